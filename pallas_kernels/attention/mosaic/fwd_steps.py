"""Steps of the Mosaic GPU attention forward kernel (fwd.py).

A consumer warpgroup runs a query tile as a walk over the key blocks in the ring
(`walk_key_blocks`). Each block is one `step`: S = Q K^T (`logits_product`), then the soft cap
and element mask (`visible_logits`), the online softmax update (`probabilities`), dropout
(`dropped`), O += P V (`output_product`) and the slot's release. The epilogue normalises the
output (`normalise`) and writes it and the logsumexp (`write_tile`). The producer streams each
tile's key blocks into the ring (`stream_key_blocks`). Tiles are (queries x keys); `dims` is the
kernel's fwd._Dims throughout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.attention import common
from pallas_kernels.attention.mosaic import common as mosaic


class KeyRing(NamedTuple):
  """The ring of key blocks that the producer fills and the consumers walk: shared-memory
  slots, their "loaded" barriers and how a slot is handed back (mosaic.SlotRelease). The
  dropout key states' slots and barrier are None without dropout."""

  k_smem: object
  v_smem: object
  columns_smem: object
  k_loaded: object
  v_loaded: object
  columns_loaded: object
  k_release: mosaic.SlotRelease
  v_release: mosaic.SlotRelease


class Softmax(NamedTuple):
  """A consumer's online softmax state (FlashAttention-2, section 3.1.1), float32 registers:
  the output accumulated so far, not yet divided by the row sums; each row's running max of
  its base-2 logits; each row's sum of exp2(logit - max)."""

  acc: jax.Array
  row_max: jax.Array
  row_sum: jax.Array


def empty_softmax(dims) -> Softmax:
  """The state before any key block: max -inf, sums and output zero."""
  row_max = plgpu.layout_cast(
    jnp.full((dims.block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
  )
  row_sum = plgpu.layout_cast(
    jnp.full((dims.block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1)
  )
  acc = plgpu.layout_cast(
    jnp.full((dims.block_q, dims.head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA
  )
  return Softmax(acc, row_max, row_sum)


@dataclasses.dataclass(frozen=True)
class KeyWalk:
  """One consumer's walk over a tile's key blocks: what its steps read, fixed for the tile
  (traced values where they vary).

  Attributes:
    dims: the kernel's static sizes.
    ring: the key ring.
    q_smem: the consumer's queries in shared memory.
    batch: the tile's batch row.
    q_start: the consumer's first query.
    kv_len: the batch row's key length.
    segments: the queries' segment ids (a vector), or None.
    kv_segments_ref: the keys' segment ids in GMEM, read per masked block; None without
      segments.
    dropout_rows: the queries' dropout hash states (a vector), or None.
    blocks: (start, full_start, full_end, end): the key blocks the consumer visits
      (common.masked_loops' bounds).
    cta_blocks: (begin, end): the key blocks the CTA streams; the consumer releases those it
      does not visit.
    stream: the key blocks the CTA streamed before this tile: ring slots are taken in turn
      over all of them.
  """

  dims: object
  ring: KeyRing
  q_smem: object
  batch: object
  q_start: object
  kv_len: object
  segments: object
  kv_segments_ref: object
  dropout_rows: object
  blocks: tuple
  cta_blocks: tuple
  stream: object

  def slot(self, index):
    """The ring slot of key block `index`."""
    return lax.rem(self.stream + index - self.cta_blocks[0], self.dims.num_stages)


def walk_key_blocks(walk: KeyWalk, state: Softmax) -> Softmax:
  """The consumer's share of a tile: releases the blocks its CTA streams before its own,
  visits its own (`step`, or the overlapped steps with dims.overlap_softmax) and releases
  those after them. Returns the state after the last block."""
  dims = walk.dims
  start, _, _, end = walk.blocks
  cta_begin, cta_end = walk.cta_blocks
  if dims.late_starts:
    lax.fori_loop(cta_begin, start, functools.partial(skip_block, walk, wait=True), None)

  @pl.when(start < end)
  def _():
    plgpu.barrier_wait(walk.ring.k_loaded.at[walk.slot(start)])

  if dims.overlap_softmax:
    no_probs = plgpu.layout_cast(
      jnp.zeros((dims.block_q, dims.block_kv), walk.ring.k_smem.dtype), plgpu.Layout.WGMMA
    )
    state, _ = mosaic.pipelined_loops(
      walk.blocks,
      functools.partial(first_step, walk),
      functools.partial(overlapped_step, walk),
      functools.partial(last_step, walk),
      (state, no_probs),
    )
  else:
    state = common.masked_loops(walk.blocks, functools.partial(step, walk), state)
  # Waits for the loads too where the slots' next waits must see the next phase (`skip_block`).
  lax.fori_loop(
    end,
    cta_end,
    functools.partial(skip_block, walk, wait=dims.persistent or dims.named_releases),
    None,
  )
  return state


def step(walk: KeyWalk, index, state: Softmax, masked: bool) -> Softmax:
  """Key block `index`: S = Q K^T, the softmax update, O += P V (`masked`: the block takes the
  element predicate). With dims.late_row_sum the row sums are taken while O += P V runs."""
  slot = walk.slot(index)
  logits = logits_product(walk, slot)
  probs, state, _, unsummed = probabilities(
    walk, logits, index, slot, masked, state, late_sum=walk.dims.late_row_sum
  )
  acc, block_sum = output_product(
    walk, state.acc, probs, slot, next_keys_after=index, unsummed=unsummed
  )
  return Softmax(
    acc, state.row_max, state.row_sum if block_sum is None else state.row_sum + block_sum
  )


# With dims.overlap_softmax (FlashAttention-3, section 3.2: intra-warpgroup pipelining) block
# j's S = Q K^T is issued together with block j - 1's O += P V, and block j's softmax runs while
# that product is still on the tensor cores. The carry is then (state, block j - 1's
# probabilities), whose product with V is not yet in the accumulator; the first block only
# computes S and its softmax, and a last step adds the last product (mosaic.pipelined_loops).


def first_step(walk: KeyWalk, index, carry):
  """The first block, overlapped: S = Q K^T and its softmax, no product with V yet."""
  state, _ = carry
  slot = walk.slot(index)
  logits = logits_product(walk, slot)
  # The accumulator is still zero: no rescaling.
  probs, state, _, _ = probabilities(walk, logits, index, slot, True, state, rescale=False)
  await_next_keys(walk, index)
  return state, probs


def overlapped_step(walk: KeyWalk, index, carry, masked: bool):
  """Block `index`'s S = Q K^T issued with the previous block's O += P V, its softmax run
  while the latter is in flight; the accumulator is rescaled once that product has landed."""
  state, previous_probs = carry
  dims, ring = walk.dims, walk.ring
  slot, previous = walk.slot(index), walk.slot(index - 1)
  plgpu.barrier_wait(ring.v_loaded.at[previous])
  mosaic.await_turn()

  def products(out_ref, logits_ref):
    out_ref[...] = state.acc
    plgpu.wgmma(logits_ref, walk.q_smem, ring.k_smem.at[slot].transpose((1, 0)))
    plgpu.wgmma(out_ref, previous_probs, ring.v_smem.at[previous])
    mosaic.pass_turn()
    # wgmma groups complete in order: with at most one in flight, S is done.
    logits = plgpu.wgmma_accumulator_load(logits_ref, wait_n=1)
    ring.k_release.release(slot)
    probs, new_state, correction, _ = probabilities(
      walk, logits, index, slot, masked, state, rescale=False
    )
    await_next_keys(walk, index)
    return out_ref[...], probs, new_state.row_max, new_state.row_sum, correction

  acc, probs, row_max, row_sum, correction = pl.run_scoped(
    products,
    plgpu.ACC((dims.block_q, dims.head_dim), jnp.float32),
    plgpu.ACC((dims.block_q, dims.block_kv), jnp.float32),
  )
  ring.v_release.release(previous)
  acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
  return Softmax(acc, row_max, row_sum), probs


def last_step(walk: KeyWalk, index, carry):
  """The last block's O += P V, overlapped."""
  state, probs = carry
  acc, _ = output_product(walk, state.acc, probs, walk.slot(index))
  return state._replace(acc=acc), probs


def skip_block(walk: KeyWalk, index, carry, *, wait: bool):
  """Block `index`, which this consumer does not need but the other does: releases its slots
  and keeps the alternation in step (one pass and one await of the turn, as in `step`).

  With `wait` it first waits for the loads, as it must before its own blocks: barrier phases
  advance per wait, and its later waits on these slots must see the next phase. So must it
  after them in a persistent CTA, whose next tile waits on the same slots, and with named
  releases (mosaic.SlotRelease).
  """
  ring = walk.ring
  slot = walk.slot(index)
  if wait:
    plgpu.barrier_wait(ring.k_loaded.at[slot])
    plgpu.barrier_wait(ring.v_loaded.at[slot])
    if ring.columns_loaded is not None:
      plgpu.barrier_wait(ring.columns_loaded.at[slot])
  ring.k_release.release(slot)
  ring.v_release.release(slot)
  mosaic.pass_turn()
  mosaic.await_turn()
  return carry


def logits_product(walk: KeyWalk, slot):
  """S = Q K^T of the block in `slot`, passing the turn once it is issued; releases the keys'
  slot once it has landed."""
  ring = walk.ring

  def product(acc_ref):
    plgpu.wgmma(acc_ref, walk.q_smem, ring.k_smem.at[slot].transpose((1, 0)))
    mosaic.pass_turn()
    return acc_ref[...]

  logits = pl.run_scoped(product, plgpu.ACC((walk.dims.block_q, walk.dims.block_kv), jnp.float32))
  ring.k_release.release(slot)
  return logits


def await_next_keys(walk: KeyWalk, index) -> None:
  """Waits for the keys of the block after `index`, where the consumer visits it."""
  next_index = index + 1

  @pl.when(next_index < walk.blocks[3])
  def _():
    plgpu.barrier_wait(walk.ring.k_loaded.at[walk.slot(next_index)])


def visible_logits(walk: KeyWalk, logits, index, masked: bool):
  """(logits, log2_scale): block `index`'s logits soft-capped and, in a block the element
  predicate cuts (`masked`), -inf where it hides them; times log2_scale they are base-2."""
  dims = walk.dims
  # Base-2 logits: one multiply by scale * log2(e), fused into the exp2 argument (a soft cap
  # applies the scale inside its tanh, before the mask: tanh would make -inf finite).
  log2_scale = dims.scale * common.LOG2_E
  if dims.soft_cap is not None:
    logits, _ = mosaic.capped_logits(logits, dims)
    log2_scale = 1.0
  if masked:
    k_start = index * dims.block_kv
    segments = None
    if walk.segments is not None:
      segments = (
        walk.segments,
        mosaic.segment_ids(walk.kv_segments_ref, walk.batch, k_start, dims.block_kv, 1),
      )
    visible = mosaic.tile_visible(
      dims,
      walk.q_start,
      k_start,
      (dims.block_q, dims.block_kv),
      0,
      kv_len=walk.kv_len,
      segments=segments,
    )
    logits = jnp.where(visible, logits, -jnp.inf)
  return logits, log2_scale


def probabilities(
  walk: KeyWalk,
  logits,
  index,
  slot,
  masked: bool,
  state: Softmax,
  *,
  rescale: bool = True,
  late_sum: bool = False,
):
  """The online softmax update of one key block's logits (FlashAttention-2, section 3.1.1).

  Returns:
    P in the input dtype, dropout applied; the new state, whose output is rescaled only with
    `rescale` (else left as given); the factor that rescales the output accumulated so far;
    None or, with `late_sum`, the float32 probabilities whose sum the new row sums still lack.
  """
  logits, log2_scale = visible_logits(walk, logits, index, masked)
  new_max = jnp.maximum(state.row_max, logits.max(axis=1) * log2_scale)
  shift = new_max
  if masked and walk.dims.empty_rows:
    # A row may have seen no key yet (under a window): its max is still -inf, and
    # subtracting it would give NaN.
    shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
  correction = jnp.exp2(state.row_max - shift)
  probs = jnp.exp2(logits * log2_scale - lax.broadcast_in_dim(shift, logits.shape, [0]))
  acc = state.acc
  if rescale:
    acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
  row_sum = state.row_sum * correction
  unsummed = probs if late_sum else None
  if not late_sum:
    row_sum = row_sum + probs.sum(axis=1)
  if walk.dropout_rows is not None:
    probs = dropped(walk, probs, slot)
  return (
    probs.astype(walk.ring.k_smem.dtype),
    Softmax(acc, new_max, row_sum),
    correction,
    unsummed,
  )


def dropped(walk: KeyWalk, probs, slot):
  """The probabilities with dropout's drops zeroed. The row sum counts every probability;
  only the product with V sees the drops."""
  ring, dims = walk.ring, walk.dims
  # The producer loaded the block's key states beside it; the slot is refilled only after this
  # block's last product (v_consumed), so they are still there.
  plgpu.barrier_wait(ring.columns_loaded.at[slot])
  columns = plgpu.load(ring.columns_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
  keep = mosaic.dropout_keep(
    walk.dropout_rows, columns, (dims.block_q, dims.block_kv), 0, dims.dropout_rate
  )
  return jnp.where(keep, probs, 0.0)


def output_product(walk: KeyWalk, acc, probs, slot, next_keys_after=None, unsummed=None):
  """O += P V of the block in `slot`, on this consumer's turn; while it runs, waits for the
  keys after block `next_keys_after` (when given) and sums the rows of `unsummed`
  (dims.late_row_sum; else None). Releases the values' slot. Returns (O, the row sums or
  None)."""
  ring, dims = walk.ring, walk.dims
  plgpu.barrier_wait(ring.v_loaded.at[slot])
  mosaic.await_turn()

  def product(acc_ref):
    plgpu.wgmma(acc_ref, probs, ring.v_smem.at[slot])
    block_sum = None if unsummed is None else unsummed.sum(axis=1)
    if next_keys_after is not None:
      await_next_keys(walk, next_keys_after)
    return block_sum

  if unsummed is None:
    acc, block_sum = pl.run_state(product)(plgpu.ACC.init(acc)), None
  else:

    def summing_product(acc_ref):
      acc_ref[...] = acc
      block_sum = product(acc_ref)
      return acc_ref[...], block_sum

    acc, block_sum = pl.run_scoped(
      summing_product, plgpu.ACC((dims.block_q, dims.head_dim), jnp.float32)
    )
  ring.v_release.release(slot)
  return acc, block_sum


def normalise(dims, state: Softmax, q_start, q_len):
  """The epilogue's first half: the output divided by the row sums, deferred to here
  (FlashAttention-2, section 3.1.1), and by dropout's 1 - rate.

  Returns (the state with that output and empty rows' sums set to 1, the empty rows or None).
  """
  acc, row_max, row_sum = state
  # Without a window or lengths every row sees key 0 (causality is top-left aligned), so
  # row_sum > 0. Otherwise a row may see no key, or lie past the query length: it gets output
  # 0 and logsumexp EMPTY_ROW_LSE, as from the Triton kernel.
  empty = None
  if dims.empty_rows:
    empty = row_sum == 0.0
    if q_len is not None:
      rows_past = mosaic.vector_positions(q_start, (dims.block_q, dims.head_dim), 0) >= q_len
      empty = jnp.logical_or(empty, rows_past)
    row_sum = jnp.where(empty, 1.0, row_sum)
  normaliser = row_sum * (1.0 - dims.dropout_rate) if dims.dropout_rate else row_sum
  inverse = 1.0 / normaliser
  if empty is not None:  # Rows past the query length did accumulate: drop their sums.
    inverse = jnp.where(empty, 0.0, inverse)
  acc = acc * lax.broadcast_in_dim(inverse, acc.shape, [0])
  return Softmax(acc, row_max, row_sum), empty


def write_tile(dims, state: Softmax, empty, buffers, out_rows, lse_rows) -> None:
  """The epilogue's second half: the normalised output and the natural-log logsumexp
  (common.EMPTY_ROW_LSE, finite, for `empty` rows) to GMEM (`out_rows`, `lse_rows`) through
  shared memory (`buffers`: the output's and the logsumexp's)."""
  o_smem, lse_smem = buffers
  if dims.persistent:  # The previous tile's output has left the buffers.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  lse = state.row_max * common.LN_2 + jnp.log(state.row_sum)  # Natural-log logsumexp.
  lse_smem[...] = lse if empty is None else jnp.where(empty, common.EMPTY_ROW_LSE, lse)
  store_output(dims, state.acc, o_smem, out_rows)
  plgpu.copy_smem_to_gmem(lse_smem, lse_rows)


def store_output(dims, acc, o_smem, out_rows) -> None:
  """The output through `o_smem`: Q's buffer at once or, under the persistent launch, one
  slot's width of columns at a time through its own slots, each refilled once its previous
  copy has read it (the next tile's queries are already loading into Q's buffer). Its
  commit also publishes the logsumexp."""
  if not dims.persistent:
    o_smem[...] = acc.astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_rows)
    return
  num_slots, width = o_smem.shape[0], o_smem.shape[-1]
  for chunk in range(dims.head_dim // width):
    slot, columns = chunk % num_slots, pl.ds(chunk * width, width)
    if chunk >= num_slots:
      plgpu.wait_smem_to_gmem(num_slots - 1, wait_read_only=True)
    o_smem[slot] = acc[:, chunk * width : (chunk + 1) * width].astype(o_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[slot], out_rows.at[:, columns])


def stream_key_blocks(dims, ring: KeyRing, sources, *, batch, head, cta_blocks, stream) -> None:
  """The producer's share of a tile: key blocks [begin, end) (`cta_blocks`) of the query
  head's key/value head into the ring, in the slots that follow the `stream` blocks of earlier
  tiles. A slot is refilled once both consumers have released its previous block.

  Args:
    sources: (k, v, dropout key states or None) in GMEM.
  """
  begin, end = cta_blocks
  k_ref, v_ref, columns_ref = sources
  copy = functools.partial(
    mosaic.copy_key_block, batch=batch, kv_head=lax.div(head, dims.group), block_kv=dims.block_kv
  )

  @pl.loop(begin, end)
  def _(index):
    position = stream + index - begin
    slot = lax.rem(position, dims.num_stages)
    refill = position >= dims.num_stages
    pl.when(refill)(lambda: ring.k_release.await_release(slot))
    if dims.overlap_softmax:
      # A consumer releases a block's values one step after its keys (the P V product runs
      # with the next block's S = Q K^T) and waits for the next keys before that: the keys
      # must not wait for the values. The dropout key states stay with the values, which the
      # softmax reads them beside.
      copy(index, slot, (k_ref, None, None), (ring.k_smem, None, None), (ring.k_loaded, None, None))
      pl.when(refill)(lambda: ring.v_release.await_release(slot))
      copy(
        index,
        slot,
        (None, v_ref, columns_ref),
        (None, ring.v_smem, ring.columns_smem),
        (None, ring.v_loaded, ring.columns_loaded),
      )
    else:
      pl.when(refill)(lambda: ring.v_release.await_release(slot))
      copy(
        index,
        slot,
        (k_ref, v_ref, columns_ref),
        (ring.k_smem, ring.v_smem, ring.columns_smem),
        (ring.k_loaded, ring.v_loaded, ring.columns_loaded),
      )
