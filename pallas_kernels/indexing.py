"""Index vectors for Pallas-Triton windows that may run past an array's end."""

from __future__ import annotations

import jax.numpy as jnp


def positions(start, size: int):
  """The `size` consecutive positions from `start`, an index vector for `ref.at[...]`.

  Kernels index their windows with these rather than `pl.ds` slices because a window may run
  past the array's end (those lanes are masked): a kernel that reads a whole row as one
  power-of-two chunk at column 0 reads wider than any width that is not a power of two, and
  Pallas (from jax 0.12) refuses a slice it can see overrunning at trace time. Index vectors
  lower to the same pointer arithmetic on both versions.
  """
  return start + jnp.arange(size)
