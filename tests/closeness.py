"""The comparison rule of the op tests: FlashAttention's three-way tolerance.

An implementation's error against a float32 reference may be at most twice the error of the
plain XLA computation in the same dtype, plus a floor relative to the reference's largest
magnitude. For float32 inputs that makes the check tight (about 1e-5 relative). The floors are
the op's own (each op's `cases.RELATIVE_FLOOR`): a loss summed over a vocabulary rounds
differently from an attention output.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def max_error(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), initial=0.0))


def assert_close_three_way(name, actual, same_dtype, ref32, dtype, *, relative_floor: dict):
  """err(actual) <= 2 * err(xla in dtype) + relative_floor[dtype] * max(1, max|ref32|), and
  `actual` all finite."""
  actual = np.asarray(actual.astype(jnp.float32))
  assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
  floor = relative_floor[dtype] * max(1.0, float(jnp.max(jnp.abs(ref32), initial=0.0)))
  error, xla_error = max_error(jnp.asarray(actual), ref32), max_error(same_dtype, ref32)
  assert error <= 2 * xla_error + floor, (
    f"{name}: error {error:.3g} > 2 * xla error {xla_error:.3g} + {floor:.3g}"
  )
