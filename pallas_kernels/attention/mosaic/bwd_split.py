"""The split backward kernels (Pallas Mosaic GPU, Hopper): both consumer warpgroups share one
tile and hand P over through shared memory.

At d=256 one warpgroup cannot hold dK and dV (2 x 64 x 256 float32: 256 registers a thread),
and two warpgroups' Q and dO (128 KB) leave room for only 32-key dQ steps. So in both kernels
consumer 0 computes S and P, and hands P (1 - tanh^2), float32, to consumer 1 through a
swizzled shared-memory tile guarded by two hardware named barriers (mosaic.pass_turn /
await_turn: "ready" one way, "free" the other). Consumer 1 grants the first "free" and
consumer 0 takes the last one after its loop, so every arrive has its wait. Consumer 1
computes dP and dS = P (1 - tanh^2) (dP - D). Masks, soft cap and dropout: consumer 0 applies
the element predicate and the cap to what it hands over; consumer 1 applies the dropout mask
to dP. The producer is the unsplit kernels' (bwd_steps).
"""

from __future__ import annotations

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.attention import common
from pallas_kernels.attention.mosaic import bwd_steps as steps
from pallas_kernels.attention.mosaic import common as mosaic
from pallas_kernels.attention.mosaic.common import NUM_CONSUMERS, broadcast


def dkv_split_kernel(
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
  dk_ref,
  dv_ref,
  k_smem,
  v_smem,
  q_smem,
  do_smem,
  stats_smem,
  rows_smem,
  weights_smem,
  k_loaded,
  v_loaded,
  q_loaded,
  do_loaded,
  stats_loaded,
  rows_loaded,
  consumed,
  *,
  dims: steps.Dims,
):
  """dK/dV with the two consumers sharing one key tile: consumer 0 computes S^T = K Q^T and
  P^T and accumulates dV += P^T dO; consumer 1 computes dP^T = V dO^T and accumulates
  dK += dS^T Q. Each runs two of the four products and holds one result."""
  block_q, block_kv, stages = dims.block_q, dims.block_kv, dims.num_stages
  batch = lax.axis_index("batch")
  kv_head = lax.axis_index("heads")
  k_start = lax.axis_index("kv_tiles") * block_kv
  warpgroup = lax.axis_index("wg")
  _, kv_len = mosaic.sequence_lengths(lengths_ref, batch, dims)
  # Both consumers hold the same keys: the CTA streams exactly the query blocks they visit.
  first, full_start, full_end, stop = steps.query_blocks_seen(
    dims, k_start, block_kv, kv_len, lengths_ref, segment_table_ref, batch
  )
  per_head = stop - first
  keys = (batch, pl.ds(k_start, block_kv), kv_head)
  tile = (block_kv, block_q)
  loaded = (q_loaded, do_loaded, stats_loaded, None if rows_ref is None else rows_loaded)
  release = steps.slot_release(consumed, dims)
  dropout = rows_ref is not None
  acc = plgpu.layout_cast(jnp.zeros((block_kv, dims.head_dim), jnp.float32), plgpu.Layout.WGMMA)

  def visit_all(visit, carry):
    """visit(slot, query block, carry, masked) over every streamed block in order."""

    def visit_head(g, carry):
      base = g * per_head - first  # Step number of query block i is base + i.

      def body(i, carry, masked):
        step = base + i
        slot = lax.rem(step, stages)
        steps.wait_loaded(loaded, slot)
        carry = visit(slot, i, carry, masked)
        release.release(slot)
        return carry

      return common.masked_loops((first, full_start, full_end, stop), body, carry)

    return lax.fori_loop(0, dims.group, visit_head, carry)

  @pl.when(warpgroup == 0)
  def _probabilities_and_dv():
    plgpu.set_max_registers(dims.consumer_registers, action="increase")
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem, k_loaded.at[0])
    plgpu.barrier_wait(k_loaded.at[0])
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
    dropout_columns = mosaic.dropout_columns(k_start, tile, query_dim=1) if dropout else None

    def visit(slot, block, dv, masked):
      s = steps.transposed_logits(k_smem, q_smem.at[slot], tile)
      lse2 = steps.stream_row(stats_smem, slot, 0, tile)
      probs, capped = steps.visible_probs(s, lse2, dims, block * block_q, k_start, masking, masked)
      weights = probs if capped is None else probs * (1.0 - capped * capped)
      mosaic.await_turn()  # Consumer 1 has read the previous weights.
      weights_smem[...] = weights
      mosaic.pass_turn()
      if dropout:
        keep = steps.transposed_dropout_keep(dims, rows_smem, slot, dropout_columns, tile)
        probs = jnp.where(keep, probs, 0.0)
      return steps.accumulate(dv, probs, do_smem.at[slot])  # dV += P^T dO

    dv = visit_all(visit, acc)
    mosaic.await_turn()  # Consumer 1's last release: every arrive is matched by a wait.
    steps.store_keys_block(k_smem, dv, dv_ref, keys)  # Only this consumer reads K.

  @pl.when(warpgroup == 1)
  def _dk():
    plgpu.set_max_registers(dims.consumer_registers, action="increase")
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem, v_loaded.at[0])
    plgpu.barrier_wait(v_loaded.at[0])
    dropout_columns = mosaic.dropout_columns(k_start, tile, query_dim=1) if dropout else None
    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)
    mosaic.pass_turn()  # The weights buffer starts free.

    def visit(slot, block, dk, masked):
      del block, masked  # Consumer 0's weights carry the masks.

      def product(acc_ref):
        plgpu.wgmma(acc_ref, v_smem, do_smem.at[slot].transpose((1, 0)))  # dP^T = V dO^T

      dp = pl.run_state(product)(plgpu.ACC.init(zeros))
      if dropout:
        keep = steps.transposed_dropout_keep(dims, rows_smem, slot, dropout_columns, tile)
        dp = jnp.where(keep, dp, 0.0)  # 1 / (1 - rate) rides in lse2 and D.
      dp = dp - steps.stream_row(stats_smem, slot, 1, tile)
      mosaic.await_turn()  # Consumer 0's weights for this block are in.
      weights = weights_smem[...]
      mosaic.pass_turn()
      return steps.accumulate(dk, weights * dp, q_smem.at[slot])  # dK += dS^T Q

    dk = visit_all(visit, acc)
    steps.store_keys_block(v_smem, dk * dims.scale, dk_ref, keys)  # Only this consumer reads V.

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
      first=first,
      per_head=per_head,
    )


def dq_split_kernel(
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
  dq_ref,
  q_smem,
  do_smem,
  stats_smem,
  k_smem,
  v_smem,
  columns_smem,
  weights_smem,
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
  """dQ with the two consumers sharing one query tile: consumer 0 computes S = Q K^T and P;
  consumer 1 computes dP = dO V^T and accumulates dQ += dS K."""
  block_q, block_kv = dims.block_q, dims.block_kv
  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  q_start = steps.query_tile_start(dims, block_q)
  lengths = mosaic.sequence_lengths(lengths_ref, batch, dims)
  warpgroup = lax.axis_index("wg")
  # Both consumers hold the same queries: the CTA streams exactly the key blocks they visit.
  ranges = mosaic.warpgroup_key_range(dims, q_start, lengths, segment_table_ref, batch)
  rows = (batch, pl.ds(q_start, block_q), head)
  tile = (block_q, block_kv)
  key_ring = (
    (k_ref, v_ref, columns_ref),
    (k_smem, v_smem, columns_smem),
    (k_loaded, v_loaded, None if columns_ref is None else columns_loaded),
  )
  release = steps.slot_release(consumed, dims)

  def visit_all(visit, carry):
    def body(index, carry, masked):
      slot = lax.rem(index, dims.num_stages)
      steps.wait_loaded(key_ring[2], slot)
      carry = visit(index, slot, carry, masked)
      release.release(slot)
      return carry

    return common.masked_loops(ranges, body, carry)

  def load_row(row: int):
    """Row `row` of the queries' (lse2, D), a vector to broadcast onto each step's tile."""
    return plgpu.load(stats_smem.at[row], layout=plgpu.Layout.WGMMA.reduce(1))

  @pl.when(warpgroup == 0)
  def _probabilities():
    plgpu.set_max_registers(dims.consumer_registers, action="increase")
    plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_loaded.at[0])
    plgpu.copy_gmem_to_smem(
      stats_ref.at[batch, head, :, rows[1]], stats_smem, stats_loaded.at[0]
    )  # Both consumers wait for it.
    plgpu.barrier_wait(q_loaded.at[0])
    plgpu.barrier_wait(stats_loaded.at[0])
    lse2 = load_row(0)
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
    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)

    def visit(index, slot, carry, masked):
      def product(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))  # S = Q K^T

      s = pl.run_state(product)(plgpu.ACC.init(zeros))
      probs, capped = steps.visible_probs(
        s, broadcast(lse2, tile, 0), dims, q_start, index * block_kv, masking, masked
      )
      weights = probs if capped is None else probs * (1.0 - capped * capped)
      mosaic.await_turn()  # Consumer 1 has read the previous weights.
      weights_smem[...] = weights
      mosaic.pass_turn()
      return carry

    visit_all(visit, None)
    mosaic.await_turn()  # Consumer 1's last release: every arrive is matched by a wait.

  @pl.when(warpgroup == 1)
  def _dq():
    plgpu.set_max_registers(dims.consumer_registers, action="increase")
    plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, do_loaded.at[0])
    plgpu.barrier_wait(do_loaded.at[0])
    plgpu.barrier_wait(stats_loaded.at[0])
    delta = load_row(1)
    dropout_rows = None
    if seeds_ref is not None:
      dropout_rows = mosaic.dropout_rows(seeds_ref[batch, head], q_start, tile, query_dim=0)
    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)
    mosaic.pass_turn()  # The weights buffer starts free.

    def visit(index, slot, dq, masked):
      del index, masked  # Consumer 0's weights carry the masks.

      def product(acc_ref):
        plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].transpose((1, 0)))  # dP = dO V^T

      dp = pl.run_state(product)(plgpu.ACC.init(zeros))
      if dropout_rows is not None:
        dp = jnp.where(steps.dropout_keep(dims, dropout_rows, columns_smem, slot, tile), dp, 0.0)
      dp = dp - broadcast(delta, tile, 0)
      mosaic.await_turn()  # Consumer 0's weights for this block are in.
      weights = weights_smem[...]
      mosaic.pass_turn()
      return steps.accumulate(dq, weights * dp, k_smem.at[slot])  # dQ += dS K

    acc = plgpu.layout_cast(jnp.zeros((block_q, dims.head_dim), jnp.float32), plgpu.Layout.WGMMA)
    dq = visit_all(visit, acc)
    steps.store_dq(do_smem, dq, dims, dq_ref, rows)  # Only this consumer reads dO.

  @pl.when(warpgroup == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(dims.producer_registers, action="decrease")
    steps.stream_key_blocks(
      dims, *key_ring, release, batch=batch, head=head, begin=ranges[0], end=ranges[3]
    )
