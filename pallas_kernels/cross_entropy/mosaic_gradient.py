"""d loss / d logits of one vocabulary chunk straight from x and the weight's columns (Pallas
Mosaic GPU, Hopper): the backward half of the vocabulary walk.

The walk's backward computes each chunk's logits again, turns them into d loss / d logits
with the forward's logsumexp, and multiplies that into dx and dweight. Unfused, the logits are
a float32 [tokens, chunk] product written to memory, read by the row kernel (`triton.py`),
which writes the gradient: here the product's epilogue makes the gradient in registers and
writes only it, in the inputs' dtype (a third of the traffic).

Each CTA owns one (128 tokens x block_cols columns) tile: a producer warpgroup streams x's
and the weight's (block_k wide) slices of D through shared-memory stages, two consumer
warpgroups (64 tokens each) accumulate the tile's logits with wgmma and then, per element,
with z the (soft-capped) logit, p = exp(z - lse), y the label, eps the smoothing, c the
z-loss coefficient and V the whole vocabulary:

  g = row_scale * (p * (1 + 2 c lse) - (1 - eps) * onehot(y) - eps / V)

times 1 - (z / cap)^2 under a soft cap (the rule of `triton.py` and `reference.rows_gradient`).
Padding columns and tokens are written as 0 and cut off by the launcher.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.cross_entropy.mosaic import (
  BLOCK_ROWS,
  CTA_ROWS,
  D_MULTIPLE,
  LOG2_E,
  NUM_CONSUMERS,
  TILED,
  MosaicStatisticsBlocks,
  round_up,
)
from pallas_kernels.cross_entropy.triton import LossSpec
from pallas_kernels.launcher import launcher

KERNEL_NAME = "jfused_cross_entropy_mosaic_gradient"


@dataclasses.dataclass(frozen=True)
class _Dims:
  columns: int  # Real columns of the chunk; the weight chunk may be padded past them.
  k_steps: int
  weight_layout: str
  spec: LossSpec
  blocks: MosaicStatisticsBlocks


def _tile_gradient(dims: _Dims, logits, rows, col_start):
  """The gradient of one (64 x block_cols) tile of raw float32 logits, float32; `rows`:
  the tile's (labels, lse, row_scale) vectors."""
  labels, lse, row_scale = rows
  spec = dims.spec
  z = logits
  if spec.soft_cap is not None:
    z = spec.soft_cap * jnp.tanh(logits * (1.0 / spec.soft_cap))
  shape = logits.shape

  def along_rows(vector):
    return lax.broadcast_in_dim(vector, shape, [0])

  columns = col_start + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  p = jnp.exp2(z * LOG2_E - along_rows(lse * LOG2_E))
  gradient = p * along_rows((1.0 + 2.0 * spec.z_loss * lse) * row_scale)
  if spec.label_smoothing:
    gradient = gradient - along_rows(
      spec.label_smoothing / (spec.vocab_size or dims.columns) * row_scale
    )
  label_weight = along_rows((1.0 - spec.label_smoothing) * row_scale)
  gradient = gradient - jnp.where(columns == along_rows(labels), label_weight, 0.0)
  if spec.soft_cap is not None:
    gradient = gradient * (1.0 - (z * (1.0 / spec.soft_cap)) ** 2)
  if dims.columns % dims.blocks.block_cols:
    gradient = jnp.where(columns < dims.columns, gradient, 0.0)
  return gradient


def _kernel(x_gmem, w_gmem, labels_gmem, lse_gmem, scale_gmem, out_gmem, out_smem, *, dims):
  tile = lax.axis_index("tiles")
  col_block = lax.axis_index("col_blocks")
  wg = lax.axis_index("wg")
  block_cols, block_k = dims.blocks.block_cols, dims.blocks.block_k
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  cols = pl.ds(col_block * block_cols, block_cols)

  def compute(eval_pipeline):
    rows = pl.ds(tile * CTA_ROWS + wg * BLOCK_ROWS, BLOCK_ROWS)
    vectors = tuple(
      plgpu.load(ref.at[rows], layout=row_layout, optimized=False)
      for ref in (labels_gmem, lse_gmem, scale_gmem)
    )
    zeros = plgpu.layout_cast(jnp.zeros((BLOCK_ROWS, block_cols), jnp.float32), plgpu.Layout.WGMMA)
    logits = eval_pipeline(zeros)
    gradient = _tile_gradient(dims, logits, vectors, col_block * block_cols)
    out_smem[wg] = gradient.astype(out_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[rows, cols])
    plgpu.wait_smem_to_gmem(0)

  def step(indices, x_smem, w_smem, acc):
    del indices
    w_tile = w_smem if dims.weight_layout == "dv" else w_smem.transpose((1, 0))

    def product(acc_ref):
      plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * BLOCK_ROWS, BLOCK_ROWS)], w_tile)

    return pl.run_state(product)(plgpu.ACC.init(acc))

  if dims.weight_layout == "dv":
    w_spec = plgpu.BlockSpec((block_k, block_cols), lambda k: (k, 0), transforms=TILED)
    w_block = w_gmem.at[:, cols]
  else:
    w_spec = plgpu.BlockSpec((block_cols, block_k), lambda k: (0, k), transforms=TILED)
    w_block = w_gmem.at[cols]
  x_spec = plgpu.BlockSpec((CTA_ROWS, block_k), lambda k: (0, k), transforms=TILED)
  pipeline = plgpu.emit_pipeline_warp_specialized(
    step,
    grid=(dims.k_steps,),
    memory_registers=40,
    in_specs=[x_spec, w_spec],
    max_concurrent_steps=min(dims.blocks.num_stages, dims.k_steps),
    wg_axis="wg",
    num_compute_wgs=NUM_CONSUMERS,
    compute_context=compute,
  )
  pipeline(x_gmem.at[pl.ds(tile * CTA_ROWS, CTA_ROWS)], w_block)


@launcher(static_argnames=("weight_layout", "spec", "grad_dtype", "blocks"))
def logits_gradient(
  x, weight_chunk, labels, lse, row_scale, *, weight_layout, spec, grad_dtype, blocks=None
):
  """d loss / d logits [N, C] in `grad_dtype` of x [N, D] against a chunk of C vocabulary
  columns, `weight_chunk` [D, C] ("dv") or [C, D] ("vd"); labels int32 [N] relative to the
  chunk's first column (others match no column), lse and row_scale float32 [N];
  `spec.vocab_size` is the whole vocabulary (label smoothing's uniform target)."""
  blocks = blocks or MosaicStatisticsBlocks()
  tokens, width = x.shape
  if width % blocks.block_k:  # D a multiple of 64 only: 64-wide steps.
    blocks = dataclasses.replace(blocks, block_k=D_MULTIPLE)
  v_axis = 1 if weight_layout == "dv" else 0
  columns = weight_chunk.shape[v_axis]
  padded_tokens = round_up(tokens, CTA_ROWS)
  padded_columns = round_up(columns, blocks.block_cols)
  if padded_tokens != tokens:
    extra = padded_tokens - tokens
    x = jnp.pad(x, ((0, extra), (0, 0)))
    labels = jnp.pad(labels, (0, extra), constant_values=-1)
    lse, row_scale = jnp.pad(lse, (0, extra)), jnp.pad(row_scale, (0, extra))
  if padded_columns != columns:  # Only a walk's last, narrower chunk.
    pad = [(0, 0), (0, 0)]
    pad[v_axis] = (0, padded_columns - columns)
    weight_chunk = jnp.pad(weight_chunk, pad)
  dims = _Dims(
    columns=columns,
    k_steps=width // blocks.block_k,
    weight_layout=weight_layout,
    spec=spec,
    blocks=blocks,
  )
  gradient = plgpu.kernel(
    functools.partial(_kernel, dims=dims),
    out_type=jax.ShapeDtypeStruct((padded_tokens, padded_columns), grad_dtype),
    scratch_types=[
      plgpu.SMEM((NUM_CONSUMERS, BLOCK_ROWS, blocks.block_cols), grad_dtype, transforms=TILED)
    ],
    # Token tiles vary fastest: CTAs in flight together read the same weight columns.
    grid=(padded_tokens // CTA_ROWS, padded_columns // blocks.block_cols),
    grid_names=("tiles", "col_blocks"),
    num_threads=NUM_CONSUMERS + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    kernel_name=KERNEL_NAME,
  )(
    x,
    weight_chunk,
    labels.astype(jnp.int32),
    lse.astype(jnp.float32),
    row_scale.astype(jnp.float32),
  )
  return gradient[:tokens, :columns]
