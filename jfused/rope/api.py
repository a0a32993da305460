"""Rotary position embeddings (RoPE, Su et al. 2021) in the layout attention takes.

`rotary_embedding(x, positions)` rotates each pair (x[i], x[i + H/2]) of a head's features by
the angle position * theta^(-2i/H): the "rotate half" form of Flax's `nnx.RoPE`, LLaMA and
Gemma. Computed in float32 and returned in x's dtype. It is elementwise: under `jax.jit` XLA
fuses it with the projection that makes q and k, so it has one implementation, XLA.
`segment_positions` gives each token of packed sequences its position within its sequence.
"""

from __future__ import annotations

import numbers

from jax import lax
import jax.numpy as jnp


def _validate(x, positions, theta):
  if not hasattr(x, "shape") or not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"rotary_embedding: x must be a floating array, got {getattr(x, 'dtype', x)!r}")
  if x.ndim < 3:
    raise ValueError(
      f"rotary_embedding: x must be [batch..., T, heads, head_dim], got shape {tuple(x.shape)}"
    )
  if x.shape[-1] % 2:
    raise ValueError(f"rotary_embedding: head_dim must be even, got {x.shape[-1]}")
  if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not theta > 1.0:
    raise ValueError(f"rotary_embedding: theta must be a number > 1, got {theta!r}")
  if positions is not None:
    if not jnp.issubdtype(positions.dtype, jnp.integer):
      raise TypeError(f"rotary_embedding: positions must be integers, got {positions.dtype}")
    expected = tuple(x.shape[:-2])
    if positions.ndim < 1 or positions.shape[-1] != x.shape[-3] or positions.ndim > len(expected):
      raise ValueError(
        f"rotary_embedding: positions must be [batch..., T] with T = {x.shape[-3]} "
        f"(x has shape {tuple(x.shape)}), got {tuple(positions.shape)}"
      )


def rotary_embedding(x, positions=None, *, theta: float = 10000.0):
  """Rotates the features of queries or keys by their positions.

  Args:
    x: floating [batch..., T, heads, head_dim] (head_dim even), as attention takes q and k.
    positions: integer [batch..., T] (leading axes may be fewer, broadcast as size 1), or
      None for 0..T-1. Packed sequences pass `segment_positions(segment_ids)`.
    theta: the base of the frequencies: 10000 (LLaMA 2, Gemma), 500000 (LLaMA 3).

  Returns:
    x's shape and dtype.

  Example:
    >>> q = jfused.rotary_embedding(q, positions, theta=500000.0)
  """
  _validate(x, positions, theta)
  length, half = x.shape[-3], x.shape[-1] // 2
  if positions is None:
    positions = jnp.arange(length)
  positions = positions.reshape((1,) * (x.ndim - 2 - positions.ndim) + positions.shape)
  frequencies = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * (2.0 / x.shape[-1])))
  # [batch..., T, 1, H/2]: one angle per position and frequency, shared by the heads.
  angles = positions.astype(jnp.float32)[..., None, None] * frequencies.reshape(
    (1,) * (positions.ndim + 1) + (half,)
  )
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  first, second = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def segment_positions(segment_ids):
  """Each token's position within its packed sequence: 0 at the first token of each run of
  equal segment ids along the last axis, counting up.

  Args:
    segment_ids: integer [batch..., T].

  Returns:
    int32 [batch..., T].

  Example:
    >>> segment_positions(jnp.array([[0, 0, 0, 1, 1, 2]]))   # [[0, 1, 2, 0, 1, 0]]
  """
  if not hasattr(segment_ids, "shape") or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise TypeError("segment_positions: segment_ids must be an integer array")
  if segment_ids.ndim < 1:
    raise ValueError("segment_positions: segment_ids must be [batch..., T]")
  index = lax.broadcasted_iota(jnp.int32, segment_ids.shape, segment_ids.ndim - 1)
  previous = jnp.concatenate([segment_ids[..., :1], segment_ids[..., :-1]], axis=-1)
  starts = jnp.where((index == 0) | (segment_ids != previous), index, 0)
  return index - lax.cummax(starts, axis=segment_ids.ndim - 1)
