"""FlashAttention forward kernel, Pallas with the Triton lowering (Ampere and newer).

Each program owns one block of queries of one (batch, head) and walks the key blocks the
masking rules leave visible, keeping the running max `m`, the running sum `l` and the
unnormalised output in registers (FlashAttention-2, Algorithm 1). No T x S array is ever
written: the output and the logsumexp are the only results.

With dropout, each probability is kept or zeroed by a hash of its (seed, query, key) position
(dropout.py) after the softmax statistics are updated, so the normaliser counts every
probability, and the 1 / (1 - rate) scale is folded into the final normalisation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.attention import common
from pallas_kernels.launcher import launcher


@dataclasses.dataclass(frozen=True)
class ForwardBlocks:
  block_q: int = 128
  block_kv: int = 64
  num_warps: int = 4
  num_stages: int = 3


def default_forward_blocks(head_dim: int, dtype) -> ForwardBlocks:
  # Measured on H100 (bf16; benchmarks/results/attention_sweep_h100_*.log): 128 x 64 tiles
  # with 4 warps lead at d=128, causal and not; d=64 gains from a third pipeline stage.
  # float32 and d=256 tiles need half the rows to fit registers and shared memory.
  if jnp.dtype(dtype) == jnp.float32 or head_dim > 128:
    return ForwardBlocks(block_q=64, block_kv=32, num_warps=4, num_stages=2)
  if head_dim <= 64:
    return ForwardBlocks(block_q=128, block_kv=64, num_warps=4, num_stages=3)
  return ForwardBlocks(block_q=128, block_kv=64, num_warps=4, num_stages=2)


def clamp_block(block: int, length: int) -> int:
  """Shrinks a block for short sequences (never below 16, Triton's smallest dot tile)."""
  return max(16, min(block, 1 << max(length - 1, 0).bit_length()))


def _forward_kernel(
  bounds_ref,
  limits_ref,
  q_ref,
  k_ref,
  v_ref,
  bias_ref,
  mask_ref,
  q_segments_ref,
  kv_segments_ref,
  dropout_seeds_ref,
  out_ref,
  lse_ref,
  *,
  config: common.AttentionConfig,
  block_q: int,
  block_kv: int,
  num_q_blocks: int,
):
  # Query blocks are launched last-first: under causal masking the last ones have the most
  # work, and starting them first balances the tail of the grid.
  q_start = (num_q_blocks - 1 - pl.program_id(0)) * block_q
  q = q_ref[...]
  q_segments = None if q_segments_ref is None else q_segments_ref[...]
  row_max = jnp.full((block_q,), common.MASKED_LOGIT, jnp.float32)
  row_sum = jnp.zeros((block_q,), jnp.float32)
  acc = jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32)
  guard_empty_rows = config.has_bias or config.soft_cap is not None
  dropout_rows = None
  if dropout_seeds_ref is not None:
    dropout_rows = common.dropout_rows(dropout_seeds_ref[0], q_start, block_q)

  def visit(block, carry, masked):
    acc, row_max, row_sum = carry
    keys = pl.ds(block * block_kv, block_kv)
    bias_tile = None if bias_ref is None else bias_ref[:, keys]
    logits, _ = common.tile_logits(config, q, k_ref[keys, :], bias_tile)
    if masked:
      visible = common.tile_visible(
        config,
        q_start,
        block * block_kv,
        block_q,
        block_kv,
        limits_ref=limits_ref,
        q_segments=q_segments,
        kv_segments=None if kv_segments_ref is None else kv_segments_ref[keys],
        mask_tile=None if mask_ref is None else mask_ref[:, keys],
      )
      logits = jnp.where(visible, logits, common.MASKED_LOGIT)
    new_max = jnp.maximum(row_max, logits.max(axis=-1))
    # A row with nothing visible yet (max MASKED_LOGIT, or -inf from a bias) shifts by 0, so
    # its masked keys get exp2(MASKED_LOGIT) = 0 rather than exp2(0) = 1 (or NaN from -inf).
    shift = new_max
    if masked or guard_empty_rows:
      shift = jnp.where(new_max <= common.MASKED_LOGIT, 0.0, new_max)
    correction = jnp.exp2(row_max - shift)
    probs = jnp.exp2(logits - shift[:, None])
    row_sum = row_sum * correction + probs.sum(axis=-1)
    if dropout_rows is not None:
      probs = jnp.where(
        common.dropout_keep(config, dropout_rows, block * block_kv, block_kv), probs, 0.0
      )
    values = v_ref[keys, :]
    acc = acc * correction[:, None] + common.matmul(probs.astype(values.dtype), values)
    return acc, new_max, row_sum

  bounds = [bounds_ref[i] for i in range(4)]
  acc, row_max, row_sum = common.masked_loops(bounds, visit, (acc, row_max, row_sum))

  # FlashAttention-2 section 3.1.1: normalise once at the end. Rows that saw no visible key
  # get output 0 and logsumexp EMPTY_ROW_LSE, which the caller recognises (and the backward
  # treats as rows with no probability mass). Dropout's 1 / (1 - rate) joins the same division.
  empty = row_sum == 0.0
  normaliser = jnp.where(empty, 1.0, row_sum)
  if config.dropout_rate > 0.0:
    normaliser = normaliser * (1.0 - config.dropout_rate)
  out = acc / normaliser[:, None]
  out_ref[...] = out.astype(out_ref.dtype)
  lse2 = row_max + jnp.log2(jnp.where(empty, 1.0, row_sum))
  lse_ref[...] = jnp.where(empty, common.EMPTY_ROW_LSE, lse2 * common.LN_2)


@launcher(static_argnums=1)
def attention_forward(
  ops: common.AttentionOperands,
  config: common.AttentionConfig,
) -> tuple[jax.Array, jax.Array]:
  """Runs the forward kernel.

  Returns:
    out [B, T, N, Dv] in q's dtype (rows with no visible key are 0), and the natural-log
    logsumexp [B, N, T] in float32 (common.EMPTY_ROW_LSE for rows with no visible key).
  """
  batch, t, num_heads, head_dim = ops.q.shape
  s, num_kv_heads = ops.k.shape[1], ops.k.shape[2]
  dv = ops.v.shape[-1]
  group = num_heads // num_kv_heads
  common.check_dropout_operands(config, ops)
  blocks = config.forward_blocks or default_forward_blocks(head_dim, ops.q.dtype)
  block_q, block_kv = clamp_block(blocks.block_q, t), clamp_block(blocks.block_kv, s)
  padded = common.pad_operands(ops, block_q, block_kv)
  t_pad, s_pad = padded.t_pad, padded.s_pad
  num_q_blocks = t_pad // block_q
  bounds = common.loop_bounds(config, padded, block_q, block_kv)
  bounds_per_head = bounds.shape[1] > 1

  def q_block(i):
    return num_q_blocks - 1 - i

  def per_head_or_shared(array, n):
    return n if array.shape[1] > 1 else 0

  def per_batch_or_shared(array, b):
    return b if array.shape[0] > 1 else 0

  in_specs = [
    pl.BlockSpec(
      (None, None, None, 4), lambda i, b, n: (b, n if bounds_per_head else 0, q_block(i), 0)
    ),
    pl.BlockSpec((None, 2), lambda i, b, n: (b, 0)),
    pl.BlockSpec((None, block_q, None, padded.q.shape[-1]), lambda i, b, n: (b, q_block(i), n, 0)),
    pl.BlockSpec((None, s_pad, None, padded.k.shape[-1]), lambda i, b, n: (b, 0, n // group, 0)),
    pl.BlockSpec((None, s_pad, None, padded.v.shape[-1]), lambda i, b, n: (b, 0, n // group, 0)),
  ]
  for extra in (padded.bias, padded.mask):
    in_specs.append(
      None
      if extra is None
      else pl.BlockSpec(
        (None, None, block_q, s_pad),
        functools.partial(
          lambda i, b, n, arr: (
            per_batch_or_shared(arr, b),
            per_head_or_shared(arr, n),
            q_block(i),
            0,
          ),
          arr=extra,
        ),
      )
    )
  if padded.q_segments is None:
    in_specs += [None, None]
  else:
    in_specs += [
      pl.BlockSpec((None, block_q), lambda i, b, n: (b, q_block(i))),
      pl.BlockSpec((None, s_pad), lambda i, b, n: (b, 0)),
    ]
  in_specs.append(
    None
    if padded.dropout_seeds is None
    else pl.BlockSpec((None, None, 1), lambda i, b, n: (b, n, 0))
  )

  out_shape = [
    jax.ShapeDtypeStruct((batch, t_pad, num_heads, padded.v.shape[-1]), ops.q.dtype),
    jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32),
  ]
  out_specs = [
    pl.BlockSpec((None, block_q, None, padded.v.shape[-1]), lambda i, b, n: (b, q_block(i), n, 0)),
    pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, q_block(i))),
  ]
  kernel = functools.partial(
    _forward_kernel, config=config, block_q=block_q, block_kv=block_kv, num_q_blocks=num_q_blocks
  )
  out, lse = pl.pallas_call(
    kernel,
    grid=(num_q_blocks, batch, num_heads),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=pltriton.CompilerParams(
      num_warps=blocks.num_warps, num_stages=blocks.num_stages
    ),
    interpret=config.interpret,
    name="jfused_attention_fwd",
  )(
    bounds,
    padded.limits,
    padded.q,
    padded.k,
    padded.v,
    padded.bias,
    padded.mask,
    padded.q_segments,
    padded.kv_segments,
    padded.dropout_seeds,
  )
  return out[:, :t, :, :dv], lse[:, :, :t]
