"""jfused.mlp.linear against JAX's autodiff of `x @ kernel.astype(x.dtype) + bias` (what
nnx.Linear with dtype=x.dtype computes): forward and gradients, what its backward keeps, bad
arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfused
from tests.closeness import assert_close_three_way

RELATIVE_FLOOR = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def flax_style(x, kernel, bias):
  y = x @ kernel.astype(x.dtype)
  if bias is None:
    return y
  return y + bias.astype(x.dtype).reshape((1,) * (y.ndim - 1) + bias.shape)


def outputs_and_grads(fn, x, kernel, bias):
  def loss(x, kernel, bias):
    out = fn(x, kernel, bias)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

  argnums = (0, 1) if bias is None else (0, 1, 2)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(
    x, kernel, bias
  )
  return out, grads


@pytest.mark.parametrize(
  "dtype, param_dtype",
  [
    (jnp.float32, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16),
    (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32),
  ],
  ids=lambda d: jnp.dtype(d).name,
)
@pytest.mark.parametrize(
  "leading, features, out, with_bias", [((3, 5), 12, 7, True), ((4,), 9, 1, False)]
)
def test_matches_autodiff_of_nnx_linear(leading, features, out, with_bias, dtype, param_dtype):
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (*leading, features), dtype)
  kernel = (jax.random.normal(keys[1], (features, out)) / features**0.5).astype(param_dtype)
  bias = jax.random.normal(keys[2], (out,)).astype(param_dtype) if with_bias else None
  actual, grads = outputs_and_grads(jfused.mlp.linear, x, kernel, bias)
  same, grads_same = outputs_and_grads(flax_style, x, kernel, bias)
  with jax.default_matmul_precision("highest"):
    x32 = x.astype(jnp.float32)
    ref32, grads32 = outputs_and_grads(flax_style, x32, kernel.astype(jnp.float32), bias)
  floors = dict(relative_floor=RELATIVE_FLOOR)
  assert actual.dtype == jnp.dtype(dtype) and actual.shape == (*leading, out)
  assert_close_three_way("out", actual, same, ref32, dtype, **floors)
  for i, (grad, grad_same, grad32) in enumerate(zip(grads, grads_same, grads32, strict=True)):
    assert grad.dtype == (x, kernel, bias)[i].dtype
    assert_close_three_way(f"grad {i}", grad, grad_same, grad32, dtype, **floors)


def test_backward_keeps_the_float32_kernel_not_a_cast():
  """nnx.Linear's autodiff keeps the bf16 cast of a float32 kernel for dx; linear keeps the
  float32 kernel itself (a parameter, held anyway) and casts it again in the backward."""
  x = jnp.ones((4, 16), jnp.bfloat16)
  kernel = jnp.ones((16, 8), jnp.float32)

  def kept(fn):
    _, vjp_fn = jax.vjp(lambda x, k: fn(x, k, None), x, kernel)
    return sorted(
      jnp.dtype(a.dtype).name for a in jax.tree.leaves(vjp_fn) if a.shape == kernel.shape
    )

  assert kept(jfused.mlp.linear) == ["float32"]
  assert "bfloat16" in kept(flax_style)
  np.testing.assert_array_equal(jfused.mlp.linear(x, kernel), flax_style(x, kernel, None))


@pytest.mark.parametrize(
  "args, error, words",
  [
    ((jnp.zeros((2, 4), jnp.int32), jnp.zeros((4, 3))), TypeError, "x"),
    ((jnp.zeros((2, 4)), jnp.zeros((4, 3), jnp.int32)), TypeError, "kernel"),
    ((jnp.zeros((2, 4)), jnp.zeros((5, 3))), ValueError, "kernel"),
    ((jnp.zeros((2, 4)), jnp.zeros((4,))), ValueError, "kernel"),
    ((jnp.zeros((2, 4)), jnp.zeros((4, 3)), jnp.zeros((4,))), ValueError, "bias"),
  ],
)
def test_bad_arguments_raise(args, error, words):
  with pytest.raises(error, match=words):
    jfused.mlp.linear(*args)
