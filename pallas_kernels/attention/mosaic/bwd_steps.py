"""Steps shared by the Mosaic GPU backward kernels (bwd.py and the split kernels of
bwd_split.py): static sizes, P and dS from a tile, the element
predicate, the producers' streams, the waits, products and result stores.

Tiles of the dK/dV kernels are (keys x queries), those of the dQ kernels (queries x keys).
"""

from __future__ import annotations

import dataclasses

from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.attention import common
from pallas_kernels.attention.mosaic import common as mosaic
from pallas_kernels.attention.mosaic.common import broadcast


@dataclasses.dataclass(frozen=True)
class Dims:
  """Static sizes the kernel bodies need (the field names `mosaic.kv_block_range` reads
  included)."""

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
  # MosaicBackwardBlocks.dq_overlap in the dQ kernel, dkv_overlap in the dK/dV kernel.
  overlap: bool = False
  named_releases: bool = False  # MosaicBackwardBlocks.named_releases.
  consumer_registers: int = mosaic.CONSUMER_REGISTERS  # MosaicBackwardBlocks'.

  @property
  def producer_registers(self) -> int:
    return mosaic.producer_registers(self.consumer_registers)


def probabilities(s, lse2, dims: Dims):
  """(P, tanh or None) of a tile from S and its broadcast base-2 logsumexp."""
  if dims.soft_cap is None:
    # Base-2 logits: P = exp2(S * scale * log2(e) - lse2), one FMA per element.
    return jnp.exp2(s * (dims.scale * common.LOG2_E) - lse2), None
  logits, capped = mosaic.capped_logits(s, dims)
  return jnp.exp2(logits - lse2), capped


def logits_gradient(probs, dp, delta, capped):
  """dS = P * (dP - D), times 1 - tanh^2 under a soft cap: the gradient of the scaled
  logits (the kernels apply the scale to dK and dQ once, at the end)."""
  dlogits = probs * (dp - delta)
  return dlogits if capped is None else dlogits * (1.0 - capped * capped)


def query_blocks_seen(dims: Dims, k_start, keys: int, kv_len, lengths_ref, table_ref, batch):
  """(first, full_start, full_end, stop): the query blocks the keys [k_start, k_start + keys)
  see (common.masked_loops' bounds), under the band, the key length (`lengths_ref` given) and
  the segment block-range table for blocks of `keys` keys (`table_ref` given)."""
  low, high = mosaic.diagonal_band(dims)
  # Query q sees key k when low <= k - q <= high, i.e. -high <= q - k <= -low.
  band = (None if high is None else -high, None if low is None else -low)
  ranges = mosaic.block_range(
    k_start,
    k_start + keys - 1,
    band,
    block=dims.block_q,
    num_blocks=dims.num_q_blocks,
    whole_blocks=dims.num_q_blocks,
  )
  if lengths_ref is not None:
    # Keys past the key length get dK = dV = 0: keys all past it see nothing, and in a tile
    # the length cuts every block takes the element predicate.
    ranges = mosaic.emptied(ranges, k_start < kv_len, ranges[0])
    ranges = mosaic.all_masked(ranges, k_start + keys > kv_len)
  return mosaic.narrowed_by_segments(ranges, table_ref, batch, lax.div(k_start, keys))


def query_tile_start(dims: Dims, cta_queries: int):
  """The first query of a dQ kernel's CTA: causal tiles last-first, as in the forward (4 %
  off the causal dQ kernel on an H200,
  benchmarks/results/attention_mosaic_bwd_variants_h200_2026-12-01.log)."""
  num_tiles = dims.num_q_blocks * dims.block_q // cta_queries
  return mosaic.query_tile_start(lax.axis_index("q_tiles"), num_tiles, cta_queries, dims.causal)


def slot_release(consumed, dims: Dims) -> mosaic.SlotRelease:
  """How a kernel's ring slots are released, made once per kernel: the mbarriers `consumed`
  or, with dims.named_releases, named barriers (every consumer waits for a block's load
  before releasing its slot, as mosaic.SlotRelease requires)."""
  (release,) = mosaic.slot_releases((consumed,), dims.num_stages, dims.named_releases)
  return release


def wait_loaded(loaded, slot) -> None:
  """Waits for ring slot `slot` of the streamed blocks; `loaded` holds their barriers, None
  for an absent stream."""
  for barrier in loaded:
    if barrier is not None:
      plgpu.barrier_wait(barrier.at[slot])


def stream_query_blocks(
  dims: Dims, sources, ring, loaded, release, *, batch, kv_head, first, per_head
) -> None:
  """The dK/dV kernels' producer: for each query head of the group in turn, query blocks
  [first, first + per_head) into the ring, each slot reused once the consumers release it.

  Args:
    sources: (q, dout, stats, dropout rows or None) in GMEM.
    ring, loaded: their shared-memory rings and "loaded" barriers, in the same order.
    release: the ring's SlotRelease (`slot_release`).
  """
  q_ref, do_ref, stats_ref, rows_ref = sources

  @pl.loop(0, dims.group * per_head)
  def _(step):
    slot = lax.rem(step, dims.num_stages)
    q_head = kv_head * dims.group + lax.div(step, per_head)
    queries = pl.ds((first + lax.rem(step, per_head)) * dims.block_q, dims.block_q)

    @pl.when(step >= dims.num_stages)
    def _():
      release.await_release(slot)  # Both consumers are done with the slot.

    blocks = [
      q_ref.at[batch, queries, q_head],
      do_ref.at[batch, queries, q_head],
      stats_ref.at[batch, q_head, :, queries],
    ]
    if rows_ref is not None:
      blocks.append(rows_ref.at[batch, q_head, queries])
    for block, smem, barrier in zip(blocks, ring, loaded):
      plgpu.copy_gmem_to_smem(block, smem.at[slot], barrier.at[slot])


@dataclasses.dataclass(frozen=True)
class TileMasking:
  """What a consumer's element predicate reads, fixed for its own rows (traced values).

  Attributes:
    query_dim: the tile axis of the queries: 0 in the dQ kernels (queries x keys), 1 in the
      dK/dV kernels (keys x queries). The consumer's own positions lie along axis 0.
    key_bound: keys at or past kv_len are hidden (dQ always: padded keys; dK/dV only under
      key lengths, since padded keys' own dK and dV rows are cut off).
    kv_len: this batch row's key length.
    own_segments: the segment ids of the consumer's own positions (a vector), or None.
    streamed_segments_ref: the other side's segment ids in GMEM, read per block.
    batch: the batch row.
  """

  query_dim: int
  key_bound: bool
  kv_len: object
  own_segments: object
  streamed_segments_ref: object
  batch: object


def tile_masking(
  query_dim: int,
  *,
  key_bound: bool,
  kv_len,
  own_start,
  own_size: int,
  own_segments_ref,
  streamed_segments_ref,
  batch,
) -> TileMasking:
  own_segments = None
  if own_segments_ref is not None:
    own_segments = mosaic.segment_ids(own_segments_ref, batch, own_start, own_size, 0)
  return TileMasking(query_dim, key_bound, kv_len, own_segments, streamed_segments_ref, batch)


def visible_probs(s, lse2, dims: Dims, q_start, k_start, masking: TileMasking, masked: bool):
  """(P, tanh or None) of a tile (laid out as `masking.query_dim` says), zero where the
  element predicate hides it in a block that needs it (`masked`). Without a band, lengths
  or segments no masked block is visited."""
  probs, capped = probabilities(s, lse2, dims)
  if not masked:
    return probs, capped
  segments = None
  if masking.own_segments is not None:
    streamed_start, streamed_size = (
      (k_start, dims.block_kv) if masking.query_dim == 0 else (q_start, dims.block_q)
    )
    streamed = mosaic.segment_ids(
      masking.streamed_segments_ref, masking.batch, streamed_start, streamed_size, 1
    )
    segments = (
      (masking.own_segments, streamed)
      if masking.query_dim == 0
      else (streamed, masking.own_segments)
    )
  visible = mosaic.tile_visible(
    dims,
    q_start,
    k_start,
    s.shape,
    masking.query_dim,
    key_bound=masking.key_bound,
    kv_len=masking.kv_len,
    segments=segments,
  )
  return (probs if visible is None else jnp.where(visible, probs, 0.0)), capped


def transposed_dropout_keep(dims: Dims, rows_smem, slot, columns, tile):
  """The forward's keep mask on a (keys x queries) tile: query states from the streamed row
  table, key states computed once per consumer."""
  rows = plgpu.load(rows_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
  return mosaic.dropout_keep(rows, columns, tile, 1, dims.dropout_rate)


def stream_row(stats_smem, slot, row: int, tile):
  """Row `row` of a streamed (lse2, D) block, broadcast over a (keys x queries) tile."""
  vector = plgpu.load(stats_smem.at[slot, row], layout=plgpu.Layout.WGMMA.reduce(0))
  return broadcast(vector, tile, 1)


def transposed_logits(k_smem, q_view, tile):
  """S^T = K Q^T of a (keys x queries) tile."""
  zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)

  def product(acc_ref):
    plgpu.wgmma(acc_ref, k_smem, q_view.transpose((1, 0)))

  return pl.run_state(product)(plgpu.ACC.init(zeros))


def accumulate(acc, lhs, rhs_smem):
  """acc + lhs @ rhs, lhs a register tile (cast to the operand dtype), rhs in shared memory."""

  def product(acc_ref):
    plgpu.wgmma(acc_ref, lhs.astype(rhs_smem.dtype), rhs_smem)

  return pl.run_state(product)(plgpu.ACC.init(acc))


def stage_transposed(smem, value_t) -> None:
  """Writes a register tile where a later wgmma reads it from shared memory (the fused
  backward's dS^T, read transposed as dS); the tile's previous product must have landed."""
  smem[...] = value_t.astype(smem.dtype)
  plgpu.commit_smem()


def add_to_gmem(smem, value, out_ref, index) -> None:
  """out_ref[index] += value (float32) by a TMA reduce-add staged through `smem`, once the
  previous add from it has been read out. Adds from different CTAs land in any order."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  smem[...] = value
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem, out_ref.at[index], reduction_op="add")


def store_keys_block(smem, value, out_ref, keys) -> None:
  """Stages a (keys x head dim) result in a buffer its warpgroup no longer reads, then
  copies it to GMEM."""
  smem[...] = value.astype(smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem, out_ref.at[keys])
  plgpu.wait_smem_to_gmem(0)


def stream_key_blocks(
  dims: Dims, sources, ring, loaded, release, *, batch, head, begin, end
) -> None:
  """The dQ kernels' producer: key blocks [begin, end) of the query head's key/value head
  into the ring, each slot reused once the consumers release it (`release`, the ring's
  SlotRelease). sources: (k, v, dropout key states or None) in GMEM; ring, loaded: their
  rings and barriers, in the same order."""
  kv_head = lax.div(head, dims.group)

  @pl.loop(begin, end)
  def _(index):
    slot = lax.rem(index, dims.num_stages)

    @pl.when(index >= begin + dims.num_stages)
    def _():
      release.await_release(slot)

    mosaic.copy_key_block(
      index, slot, sources, ring, loaded, batch=batch, kv_head=kv_head, block_kv=dims.block_kv
    )


def dropout_keep(dims: Dims, rows, columns_smem, slot, tile):
  """The forward's keep mask on a (queries x keys) tile: query states computed once per
  consumer, key states from the streamed table."""
  columns = plgpu.load(columns_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
  return mosaic.dropout_keep(rows, columns, tile, 0, dims.dropout_rate)


def store_dq(smem, dq, dims: Dims, dq_ref, rows) -> None:
  smem[...] = (dq * dims.scale).astype(smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(smem, dq_ref.at[rows])
  plgpu.wait_smem_to_gmem(0)
