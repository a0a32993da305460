"""Attention dropout's keep mask: a counter-based hash, in one place.

Whether the probability of query `q` attending to key `k` in (batch b, query head n) survives
dropout is a pure function of (seed[b, n], q, k):

  row    = mix(mix(q) ^ seed) | 1               once per query row of a tile
  column = mix((k + 1) * GOLDEN)                once per key column of a tile
  bits   = row * column                         once per (query, key) element
  keep   = bits >= round(rate * 2**32)          compared as uint32

`mix` is a 32-bit finaliser (two multiplies and three xor-shifts, Wellons' "lowbias32"
constants). The per-element step is deliberately a single multiply: it runs in the forward
kernel and in both backward kernels on every visible logit, where the integer units are the
bottleneck. On an H100 a full `mix` per element cost the forward about 50 %; an xor of the
states before a constant multiply, with the backward's per-element 1 / (1 - rate) (now folded
into its row statistics), cost the Mosaic forward+backward 17 % at B=4, T=4096, causal, and
this single multiply 12 %. Row states are odd, so along a row the product is a bijection of the
column state, and its top bits, which the threshold compares, depend on every bit of both
states. Column states are a bijection of the key position that is zero only for k = -1 (a zero
would drop a whole key). Two rows only give related masks when their states differ by a
multiple of a large power of two, and the `| 1` makes two rows of one head share a state with a
chance of 2**-31 per pair: harmless to a dropout mask.

Nothing here depends on tile sizes, padding or how the batch is split, so the forward kernel,
both backward kernels and the dense reference mask (`keep_mask`) agree by construction: they
all call these functions. `head_seeds` turns a JAX PRNG key into the per-(batch, head) seeds,
outside the kernels, from global batch and head indices.

The hash only needs to look random to a dropout mask; it is not a cryptographic or
statistically certified generator.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# Wellons' lowbias32 multipliers and the 32-bit golden ratio (an odd Weyl increment).
_MULTIPLIER_1 = np.uint32(0x7FEB352D)
_MULTIPLIER_2 = np.uint32(0x846CA68B)
_GOLDEN = np.uint32(0x9E3779B9)


def _xor_shift(x: jax.Array, shift: int) -> jax.Array:
  return x ^ lax.shift_right_logical(x, jnp.uint32(shift))


def mix(x: jax.Array) -> jax.Array:
  """A bijective 32-bit finaliser: every input bit flips about half the output bits."""
  x = _xor_shift(x, 16) * _MULTIPLIER_1
  x = _xor_shift(x, 15) * _MULTIPLIER_2
  return _xor_shift(x, 16)


def keep_threshold(rate: float) -> int:
  """The uint32 threshold: an element is kept when its hash is >= this (probability 1-rate)."""
  return min(round(rate * 2.0**32), 2**32 - 1)


def row_hashes(seed: jax.Array, q_positions: jax.Array) -> jax.Array:
  """Per-row state from a uint32 seed and int query positions (broadcast against each other).

  Odd, so that the per-element product keeps every bit of the column state.
  """
  return mix(mix(q_positions.astype(jnp.uint32)) ^ seed) | jnp.uint32(1)


def column_hashes(k_positions: jax.Array) -> jax.Array:
  """Per-key state from int key positions: a bijection, nonzero for every position >= 0."""
  return mix((k_positions.astype(jnp.uint32) + jnp.uint32(1)) * _GOLDEN)


def keep_from_parts(rows: jax.Array, columns: jax.Array, threshold: int) -> jax.Array:
  """The keep decision of each element: rows [..., T, 1] against columns [..., 1, S]."""
  return rows * columns >= jnp.uint32(threshold)


def keep_mask(
  seeds: jax.Array, q_positions: jax.Array, k_positions: jax.Array, rate: float
) -> jax.Array:
  """The keep mask, composed from the pieces the kernels call one tile at a time.

  Args:
    seeds: uint32, broadcastable to [..., 1, 1] (one per batch entry and head).
    q_positions: int query positions, [..., T, 1].
    k_positions: int key positions, [..., 1, S].
    rate: dropout rate in [0, 1).

  Returns:
    bool [..., T, S]: True where the probability is kept (and scaled by 1 / (1 - rate)).
  """
  return keep_from_parts(
    row_hashes(seeds, q_positions), column_hashes(k_positions), keep_threshold(rate)
  )


def head_seeds(rng: jax.Array, batch: int, num_heads: int, *, broadcast: bool = False):
  """uint32 [batch, num_heads] seeds from a typed PRNG key, one per (batch entry, query head).

  The seed of (b, n) depends only on the key, b and n (global indices, so sharding the batch
  does not change it); distinct heads of one batch entry always get distinct seeds. With
  broadcast=True every (b, n) gets the seed of (0, 0): one mask shared over batch and heads.
  """
  words = jax.random.bits(rng, (2,), jnp.uint32)
  b = jnp.arange(batch, dtype=jnp.uint32)[:, None]
  n = jnp.arange(num_heads, dtype=jnp.uint32)[None, :]
  if broadcast:
    b, n = jnp.zeros_like(b), jnp.zeros_like(n)
  seeds = mix(mix(mix(b ^ words[0]) + n * _GOLDEN) ^ words[1])
  return jnp.broadcast_to(seeds, (batch, num_heads))
