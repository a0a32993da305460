"""FlashAttention backward kernels in Pallas Mosaic GPU, for Hopper (sm90): TMA, wgmma.

By default two kernels, no atomics, so the gradients are deterministic (FlashAttention-2,
section 3.2):

- dK/dV: a CTA owns 2 * block_kv keys of one key/value head; each of its two consumer
  warpgroups keeps block_kv of them (K, V in shared memory; dK, dV accumulating in registers)
  while a producer warpgroup streams (Q, dO, logsumexp, D) blocks of every query head of the
  group through a ring of shared-memory slots. GQA is reduced here: the group's query heads
  are walked one after the other into the same accumulators.
- dQ: a CTA owns 2 * block_q queries of one query head; the producer streams key and value
  blocks as in the forward kernel.

A fused form (`MosaicBackwardBlocks.fused`, FlashAttention-3's backward) drops the dQ
kernel: the dK/dV kernel's consumers also compute each step's dQ part, dS K (dS^T staged in
shared memory and read transposed), and add it into a zeroed float32 dQ in global memory with
a TMA reduce-add; the launcher scales and casts that sum. S and dP are then computed once per
tile instead of twice, but the adds land in any order: dQ is not bitwise repeatable.

Each has a split form (`MosaicBackwardBlocks.dkv_split`, `dq_split`;
bwd_split.py): both consumers share one tile, one computes P from S and
hands P (1 - tanh^2) to the other through shared memory, which computes dP and dS. d=256
takes the split dK/dV kernel (one warpgroup cannot hold both accumulators); the split dQ
kernel measured 5 % slower there than the unsplit one with 32-key steps, so it is an option.

Both recompute P from the saved base-2 logsumexp. The dK/dV kernel works on transposed
tiles (keys x queries) so that wgmma's register operand is P^T or dS^T, which is what dV and
dK accumulate: S^T = K Q^T and dP^T = V dO^T read both operands from shared memory,
dV += P^T dO and dK += dS^T Q take P^T and dS^T from registers. Each step issues its two
independent products together so a single wait covers both; with `dkv_overlap` (the default
at d=128) dV's product instead runs beside dP^T's and the computation of dS^T.

Both grids are (head, tile, batch), as the forward's: Mosaic GPU launches the last axis
fastest, so the CTAs in flight together are the tiles of one or two heads, sharing that
head's streamed blocks in L2. The dQ kernels take causal query tiles last-first.

Padding: queries are padded to whole blocks with a logsumexp of EMPTY_ROW_LSE (P = 0 for those
rows, no mask needed); keys are padded to whole blocks and masked only where they meet the
queries' products (the dQ kernel's last block; padded keys' own dK/dV rows are cut off).
Causal masking (top-left, as `jax.nn`) skips blocks that see nothing and masks the diagonal.
Dropout regenerates the forward's keep mask from the same hash (dropout.py); its
1 / (1 - rate) is folded into the streamed (lse2, D) rows (common.backward_row_statistics).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.attention import common
from pallas_kernels.attention.mosaic import bwd_split as split_kernels
from pallas_kernels.attention.mosaic import bwd_steps as steps
from pallas_kernels.attention.mosaic import common as mosaic
from pallas_kernels.attention.mosaic.common import NUM_CONSUMERS, broadcast
from pallas_kernels.launcher import launcher

DKV_KERNEL_NAME = "jfused_attention_mosaic_bwd_dkv"
DQ_KERNEL_NAME = "jfused_attention_mosaic_bwd_dq"
# Head dims the backward serves (d=256 with the split dK/dV kernel).
SUPPORTED_HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class MosaicBackwardBlocks:
  """Tile sizes, all multiples of 64 (wgmma's M and the P/dS contraction)."""

  dkv_block_kv: int = 64  # Keys per consumer warpgroup in the dK/dV kernel.
  dkv_block_q: int = 64  # Queries per streamed step.
  dkv_stages: int = 2
  dq_block_q: int = 64  # Queries per consumer warpgroup in the dQ kernel.
  dq_block_kv: int = 64  # Keys per streamed step.
  dq_stages: int = 2
  # The dK/dV consumers share one key tile, one accumulating dV and the other dK
  # (_dkv_split_kernel); otherwise each holds its own dkv_block_kv keys and both results.
  dkv_split: bool = False
  # The dQ consumers share one query tile, one computing P and the other dQ
  # (_dq_split_kernel); otherwise each holds its own dq_block_q queries.
  dq_split: bool = False
  # The dQ kernel issues a block's S and dP with the previous block's dS K and computes dS
  # while that product runs (FlashAttention-3, section 3.2); holds one more dS tile, and a
  # slot is released a step later, so it wants three stages. Correct but no faster on an
  # H200 (three stages: 1-2 % slower; docs/attention_mosaic.md), hence off.
  dq_overlap: bool = False
  # The dK/dV kernel issues dV += P^T dO with dP^T = V dO^T and computes dS^T while it
  # runs, before dK += dS^T Q (instead of S^T with dP^T, then dV with dK).
  dkv_overlap: bool = False
  # Consumers release ring slots on hardware named barriers instead of mbarriers
  # (mosaic.SlotRelease), in both kernels.
  named_releases: bool = False
  # One kernel for all three gradients (FlashAttention-3's backward): the dK/dV kernel also
  # computes each step's dQ part, dS K, and adds it into a float32 dQ in global memory with a
  # TMA reduce-add; no dQ kernel, so S and dP are computed once instead of twice (5 tile
  # products per step instead of 7). The adds of different key tiles land in any order, so
  # dQ is not bitwise repeatable (`deterministic_backward=True` keeps the two kernels).
  fused: bool = False
  # With `fused`, FlashAttention-3's division of dQ's product: each consumer computes half
  # of dQ's columns for the CTA's keys (both consumers' dS, staged in shared memory), not
  # all of its columns for its own keys. Half the float32 adds and half the dQ registers, for
  # one barrier between the consumers a step (a skipping consumer stages zeros). Needs
  # half the head dim to be a whole swizzle tile: d=128.
  fused_split_dq: bool = False
  # Registers per consumer thread; the producer gets what the launch's leave
  # (mosaic.producer_registers). FlashAttention-3's backward gives its two consumers 240 and
  # its producer 24.
  consumer_registers: int = mosaic.CONSUMER_REGISTERS

  def __post_init__(self):
    # Consumers raise their count from the launch's; the producer keeps at least the fewest.
    most = mosaic.MOST_CONSUMER_REGISTERS
    if (
      self.consumer_registers % mosaic.REGISTER_STEP
      or not mosaic.LAUNCH_REGISTERS <= self.consumer_registers <= most
    ):
      raise ValueError(
        f"consumer_registers must be a multiple of {mosaic.REGISTER_STEP} from "
        f"{mosaic.LAUNCH_REGISTERS} to {most}, got {self.consumer_registers}"
      )
    if self.fused and self.dkv_split:
      raise ValueError("fused serves the unsplit dK/dV kernel; dkv_split must be False")
    if self.fused_split_dq and not self.fused:
      raise ValueError("fused_split_dq divides the fused backward's dQ; fused must be True")
    if self.dq_overlap and self.dq_split:
      raise ValueError("dq_overlap serves the unsplit dQ kernel; dq_split must be False")
    if self.dkv_overlap and self.dkv_split:
      raise ValueError("dkv_overlap serves the unsplit dK/dV kernel; dkv_split must be False")

  @property
  def dkv_cta_keys(self) -> int:
    return self.dkv_block_kv * (1 if self.dkv_split else NUM_CONSUMERS)

  @property
  def dq_cta_queries(self) -> int:
    return self.dq_block_q * (1 if self.dq_split else NUM_CONSUMERS)


def default_backward_blocks(head_dim: int) -> MosaicBackwardBlocks:
  # Measured on H100 (bf16; benchmarks/results/attention_mosaic_bwd_sweep_h100_2026-11-25.log,
  # `python3 -m benchmarks.sweep_attention_mosaic_bwd`). d=64: 128-row steps and three stages
  # took 14 % off the default (the per-step barriers and waits are spread over twice the
  # work). d=128: 64 x 64 steps with two stages lead; larger steps spill the four
  # accumulators (S^T, dP^T, dK, dV) and a third stage gained nothing.
  if head_dim <= 64:
    return MosaicBackwardBlocks(dkv_block_q=128, dkv_stages=3, dq_block_kv=128, dq_stages=3)
  if head_dim <= 128:
    # dS^T computed while dV += P^T dO runs: 0-4 % off the dK/dV kernel on an H200 (at d=64,
    # with 128-query steps, 4-5 % slower and 15 % causal;
    # attention_mosaic_bwd_variants_h200_2026-12-01*.log).
    return MosaicBackwardBlocks(dkv_overlap=True)
  # d=256 (attention_mosaic_bwd_d256_sweep_h100_2026-11-25b.log): dK and dV go to separate
  # warpgroups (their registers), and the dQ kernel streams 32-key steps so that two stages of
  # K and V fit beside both consumers' Q and dO: 5 % faster than the split dQ kernel with
  # 64-key steps (which streams K and V once per 64 queries instead of 128), 20 % faster than
  # a single stage of 64-key steps.
  return MosaicBackwardBlocks(dkv_split=True, dq_block_kv=32, named_releases=True)


def fused_backward_blocks(head_dim: int) -> MosaicBackwardBlocks | None:
  """The fused backward's tiles (MosaicBackwardBlocks.fused), or None where it is not served.

  The head dim's default, with what the fused kernel adds in shared memory (each consumer's
  dS^T and float32 dQ part) fitting: d=64 streams two stages instead of three. d=128 divides
  dQ's columns between the consumers (fused_split_dq): on an H200 that ran 1.27-1.30x faster
  than each consumer adding all of its dQ part, whose registers spill
  (attention_mosaic_fused_bwd_kernels_h200_2026-12-03c.log), and with FlashAttention-3's
  240 registers a consumer (the producer keeps 24) 2-4 % faster again than with 232, its
  spill stores cut from 196-528 to 144-416 bytes (registers_bwd_h200_2026-12-03e.log); the
  two deterministic kernels gained nothing from 240 (within 1 %). d=256 takes the split dK/dV
  kernel, whose consumers share one key tile and hold dK and dV apart; the dQ part has no
  registers left there.
  """
  if head_dim > 128:
    return None
  blocks = dataclasses.replace(default_backward_blocks(head_dim), fused=True)
  if head_dim <= 64:
    return dataclasses.replace(blocks, dkv_stages=2)
  return dataclasses.replace(blocks, fused_split_dq=True, consumer_registers=240)


def fused_backward_is_faster(head_dim: int, *, masked: bool, dropout: bool) -> bool:
  """Whether the fused backward beats the deterministic dK/dV and dQ pair on such a call, as
  measured on an H200: only at d=128 with no mask and no dropout (the backward alone 2.965
  against 3.020 ms at B4 T4096 16 heads, attention_bench_fused_bwd_240_h200_2026-12-03f;
  2.958 against 3.043 in registers_bwd_h200_2026-12-03e). Under causal masks it ran 2.5-5.5 %
  slower forward+backward and at d=64 1.5-2.2x slower; windows, lengths, segments and dropout
  were not measured on their own and keep the pair."""
  return head_dim == 128 and not masked and not dropout


def unsupported_reason(q: jax.Array, v: jax.Array) -> str | None:
  """Why the backward kernels cannot serve these operands (the forward checked the rest)."""
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
    return f"the Mosaic backward serves head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}"
  return None


def _dkv_kernel(
  lengths_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  stats_ref,
  rows_ref,
  q_segments_ref,
  kv_segments_ref,
  segment_table_ref,
  cta_segment_table_ref,
  dq_sum_ref,
  dk_ref,
  dv_ref,
  k_smem2,
  v_smem2,
  q_smem,
  do_smem,
  stats_smem,
  rows_smem,
  k_loaded,
  v_loaded,
  q_loaded,
  do_loaded,
  stats_loaded,
  rows_loaded,
  consumed,
  *fused_scratch,
  dims: steps.Dims,
  split_dq: bool = False,
):
  block_q, block_kv, stages = dims.block_q, dims.block_kv, dims.num_stages
  batch = lax.axis_index("batch")
  kv_head = lax.axis_index("heads")
  cta_keys = NUM_CONSUMERS * block_kv
  cta_k_start = lax.axis_index("kv_tiles") * cta_keys
  warpgroup = lax.axis_index("wg")
  _, kv_len = mosaic.sequence_lengths(lengths_ref, batch, dims)
  # Query blocks the CTA streams per query head: from the first one consumer 0 needs to the
  # last one consumer 1 (the later keys) needs.
  cta_first, _, _, cta_stop = steps.query_blocks_seen(
    dims, cta_k_start, cta_keys, kv_len, lengths_ref, cta_segment_table_ref, batch
  )
  per_head = cta_stop - cta_first  # Streamed steps per query head of the group.
  loaded = (q_loaded, do_loaded, stats_loaded, None if rows_ref is None else rows_loaded)
  release = steps.slot_release(consumed, dims)

  @pl.when(warpgroup < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(dims.consumer_registers, action="increase")
    k_smem, v_smem = k_smem2.at[warpgroup], v_smem2.at[warpgroup]
    k_start = cta_k_start + warpgroup * block_kv
    keys = (batch, pl.ds(k_start, block_kv), kv_head)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, k_loaded.at[warpgroup])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, v_loaded.at[warpgroup])
    plgpu.barrier_wait(k_loaded.at[warpgroup])
    plgpu.barrier_wait(v_loaded.at[warpgroup])
    ranges = steps.query_blocks_seen(
      dims, k_start, block_kv, kv_len, lengths_ref, segment_table_ref, batch
    )
    first, full_start, full_end, stop = mosaic.within(ranges, cta_first, cta_stop)
    masking = steps.tile_masking(
      1,
      key_bound=lengths_ref is not None,
      kv_len=kv_len,
      own_start=k_start,
      own_size=block_kv,
      own_segments_ref=kv_segments_ref,
      streamed_segments_ref=q_segments_ref,
      batch=batch,
    )
    tile = (block_kv, block_q)
    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)
    # MosaicBackwardBlocks.fused: each consumer stages its dS^T where the dQ product reads it
    # as dS, and its float32 dQ part for the TMA reduce-add.
    fused = dq_sum_ref is not None and not split_dq
    if fused:
      ds_smem2, dq_smem2 = fused_scratch
      ds_smem, dq_smem = ds_smem2.at[warpgroup], dq_smem2.at[warpgroup]
      dq_zeros = plgpu.layout_cast(
        jnp.zeros((block_q, dims.head_dim), jnp.float32), plgpu.Layout.WGMMA
      )

    def add_query_gradient(dq_part, block, head):
      """dq_sum[query block `block` of `head`] += dq_part, in float32 (scaled at the end)."""
      rows = (batch, pl.ds(block * block_q, block_q), head)
      steps.add_to_gmem(dq_smem, dq_part, dq_sum_ref, rows)

    if split_dq:
      ds_ring, dq_half_smem2, ds_staged = fused_scratch
      half = dims.head_dim // NUM_CONSUMERS
      columns = pl.ds(warpgroup * half, half)
      half_zeros = plgpu.layout_cast(jnp.zeros((block_q, half), jnp.float32), plgpu.Layout.WGMMA)

    def query_gradient_step(step, dlogits, block, head):
      """MosaicBackwardBlocks.fused_split_dq, once a step by each consumer (visiting or not):
      stage this consumer's dS^T (zeros when it skips the step), wait for the other's, then
      add dS K for the CTA's keys into this consumer's half of dQ's columns. dS^T alternates
      between two buffers by step parity: a consumer writing step i + 2's has passed step
      i + 1's barrier, which the other reached only once its step-i product had landed."""
      ds_buffers = ds_ring.at[lax.rem(step, 2)]
      steps.stage_transposed(ds_buffers.at[warpgroup], zeros if dlogits is None else dlogits)
      plgpu.barrier_arrive(ds_staged)
      plgpu.barrier_wait(ds_staged)

      def product(acc_ref):
        for consumer in range(NUM_CONSUMERS):
          keys_half = k_smem2.at[consumer].at[:, columns]
          plgpu.wgmma(acc_ref, ds_buffers.at[consumer].transpose((1, 0)), keys_half)

      dq_half = pl.run_state(product)(plgpu.ACC.init(half_zeros))
      rows = (batch, pl.ds(block * block_q, block_q), head, columns)
      steps.add_to_gmem(dq_half_smem2.at[warpgroup], dq_half, dq_sum_ref, rows)

    def step_operands(step):
      """(slot, Q view, dO view) of streamed step `step`, once its blocks have landed."""
      slot = lax.rem(step, stages)
      steps.wait_loaded(loaded, slot)
      return slot, q_smem.at[slot], do_smem.at[slot]

    def skip(step, carry):
      # A block the other consumer needs: wait for it (barrier phases advance per wait)
      # and release it at once.
      slot, _, _ = step_operands(step)
      release.release(slot)
      return carry

    # The consumer's keys are fixed: their dropout states are computed once.
    dropout_columns = None
    if rows_ref is not None:
      dropout_columns = mosaic.dropout_columns(k_start, tile, query_dim=1)

    def visit(step, carry, *, block, head, masked: bool):
      dk, dv = carry
      slot, q_view, do_view = step_operands(step)

      def logits_products(refs):
        s_ref, dp_ref = refs
        plgpu.wgmma(s_ref, k_smem, q_view.transpose((1, 0)))  # S^T = K Q^T
        plgpu.wgmma(dp_ref, v_smem, do_view.transpose((1, 0)))  # dP^T = V dO^T

      s, dp = pl.run_state(logits_products)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
      lse2 = steps.stream_row(stats_smem, slot, 0, tile)
      probs, capped = steps.visible_probs(s, lse2, dims, block * block_q, k_start, masking, masked)
      dropout = rows_ref is not None
      if dropout:
        keep = steps.transposed_dropout_keep(dims, rows_smem, slot, dropout_columns, tile)
        dp = jnp.where(keep, dp, 0.0)  # 1 / (1 - rate) rides in lse2 and D.
      delta = steps.stream_row(stats_smem, slot, 1, tile)
      dlogits = steps.logits_gradient(probs, dp, delta, capped)
      if dropout:
        probs = jnp.where(keep, probs, 0.0)
      if fused:
        steps.stage_transposed(ds_smem, dlogits)

      def gradient_products(refs):
        dk_ref_acc, dv_ref_acc = refs[:2]
        plgpu.wgmma(dv_ref_acc, probs.astype(q_smem.dtype), do_view)  # dV += P^T dO
        plgpu.wgmma(dk_ref_acc, dlogits.astype(q_smem.dtype), q_view)  # dK += dS^T Q
        if fused:
          plgpu.wgmma(refs[2], ds_smem.transpose((1, 0)), k_smem)  # dQ part = dS K

      accumulators = (plgpu.ACC.init(dk), plgpu.ACC.init(dv))
      if fused:
        accumulators += (plgpu.ACC.init(dq_zeros),)
      dk, dv, *dq_part = pl.run_state(gradient_products)(accumulators)
      # The slot's Q and dO are read; the staged dS^T is read too (its product has landed).
      release.release(slot)
      if fused:
        add_query_gradient(dq_part[0], block, head)
      if split_dq:
        query_gradient_step(step, dlogits, block, head)
      return dk, dv

    def overlapped_visit(step, carry, *, block, head, masked: bool):
      # MosaicBackwardBlocks.dkv_overlap: S^T alone, then P^T; dP^T = V dO^T and
      # dV += P^T dO issued together, and dS^T computed while dV's product runs; then
      # dK += dS^T Q. Three waits a step, but only P^T's computation leaves this
      # warpgroup's tensor-core queue empty.
      dk, dv = carry
      slot, q_view, do_view = step_operands(step)
      s = steps.transposed_logits(k_smem, q_view, tile)  # S^T = K Q^T
      probs, capped = steps.visible_probs(
        s,
        steps.stream_row(stats_smem, slot, 0, tile),
        dims,
        block * block_q,
        k_start,
        masking,
        masked,
      )
      keep = None
      if rows_ref is not None:
        keep = steps.transposed_dropout_keep(dims, rows_smem, slot, dropout_columns, tile)
      kept = probs if keep is None else jnp.where(keep, probs, 0.0)

      def products(dk_ref, dv_ref, dp_ref, *dq_ref):
        dk_ref[...] = dk
        dv_ref[...] = dv
        plgpu.wgmma(dp_ref, v_smem, do_view.transpose((1, 0)))  # dP^T = V dO^T
        plgpu.wgmma(dv_ref, kept.astype(q_smem.dtype), do_view)  # dV += P^T dO
        # wgmma groups complete in order: with at most one in flight, dP^T is done.
        dp = plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)
        if keep is not None:
          dp = jnp.where(keep, dp, 0.0)  # 1 / (1 - rate) rides in lse2 and D.
        dlogits = steps.logits_gradient(
          probs, dp, steps.stream_row(stats_smem, slot, 1, tile), capped
        )
        plgpu.wgmma(dk_ref, dlogits.astype(q_smem.dtype), q_view)  # dK += dS^T Q
        if split_dq:  # dS^T leaves with dK and dV, for query_gradient_step.
          return dk_ref[...], dv_ref[...], dlogits.astype(q_smem.dtype)
        if not fused:
          return dk_ref[...], dv_ref[...]
        steps.stage_transposed(ds_smem, dlogits)
        dq_ref[0][...] = dq_zeros
        plgpu.wgmma(dq_ref[0], ds_smem.transpose((1, 0)), k_smem)  # dQ part = dS K
        return dk_ref[...], dv_ref[...], dq_ref[0][...]

      accumulator = plgpu.ACC((block_kv, dims.head_dim), jnp.float32)
      dq_accumulator = [plgpu.ACC((block_q, dims.head_dim), jnp.float32)] if fused else []
      dk, dv, *dq_part = pl.run_scoped(
        products, accumulator, accumulator, plgpu.ACC(tile, jnp.float32), *dq_accumulator
      )
      release.release(slot)
      if fused:
        add_query_gradient(dq_part[0], block, head)
      if split_dq:
        query_gradient_step(step, dq_part[0], block, head)  # dq_part: dS^T here.
      return dk, dv

    def visit_head(g, carry):
      base = g * per_head - cta_first  # Step number of query block i is base + i.
      head = kv_head * dims.group + g

      def body(i, carry, masked):
        return (overlapped_visit if dims.overlap else visit)(
          base + i, carry, block=i, head=head, masked=masked
        )

      def skip_step(step, carry):
        carry = skip(step, carry)
        if split_dq:  # The other consumer may visit it: this one's dQ columns still count.
          query_gradient_step(step, None, step - base, head)
        return carry

      lax.fori_loop(base + cta_first, base + first, skip_step, None)
      carry = common.masked_loops((first, full_start, full_end, stop), body, carry)
      lax.fori_loop(base + stop, base + cta_stop, skip_step, None)
      return carry

    acc = plgpu.layout_cast(jnp.zeros((block_kv, dims.head_dim), jnp.float32), plgpu.Layout.WGMMA)
    dk, dv = lax.fori_loop(0, dims.group, visit_head, (acc, acc))
    # K and V are no longer needed: their buffers stage the results for the TMA stores.
    steps.store_keys_block(k_smem, dk * dims.scale, dk_ref, keys)
    steps.store_keys_block(v_smem, dv, dv_ref, keys)

  @pl.when(warpgroup == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(dims.producer_registers, action="decrease")
    steps.stream_query_blocks(
      dims,
      (q_ref, do_ref, stats_ref, rows_ref),
      (q_smem, do_smem, stats_smem, rows_smem),
      loaded,
      release,
      batch=batch,
      kv_head=kv_head,
      first=cta_first,
      per_head=per_head,
    )


def _dq_kernel(
  lengths_ref,
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  stats_ref,
  seeds_ref,
  columns_ref,
  q_segments_ref,
  kv_segments_ref,
  segment_table_ref,
  cta_segment_table_ref,
  dq_ref,
  q_smem2,
  do_smem2,
  stats_smem2,
  k_smem,
  v_smem,
  columns_smem,
  q_loaded,
  do_loaded,
  stats_loaded,
  k_loaded,
  v_loaded,
  columns_loaded,
  consumed,
  *,
  dims: steps.Dims,
):
  block_q, block_kv, stages = dims.block_q, dims.block_kv, dims.num_stages
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  cta_q_start = steps.query_tile_start(dims, NUM_CONSUMERS * block_q)
  lengths = mosaic.sequence_lengths(lengths_ref, batch, dims)
  # Queries past the query length have P = 0 (their logsumexp is EMPTY_ROW_LSE): a CTA or consumer
  # holding only such queries streams or visits nothing.
  cta_begin, cta_end = mosaic.cta_key_range(
    dims, cta_q_start, lengths, cta_segment_table_ref, batch
  )
  warpgroup = lax.axis_index("wg")
  key_ring = (
    (k_ref, v_ref, columns_ref),
    (k_smem, v_smem, columns_smem),
    (k_loaded, v_loaded, None if columns_ref is None else columns_loaded),
  )
  release = steps.slot_release(consumed, dims)

  @pl.when(warpgroup < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(dims.consumer_registers, action="increase")
    q_smem, do_smem = q_smem2.at[warpgroup], do_smem2.at[warpgroup]
    stats_smem = stats_smem2.at[warpgroup]
    q_start = cta_q_start + warpgroup * block_q
    rows = (batch, pl.ds(q_start, block_q), head)
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_loaded.at[warpgroup])
    plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, do_loaded.at[warpgroup])
    plgpu.copy_gmem_to_smem(
      stats_ref.at[batch, head, :, rows[1]], stats_smem, stats_loaded.at[warpgroup]
    )
    plgpu.barrier_wait(q_loaded.at[warpgroup])
    plgpu.barrier_wait(do_loaded.at[warpgroup])
    plgpu.barrier_wait(stats_loaded.at[warpgroup])
    tile = (block_q, block_kv)
    # Vectors, broadcast onto each step's tile where used (a broadcast tile held across the
    # loop would take a tile's registers).
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    lse2 = plgpu.load(stats_smem.at[0], layout=row_layout)
    delta = plgpu.load(stats_smem.at[1], layout=row_layout)
    start, full_start, full_end, end = mosaic.warpgroup_key_range(
      dims, q_start, lengths, segment_table_ref, batch, (cta_begin, cta_end)
    )
    masking = steps.tile_masking(
      0,
      key_bound=True,
      kv_len=lengths[1],
      own_start=q_start,
      own_size=block_q,
      own_segments_ref=q_segments_ref,
      streamed_segments_ref=kv_segments_ref,
      batch=batch,
    )
    # The consumer's queries are fixed: their dropout states are computed once.
    dropout_rows = None
    if seeds_ref is not None:
      dropout_rows = mosaic.dropout_rows(seeds_ref[batch, head], q_start, tile, query_dim=0)
    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)

    def logits_gradient(s, dp, index, slot, masked: bool):
      """dS of a (queries x keys) tile from its S = Q K^T and dP = dO V^T."""
      probs, capped = steps.visible_probs(
        s, broadcast(lse2, tile, 0), dims, q_start, index * block_kv, masking, masked
      )
      if dropout_rows is not None:
        dp = jnp.where(steps.dropout_keep(dims, dropout_rows, columns_smem, slot, tile), dp, 0.0)
      return steps.logits_gradient(probs, dp, broadcast(delta, tile, 0), capped)

    def logits_products(slot):
      k_view, v_view = k_smem.at[slot], v_smem.at[slot]

      def products(refs):
        s_ref, dp_ref = refs
        plgpu.wgmma(s_ref, q_smem, k_view.transpose((1, 0)))  # S = Q K^T
        plgpu.wgmma(dp_ref, do_smem, v_view.transpose((1, 0)))  # dP = dO V^T

      return pl.run_state(products)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))

    def visit(index, dq, masked: bool):
      slot = lax.rem(index, stages)
      steps.wait_loaded(key_ring[2], slot)
      s, dp = logits_products(slot)
      dlogits = logits_gradient(s, dp, index, slot, masked)
      dq = steps.accumulate(dq, dlogits, k_smem.at[slot])  # dQ += dS K
      release.release(slot)
      return dq

    # With dims.overlap (MosaicBackwardBlocks.dq_overlap): block j's S and dP are issued
    # with block j-1's dQ += dS K, and block j's dS is computed while that product runs
    # (mosaic.pipelined_loops); the carry holds block j-1's dS, and a block's slot is
    # released one step later, once its dS K has landed.

    def first_visit(index, carry):
      dq, _ = carry
      slot = lax.rem(index, stages)
      steps.wait_loaded(key_ring[2], slot)
      s, dp = logits_products(slot)
      return dq, logits_gradient(s, dp, index, slot, True).astype(k_smem.dtype)

    def overlapped_visit(index, carry, masked: bool):
      dq, previous_dlogits = carry
      slot, previous = lax.rem(index, stages), lax.rem(index - 1, stages)
      steps.wait_loaded(key_ring[2], slot)

      def products(dq_ref, s_ref, dp_ref):
        dq_ref[...] = dq
        plgpu.wgmma(s_ref, q_smem, k_smem.at[slot].transpose((1, 0)))  # S = Q K^T
        plgpu.wgmma(dp_ref, do_smem, v_smem.at[slot].transpose((1, 0)))  # dP = dO V^T
        plgpu.wgmma(dq_ref, previous_dlogits, k_smem.at[previous])  # dQ += dS K
        # wgmma groups complete in order: with at most one in flight, S and dP are done.
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)
        dp = plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)
        dlogits = logits_gradient(s, dp, index, slot, masked).astype(k_smem.dtype)
        return dq_ref[...], dlogits

      dq, dlogits = pl.run_scoped(
        products,
        plgpu.ACC((block_q, dims.head_dim), jnp.float32),
        plgpu.ACC(tile, jnp.float32),
        plgpu.ACC(tile, jnp.float32),
      )
      release.release(previous)
      return dq, dlogits

    def last_visit(index, carry):
      dq, dlogits = carry
      slot = lax.rem(index, stages)
      dq = steps.accumulate(dq, dlogits, k_smem.at[slot])
      release.release(slot)
      return dq, dlogits

    def skip(index, carry):
      slot = lax.rem(index, stages)
      steps.wait_loaded(key_ring[2], slot)
      release.release(slot)
      return carry

    dq = plgpu.layout_cast(jnp.zeros((block_q, dims.head_dim), jnp.float32), plgpu.Layout.WGMMA)
    lax.fori_loop(cta_begin, start, skip, None)
    bounds = (start, full_start, full_end, end)
    if dims.overlap:
      no_dlogits = plgpu.layout_cast(jnp.zeros(tile, k_smem.dtype), plgpu.Layout.WGMMA)
      dq, _ = mosaic.pipelined_loops(
        bounds, first_visit, overlapped_visit, last_visit, (dq, no_dlogits)
      )
    else:
      dq = common.masked_loops(bounds, visit, dq)
    lax.fori_loop(end, cta_end, skip, None)
    steps.store_dq(q_smem, dq, dims, dq_ref, rows)  # Q's buffer stages the result.

  @pl.when(warpgroup == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(dims.producer_registers, action="decrease")
    steps.stream_key_blocks(
      dims, *key_ring, release, batch=batch, head=head, begin=cta_begin, end=cta_end
    )


@launcher(static_argnames=("scale", "is_causal", "dropout_rate", "soft_cap", "window", "blocks"))
def attention_backward(
  q,
  k,
  v,
  out,
  lse,
  dout,
  *,
  scale: float,
  is_causal: bool,
  dropout_rate: float = 0.0,
  dropout_seeds=None,
  soft_cap: float | None = None,
  window: tuple[int, int] | None = None,
  lengths=None,
  q_segments=None,
  kv_segments=None,
  blocks: MosaicBackwardBlocks | None = None,
):
  """Gradients of the Mosaic forward: (dq, dk, dv) for q [B, T, N, D], k, v [B, S, K, D].

  Args:
    out, lse: the forward's output and natural-log logsumexp [B, N, T].
    dout: cotangent of out.
    dropout_rate, dropout_seeds: the forward's dropout (seeds uint32 [B, N]), if any.
    soft_cap, window, lengths: the forward's logit soft cap, local window and sequence
      lengths table (int32 [B, 2], mosaic.common.sequence_lengths_table), if any.
    q_segments, kv_segments: the forward's segment ids (int32 [B, T], [B, S]), if any.
  """
  batch, t, num_heads, head_dim = q.shape
  s, num_kv_heads = k.shape[1:3]
  group = num_heads // num_kv_heads
  blocks = blocks or default_backward_blocks(head_dim)
  t_pad = common.round_up(t, max(blocks.dq_cta_queries, blocks.dkv_block_q))
  s_pad = common.round_up(s, max(blocks.dkv_cta_keys, blocks.dq_block_kv))

  # One [2, block] copy per streamed step brings both rows: [B, N, 2, T].
  stats = jnp.stack(common.backward_row_statistics(out, dout, lse, t_pad, dropout_rate), axis=2)
  q, dout = common.pad_axis(q, 1, t_pad), common.pad_axis(dout.astype(q.dtype), 1, t_pad)
  k, v = common.pad_axis(k, 1, s_pad), common.pad_axis(v, 1, s_pad)
  seeds = rows = columns = None
  if dropout_seeds is not None:
    seeds = dropout_seeds.astype(jnp.uint32)
    rows = mosaic.dropout_row_table(seeds, t_pad)
    columns = mosaic.dropout_column_table(s_pad)

  def dims_for(block_q, block_kv, stages, overlap=False):
    return steps.Dims(
      head_dim=head_dim,
      kv_len=s,
      num_q_blocks=t_pad // block_q,
      group=group,
      block_q=block_q,
      block_kv=block_kv,
      num_stages=stages,
      scale=scale,
      causal=is_causal,
      dropout_rate=dropout_rate,
      soft_cap=soft_cap,
      window=window,
      overlap=overlap,
      named_releases=blocks.named_releases,
      consumer_registers=blocks.consumer_registers,
    )

  dkv_segments = (None,) * (3 if blocks.dkv_split else 4)
  dq_segments = (None,) * (3 if blocks.dq_split else 4)
  if q_segments is not None:
    q_segments = common.pad_edge(q_segments.astype(jnp.int32), 1, t_pad)
    kv_segments = common.pad_edge(kv_segments.astype(jnp.int32), 1, s_pad)
    # Per warpgroup and per CTA: which blocks the segment ids allow.
    # A split kernel's consumers hold the CTA's keys (queries): one table serves both.
    dkv_segments = (
      q_segments,
      kv_segments,
      *(
        mosaic.segment_block_ranges(
          q_segments, kv_segments, block_q=blocks.dkv_block_q, block_kv=keys, over_queries=True
        )
        for keys in sorted({blocks.dkv_block_kv, blocks.dkv_cta_keys})
      ),
    )
    dq_segments = (
      q_segments,
      kv_segments,
      *(
        mosaic.segment_block_ranges(
          q_segments, kv_segments, block_q=queries, block_kv=blocks.dq_block_kv
        )
        for queries in sorted({blocks.dq_block_q, blocks.dq_cta_queries})
      ),
    )

  dkv = dims_for(blocks.dkv_block_q, blocks.dkv_block_kv, blocks.dkv_stages, blocks.dkv_overlap)
  if blocks.fused_split_dq and (head_dim // NUM_CONSUMERS) % 64:
    raise ValueError(
      f"fused_split_dq needs half the head dim to be a multiple of 64, got head dim {head_dim}"
    )
  if blocks.fused and lengths is None and s_pad != s:
    # Padded keys must not reach dQ: their zero K rows give P = exp(-lse), which overflows
    # (and times zero is NaN) in rows whose logits all lie far below zero. A length table
    # makes the kernel mask the key tile they sit in.
    lengths = mosaic.sequence_lengths_table(None, jnp.full((batch,), s, jnp.int32), t, s)
  dkv_inputs = (lengths, q, k, v, dout, stats, rows, *dkv_segments)
  if blocks.fused:
    # The kernel adds every step's dQ part into this zeroed float32 buffer (a ref the kernel
    # writes: its final value comes back as an aliased output).
    dq_sum = jax.new_ref(jnp.zeros((batch, t_pad, num_heads, head_dim), jnp.float32))
    dk, dv = _dkv_call(
      dkv, (*dkv_inputs, dq_sum), num_kv_heads, batch, split=False, split_dq=blocks.fused_split_dq
    )
    dq = (dq_sum[...] * scale).astype(q.dtype)
    return dq[:, :t], dk[:, :s], dv[:, :s]
  if not blocks.dkv_split:
    dkv_inputs += (None,)  # No dQ sum: the dQ kernel below computes dQ.
  dk, dv = _dkv_call(dkv, dkv_inputs, num_kv_heads, batch, split=blocks.dkv_split)
  dq = _dq_call(
    dims_for(blocks.dq_block_q, blocks.dq_block_kv, blocks.dq_stages, blocks.dq_overlap),
    (lengths, q, k, v, dout, stats, seeds, columns, *dq_segments),
    num_heads,
    batch,
    split=blocks.dq_split,
  )
  return dq[:, :t], dk[:, :s], dv[:, :s]


def _launch(
  kernel,
  dims: steps.Dims,
  inputs,
  *,
  out_type,
  scratch_types,
  num_tiles: int,
  tiles_name: str,
  num_heads: int,
  batch: int,
  name: str,
):
  """plgpu.kernel with the settings both backward kernels share; absent (None) inputs reach
  the kernel as None refs.

  The grid is (head, tile, batch), as the forward's, and Mosaic GPU launches its last axis
  fastest: batch rows, then tiles, then heads, so the CTAs in flight share one head's
  streamed blocks. On an H200 this took 4-8 % off both kernels against the former
  (tile, head, batch) grid, whose CTAs in flight spanned every head
  (benchmarks/results/attention_mosaic_bwd_variants_h200_2026-12-01.log).
  """
  return plgpu.kernel(
    mosaic.with_absent_inputs(functools.partial(kernel, dims=dims), inputs),
    out_type=out_type,
    scratch_types=scratch_types,
    grid=(num_heads, num_tiles, batch),
    grid_names=("heads", tiles_name, "batch"),
    num_threads=NUM_CONSUMERS + 1,
    thread_name="wg",
    compiler_params=plgpu.CompilerParams(approx_math=True),
    kernel_name=name,
  )(*(x for x in inputs if x is not None))


def _dkv_call(
  dims: steps.Dims, inputs, num_kv_heads: int, batch: int, *, split: bool, split_dq: bool = False
):
  """The dK/dV kernel on padded (sequence lengths table, q, k, v, dout, stats, dropout row
  table, query and key segment ids, their block-range tables (one under `split`, else per
  warpgroup and per CTA), and unless `split` the fused backward's float32 dQ sum (a ref);
  None where absent); returns padded (dk, dv)."""
  q, k, v = inputs[1:4]
  fused = not split and inputs[-1] is not None
  # Key tiles: one per consumer, or one both share (split).
  tiles = 1 if split else NUM_CONSUMERS
  fused_scratch = []
  if fused and split_dq:
    fused_scratch = [
      # dS^T of both consumers, by step parity; each consumer's half of dQ's columns.
      plgpu.SMEM((2, tiles, dims.block_kv, dims.block_q), q.dtype, transforms=mosaic.TILED),
      plgpu.SMEM(
        (tiles, dims.block_q, dims.head_dim // tiles), jnp.float32, transforms=mosaic.TILED_FLOAT32
      ),
      plgpu.Barrier(num_arrivals=NUM_CONSUMERS),  # Both consumers' dS^T staged.
    ]
  elif fused:
    fused_scratch = [
      # Each consumer's dS^T (read transposed by dQ's product) and float32 dQ part.
      plgpu.SMEM((tiles, dims.block_kv, dims.block_q), q.dtype, transforms=mosaic.TILED),
      plgpu.SMEM(
        (tiles, dims.block_q, dims.head_dim), jnp.float32, transforms=mosaic.TILED_FLOAT32
      ),
    ]
  kv_block = (tiles, dims.block_kv, dims.head_dim) if tiles > 1 else (dims.block_kv, dims.head_dim)
  q_ring = (dims.num_stages, dims.block_q, dims.head_dim)
  # The split kernel's hand-over of P (1 - tanh^2), float32, swizzled as wgmma tiles are.
  weights = (
    [plgpu.SMEM((dims.block_kv, dims.block_q), jnp.float32, transforms=mosaic.TILED_FLOAT32)]
    if split
    else []
  )
  kernel = split_kernels.dkv_split_kernel
  if not split:
    kernel = functools.partial(_dkv_kernel, split_dq=fused and split_dq)
  return _launch(
    kernel,
    dims,
    inputs,
    out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    scratch_types=[
      plgpu.SMEM(kv_block, k.dtype, transforms=mosaic.TILED),
      plgpu.SMEM(kv_block, v.dtype, transforms=mosaic.TILED),
      plgpu.SMEM(q_ring, q.dtype, transforms=mosaic.TILED),
      plgpu.SMEM(q_ring, q.dtype, transforms=mosaic.TILED),
      plgpu.SMEM((dims.num_stages, 2, dims.block_q), jnp.float32),
      plgpu.SMEM((dims.num_stages, dims.block_q), jnp.uint32),  # Dropout query states.
      *weights,
      plgpu.Barrier(num_barriers=tiles),  # K tile loaded, one per tile.
      plgpu.Barrier(num_barriers=tiles),  # V tile loaded.
      plgpu.Barrier(num_barriers=dims.num_stages),  # Q block loaded, one per slot.
      plgpu.Barrier(num_barriers=dims.num_stages),  # dO block loaded.
      plgpu.Barrier(num_barriers=dims.num_stages),  # (lse, D) loaded.
      plgpu.Barrier(num_barriers=dims.num_stages),  # Dropout query states loaded.
      plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=dims.num_stages),  # Released.
      *fused_scratch,
    ],
    num_tiles=k.shape[1] // (tiles * dims.block_kv),
    tiles_name="kv_tiles",
    num_heads=num_kv_heads,
    batch=batch,
    name=DKV_KERNEL_NAME,
  )


def _dq_call(dims: steps.Dims, inputs, num_heads: int, batch: int, *, split: bool):
  """The dQ kernel on padded (sequence lengths table, q, k, v, dout, stats, dropout seeds,
  dropout column table, query and key segment ids, their block-range tables (one under
  `split`, else per warpgroup and per CTA); None where absent); returns the padded dq."""
  q, k, v = inputs[1:4]
  # Query tiles: one per consumer, or one both share (split).
  tiles = 1 if split else NUM_CONSUMERS
  q_block = (tiles, dims.block_q, dims.head_dim) if tiles > 1 else (dims.block_q, dims.head_dim)
  stats_block = (tiles, 2, dims.block_q) if tiles > 1 else (2, dims.block_q)
  kv_ring = (dims.num_stages, dims.block_kv, dims.head_dim)
  # dQ += dS K contracts over block_kv keys: below 64 the tiles take a narrower swizzle
  # (all of them: a product's operands share one).
  tiled = mosaic.TILED if dims.block_kv >= 64 else mosaic.TILED_NARROW
  # The split kernel's hand-over of P (1 - tanh^2), as in the split dK/dV kernel.
  weights = (
    [plgpu.SMEM((dims.block_q, dims.block_kv), jnp.float32, transforms=mosaic.TILED_FLOAT32)]
    if split
    else []
  )
  return _launch(
    split_kernels.dq_split_kernel if split else _dq_kernel,
    dims,
    inputs,
    out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
    scratch_types=[
      plgpu.SMEM(q_block, q.dtype, transforms=tiled),
      plgpu.SMEM(q_block, q.dtype, transforms=tiled),
      plgpu.SMEM(stats_block, jnp.float32),
      plgpu.SMEM(kv_ring, k.dtype, transforms=tiled),
      plgpu.SMEM(kv_ring, v.dtype, transforms=tiled),
      plgpu.SMEM((dims.num_stages, dims.block_kv), jnp.uint32),  # Dropout key states.
      *weights,
      plgpu.Barrier(num_barriers=tiles),  # Q loaded, one per tile.
      plgpu.Barrier(num_barriers=tiles),  # dO loaded.
      plgpu.Barrier(num_barriers=tiles),  # (lse, D) loaded.
      plgpu.Barrier(num_barriers=dims.num_stages),  # K block loaded, one per slot.
      plgpu.Barrier(num_barriers=dims.num_stages),  # V block loaded.
      plgpu.Barrier(num_barriers=dims.num_stages),  # Dropout key states loaded.
      plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=dims.num_stages),  # Released.
    ],
    num_tiles=q.shape[1] // (tiles * dims.block_q),
    tiles_name="q_tiles",
    num_heads=num_heads,
    batch=batch,
    name=DQ_KERNEL_NAME,
  )
