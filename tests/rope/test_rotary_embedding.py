"""jfused.rotary_embedding against Flax's nnx.RoPE and its defining properties, and
jfused.segment_positions against a loop."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfused


def _flax_rope(x, positions, theta):
  """Flax's nnx.RoPE per batch entry and head (its tables take one row of positions)."""
  rope = nnx.RoPE(theta=theta)
  return jnp.stack(
    [
      jnp.stack(
        [rope(x[b, :, h], positions[b].astype(jnp.float32)) for h in range(x.shape[2])], axis=1
      )
      for b in range(x.shape[0])
    ]
  )


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_matches_flax_rope(theta):
  x = jax.random.normal(jax.random.key(0), (2, 9, 3, 16))
  positions = jnp.array([[0, 1, 2, 3, 4, 5, 6, 7, 8], [5, 6, 0, 1, 2, 3, 0, 1, 900]])
  np.testing.assert_allclose(
    jfused.rotary_embedding(x, positions, theta=theta),
    _flax_rope(x, positions, theta),
    rtol=1e-5,
    atol=1e-5,
  )


def test_default_positions_and_broadcast_positions():
  x = jax.random.normal(jax.random.key(1), (2, 7, 2, 8))
  arange = jnp.broadcast_to(jnp.arange(7), (2, 7))
  expected = jfused.rotary_embedding(x, arange)
  np.testing.assert_array_equal(jfused.rotary_embedding(x), expected)
  np.testing.assert_array_equal(jfused.rotary_embedding(x, jnp.arange(7)), expected)
  np.testing.assert_array_equal(jfused.rotary_embedding(x, jnp.arange(7)[None]), expected)


def test_rotation_keeps_norms_and_relative_positions():
  q = jax.random.normal(jax.random.key(2), (1, 1, 1, 32))
  k = jax.random.normal(jax.random.key(3), (1, 1, 1, 32))
  rotate = lambda x, p: jfused.rotary_embedding(x, jnp.array([[p]]))
  # A rotation: lengths do not change.
  np.testing.assert_allclose(jnp.linalg.norm(rotate(q, 37)), jnp.linalg.norm(q), rtol=1e-5)
  # <R(m) q, R(n) k> depends on m - n only: what makes RoPE a relative position code.
  score = lambda m, n: float(jnp.sum(rotate(q, m) * rotate(k, n)))
  assert score(10, 3) == pytest.approx(score(107, 100), rel=1e-4)
  assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtype_and_gradient(dtype):
  x = jax.random.normal(jax.random.key(4), (2, 5, 4, 8), dtype)
  y = jfused.rotary_embedding(x, theta=100.0)
  assert y.dtype == dtype and y.shape == x.shape
  reference = jfused.rotary_embedding(x.astype(jnp.float32), theta=100.0)
  np.testing.assert_allclose(
    y.astype(jnp.float32), reference, atol=2e-2 if dtype != jnp.float32 else 1e-6
  )
  # The gradient of an orthogonal map is its transpose: rotating back by the same angles.
  cotangent = jax.random.normal(jax.random.key(5), x.shape, jnp.float32)
  (grad,) = jax.vjp(lambda x: jfused.rotary_embedding(x, theta=100.0), x.astype(jnp.float32))[1](
    cotangent
  )
  restored = jfused.rotary_embedding(grad, theta=100.0)
  np.testing.assert_allclose(restored, cotangent, atol=1e-5)


def test_jit_and_vmap():
  x = jax.random.normal(jax.random.key(6), (3, 6, 2, 4))
  positions = jax.random.randint(jax.random.key(7), (3, 6), 0, 50)
  direct = jfused.rotary_embedding(x, positions)
  np.testing.assert_allclose(jax.jit(jfused.rotary_embedding)(x, positions), direct, rtol=1e-6)
  mapped = jax.vmap(lambda x, p: jfused.rotary_embedding(x[None], p[None])[0])(x, positions)
  np.testing.assert_allclose(mapped, direct, rtol=1e-6)


def test_segment_positions():
  segments = jnp.array([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5], [1, 2, 1, 1, 3, 3]])
  expected = [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 0, 1]]
  np.testing.assert_array_equal(jfused.segment_positions(segments), expected)
  random = np.asarray(jax.random.randint(jax.random.key(8), (4, 50), 0, 3))
  looped = np.zeros_like(random)
  for b in range(4):
    for t in range(1, 50):
      looped[b, t] = looped[b, t - 1] + 1 if random[b, t] == random[b, t - 1] else 0
  np.testing.assert_array_equal(jfused.segment_positions(jnp.asarray(random)), looped)


@pytest.mark.parametrize(
  "args, error, match",
  [
    ((jnp.ones((2, 3, 1, 5)), None), ValueError, "head_dim must be even"),
    ((jnp.ones((3, 4)), None), ValueError, r"x must be \[batch..., T, heads, head_dim\]"),
    ((jnp.ones((2, 3, 1, 4), jnp.int32), None), TypeError, "x must be a floating array"),
    ((jnp.ones((2, 3, 1, 4)), jnp.ones((2, 3))), TypeError, "positions must be integers"),
    ((jnp.ones((2, 3, 1, 4)), jnp.ones((2, 4), jnp.int32)), ValueError, "T = 3"),
  ],
)
def test_bad_arguments(args, error, match):
  with pytest.raises(error, match=match):
    jfused.rotary_embedding(*args)


def test_bad_theta():
  with pytest.raises(ValueError, match="theta must be a number > 1"):
    jfused.rotary_embedding(jnp.ones((1, 2, 1, 4)), theta=0.5)
