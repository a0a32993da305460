"""Pieces shared by the Mosaic GPU attention kernels (forward, dK/dV, dQ).

Tiles live in wgmma's accumulator layout (`plgpu.Layout.WGMMA`); per-row and per-column
vectors of a tile live in its reductions (`.reduce(1)` indexes rows, `.reduce(0)` columns),
so broadcasting them back onto the tile moves no data between threads.
"""

from __future__ import annotations

import dataclasses

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.experimental.mosaic.gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith

from pallas_kernels.attention import common
from pallas_kernels.attention import dropout as attention_dropout
from pallas_kernels.attention import mask as attention_mask

NUM_CONSUMERS = 2  # Consumer warpgroups per CTA; the producer is warpgroup NUM_CONSUMERS.
# Registers per thread: consumers hold the accumulators; the producer only issues copies.
# A CTA of three warpgroups is launched with 168 a thread (64K over 384 threads, in
# multiples of 8); set_max_registers moves them between warpgroups within that total.
LAUNCH_REGISTERS = 168
CONSUMER_REGISTERS = 232
# set_max_registers takes multiples of 8 from 24 to 256.
REGISTER_STEP, FEWEST_REGISTERS = 8, 24


def producer_registers(consumer_registers: int) -> int:
  """What the launch's registers leave the producer once each consumer has its share."""
  return (NUM_CONSUMERS + 1) * LAUNCH_REGISTERS - NUM_CONSUMERS * consumer_registers


PRODUCER_REGISTERS = producer_registers(CONSUMER_REGISTERS)  # 40
# The most a consumer may take, leaving the producer the fewest: 240, FlashAttention-3's.
MOST_CONSUMER_REGISTERS = (
  (((NUM_CONSUMERS + 1) * LAUNCH_REGISTERS - FEWEST_REGISTERS) // NUM_CONSUMERS)
  // REGISTER_STEP
  * REGISTER_STEP
)
# Streaming multiprocessors of an H100 or H200 (SXM): the persistent launches' CTA count when
# lowering without a GPU.
HOPPER_SMS = 132


def num_sms() -> int:
  """SMs of the local GPU (HOPPER_SMS where there is none: lowering for an abstract H100)."""
  device = jax.local_devices()[0]
  return getattr(device, "core_count", HOPPER_SMS) if device.platform == "gpu" else HOPPER_SMS


# 128-byte swizzled (8, 64) tiles: the shared-memory layout wgmma reads without bank
# conflicts. The minor dimension (the head dim) must be a multiple of 64 elements.
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
# The same 128-byte rows for float32 tiles exchanged between warpgroups.
TILED_FLOAT32 = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))
# 64-byte swizzled (8, 32) tiles: wgmma contracts in groups of the swizzle's width, so a
# product contracting over 32 keys needs these.
TILED_NARROW = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(64))


# Hardware named barriers (PTX `bar`) for the consumers' turn-taking: cheaper than an
# mbarrier's arrive and try-wait loop. Mosaic GPU uses id 0 (the whole CTA) and 1 + w (one per
# warpgroup w), so consumer w waits on TURN_BARRIER + w.
TURN_BARRIER = 1 + NUM_CONSUMERS + 1
_CONSUMER_THREADS = NUM_CONSUMERS * 128


def _turn_barrier(operation: str, *, other: bool) -> None:
  @plgpu.inline_mgpu()
  def emit(_):
    i32 = ir.IntegerType.get_signless(32)
    warpgroup = mgpu.utils.warpgroup_idx(sync=True)
    if other:  # The other consumer's barrier: TURN_BARRIER + 1 - w.
      barrier = arith.subi(mgpu.utils.c(TURN_BARRIER + 1, i32), warpgroup)
    else:
      barrier = arith.addi(warpgroup, mgpu.utils.c(TURN_BARRIER, i32))
    mgpu.utils.inline_ptx(
      f"bar.{operation} $0, {_CONSUMER_THREADS};", barrier, has_side_effects=True, convergent=True
    )

  emit()


def pass_turn() -> None:
  """Tells the other consumer it may start its next matrix product (does not wait)."""
  _turn_barrier("arrive", other=True)


def await_turn() -> None:
  """Waits until the other consumer has passed the turn to this one."""
  _turn_barrier("sync", other=False)


def hand_over_turn() -> None:
  """Passes the turn and waits until the other consumer has taken it: a pass that the same
  consumer's next pass cannot overtake (named barriers have no phases)."""
  _turn_barrier("sync", other=True)


# Ring slots handed back to the producer on hardware named barriers (ids after the turns'):
# both consumers `bar.arrive` and the producer warpgroup `bar.sync`s, one barrier per slot.
# An mbarrier arrive is executed by each of a warpgroup's 128 threads (Pallas multiplies the
# arrival count), a named barrier's once per warp.
RELEASE_BARRIER = TURN_BARRIER + NUM_CONSUMERS
_NAMED_BARRIERS = 16  # Per CTA, ids 0-15.
_RELEASE_THREADS = (NUM_CONSUMERS + 1) * 128


@dataclasses.dataclass(frozen=True)
class SlotRelease:
  """How the consumers release a ring slot and the producer waits for it.

  With `first_id` None, an mbarrier per slot (`barriers`, num_arrivals=NUM_CONSUMERS).
  Otherwise hardware named barriers first_id + slot. A named barrier has no phase: an arrival
  joins whichever use of the barrier is open, so a consumer may release a slot only after
  waiting for the load that refilled it (its release of the slot's previous block is then
  synced by the producer already). The kernels that take them keep to that rule.
  """

  barriers: object
  first_id: int | None = None

  def release(self, slot) -> None:
    if self.first_id is None:
      plgpu.barrier_arrive(self.barriers.at[slot])
    else:
      _named_barrier("arrive", self.first_id + slot)

  def await_release(self, slot) -> None:
    if self.first_id is None:
      plgpu.barrier_wait(self.barriers.at[slot])
    else:
      _named_barrier("sync", self.first_id + slot)


def slot_releases(barriers, num_stages: int, named: bool):
  """A SlotRelease per mbarrier ref in `barriers` (one ring of `num_stages` slots each), on
  those refs or (named) on consecutive named barrier ids after the turns'."""
  if not named:
    return tuple(SlotRelease(b) for b in barriers)
  if RELEASE_BARRIER + len(barriers) * num_stages > _NAMED_BARRIERS:
    raise ValueError(
      f"{len(barriers)} rings of {num_stages} slots need more than the "
      f"{_NAMED_BARRIERS} named barriers a CTA has"
    )
  return tuple(SlotRelease(b, RELEASE_BARRIER + i * num_stages) for i, b in enumerate(barriers))


def _named_barrier(operation: str, barrier) -> None:
  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_SPLAT,))
  def emit(_, barrier):
    mgpu.utils.inline_ptx(
      f"bar.{operation} $0, {_RELEASE_THREADS};",
      barrier.registers[()],
      has_side_effects=True,
      convergent=True,
    )

  emit(jnp.asarray(barrier, jnp.int32))


def capped_logits(s, dims):
  """(logits2, tanh): S = Q K^T after scale and soft cap, in base-2 units, and the tanh the
  backward needs (d cap * tanh(z / cap) / dz = 1 - tanh^2). Only with `dims.soft_cap`; without
  one the kernels fold the scale into the exp2 argument instead."""
  capped = jnp.tanh(s * (dims.scale / dims.soft_cap))
  return capped * (dims.soft_cap * common.LOG2_E), capped


def diagonal_band(dims):
  """Bounds (low, high) on key - query from causality and the window (None: unbounded)."""
  return attention_mask.MaskRules(dims.causal, dims.window).diagonal_band()


def block_range(first, last, band, *, block: int, num_blocks: int, whole_blocks: int):
  """Which blocks of positions p are seen from the positions a in [first, last] under
  low <= p - a <= high (`band`).

  Returns (start, full_start, full_end, end): blocks [start, end) hold a position seen from
  some a; blocks [full_start, full_end), within them and below `whole_blocks` (the blocks
  without padding), are seen whole from every a, so they need no element mask. The other
  blocks of [start, end) need it. Divisions only see non-negative numbers (lax.div
  truncates).

  Where no block can need the mask before the full ones (no lower bound) the result's
  full_start is its start, and where none can after them (no upper bound, no padding) its
  full_end is its end: the same values, which common.masked_loops recognises to leave those
  loops out.
  """
  low, high = band
  start = 0 if low is None else jnp.minimum(lax.div(jnp.maximum(first + low, 0), block), num_blocks)
  end = num_blocks  # Never below start, which is at most num_blocks.
  if high is not None:  # Blocks whose first position is at most last + high.
    end = jnp.minimum(lax.div(jnp.maximum(last + high, -1) + block, block), num_blocks)
    end = jnp.maximum(end, start)
  full_start = start
  if low is not None:  # The first block starting at or after last + low.
    full_start = jnp.clip(lax.div(jnp.maximum(last + low, 0) + block - 1, block), start, end)
  if high is None and common.same_bound(whole_blocks, num_blocks):
    return start, full_start, end, end
  full_end = whole_blocks
  if high is not None:  # Blocks ending at or before first + high.
    full_end = jnp.minimum(lax.div(jnp.maximum(first + high + 1, 0), block), whole_blocks)
  return start, full_start, jnp.clip(full_end, full_start, end), end


def kv_block_range(dims, first_query, last_query, kv_len=None):
  """block_range of the key blocks seen from queries [first_query, last_query] (the forward
  and dQ kernels). `dims` has causal, window, block_kv, kv_len; `kv_len` (traced, per
  batch row under key_value_seq_lengths) overrides dims.kv_len."""
  kv_len = dims.kv_len if kv_len is None else kv_len
  return block_range(
    first_query,
    last_query,
    diagonal_band(dims),
    block=dims.block_kv,
    num_blocks=(kv_len + dims.block_kv - 1) // dims.block_kv,
    whole_blocks=kv_len // dims.block_kv,
  )


def tile_visible(
  dims,
  q_start,
  k_start,
  shape,
  query_dim: int,
  *,
  key_bound: bool = True,
  kv_len=None,
  segments=None,
):
  """attention_mask's element predicate on a tile whose queries lie along `query_dim`;
  with `key_bound`, keys at or past `kv_len` (default dims.kv_len: the padding) are
  invisible too. segments: (query ids, key ids), vectors along the tile's two axes."""
  q_segments = kv_segments = None
  if segments is not None:
    q_segments = broadcast(segments[0], shape, query_dim)
    kv_segments = broadcast(segments[1], shape, 1 - query_dim)
  rules = attention_mask.MaskRules(dims.causal, dims.window)
  # Query positions only where a band rule reads them: an unused value is one jax 0.12's
  # Mosaic layout inference cannot place.
  return attention_mask.element_visible(
    rules,
    _positions(q_start, shape, query_dim) if rules.banded else None,
    _positions(k_start, shape, 1 - query_dim),
    kv_length=(dims.kv_len if kv_len is None else kv_len) if key_bound else None,
    q_segments=q_segments,
    kv_segments=kv_segments,
  )


def segment_block_ranges(
  q_segments, kv_segments, *, block_q: int, block_kv: int, over_queries: bool = False
):
  """int32 [B, blocks, 4]: for each query block (each key block, `over_queries`), the
  (start, full_start, full_end, end) range of key (query) blocks whose segment ids may match
  (attention_mask's block rules with the segment rule alone; computed by XLA). The kernels
  intersect it with their band ranges (`intersect_ranges`). Segments are padded to whole
  blocks (common.pad_edge in pallas_kernels/attention)."""
  batch = q_segments.shape[0]
  any_visible, all_visible = attention_mask.block_visibility(
    attention_mask.MaskRules(),
    batch=batch,
    num_q_blocks=q_segments.shape[1] // block_q,
    num_kv_blocks=kv_segments.shape[1] // block_kv,
    block_q=block_q,
    block_kv=block_kv,
    kv_bound=jnp.full((batch,), kv_segments.shape[1], jnp.int32),
    q_segments=q_segments,
    kv_segments=kv_segments,
  )
  if over_queries:
    any_visible, all_visible = (jnp.swapaxes(a, -1, -2) for a in (any_visible, all_visible))
  return attention_mask.block_loop_bounds(any_visible, all_visible)[:, 0]


def intersect_ranges(ranges, other):
  """Block ranges (start, full_start, full_end, end) allowed by both: the run needing no
  element mask is where both need none."""
  start, full_start, full_end, end = ranges
  start = jnp.maximum(start, other[0])
  end = jnp.maximum(jnp.minimum(end, other[3]), start)
  full_start = jnp.clip(jnp.maximum(full_start, other[1]), start, end)
  full_end = jnp.clip(jnp.minimum(full_end, other[2]), full_start, end)
  return start, full_start, full_end, end


def narrowed_by_segments(ranges, table_ref, batch, block_index):
  """Block ranges intersected with row `block_index` of a `segment_block_ranges` table (read
  in the kernel); unchanged without segment ids (`table_ref` None)."""
  if table_ref is None:
    return ranges
  return intersect_ranges(ranges, tuple(table_ref[batch, block_index, i] for i in range(4)))


def query_tile_start(index, num_tiles: int, tile_queries: int, causal: bool):
  """The first query of query tile `index` in launch order (the forward and dQ kernels).
  Under causal masking the tiles run last-first: the last see the most keys, and starting
  them first shortens the grid's tail."""
  if causal:
    index = num_tiles - 1 - index
  return index * tile_queries


def cta_key_range(dims, cta_q_start, lengths, cta_table_ref, batch):
  """(begin, end): the key blocks a CTA of NUM_CONSUMERS * block_q queries streams (forward
  and dQ kernels), from the first one consumer 0 needs to the last one consumer 1 (the later
  queries) needs; none if all its queries lie past the query length. lengths: (query length
  or None, key length), `sequence_lengths`."""
  q_len, kv_len = lengths
  cta_rows = NUM_CONSUMERS * dims.block_q
  begin, _, _, end = kv_block_range(dims, cta_q_start, cta_q_start + cta_rows - 1, kv_len)
  if q_len is not None:
    end = jnp.where(cta_q_start < q_len, end, begin)
  begin, _, _, end = narrowed_by_segments(
    (begin, begin, begin, end), cta_table_ref, batch, lax.div(cta_q_start, cta_rows)
  )
  return begin, end


def warpgroup_key_range(dims, q_start, lengths, table_ref, batch, cta_range=None):
  """(start, full_start, full_end, end): the key blocks a consumer's block_q queries from
  `q_start` visit (forward and dQ kernels), within the CTA's `cta_range` (None: the CTA
  holds just these queries); nothing if they all lie past the query length."""
  q_len, kv_len = lengths
  ranges = kv_block_range(dims, q_start, q_start + dims.block_q - 1, kv_len)
  if q_len is not None:
    ranges = emptied(ranges, q_start < q_len, ranges[0] if cta_range is None else cta_range[0])
  ranges = narrowed_by_segments(ranges, table_ref, batch, lax.div(q_start, dims.block_q))
  return ranges if cta_range is None else within(ranges, *cta_range)


def pipelined_loops(bounds, first_step, step, last_step, carry):
  """The block loops of a kernel whose step j issues block j's first products together with
  block j-1's last one (FlashAttention-3, section 3.2): `first_step(start, carry)` on the
  first block, `step(index, carry, masked)` on the others over common.masked_loops' ranges,
  then `last_step(end - 1, carry)` to finish the last block. Nothing runs on an empty range.
  The first block always takes the element predicate (it keeps a whole block whole): one
  loop instead of three."""
  start, full_start, full_end, end = bounds
  first_end = jnp.minimum(start + 1, end)
  carry = lax.fori_loop(start, first_end, first_step, carry)
  # max(start, first_end) is first_end and max(end, first_end) is end: bounds that were one
  # value stay one, so masked_loops still leaves out the ranges they rule out.
  rest_full_start = (
    first_end if common.same_bound(full_start, start) else jnp.maximum(full_start, first_end)
  )
  rest_full_end = end if common.same_bound(full_end, end) else jnp.maximum(full_end, first_end)
  rest = (first_end, rest_full_start, rest_full_end, end)
  carry = common.masked_loops(rest, step, carry)
  return lax.fori_loop(jnp.maximum(end - 1, start), end, last_step, carry)


def within(ranges, first, stop):
  """Block ranges clamped into the CTA's stream [first, stop): a warpgroup that needs nothing
  then releases exactly the blocks the producer loads."""
  clamped = {}  # One clamp per distinct bound: bounds that were one value stay one.
  for bound in ranges:
    if id(bound) not in clamped:
      clamped[id(bound)] = jnp.clip(bound, first, stop)
  return tuple(clamped[id(bound)] for bound in ranges)


def segment_ids(ref, batch, start, size: int, dim: int):
  """The segment ids of `size` positions from `start`, laid along tile axis `dim`; read
  straight from GMEM (a few hundred bytes, L2-resident)."""
  return plgpu.load(
    ref.at[batch, pl.ds(start, size)], layout=plgpu.Layout.WGMMA.reduce(1 - dim), optimized=False
  )


def sequence_lengths_table(q_length, kv_length, t: int, s: int):
  """int32 [B, 2]: each batch row's (query length, key length), clipped to [0, T] and
  [0, S]; an absent length is the whole sequence. None when both are absent."""
  if q_length is None and kv_length is None:
    return None
  batch = (q_length if q_length is not None else kv_length).shape[0]

  def column(length, full):
    if length is None:
      return jnp.full((batch,), full, jnp.int32)
    return jnp.clip(length.astype(jnp.int32), 0, full)

  return jnp.stack([column(q_length, t), column(kv_length, s)], axis=1)


def sequence_lengths(lengths_ref, batch, dims):
  """(query length, key length) of this batch row: from the int32 [B, 2] table the caller
  passes under query_seq_lengths / key_value_seq_lengths, else (None, dims.kv_len)."""
  if lengths_ref is None:
    return None, dims.kv_len
  return lengths_ref[batch, 0], lengths_ref[batch, 1]


def emptied(ranges, keep, at):
  """Block ranges (start, full_start, full_end, end) collapsed to nothing at block `at`
  where `keep` is false (a warpgroup whose rows all lie past a sequence length)."""
  return tuple(jnp.where(keep, bound, at) for bound in ranges)


def all_masked(ranges, masked):
  """Block ranges whose blocks all take the element predicate where `masked` is true (a
  key tile cut by the key length: every block it meets has invisible keys)."""
  start, full_start, full_end, end = ranges
  return (start, jnp.where(masked, end, full_start), jnp.where(masked, end, full_end), end)


def copy_key_block(index, slot, sources, ring, loaded, *, batch, kv_head, block_kv: int):
  """Starts the TMA copies of key block `index` into ring slot `slot` (the producers of the
  forward and dQ kernels).

  Args:
    sources: (k, v, dropout key states) in GMEM: [B, S, K, D], [B, S, K, D], [S]; None for
      one not to copy.
    ring, loaded: their shared-memory rings and "loaded" barriers, in the same order.
  """
  keys = pl.ds(index * block_kv, block_kv)
  k_ref, v_ref, columns_ref = sources
  blocks = [None if ref is None else ref.at[batch, keys, kv_head] for ref in (k_ref, v_ref)]
  blocks.append(None if columns_ref is None else columns_ref.at[keys])
  for block, smem, barrier in zip(blocks, ring, loaded):
    if block is not None:
      plgpu.copy_gmem_to_smem(block, smem.at[slot], barrier.at[slot])


def broadcast(vector, shape, dim: int):
  """A row or column vector laid along tile axis `dim`, broadcast over the other axis."""
  return lax.broadcast_in_dim(vector, shape, [dim])


def tile_positions(start, shape, dim: int):
  """start + the index along axis `dim` of every element of a tile, int32."""
  return start + plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


# Mask positions broadcast from a vector instead of made as a whole tile of indices: ptxas
# then keeps far fewer registers in the masked steps (deviceless H100 compile, jax 0.11.2,
# 2026-12-08: the dK/dV kernel's spills at d=128 fell from 152 to 8 bytes causal and from
# 332 to 180 under a 1023-key window, and at d=64 causal from 92 to 0). Off until timed on
# a GPU (scripts/gpu_check.sh positions_ab).
POSITIONS_FROM_VECTORS = False


def _positions(start, shape, dim: int):
  """tile_positions(start, shape, dim), from a vector when POSITIONS_FROM_VECTORS."""
  if POSITIONS_FROM_VECTORS:
    return broadcast(vector_positions(start, shape, dim), shape, dim)
  return tile_positions(start, shape, dim)


def vector_positions(start, shape, dim: int):
  """start + index of a vector along tile axis `dim` (laid out to broadcast onto the tile)."""
  layout = plgpu.Layout.WGMMA.reduce(1 - dim)
  return start + plgpu.broadcasted_iota(jnp.int32, (shape[dim],), 0, layout=layout)


def dropout_rows(seed, q_start, shape, query_dim: int):
  """Dropout hash states of a tile's queries (attention_dropout.row_hashes), a vector.

  Computed in the kernel where a warpgroup's queries stay fixed (forward, dQ): each thread
  holds two of them.
  """
  return attention_dropout.row_hashes(seed, vector_positions(q_start, shape, query_dim))


def dropout_columns(k_start, shape, query_dim: int):
  """Dropout hash states of a tile's keys (attention_dropout.column_hashes), a vector.

  Computed in the kernel where a warpgroup's keys stay fixed (dK/dV).
  """
  return attention_dropout.column_hashes(vector_positions(k_start, shape, 1 - query_dim))


# Where the vector changes every step, the kernels load it from a table computed beforehand:
# along a tile's minor axis each thread holds a quarter of the vector, and hashing it there
# cost more integer work than the per-element keep decisions themselves.


def dropout_row_table(seeds, length: int):
  """uint32 [B, N, length]: the row states of every query position, per (batch, head)."""
  positions = jnp.arange(length, dtype=jnp.int32)[None, None, :]
  return attention_dropout.row_hashes(seeds.astype(jnp.uint32)[:, :, None], positions)


def dropout_column_table(length: int):
  """uint32 [length]: the column states of every key position."""
  return attention_dropout.column_hashes(jnp.arange(length, dtype=jnp.int32))


def dropout_keep(rows, columns, shape, query_dim: int, rate: float):
  """Which elements of a tile survive dropout, from its query and key hash vectors."""
  return attention_dropout.keep_from_parts(
    broadcast(rows, shape, query_dim),
    broadcast(columns, shape, 1 - query_dim),
    attention_dropout.keep_threshold(rate),
  )


def with_absent_inputs(kernel, inputs):
  """`kernel` taking a ref (or None) for each of `inputs`, which may hold None: `plgpu.kernel`
  passes refs only for the arrays it is given. Call the result on the present inputs."""
  present = [x is not None for x in inputs]
  count = sum(present)

  def wrapped(*refs, **kwargs):
    given = iter(refs[:count])
    return kernel(*(next(given) if p else None for p in present), *refs[count:], **kwargs)

  return wrapped
