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

from pallas_kernels.attention.common import LOG2_E, pad_axis, round_up
from pallas_kernels.attention.mosaic.common import NUM_CONSUMERS, TILED
from pallas_kernels.cross_entropy.mosaic import (
  BLOCK_ROWS,
  CTA_ROWS,
  MosaicStatisticsBlocks,
  blocks_for_width,
  launch_grid,
  product_pipeline,
  tile_product,
  token_tile,
  weight_spec,
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
  tile = token_tile(dims.blocks)
  col_block = lax.axis_index("col_blocks")
  wg = lax.axis_index("wg")
  block_cols = dims.blocks.block_cols
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
    return tile_product(acc, x_smem, w_smem, wg, dims.weight_layout)

  w_spec = weight_spec(dims.weight_layout, dims.blocks, lambda k: (k, 0))
  w_block = w_gmem.at[:, cols] if dims.weight_layout == "dv" else w_gmem.at[cols]
  pipeline = product_pipeline(
    step, compute, grid=(dims.k_steps,), w_spec=w_spec, blocks=dims.blocks, steps=dims.k_steps
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
  tokens, width = x.shape
  blocks = blocks_for_width(blocks, width)
  v_axis = 1 if weight_layout == "dv" else 0
  columns = weight_chunk.shape[v_axis]
  padded_tokens = round_up(tokens, blocks.cluster_rows)
  padded_columns = round_up(columns, blocks.block_cols)
  x, lse, row_scale = (pad_axis(a, 0, padded_tokens) for a in (x, lse, row_scale))
  labels = pad_axis(labels, 0, padded_tokens, value=-1)
  # Padded only for a walk's last, narrower chunk.
  weight_chunk = pad_axis(weight_chunk, v_axis, padded_columns)
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
    # Mosaic GPU launches the last axis fastest: the CTAs in flight together are every
    # column block of a few token tiles, sharing those x tiles, and the chunk's weight
    # columns stay in L2 for the whole launch.
    **launch_grid(
      blocks, padded_tokens // CTA_ROWS, (padded_columns // blocks.block_cols, "col_blocks")
    ),
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
