"""The attention masking rules, in one place.

A query at position `q` may attend to a key at position `k` when every active rule allows it:

  causal        k <= q                      (top-left aligned, as in jax.nn)
  window        q - left <= k <= q + right  (inclusive, as in jax.nn)
  lengths       q < query_length and k < key_value_length
  segments      query_segment[q] == key_segment[k]
  boolean mask  mask[b, n, q, k]

Two views of the same rules live here:
- `element_visible` decides single (query, key) pairs. The kernels call it on each block they
  compute, and the reference calls it on the whole T x S grid.
- `block_visibility` decides whole (query block, key block) tiles: may any pair be visible, and
  are all pairs visible? `block_loop_bounds` turns that into the loop bounds each kernel program
  walks, so tiles with nothing visible are never loaded, and tiles that are fully visible skip
  the element predicate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MaskRules:
  """The static part of the masking rules (the dynamic part is arrays: lengths, segments)."""

  is_causal: bool = False
  # Inclusive (left, right) window, or None for no window.
  window: tuple[int, int] | None = None

  @property
  def banded(self) -> bool:
    """Whether causality or a window bounds k - q: the rules that read query positions."""
    return self.is_causal or self.window is not None

  def diagonal_band(self) -> tuple[int | None, int | None]:
    """Bounds (low, high) on k - q implied by causality and the window; None is unbounded."""
    low = high = None
    if self.window is not None:
      low, high = -self.window[0], self.window[1]
    if self.is_causal:
      high = 0 if high is None else min(high, 0)
    return low, high


def _and(mask, other):
  return other if mask is None else jnp.logical_and(mask, other)


def element_visible(
  rules: MaskRules,
  q_positions: jax.Array,
  k_positions: jax.Array,
  *,
  q_length: jax.Array | None = None,
  kv_length: jax.Array | None = None,
  q_segments: jax.Array | None = None,
  kv_segments: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> jax.Array | None:
  """Which (query, key) pairs may attend; None means all of them.

  Args:
    rules: causal and window rules.
    q_positions: int positions of the queries, shape [..., Tq, 1] (None where neither a
      band rule nor q_length reads them).
    k_positions: int positions of the keys, shape [..., 1, Sk].
    q_length: valid query length, broadcastable against q_positions.
    kv_length: valid key length, broadcastable against k_positions.
    q_segments: segment id of each query, shape [..., Tq, 1].
    kv_segments: segment id of each key, shape [..., 1, Sk].
    mask: boolean mask broadcastable to [..., Tq, Sk].

  Returns:
    A boolean array broadcastable to [..., Tq, Sk], or None when no rule is active.
  """
  visible = None
  if rules.banded:
    low, high = rules.diagonal_band()
    offset = k_positions - q_positions
    if low is not None:
      visible = _and(visible, offset >= low)
    if high is not None:
      visible = _and(visible, offset <= high)
  if q_length is not None:
    visible = _and(visible, q_positions < q_length)
  if kv_length is not None:
    visible = _and(visible, k_positions < kv_length)
  if q_segments is not None:
    visible = _and(visible, q_segments == kv_segments)
  if mask is not None:
    visible = _and(visible, mask)
  return visible


def _block_extremes(values: jax.Array, block: int):
  """Per-block minimum and maximum of int values [B, L], L a multiple of block."""
  blocks = values.reshape(values.shape[0], -1, block)
  return blocks.min(axis=-1), blocks.max(axis=-1)


def block_visibility(
  rules: MaskRules,
  *,
  batch: int,
  num_q_blocks: int,
  num_kv_blocks: int,
  block_q: int,
  block_kv: int,
  kv_bound: jax.Array,
  q_length: jax.Array | None = None,
  q_segments: jax.Array | None = None,
  kv_segments: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Whether any / all pairs of each (query block, key block) tile are visible.

  Args:
    rules: causal and window rules.
    batch: batch size B.
    num_q_blocks, num_kv_blocks: tile counts along T and S (after padding).
    block_q, block_kv: tile sizes.
    kv_bound: int32 [B], keys at or past it are invisible (length and padding).
    q_length: int32 [B] or None; queries at or past it are invisible.
    q_segments: int32 [B, num_q_blocks * block_q] or None.
    kv_segments: int32 [B, num_kv_blocks * block_kv] or None.
    mask: bool [Bm, Hm, num_q_blocks * block_q, num_kv_blocks * block_kv] or None, with Bm in
      (1, B).

  Returns:
    (any_visible, all_visible), bool [B, Hm, num_q_blocks, num_kv_blocks] (Hm = 1 without a
    per-head mask). `any_visible` may over-approximate (for segments); `all_visible` is exact.
  """
  # Every grid below is rank 4, [B, H, q block, kv block] with size-1 axes, so nothing relies
  # on implicit rank promotion (which callers may have set to raise).
  q_start = (jnp.arange(num_q_blocks) * block_q)[None, None, :, None]
  q_last = q_start + block_q - 1
  k_start = (jnp.arange(num_kv_blocks) * block_kv)[None, None, None, :]
  k_last = k_start + block_kv - 1
  any_visible = jnp.ones((batch, 1, num_q_blocks, num_kv_blocks), bool)
  all_visible = any_visible

  def both(any_more, all_more):
    return jnp.logical_and(any_visible, any_more), jnp.logical_and(all_visible, all_more)

  # Inside a tile, k - q takes every integer value between these two extremes.
  low, high = rules.diagonal_band()
  offset_min, offset_max = k_start - q_last, k_last - q_start
  if low is not None:
    any_visible, all_visible = both(offset_max >= low, offset_min >= low)
  if high is not None:
    any_visible, all_visible = both(offset_min <= high, offset_max <= high)

  bound = kv_bound[:, None, None, None]
  any_visible, all_visible = both(k_start < bound, k_last < bound)
  if q_length is not None:
    length = q_length[:, None, None, None]
    any_visible, all_visible = both(q_start < length, q_last < length)

  if q_segments is not None:
    q_min, q_max = _block_extremes(q_segments, block_q)
    k_min, k_max = _block_extremes(kv_segments, block_kv)
    q_min, q_max = q_min[:, None, :, None], q_max[:, None, :, None]
    k_min, k_max = k_min[:, None, None, :], k_max[:, None, None, :]
    overlap = jnp.logical_and(q_min <= k_max, k_min <= q_max)
    single = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
    any_visible, all_visible = both(overlap, single)

  if mask is not None:
    bm, hm = mask.shape[:2]
    tiles = mask.reshape(bm, hm, num_q_blocks, block_q, num_kv_blocks, block_kv)
    any_visible, all_visible = both(tiles.any(axis=(3, 5)), tiles.all(axis=(3, 5)))
  return any_visible, all_visible


def block_loop_bounds(any_visible: jax.Array, all_visible: jax.Array) -> jax.Array:
  """Loop bounds over the last axis of tile-visibility arrays.

  A kernel program owning one row of tiles walks the blocks [start, end) in three loops:
  [start, full_start) and [full_end, end) with the element predicate, [full_start, full_end)
  without it (every pair there is visible).

  Args:
    any_visible, all_visible: bool [..., n_blocks] from `block_visibility`.

  Returns:
    int32 [..., 4]: (start, full_start, full_end, end), start <= full_start <= full_end <= end.
  """
  n = any_visible.shape[-1]
  index = jax.lax.broadcasted_iota(jnp.int32, any_visible.shape, any_visible.ndim - 1)
  end = jnp.max(jnp.where(any_visible, index + 1, 0), axis=-1)
  start = jnp.min(jnp.where(any_visible, index, n), axis=-1)
  start = jnp.minimum(start, end)
  full_start = jnp.minimum(jnp.min(jnp.where(all_visible, index, n), axis=-1), end)
  after_run = jnp.logical_and(~all_visible, index >= full_start[..., None])
  full_end = jnp.minimum(jnp.min(jnp.where(after_run, index, n), axis=-1), end)
  return jnp.stack([start, full_start, full_end, end], axis=-1).astype(jnp.int32)
