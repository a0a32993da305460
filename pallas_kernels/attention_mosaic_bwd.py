"""FlashAttention backward kernels in Pallas Mosaic GPU, for Hopper (sm90): TMA, wgmma.

Two kernels, no atomics, so the gradients are deterministic (FlashAttention-2, section 3.2):

- dK/dV: a CTA owns 2 * block_kv keys of one key/value head; each of its two consumer
  warpgroups keeps block_kv of them (K, V in shared memory; dK, dV accumulating in registers)
  while a producer warpgroup streams (Q, dO, logsumexp, D) blocks of every query head of the
  group through a ring of shared-memory slots. GQA is reduced here: the group's query heads
  are walked one after the other into the same accumulators.
- dQ: a CTA owns 2 * block_q queries of one query head; the producer streams key and value
  blocks as in the forward kernel.

Both recompute P from the saved base-2 logsumexp. The dK/dV kernel works on transposed
tiles (keys x queries) so that wgmma's register operand is P^T or dS^T, which is what dV and
dK accumulate: S^T = K Q^T and dP^T = V dO^T read both operands from shared memory,
dV += P^T dO and dK += dS^T Q take P^T and dS^T from registers. Each step issues its two
independent products together so a single wait covers both.

Padding: queries are padded to whole blocks with a logsumexp of +inf (P = 0 for those rows,
no mask needed); keys are padded to whole blocks and masked only where they meet the
queries' products (the dQ kernel's last block; padded keys' own dK/dV rows are cut off).
Causal masking (top-left, as `jax.nn`) skips blocks that see nothing and masks the diagonal.
Dropout regenerates the forward's keep mask from the same hash (attention_dropout.py); its
1 / (1 - rate) is folded into the streamed (lse2, D) rows (common.backward_row_statistics).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import attention_common as common
from pallas_kernels import attention_mosaic_common as mosaic
from pallas_kernels.attention_mosaic_common import NUM_CONSUMERS, broadcast

DKV_KERNEL_NAME = "jfused_attention_mosaic_bwd_dkv"
DQ_KERNEL_NAME = "jfused_attention_mosaic_bwd_dq"
# Head dims the backward serves: at d=256 one warpgroup's dK and dV accumulators alone
# (2 x 64 x 256 float32) would need 256 registers per thread.
SUPPORTED_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class MosaicBackwardBlocks:
  """Tile sizes, all multiples of 64 (wgmma's M and the P/dS contraction)."""

  dkv_block_kv: int = 64  # Keys per consumer warpgroup in the dK/dV kernel.
  dkv_block_q: int = 64  # Queries per streamed step.
  dkv_stages: int = 2
  dq_block_q: int = 64  # Queries per consumer warpgroup in the dQ kernel.
  dq_block_kv: int = 64  # Keys per streamed step.
  dq_stages: int = 2


def default_backward_blocks(head_dim: int) -> MosaicBackwardBlocks:
  # Measured on H100 (bf16; benchmarks/results/attention_mosaic_bwd_sweep_h100_2026-11-25.log,
  # `python3 -m benchmarks.sweep_attention_mosaic_bwd`). d=64: 128-row steps and three stages
  # took 14 % off the default (the per-step barriers and waits are spread over twice the
  # work). d=128: 64 x 64 steps with two stages lead; larger steps spill the four
  # accumulators (S^T, dP^T, dK, dV) and a third stage gained nothing.
  if head_dim <= 64:
    return MosaicBackwardBlocks(dkv_block_q=128, dkv_stages=3, dq_block_kv=128, dq_stages=3)
  return MosaicBackwardBlocks()


def unsupported_reason(q: jax.Array, v: jax.Array) -> str | None:
  """Why the backward kernels cannot serve these operands (the forward checked the rest)."""
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
    return f"the Mosaic backward serves head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
  return None


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Static sizes the kernel bodies need (the field names `mosaic.kv_block_range` reads included)."""

  head_dim: int
  kv_len: int  # Real (unpadded) number of keys.
  num_q_blocks: int  # Query blocks the dK/dV kernel streams, per head.
  group: int  # Query heads per key/value head.
  block_q: int
  block_kv: int
  num_stages: int
  scale: float
  causal: bool
  dropout_rate: float
  soft_cap: float | None
  window: tuple[int, int] | None  # Inclusive (left, right), as attention_mask.


def _probs(s, lse2, dims: _Dims):
  """(P, tanh or None) of a tile from S and its broadcast base-2 logsumexp."""
  if dims.soft_cap is None:
    # Base-2 logits: P = exp2(S * scale * log2(e) - lse2), one FMA per element.
    return jnp.exp2(s * (dims.scale * common.LOG2_E) - lse2), None
  logits, capped = mosaic.capped_logits(s, dims)
  return jnp.exp2(logits - lse2), capped


def _logits_gradient(probs, dp, delta, capped):
  """dS = P * (dP - D), times 1 - tanh^2 under a soft cap: the gradient of the scaled
  logits (the kernels apply the scale to dK and dQ once, at the end)."""
  dlogits = probs * (dp - delta)
  return dlogits if capped is None else dlogits * (1.0 - capped * capped)


def _dkv_kernel(lengths_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, rows_ref, q_segments_ref,
                kv_segments_ref, segment_table_ref, cta_segment_table_ref, dk_ref, dv_ref,
                k_smem2, v_smem2, q_smem, do_smem, stats_smem, rows_smem, k_loaded, v_loaded,
                q_loaded, do_loaded, stats_loaded, rows_loaded, consumed, *, dims: _Dims):
  block_q, block_kv, stages = dims.block_q, dims.block_kv, dims.num_stages
  batch = lax.axis_index("batch")
  kv_head = lax.axis_index("heads")
  cta_k_start = lax.axis_index("kv_tiles") * (NUM_CONSUMERS * block_kv)
  warpgroup = lax.axis_index("wg")

  # Query q sees key k when low <= k - q <= high, i.e. -high <= q - k <= -low.
  low, high = mosaic.diagonal_band(dims)
  query_band = (None if high is None else -high, None if low is None else -low)

  def query_block_range(first_key, last_key):
    return mosaic.block_range(first_key, last_key, query_band, block=block_q,
                              num_blocks=dims.num_q_blocks, whole_blocks=dims.num_q_blocks)

  # Query blocks the CTA streams per query head: from the first one consumer 0 needs to the
  # last one consumer 1 (the later keys) needs.
  cta_first, _, _, cta_stop = query_block_range(
      cta_k_start, cta_k_start + NUM_CONSUMERS * block_kv - 1)
  # Under key lengths, keys past the length get dK = dV = 0: a CTA holding only such keys
  # streams nothing, and the element predicate bounds the keys of a tile the length cuts.
  _, kv_len = mosaic.sequence_lengths(lengths_ref, batch, dims)
  if lengths_ref is not None:
    cta_stop = jnp.where(cta_k_start < kv_len, cta_stop, cta_first)
  cta_first, _, _, cta_stop = mosaic.narrowed_by_segments(
      (cta_first, cta_first, cta_first, cta_stop), cta_segment_table_ref, batch,
      lax.div(cta_k_start, NUM_CONSUMERS * block_kv))
  per_head = cta_stop - cta_first  # Streamed steps per query head of the group.

  @pl.when(warpgroup < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(mosaic.CONSUMER_REGISTERS, action="increase")
    k_smem, v_smem = k_smem2.at[warpgroup], v_smem2.at[warpgroup]
    k_start = cta_k_start + warpgroup * block_kv
    keys = (batch, pl.ds(k_start, block_kv), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, k_loaded.at[warpgroup])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, v_loaded.at[warpgroup])
    plgpu.barrier_wait(k_loaded.at[warpgroup])
    plgpu.barrier_wait(v_loaded.at[warpgroup])
    ranges = query_block_range(k_start, k_start + block_kv - 1)
    if lengths_ref is not None:
      ranges = mosaic.emptied(ranges, k_start < kv_len, cta_first)
      ranges = mosaic.all_masked(ranges, k_start + block_kv > kv_len)
    ranges = mosaic.narrowed_by_segments(ranges, segment_table_ref, batch,
                                         lax.div(k_start, block_kv))
    first, full_start, full_end, stop = mosaic.within(ranges, cta_first, cta_stop)
    key_segments = None
    if kv_segments_ref is not None:
      key_segments = mosaic.segment_ids(kv_segments_ref, batch, k_start, block_kv, 0)
    tile = (block_kv, block_q)
    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)

    def wait_loaded(slot):
      plgpu.barrier_wait(q_loaded.at[slot])
      plgpu.barrier_wait(do_loaded.at[slot])
      plgpu.barrier_wait(stats_loaded.at[slot])
      if rows_ref is not None:
        plgpu.barrier_wait(rows_loaded.at[slot])

    def skip(step, carry):
      # A block the other consumer needs: wait for it (barrier phases advance per wait)
      # and release it at once.
      slot = lax.rem(step, stages)
      wait_loaded(slot)
      plgpu.barrier_arrive(consumed.at[slot])
      return carry

    # The consumer's keys are fixed: their dropout states are computed once.
    dropout_columns = None
    if rows_ref is not None:
      dropout_columns = mosaic.dropout_columns(k_start, tile, query_dim=1)

    def visit(step, carry, *, block, masked: bool):
      dk, dv = carry
      slot = lax.rem(step, stages)
      wait_loaded(slot)
      q_view = q_smem.at[slot]
      do_view = do_smem.at[slot]

      def logits_products(refs):
        s_ref, dp_ref = refs
        plgpu.wgmma(s_ref, k_smem, q_view.transpose((1, 0)))  # S^T = K Q^T
        plgpu.wgmma(dp_ref, v_smem, do_view.transpose((1, 0)))  # dP^T = V dO^T

      s, dp = pl.run_state(logits_products)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
      lse2 = plgpu.load(stats_smem.at[slot, 0], layout=plgpu.Layout.WGMMA.reduce(0))
      delta = plgpu.load(stats_smem.at[slot, 1], layout=plgpu.Layout.WGMMA.reduce(0))
      probs, capped = _probs(s, broadcast(lse2, tile, 1), dims)
      q_start = block * block_q
      # Padded keys need no mask here: their dK and dV rows are cut off; keys past a key
      # length do. Without a band or lengths nothing is masked (no masked block is visited).
      visible = None
      if masked:
        segments = None
        if key_segments is not None:
          segments = (mosaic.segment_ids(q_segments_ref, batch, q_start, block_q, 1),
                      key_segments)
        visible = mosaic.tile_visible(dims, q_start, k_start, tile, 1,
                                      key_bound=lengths_ref is not None, kv_len=kv_len,
                                      segments=segments)
      if visible is not None:
        probs = jnp.where(visible, probs, 0.0)
      dropout = rows_ref is not None
      if dropout:
        rows = plgpu.load(rows_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        keep = mosaic.dropout_keep(rows, dropout_columns, tile, 1, dims.dropout_rate)
        dp = jnp.where(keep, dp, 0.0)  # 1 / (1 - rate) rides in lse2 and D.
      dlogits = _logits_gradient(probs, dp, broadcast(delta, tile, 1), capped)
      if dropout:
        probs = jnp.where(keep, probs, 0.0)

      def gradient_products(refs):
        dk_ref_acc, dv_ref_acc = refs
        plgpu.wgmma(dv_ref_acc, probs.astype(q_smem.dtype), do_view)  # dV += P^T dO
        plgpu.wgmma(dk_ref_acc, dlogits.astype(q_smem.dtype), q_view)  # dK += dS^T Q

      dk, dv = pl.run_state(gradient_products)((plgpu.ACC.init(dk), plgpu.ACC.init(dv)))
      plgpu.barrier_arrive(consumed.at[slot])
      return dk, dv

    def visit_head(g, carry):
      base = g * per_head - cta_first  # Step number of query block i is base + i.

      def body(i, carry, masked):
        return visit(base + i, carry, block=i, masked=masked)

      lax.fori_loop(base + cta_first, base + first, skip, None)
      carry = common.masked_loops((first, full_start, full_end, stop), body, carry)
      lax.fori_loop(base + stop, base + cta_stop, skip, None)
      return carry

    acc = plgpu.layout_cast(jnp.zeros((block_kv, dims.head_dim), jnp.float32),
                            plgpu.Layout.WGMMA)
    dk, dv = lax.fori_loop(0, dims.group, visit_head, (acc, acc))
    # K and V are no longer needed: their buffers stage the results for the TMA stores.
    k_smem[...] = (dk * dims.scale).astype(k_smem.dtype)
    v_smem[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[keys])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[keys])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(warpgroup == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(mosaic.PRODUCER_REGISTERS, action="decrease")

    @pl.loop(0, dims.group * per_head)
    def _(step):
      slot = lax.rem(step, stages)
      q_head = kv_head * dims.group + lax.div(step, per_head)
      queries = pl.ds((cta_first + lax.rem(step, per_head)) * block_q, block_q)

      @pl.when(step >= stages)
      def _():
        plgpu.barrier_wait(consumed.at[slot])  # Both consumers are done with the slot.

      plgpu.copy_gmem_to_smem(q_ref.at[batch, queries, q_head], q_smem.at[slot],
                              q_loaded.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[batch, queries, q_head], do_smem.at[slot],
                              do_loaded.at[slot])
      plgpu.copy_gmem_to_smem(stats_ref.at[batch, q_head, :, queries], stats_smem.at[slot],
                              stats_loaded.at[slot])
      if rows_ref is not None:
        plgpu.copy_gmem_to_smem(rows_ref.at[batch, q_head, queries], rows_smem.at[slot],
                                rows_loaded.at[slot])


def _dq_kernel(lengths_ref, q_ref, k_ref, v_ref, do_ref, stats_ref, seeds_ref, columns_ref,
               q_segments_ref, kv_segments_ref, segment_table_ref, cta_segment_table_ref, dq_ref,
               q_smem2, do_smem2, stats_smem2, k_smem, v_smem, columns_smem, q_loaded,
               do_loaded, stats_loaded, k_loaded, v_loaded, columns_loaded, consumed, *,
               dims: _Dims):
  block_q, block_kv, stages = dims.block_q, dims.block_kv, dims.num_stages
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  cta_q_start = lax.axis_index("q_tiles") * (NUM_CONSUMERS * block_q)
  lengths = mosaic.sequence_lengths(lengths_ref, batch, dims)
  kv_len = lengths[1]
  # Queries past the query length have P = 0 (their logsumexp is +inf): a CTA or consumer
  # holding only such queries streams or visits nothing.
  cta_begin, cta_end = mosaic.cta_key_range(dims, cta_q_start, lengths, cta_segment_table_ref,
                                            batch)
  warpgroup = lax.axis_index("wg")

  @pl.when(warpgroup < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(mosaic.CONSUMER_REGISTERS, action="increase")
    q_smem, do_smem = q_smem2.at[warpgroup], do_smem2.at[warpgroup]
    stats_smem = stats_smem2.at[warpgroup]
    q_start = cta_q_start + warpgroup * block_q
    rows = pl.ds(q_start, block_q)
    plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head], q_smem, q_loaded.at[warpgroup])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem, do_loaded.at[warpgroup])
    plgpu.copy_gmem_to_smem(stats_ref.at[batch, head, :, rows], stats_smem,
                            stats_loaded.at[warpgroup])
    plgpu.barrier_wait(q_loaded.at[warpgroup])
    plgpu.barrier_wait(do_loaded.at[warpgroup])
    plgpu.barrier_wait(stats_loaded.at[warpgroup])
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    lse2 = plgpu.load(stats_smem.at[0], layout=row_layout)
    delta = plgpu.load(stats_smem.at[1], layout=row_layout)
    start, full_start, full_end, end = mosaic.warpgroup_key_range(
        dims, q_start, lengths, segment_table_ref, batch, (cta_begin, cta_end))
    query_segments = None
    if q_segments_ref is not None:
      query_segments = mosaic.segment_ids(q_segments_ref, batch, q_start, block_q, 0)
    tile = (block_q, block_kv)
    # The consumer's queries are fixed: their dropout states are computed once.
    dropout_rows = None
    if seeds_ref is not None:
      dropout_rows = mosaic.dropout_rows(seeds_ref[batch, head], q_start, tile, query_dim=0)
    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)

    def wait_loaded(slot):
      plgpu.barrier_wait(k_loaded.at[slot])
      plgpu.barrier_wait(v_loaded.at[slot])
      if columns_ref is not None:
        plgpu.barrier_wait(columns_loaded.at[slot])

    def visit(index, dq, masked: bool):
      slot = lax.rem(index, stages)
      wait_loaded(slot)
      k_view, v_view = k_smem.at[slot], v_smem.at[slot]

      def logits_products(refs):
        s_ref, dp_ref = refs
        plgpu.wgmma(s_ref, q_smem, k_view.transpose((1, 0)))  # S = Q K^T
        plgpu.wgmma(dp_ref, do_smem, v_view.transpose((1, 0)))  # dP = dO V^T

      s, dp = pl.run_state(logits_products)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
      probs, capped = _probs(s, broadcast(lse2, tile, 0), dims)
      k_start = index * block_kv
      if masked:
        segments = None
        if query_segments is not None:
          segments = (query_segments,
                      mosaic.segment_ids(kv_segments_ref, batch, k_start, block_kv, 1))
        visible = mosaic.tile_visible(dims, q_start, k_start, tile, 0, kv_len=kv_len,
                                      segments=segments)
        probs = jnp.where(visible, probs, 0.0)
      if dropout_rows is not None:
        columns = plgpu.load(columns_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        keep = mosaic.dropout_keep(dropout_rows, columns, tile, 0, dims.dropout_rate)
        dp = jnp.where(keep, dp, 0.0)
      dlogits = _logits_gradient(probs, dp, broadcast(delta, tile, 0), capped)

      def gradient_product(acc_ref):
        plgpu.wgmma(acc_ref, dlogits.astype(k_smem.dtype), k_view)  # dQ += dS K

      dq = pl.run_state(gradient_product)(plgpu.ACC.init(dq))
      plgpu.barrier_arrive(consumed.at[slot])
      return dq

    def skip(index, carry):
      slot = lax.rem(index, stages)
      wait_loaded(slot)
      plgpu.barrier_arrive(consumed.at[slot])
      return carry

    dq = plgpu.layout_cast(jnp.zeros((block_q, dims.head_dim), jnp.float32),
                           plgpu.Layout.WGMMA)
    lax.fori_loop(cta_begin, start, skip, None)
    dq = common.masked_loops((start, full_start, full_end, end), visit, dq)
    lax.fori_loop(end, cta_end, skip, None)
    q_smem[...] = (dq * dims.scale).astype(q_smem.dtype)  # Q's buffer stages the result.
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(warpgroup == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(mosaic.PRODUCER_REGISTERS, action="decrease")
    kv_head = lax.div(head, dims.group)

    @pl.loop(cta_begin, cta_end)
    def _(index):
      slot = lax.rem(index, stages)

      @pl.when(index >= cta_begin + stages)
      def _():
        plgpu.barrier_wait(consumed.at[slot])

      mosaic.copy_key_block(index, slot, (k_ref, v_ref, columns_ref),
                            (k_smem, v_smem, columns_smem), (k_loaded, v_loaded, columns_loaded),
                            batch=batch, kv_head=kv_head, block_kv=block_kv)


def attention_backward(q, k, v, out, lse, dout, *, scale: float, is_causal: bool,
                       dropout_rate: float = 0.0, dropout_seeds=None,
                       soft_cap: float | None = None, window: tuple[int, int] | None = None,
                       lengths=None, q_segments=None, kv_segments=None,
                       blocks: MosaicBackwardBlocks | None = None):
  """Gradients of the Mosaic forward: (dq, dk, dv) for q [B, T, N, D], k, v [B, S, K, D].

  Args:
    out, lse: the forward's output and natural-log logsumexp [B, N, T].
    dout: cotangent of out.
    dropout_rate, dropout_seeds: the forward's dropout (seeds uint32 [B, N]), if any.
    soft_cap, window, lengths: the forward's logit soft cap, local window and sequence
      lengths table (int32 [B, 2], attention_mosaic_common.sequence_lengths_table), if any.
    q_segments, kv_segments: the forward's segment ids (int32 [B, T], [B, S]), if any.
  """
  batch, t, num_heads, head_dim = q.shape
  s, num_kv_heads = k.shape[1:3]
  group = num_heads // num_kv_heads
  blocks = blocks or default_backward_blocks(head_dim)
  t_pad = common.round_up(t, max(NUM_CONSUMERS * blocks.dq_block_q, blocks.dkv_block_q))
  s_pad = common.round_up(s, max(NUM_CONSUMERS * blocks.dkv_block_kv, blocks.dq_block_kv))

  # One [2, block] copy per streamed step brings both rows: [B, N, 2, T].
  stats = jnp.stack(common.backward_row_statistics(out, dout, lse, t_pad,
                                                               dropout_rate), axis=2)
  q, dout = common.pad_axis(q, 1, t_pad), common.pad_axis(dout.astype(q.dtype), 1, t_pad)
  k, v = common.pad_axis(k, 1, s_pad), common.pad_axis(v, 1, s_pad)
  seeds = rows = columns = None
  if dropout_seeds is not None:
    seeds = dropout_seeds.astype(jnp.uint32)
    rows = mosaic.dropout_row_table(seeds, t_pad)
    columns = mosaic.dropout_column_table(s_pad)

  def dims_for(block_q, block_kv, stages):
    return _Dims(head_dim=head_dim, kv_len=s,
                 num_q_blocks=t_pad // block_q, group=group,
                 block_q=block_q, block_kv=block_kv, num_stages=stages, scale=scale,
                 causal=is_causal, dropout_rate=dropout_rate, soft_cap=soft_cap,
                 window=window)

  dkv_segments = dq_segments = (None,) * 4
  if q_segments is not None:
    q_segments = common.pad_edge(q_segments.astype(jnp.int32), 1, t_pad)
    kv_segments = common.pad_edge(kv_segments.astype(jnp.int32), 1, s_pad)
    # Per warpgroup and per CTA: which blocks the segment ids allow.
    dkv_segments = (q_segments, kv_segments, *(
        mosaic.segment_block_ranges(q_segments, kv_segments, block_q=blocks.dkv_block_q,
                                    block_kv=keys, over_queries=True)
        for keys in (blocks.dkv_block_kv, NUM_CONSUMERS * blocks.dkv_block_kv)))
    dq_segments = (q_segments, kv_segments, *(
        mosaic.segment_block_ranges(q_segments, kv_segments, block_q=queries,
                                    block_kv=blocks.dq_block_kv)
        for queries in (blocks.dq_block_q, NUM_CONSUMERS * blocks.dq_block_q)))

  dkv = dims_for(blocks.dkv_block_q, blocks.dkv_block_kv, blocks.dkv_stages)
  dk, dv = _dkv_call(dkv, (lengths, q, k, v, dout, stats, rows, *dkv_segments),
                     num_kv_heads, batch)
  dq = _dq_call(dims_for(blocks.dq_block_q, blocks.dq_block_kv, blocks.dq_stages),
                (lengths, q, k, v, dout, stats, seeds, columns, *dq_segments), num_heads,
                batch)
  return dq[:, :t], dk[:, :s], dv[:, :s]


def _launch(kernel, dims: _Dims, inputs, *, out_type, scratch_types, grid, grid_names, name):
  """plgpu.kernel with the settings both backward kernels share; absent (None) inputs reach
  the kernel as None refs."""
  return plgpu.kernel(
      mosaic.with_absent_inputs(functools.partial(kernel, dims=dims), inputs),
      out_type=out_type,
      scratch_types=scratch_types,
      grid=grid,
      grid_names=grid_names,
      num_threads=NUM_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      kernel_name=name,
  )(*(x for x in inputs if x is not None))


def _dkv_call(dims: _Dims, inputs, num_kv_heads: int, batch: int):
  """The dK/dV kernel on padded (sequence lengths table, q, k, v, dout, stats, dropout row
  table, query and key segment ids, their two block-range tables; None where absent);
  returns padded (dk, dv)."""
  q, k, v = inputs[1:4]
  kv_block = (NUM_CONSUMERS, dims.block_kv, dims.head_dim)
  q_ring = (dims.num_stages, dims.block_q, dims.head_dim)
  return _launch(
      _dkv_kernel, dims, inputs,
      out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_types=[
          plgpu.SMEM(kv_block, k.dtype, transforms=mosaic.TILED),
          plgpu.SMEM(kv_block, v.dtype, transforms=mosaic.TILED),
          plgpu.SMEM(q_ring, q.dtype, transforms=mosaic.TILED),
          plgpu.SMEM(q_ring, q.dtype, transforms=mosaic.TILED),
          plgpu.SMEM((dims.num_stages, 2, dims.block_q), jnp.float32),
          plgpu.SMEM((dims.num_stages, dims.block_q), jnp.uint32),  # Dropout query states.
          plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # K block loaded, one per consumer.
          plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # V block loaded.
          plgpu.Barrier(num_barriers=dims.num_stages),  # Q block loaded, one per slot.
          plgpu.Barrier(num_barriers=dims.num_stages),  # dO block loaded.
          plgpu.Barrier(num_barriers=dims.num_stages),  # (lse, D) loaded.
          plgpu.Barrier(num_barriers=dims.num_stages),  # Dropout query states loaded.
          plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=dims.num_stages),  # Released.
      ],
      grid=(k.shape[1] // (NUM_CONSUMERS * dims.block_kv), num_kv_heads, batch),
      grid_names=("kv_tiles", "heads", "batch"),
      name=DKV_KERNEL_NAME)


def _dq_call(dims: _Dims, inputs, num_heads: int, batch: int):
  """The dQ kernel on padded (sequence lengths table, q, k, v, dout, stats, dropout seeds,
  dropout column table, query and key segment ids, their two block-range tables; None where
  absent); returns the padded dq."""
  q, k, v = inputs[1:4]
  q_block = (NUM_CONSUMERS, dims.block_q, dims.head_dim)
  kv_ring = (dims.num_stages, dims.block_kv, dims.head_dim)
  return _launch(
      _dq_kernel, dims, inputs,
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=[
          plgpu.SMEM(q_block, q.dtype, transforms=mosaic.TILED),
          plgpu.SMEM(q_block, q.dtype, transforms=mosaic.TILED),
          plgpu.SMEM((NUM_CONSUMERS, 2, dims.block_q), jnp.float32),
          plgpu.SMEM(kv_ring, k.dtype, transforms=mosaic.TILED),
          plgpu.SMEM(kv_ring, v.dtype, transforms=mosaic.TILED),
          plgpu.SMEM((dims.num_stages, dims.block_kv), jnp.uint32),  # Dropout key states.
          plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # Q loaded, one per consumer.
          plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # dO loaded.
          plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # (lse, D) loaded.
          plgpu.Barrier(num_barriers=dims.num_stages),  # K block loaded, one per slot.
          plgpu.Barrier(num_barriers=dims.num_stages),  # V block loaded.
          plgpu.Barrier(num_barriers=dims.num_stages),  # Dropout key states loaded.
          plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=dims.num_stages),  # Released.
      ],
      grid=(q.shape[1] // (NUM_CONSUMERS * dims.block_q), num_heads, batch),
      grid_names=("q_tiles", "heads", "batch"),
      name=DQ_KERNEL_NAME)
