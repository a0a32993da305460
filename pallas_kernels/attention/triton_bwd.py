"""FlashAttention backward kernels, Pallas with the Triton lowering.

Two kernels, each the sole writer of what it produces, so the gradients are bitwise
deterministic without atomics (FlashAttention-2, Algorithm 2, split in two):

- dK/dV: a program owns one key block of one (batch, kv head) and walks the query blocks of
  every query head in its group, so grouped-query heads are reduced inside the kernel.
- dQ: a program owns one query block of one (batch, head) and walks the key blocks; it also
  writes the bias gradient, which is per query head.

Both recompute the probabilities from the saved logsumexp: P = exp2(S2 - lse2).
With D = rowsum(dO * O), dS = P * (dO V^T - D) is the gradient of the (capped) logits.

Dropout regenerates the forward's keep mask from the same hash (dropout.py). With
Z = keep / (1 - rate): O = (P * Z) V, so dV = (P * Z)^T dO and dP = (dO V^T) * Z, while
dS = P * (dP - D) keeps D = rowsum(dO * O) (FlashAttention, Algorithm 4). The 1 / (1 - rate)
is folded into the (lse2, D) rows (common.backward_row_statistics).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.attention import common
from pallas_kernels.attention.triton_fwd import clamp_block
from pallas_kernels.launcher import launcher


@dataclasses.dataclass(frozen=True)
class BackwardBlocks:
  # dK/dV kernel: a key block is held, query blocks stream past it.
  dkv_block_q: int = 64
  dkv_block_kv: int = 64
  # dQ kernel: a query block is held, key blocks stream past it.
  dq_block_q: int = 64
  dq_block_kv: int = 64
  dkv_num_warps: int = 4
  dkv_num_stages: int = 2
  dq_num_warps: int = 4
  dq_num_stages: int = 2


def default_backward_blocks(head_dim: int, dtype) -> BackwardBlocks:
  # Measured on H100 (bf16; benchmarks/results/attention_sweep_h100_*.log): 64 x 64 tiles
  # with 4 warps beat larger tiles, which spill the two float32 accumulators of the dK/dV
  # kernel. At d=256 the dK/dV kernel takes 64 query rows per step against 32 keys.
  if jnp.dtype(dtype) == jnp.float32:
    return BackwardBlocks(32, 32, 32, 32)
  if head_dim > 128:
    return BackwardBlocks(dkv_block_q=64, dkv_block_kv=32, dq_block_q=32, dq_block_kv=32)
  if head_dim <= 64:
    return BackwardBlocks(dkv_num_stages=3)
  return BackwardBlocks()


def _tile_probs_and_dlogits(config, q, k, v, do, lse2, delta, bias_tile, visible, keep):
  """Recomputes P for one tile and returns (P, dZ): dZ is the gradient of scale*QK^T + bias.

  With dropout (`keep` not None) the first result is P with the dropped entries zeroed; lse2
  and delta come with 1 / (1 - rate) folded in (common.backward_row_statistics).
  """
  logits, capped_tanh = common.tile_logits(config, q, k, bias_tile)
  if visible is not None:
    logits = jnp.where(visible, logits, common.MASKED_LOGIT)
  probs = jnp.exp2(logits - lse2[:, None])
  dprobs = common.matmul(do, v, contract_b=1)
  if keep is not None:
    dprobs = jnp.where(keep, dprobs, 0.0)
  dlogits = probs * (dprobs - delta[:, None])
  if capped_tanh is not None:
    dlogits = dlogits * (1.0 - capped_tanh * capped_tanh)
  if keep is not None:
    probs = jnp.where(keep, probs, 0.0)
  return probs, dlogits


def _dkv_kernel(
  bounds_ref,
  limits_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse2_ref,
  delta_ref,
  bias_ref,
  mask_ref,
  q_segments_ref,
  kv_segments_ref,
  dropout_seeds_ref,
  dk_ref,
  dv_ref,
  *,
  config: common.AttentionConfig,
  block_q: int,
  block_kv: int,
  group: int,
):
  k_start = pl.program_id(0) * block_kv
  k = k_ref[...]
  v = v_ref[...]
  kv_segments = None if kv_segments_ref is None else kv_segments_ref[...]

  def head_rows(ref, g, queries):
    """Rows `queries` of query head g of a bias or mask block shared by all heads or not."""
    return None if ref is None else ref[g if ref.shape[0] > 1 else 0, queries, :]

  def visit_head(g, carry):
    seed = None if dropout_seeds_ref is None else dropout_seeds_ref[g, 0]

    def visit(block, carry, masked):
      dk, dv = carry
      queries = pl.ds(block * block_q, block_q)
      q = q_ref[queries, g, :]
      do = do_ref[queries, g, :]
      visible = None
      if masked:
        visible = common.tile_visible(
          config,
          block * block_q,
          k_start,
          block_q,
          block_kv,
          limits_ref=limits_ref,
          q_segments=None if q_segments_ref is None else q_segments_ref[queries],
          kv_segments=kv_segments,
          mask_tile=head_rows(mask_ref, g, queries),
        )
      keep = None
      if seed is not None:
        keep = common.dropout_keep(
          config, common.dropout_rows(seed, block * block_q, block_q), k_start, block_kv
        )
      probs, dlogits = _tile_probs_and_dlogits(
        config,
        q,
        k,
        v,
        do,
        lse2_ref[g, queries],
        delta_ref[g, queries],
        head_rows(bias_ref, g, queries),
        visible,
        keep,
      )
      dv = dv + common.matmul(probs.astype(do.dtype), do, contract_a=0)
      dk = dk + common.matmul(dlogits.astype(q.dtype), q, contract_a=0)
      return dk, dv

    bounds_row = g if bounds_ref.shape[0] > 1 else 0
    bounds = [bounds_ref[bounds_row, i] for i in range(4)]
    return common.masked_loops(bounds, visit, carry)

  dk = jnp.zeros(k.shape, jnp.float32)
  dv = jnp.zeros(v.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, visit_head, (dk, dv))
  dk_ref[...] = (dk * config.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
  bounds_ref,
  limits_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse2_ref,
  delta_ref,
  bias_ref,
  mask_ref,
  q_segments_ref,
  kv_segments_ref,
  dropout_seeds_ref,
  dq_ref,
  *dbias_refs,
  config: common.AttentionConfig,
  block_q: int,
  block_kv: int,
):
  dbias_ref = dbias_refs[0] if dbias_refs else None
  q_start = pl.program_id(0) * block_q
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse2_ref[...]
  delta = delta_ref[...]
  q_segments = None if q_segments_ref is None else q_segments_ref[...]
  dropout_rows = None
  if dropout_seeds_ref is not None:
    dropout_rows = common.dropout_rows(dropout_seeds_ref[0], q_start, block_q)

  def visit(block, dq, masked):
    keys = pl.ds(block * block_kv, block_kv)
    visible = None
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
    k = k_ref[keys, :]
    keep = None
    if dropout_rows is not None:
      keep = common.dropout_keep(config, dropout_rows, block * block_kv, block_kv)
    _, dlogits = _tile_probs_and_dlogits(
      config,
      q,
      k,
      v_ref[keys, :],
      do,
      lse2,
      delta,
      None if bias_ref is None else bias_ref[:, keys],
      visible,
      keep,
    )
    if dbias_ref is not None:
      dbias_ref[:, keys] = dlogits.astype(dbias_ref.dtype)
    return dq + common.matmul(dlogits.astype(k.dtype), k)

  start, full_start, full_end, end = [bounds_ref[i] for i in range(4)]
  dq = common.masked_loops(
    (start, full_start, full_end, end), visit, jnp.zeros(q.shape, jnp.float32)
  )
  dq_ref[...] = (dq * config.scale).astype(dq_ref.dtype)
  if dbias_ref is not None:
    # Skipped tiles have no probability mass, so their bias gradient is zero.
    def write_zeros(block, _):
      dbias_ref[:, pl.ds(block * block_kv, block_kv)] = jnp.zeros(
        (block_q, block_kv), dbias_ref.dtype
      )
      return _

    lax.fori_loop(0, start, write_zeros, 0)
    lax.fori_loop(end, dbias_ref.shape[1] // block_kv, write_zeros, 0)


@launcher(static_argnums=1)
def attention_backward(
  ops: common.AttentionOperands,
  config: common.AttentionConfig,
  out: jax.Array,
  lse: jax.Array,
  dout: jax.Array,
):
  """Gradients of the forward kernel's output.

  Args:
    ops, config: as given to the forward kernel.
    out: the forward output [B, T, N, Dv].
    lse: the forward logsumexp [B, N, T] (natural log, common.EMPTY_ROW_LSE for empty rows).
    dout: cotangent of out.

  Returns:
    (dq, dk, dv, dbias); dbias is [Bb?, N, T, S] per query head, or None without a bias
    (the caller sums it down to the bias' broadcast shape).
  """
  batch, t, num_heads, head_dim = ops.q.shape
  s, num_kv_heads = ops.k.shape[1], ops.k.shape[2]
  group = num_heads // num_kv_heads
  common.check_dropout_operands(config, ops)
  blocks = config.backward_blocks or default_backward_blocks(head_dim, ops.q.dtype)
  dkv_bq, dkv_bk = clamp_block(blocks.dkv_block_q, t), clamp_block(blocks.dkv_block_kv, s)
  dq_bq, dq_bk = clamp_block(blocks.dq_block_q, t), clamp_block(blocks.dq_block_kv, s)
  padded = common.pad_operands(ops, max(dkv_bq, dq_bq), max(dkv_bk, dq_bk))
  t_pad, s_pad = padded.t_pad, padded.s_pad
  d_pad, dv_pad = padded.q.shape[-1], padded.v.shape[-1]

  lse2, delta = common.backward_row_statistics(out, dout, lse, t_pad, config.dropout_rate)
  dout = common.pad_axis(common.pad_axis(dout, 1, t_pad), 3, dv_pad)
  operands = (
    padded.limits,
    padded.q,
    padded.k,
    padded.v,
    dout,
    lse2,
    delta,
    padded.bias,
    padded.mask,
    padded.q_segments,
    padded.kv_segments,
    padded.dropout_seeds,
  )

  def shared(array, index, axis):
    return index if array.shape[axis] > 1 else 0

  # dK/dV: grid over (key block, batch, kv head); the group's query heads stream through.
  bounds = common.loop_bounds(config, padded, dkv_bq, dkv_bk, over_queries=True)
  heads_of = lambda arr: group if arr.shape[1] > 1 else 1
  head_block = lambda arr, h: h if arr.shape[1] > 1 else 0
  specs = [
    pl.BlockSpec(
      (None, heads_of(bounds), None, 4), lambda j, b, h: (b, head_block(bounds, h), j, 0)
    ),
    pl.BlockSpec((None, 2), lambda j, b, h: (b, 0)),
    pl.BlockSpec((None, t_pad, group, d_pad), lambda j, b, h: (b, 0, h, 0)),
    pl.BlockSpec((None, dkv_bk, None, d_pad), lambda j, b, h: (b, j, h, 0)),
    pl.BlockSpec((None, dkv_bk, None, dv_pad), lambda j, b, h: (b, j, h, 0)),
    pl.BlockSpec((None, t_pad, group, dv_pad), lambda j, b, h: (b, 0, h, 0)),
    pl.BlockSpec((None, group, t_pad), lambda j, b, h: (b, h, 0)),
    pl.BlockSpec((None, group, t_pad), lambda j, b, h: (b, h, 0)),
  ]
  for extra in (padded.bias, padded.mask):
    specs.append(
      None
      if extra is None
      else pl.BlockSpec(
        (None, heads_of(extra), t_pad, dkv_bk),
        functools.partial(
          lambda j, b, h, arr: (shared(arr, b, 0), head_block(arr, h), 0, j), arr=extra
        ),
      )
    )
  if padded.q_segments is None:
    specs += [None, None]
  else:
    specs += [
      pl.BlockSpec((None, t_pad), lambda j, b, h: (b, 0)),
      pl.BlockSpec((None, dkv_bk), lambda j, b, h: (b, j)),
    ]
  # The seeds of the group's query heads, [group, 1].
  specs.append(
    None
    if padded.dropout_seeds is None
    else pl.BlockSpec((None, group, 1), lambda j, b, h: (b, h, 0))
  )
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, config=config, block_q=dkv_bq, block_kv=dkv_bk, group=group),
    grid=(s_pad // dkv_bk, batch, num_kv_heads),
    in_specs=specs,
    out_specs=[
      pl.BlockSpec((None, dkv_bk, None, d_pad), lambda j, b, h: (b, j, h, 0)),
      pl.BlockSpec((None, dkv_bk, None, dv_pad), lambda j, b, h: (b, j, h, 0)),
    ],
    out_shape=[
      jax.ShapeDtypeStruct(padded.k.shape, ops.k.dtype),
      jax.ShapeDtypeStruct(padded.v.shape, ops.v.dtype),
    ],
    compiler_params=pltriton.CompilerParams(
      num_warps=blocks.dkv_num_warps, num_stages=blocks.dkv_num_stages
    ),
    interpret=config.interpret,
    name="jfused_attention_bwd_dkv",
  )(bounds, *operands)

  # dQ (and dBias): grid over (query block, batch, head).
  bounds = common.loop_bounds(config, padded, dq_bq, dq_bk)
  specs = [
    pl.BlockSpec((None, None, None, 4), lambda i, b, n: (b, shared(bounds, n, 1), i, 0)),
    pl.BlockSpec((None, 2), lambda i, b, n: (b, 0)),
    pl.BlockSpec((None, dq_bq, None, d_pad), lambda i, b, n: (b, i, n, 0)),
    pl.BlockSpec((None, s_pad, None, d_pad), lambda i, b, n: (b, 0, n // group, 0)),
    pl.BlockSpec((None, s_pad, None, dv_pad), lambda i, b, n: (b, 0, n // group, 0)),
    pl.BlockSpec((None, dq_bq, None, dv_pad), lambda i, b, n: (b, i, n, 0)),
    pl.BlockSpec((None, None, dq_bq), lambda i, b, n: (b, n, i)),
    pl.BlockSpec((None, None, dq_bq), lambda i, b, n: (b, n, i)),
  ]
  for extra in (padded.bias, padded.mask):
    specs.append(
      None
      if extra is None
      else pl.BlockSpec(
        (None, None, dq_bq, s_pad),
        functools.partial(
          lambda i, b, n, arr: (shared(arr, b, 0), shared(arr, n, 1), i, 0), arr=extra
        ),
      )
    )
  if padded.q_segments is None:
    specs += [None, None]
  else:
    specs += [
      pl.BlockSpec((None, dq_bq), lambda i, b, n: (b, i)),
      pl.BlockSpec((None, s_pad), lambda i, b, n: (b, 0)),
    ]
  specs.append(
    None
    if padded.dropout_seeds is None
    else pl.BlockSpec((None, None, 1), lambda i, b, n: (b, n, 0))
  )
  out_specs = [pl.BlockSpec((None, dq_bq, None, d_pad), lambda i, b, n: (b, i, n, 0))]
  out_shape = [jax.ShapeDtypeStruct(padded.q.shape, ops.q.dtype)]
  if padded.bias is not None:
    # One gradient per query head and batch entry; broadcast dims are summed by the caller.
    out_specs.append(pl.BlockSpec((None, None, dq_bq, s_pad), lambda i, b, n: (b, n, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((batch, num_heads, t_pad, s_pad), ops.bias.dtype))
  results = pl.pallas_call(
    functools.partial(_dq_kernel, config=config, block_q=dq_bq, block_kv=dq_bk),
    grid=(t_pad // dq_bq, batch, num_heads),
    in_specs=specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=pltriton.CompilerParams(
      num_warps=blocks.dq_num_warps, num_stages=blocks.dq_num_stages
    ),
    interpret=config.interpret,
    name="jfused_attention_bwd_dq",
  )(bounds, *operands)
  dq = results[0]
  dbias = results[1][:, :, :t, :s] if padded.bias is not None else None
  return (dq[:, :t, :, :head_dim], dk[:, :s, :, :head_dim], dv[:, :s, :, : ops.v.shape[-1]], dbias)
