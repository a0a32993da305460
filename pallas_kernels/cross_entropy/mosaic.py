"""The logits' row statistics straight from x and the weight (Pallas Mosaic GPU, Hopper).

The loss's forward needs three numbers per token: the logsumexp of its logits, its label's
logit and the sum of its logits (label smoothing's uniform term). Computed the unfused way,
the logits are a float32 [tokens, vocab] product written to memory and read back by a row
kernel (`triton.py`): at 16k tokens and a 128k vocabulary that round trip is 16 GiB of
traffic, a fifth of the forward's time on an H200. Here the logits never leave registers.

One CTA owns 128 tokens and walks the vocabulary, as the attention forward walks keys
(FlashAttention-3's layout); where too few token tiles would leave SMs idle, the vocabulary
is split among several CTAs and their statistics combined afterwards (`vocabulary_splits`):

- a producer warpgroup streams (tokens x block_k) tiles of x and (block_k x block_cols)
  tiles of the weight into a ring of shared-memory stages
  (`plgpu.emit_pipeline_warp_specialized`), over a grid of (vocabulary block, K step);
- two consumer warpgroups, 64 tokens each, accumulate their (64 x block_cols) logits over
  the K steps with wgmma; at a vocabulary block's last step each folds the block into its
  rows' running statistics (online logsumexp in base 2, the label's logit where a column
  is the label, the sum) and starts the next block from zero.

The weight is read as `[D, V]` or, for a tied `[V, D]` embedding, transposed in shared
memory on its way into wgmma: no transposed copy. Tokens are padded to whole CTAs and a
vocabulary that is not a multiple of `block_cols` has its padding columns masked; the padded
weight is the one copy this kernel may make (none for the usual power-of-two vocabularies).

The soft cap and the loss's other options are the caller's (`LossSpec` as in triton.py):
the statistics are of the capped logits; a bias is declined (the caller's XLA and Triton
paths serve it). The backward's counterpart, a chunk's d loss / d logits made in the same
kind of matmul's epilogue, is `mosaic_gradient.py`. On an H200 (2026-12-07, 16k tokens,
V = 131072) the two first ran at 85-89 % of the bare matmul's rate; with the weight's tiles
multicast to clusters of two CTAs and the statistics' vocabulary in four splits (the
defaults since, `MosaicStatisticsBlocks`) the statistics kernel is level with the bare
matmul on an H100 and the gradient kernel at 83-88 % of it. A float32 accumulator ref with
one wgmma left in flight (stages released a step late) made the statistics kernel 21-23 %
slower than this value accumulator, waited for at each step
(cross_entropy_mosaic_tiles*_h200_2026-12-07.log).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

# The attention kernels' warpgroup roles, register split, shared-memory tiles and padding.
from pallas_kernels.attention.common import LN_2, LOG2_E, pad_axis, round_up
from pallas_kernels.attention.mosaic.common import (
  NUM_CONSUMERS,
  PRODUCER_REGISTERS,
  TILED,
  num_sms,
)
from pallas_kernels.cross_entropy.triton import MASKED_LOGIT, LossSpec
from pallas_kernels.launcher import launcher

KERNEL_NAME = "jfused_cross_entropy_mosaic_statistics"
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_ROWS = 64  # Tokens per consumer warpgroup: wgmma's M.
CTA_ROWS = NUM_CONSUMERS * BLOCK_ROWS
# D must be a multiple of one 128-byte swizzled tile of 16-bit elements.
D_MULTIPLE = 64
# The running maximum before any column, in base 2: finite (jax.debug_infs must not fire),
# and exp2 of it minus any real logit is 0.
EMPTY_MAX = MASKED_LOGIT


@dataclasses.dataclass(frozen=True)
class MosaicStatisticsBlocks:
  """block_cols vocabulary columns per vocabulary block (a multiple of 64, at most 256:
  wgmma's N), block_k of D per step (64 or 128), num_stages steps' tiles of x and of the
  weight in flight. The default, 256 x 64 in three stages (144 KiB of shared memory, a
  64 x 256 float32 accumulator per consumer thread group), was the fastest of three choices
  for both kernels on an H200 (cross_entropy_mosaic_tiles_h200_2026-12-07.log; statistics at
  D2048 V131072: 15.0 ms against 19.1 at 128 x 128 x 3).

  cluster_tiles CTAs of adjacent token tiles form a cluster that shares each weight tile: at
  2, each CTA loads half of it and TMA multicasts it to both, so a CTA reads 32 KiB from L2
  a step instead of 48 (at 256 x 64), as cuBLAS's Hopper matmuls multicast one operand.

  splits (statistics kernel only): how many CTAs share one token tile's vocabulary walk;
  None picks the count that fills the SMs (`vocabulary_splits`: 1 at 16k tokens). Mosaic
  launches the splits fastest, so with 4 the CTAs in flight cover a quarter of the token
  tiles, whose x tiles (16 MiB at D=2048) stay in L2 across vocabulary blocks; with 1 every
  CTA reads its x tile from memory again for each block, all of x (64 MiB, more than L2)
  per block: four times the weight's reads for 1/500 of x's.

  On an H100 (2026-12-07, N16384 D2048 V131072, cross_entropy_mosaic_cluster_tiles_h100_*)
  the statistics kernel took 15.28 ms at 256 x 64 x 3, 14.82 with clusters, 13.24 with four
  splits and 12.70 with both, level with the bare matmul x @ W (12.72); at D4096 30.05,
  29.76, 27.38 and 26.71 (matmul 26.03). The gradient kernel, whose launch already runs the
  column blocks of a few token tiles together, moved within 2 % either way with clusters
  (0.449 against 0.457 ms at D2048, 0.893 against 0.873 at D4096). DEFAULT_BLOCKS takes
  both options."""

  block_cols: int = 256
  block_k: int = 64
  num_stages: int = 3
  cluster_tiles: int = 1
  splits: int | None = None

  def __post_init__(self):
    if self.block_cols % 64 or not 64 <= self.block_cols <= 256:
      raise ValueError(f"block_cols must be 64, 128, 192 or 256, got {self.block_cols}")
    if self.block_k not in (64, 128):
      raise ValueError(f"block_k must be 64 or 128, got {self.block_k}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages must be at least 1, got {self.num_stages}")
    if self.cluster_tiles not in (1, 2):
      raise ValueError(f"cluster_tiles must be 1 or 2, got {self.cluster_tiles}")
    if self.splits is not None and self.splits < 1:
      raise ValueError(f"splits must be None or at least 1, got {self.splits}")

  @property
  def cluster_rows(self) -> int:
    """Tokens one cluster covers: the multiple the kernels pad the tokens to."""
    return CTA_ROWS * self.cluster_tiles


def unsupported_reason(x, weight, bias) -> str | None:
  """Why these kernels cannot serve the operands (None when they can); the weight's layout
  is the caller's to validate."""
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
    return f"the Mosaic kernel serves bfloat16 and float16 x and weight, got {x.dtype}"
  if x.shape[-1] % D_MULTIPLE:
    return (
      f"the Mosaic kernel serves widths D that are multiples of {D_MULTIPLE}, got {x.shape[-1]}"
    )
  if bias is not None:
    return "the Mosaic kernel takes no bias"
  return None


# The tiles both kernels take when the caller names none (linear_cross_entropy's walk):
# weight tiles multicast to clusters of two, the statistics kernel's vocabulary in four
# splits (H100, 2026-12-07: statistics 12.70 against 15.28 ms at D2048 V131072).
DEFAULT_BLOCKS = MosaicStatisticsBlocks(cluster_tiles=2, splits=4)


def blocks_for_width(blocks: MosaicStatisticsBlocks | None, width: int):
  """The tiles asked for (default: DEFAULT_BLOCKS), with 64-wide steps along D where D is a
  multiple of 64 only."""
  blocks = blocks or DEFAULT_BLOCKS
  if width % blocks.block_k:
    blocks = dataclasses.replace(blocks, block_k=D_MULTIPLE)
  return blocks


def weight_spec(weight_layout: str, blocks: MosaicStatisticsBlocks, column_block):
  """The pipeline's spec of the weight's (block_k x block_cols) tiles, in its own layout;
  `column_block(*indices) -> (k step, vocabulary block)` from the pipeline's indices."""
  block_k, block_cols = blocks.block_k, blocks.block_cols
  # Every CTA of a cluster walks the same weight tiles: one multicast copy serves them all.
  collective = ("cluster",) if blocks.cluster_tiles > 1 else None
  if weight_layout == "dv":
    return plgpu.BlockSpec(
      (block_k, block_cols), column_block, transforms=TILED, collective_axes=collective
    )
  return plgpu.BlockSpec(
    (block_cols, block_k),
    lambda *indices: column_block(*indices)[::-1],
    transforms=TILED,
    collective_axes=collective,
  )


def token_tile(blocks: MosaicStatisticsBlocks):
  """This CTA's tile of CTA_ROWS tokens: the grid's "tiles" index counts clusters."""
  if blocks.cluster_tiles == 1:
    return lax.axis_index("tiles")
  return lax.axis_index("tiles") * blocks.cluster_tiles + lax.axis_index("cluster")


def launch_grid(blocks: MosaicStatisticsBlocks, tiles: int, other: tuple[int, str]) -> dict:
  """plgpu.kernel's grid arguments: `tiles` token tiles (whole clusters of cluster_tiles,
  as the callers pad tokens to `cluster_rows`) by the `other` (size, name) axis."""
  grid = dict(grid=(tiles // blocks.cluster_tiles, other[0]), grid_names=("tiles", other[1]))
  if blocks.cluster_tiles > 1:
    grid.update(cluster=(blocks.cluster_tiles,), cluster_names=("cluster",))
  return grid


def tile_product(acc, x_smem, w_smem, wg, weight_layout: str):
  """acc + warpgroup `wg`'s 64 rows of the x tile @ the weight tile (a [V, D] weight's tile
  transposed in shared memory on its way into wgmma)."""
  w_tile = w_smem if weight_layout == "dv" else w_smem.transpose((1, 0))

  def product(acc_ref):
    plgpu.wgmma(acc_ref, x_smem.at[pl.ds(wg * BLOCK_ROWS, BLOCK_ROWS)], w_tile)

  return pl.run_state(product)(plgpu.ACC.init(acc))


def product_pipeline(step, compute, *, grid, w_spec, blocks: MosaicStatisticsBlocks, steps: int):
  """The producer warpgroup's stream of x's (CTA_ROWS x block_k) tiles and the weight's into
  `num_stages` stages (no more than the `steps` the pipeline takes), for the consumers'
  `step` under `compute` (emit_pipeline_warp_specialized's body and compute_context); the
  grid's last index is the step along D."""
  x_spec = plgpu.BlockSpec(
    (CTA_ROWS, blocks.block_k), lambda *indices: (0, indices[-1]), transforms=TILED
  )
  return plgpu.emit_pipeline_warp_specialized(
    step,
    grid=grid,
    memory_registers=PRODUCER_REGISTERS,
    in_specs=[x_spec, w_spec],
    max_concurrent_steps=min(blocks.num_stages, steps),
    wg_axis="wg",
    num_compute_wgs=NUM_CONSUMERS,
    compute_context=compute,
  )


@dataclasses.dataclass(frozen=True)
class _Dims:
  vocab: int  # Real columns; the weight may be padded past them.
  split_blocks: int  # Vocabulary blocks per CTA: all of them, or one split's.
  k_steps: int
  weight_layout: str
  spec: LossSpec
  blocks: MosaicStatisticsBlocks


def _block_statistics(dims: _Dims, logits, labels, col_block):
  """(max, sum of exp2 relative to it, label logit, logit sum) of one (64 x block_cols)
  block of raw float32 logits, in base 2 for the first two; padded columns do not count."""
  block_cols = dims.blocks.block_cols
  if dims.spec.soft_cap is not None:
    cap = dims.spec.soft_cap
    logits = cap * jnp.tanh(logits * (1.0 / cap))
  columns = col_block * block_cols + plgpu.broadcasted_iota(
    jnp.int32, logits.shape, 1, layout=plgpu.Layout.WGMMA
  )
  if dims.vocab % block_cols:  # Padding columns: 0 in the sums, nothing in the logsumexp.
    real = columns < dims.vocab
    logits = jnp.where(real, logits, 0.0)
    logits2 = jnp.where(real, logits * LOG2_E, MASKED_LOGIT)
  else:
    logits2 = logits * LOG2_E
  is_label = columns == lax.broadcast_in_dim(labels, logits.shape, [0])
  label_logit = jnp.sum(jnp.where(is_label, logits, 0.0), axis=1)
  block_max = jnp.max(logits2, axis=1)
  block_sum = jnp.sum(jnp.exp2(logits2 - lax.broadcast_in_dim(block_max, logits.shape, [0])), 1)
  return block_max, block_sum, label_logit, jnp.sum(logits, axis=1)


def _merge(state, block):
  """Running statistics with one more block folded in (the online logsumexp)."""
  row_max, row_sum, label_logit, logit_sum = state
  block_max, block_sum, block_label, block_logit_sum = block
  new_max = jnp.maximum(row_max, block_max)
  row_sum = row_sum * jnp.exp2(row_max - new_max) + block_sum * jnp.exp2(block_max - new_max)
  return new_max, row_sum, label_logit + block_label, logit_sum + block_logit_sum


def _kernel(x_gmem, w_gmem, labels_gmem, lse_gmem, label_gmem, sum_gmem, stats_smem, *, dims):
  tile = token_tile(dims.blocks)
  first_block = lax.axis_index("splits") * dims.split_blocks
  wg = lax.axis_index("wg")
  block_cols = dims.blocks.block_cols
  tile_shape = (BLOCK_ROWS, block_cols)
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def compute(eval_pipeline):
    rows = pl.ds(tile * CTA_ROWS + wg * BLOCK_ROWS, BLOCK_ROWS)
    labels = plgpu.load(labels_gmem.at[rows], layout=row_layout, optimized=False)
    zeros = plgpu.layout_cast(jnp.zeros(tile_shape, jnp.float32), plgpu.Layout.WGMMA)
    vector_zeros = plgpu.layout_cast(jnp.zeros((BLOCK_ROWS,), jnp.float32), row_layout)
    empty_max = plgpu.layout_cast(jnp.full((BLOCK_ROWS,), EMPTY_MAX, jnp.float32), row_layout)
    state = (empty_max, vector_zeros, vector_zeros, vector_zeros)
    _, (row_max, row_sum, label_logit, logit_sum), _ = eval_pipeline((zeros, state, labels))
    lse = (row_max + jnp.log2(row_sum)) * LN_2
    for i, value in enumerate((lse, label_logit, logit_sum)):
      stats_smem[wg, i] = value
    plgpu.commit_smem()
    for i, out in enumerate((lse_gmem, label_gmem, sum_gmem)):
      plgpu.copy_smem_to_gmem(stats_smem.at[wg, i], out.at[lax.axis_index("splits"), rows])
    plgpu.wait_smem_to_gmem(0)

  def step(indices, x_smem, w_smem, carry):
    col_block, k = indices
    acc, state, labels = carry
    acc = tile_product(acc, x_smem, w_smem, wg, dims.weight_layout)

    def fold(acc, state):
      block = _block_statistics(dims, acc, labels, first_block + col_block)
      return jnp.zeros_like(acc), _merge(state, block)

    acc, state = lax.cond(k == dims.k_steps - 1, fold, lambda acc, state: (acc, state), acc, state)
    return acc, state, labels

  w_spec = weight_spec(dims.weight_layout, dims.blocks, lambda n, k: (k, first_block + n))
  grid = (dims.split_blocks, dims.k_steps)
  steps = dims.split_blocks * dims.k_steps
  pipeline = product_pipeline(
    step, compute, grid=grid, w_spec=w_spec, blocks=dims.blocks, steps=steps
  )
  pipeline(x_gmem.at[pl.ds(tile * CTA_ROWS, CTA_ROWS)], w_gmem)


@launcher(static_argnames=("weight_layout", "spec", "blocks"))
def logits_statistics(x, weight, labels, *, weight_layout: str, spec: LossSpec, blocks=None):
  """Per token of x [N, D]: (lse, label logit, logit sum), float32 [N] each, of the
  (soft-capped) logits x @ weight over the whole vocabulary; `weight` is [D, V] ("dv") or
  [V, D] ("vd"); labels int32 [N] (values outside [0, V) match no column)."""
  tokens, width = x.shape
  blocks = blocks_for_width(blocks, width)
  v_axis = 1 if weight_layout == "dv" else 0
  vocab = weight.shape[v_axis]
  padded_tokens = round_up(tokens, blocks.cluster_rows)
  padded_vocab = round_up(vocab, blocks.block_cols)
  x = pad_axis(x, 0, padded_tokens)
  labels = pad_axis(labels, 0, padded_tokens, value=-1)
  weight = pad_axis(weight, v_axis, padded_vocab)
  tiles, col_blocks = padded_tokens // CTA_ROWS, padded_vocab // blocks.block_cols
  splits = vocabulary_splits(tiles, col_blocks, num_sms(), asked=blocks.splits)
  dims = _Dims(
    vocab=vocab,
    split_blocks=col_blocks // splits,
    k_steps=width // blocks.block_k,
    weight_layout=weight_layout,
    spec=spec,
    blocks=blocks,
  )
  row_type = jax.ShapeDtypeStruct((splits, padded_tokens), jnp.float32)
  lse, label_logit, logit_sum = plgpu.kernel(
    functools.partial(_kernel, dims=dims),
    out_type=[row_type, row_type, row_type],
    scratch_types=[plgpu.SMEM((NUM_CONSUMERS, 3, BLOCK_ROWS), jnp.float32)],
    **launch_grid(blocks, tiles, (splits, "splits")),
    num_threads=NUM_CONSUMERS + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    kernel_name=KERNEL_NAME,
  )(x, weight, labels.astype(jnp.int32))
  # Each split's statistics are over its own columns (each holds at least one real one).
  lse = jax.nn.logsumexp(lse[:, :tokens], axis=0)
  return lse, jnp.sum(label_logit[:, :tokens], axis=0), jnp.sum(logit_sum[:, :tokens], axis=0)


def vocabulary_splits(tiles: int, col_blocks: int, sms: int, asked: int | None = None) -> int:
  """How many CTAs share one token tile's vocabulary. Splits walk equal numbers of blocks
  (the count divides col_blocks). With `asked` (MosaicStatisticsBlocks.splits) the most such
  splits up to it; otherwise the time is about ceil(tiles * splits / sms) waves of 1 / splits
  of the walk each, and the count taken is the one that minimises it, the fewest on a tie,
  up to twice what fills the SMs once (more only adds CTAs)."""
  most = asked or 2 * -(-sms // tiles)
  candidates = [d for d in range(1, min(col_blocks, most) + 1) if col_blocks % d == 0]
  if asked:
    return max(candidates)
  return min(candidates, key=lambda d: (-(-tiles * d // sms) / d, d))
