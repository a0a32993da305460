"""The norms in pure JAX: the "xla" implementation and what the kernels are tested on.

They compute in float32, or in float64 for float64 inputs (under jax_enable_x64), as Flax does.
"""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp


def compute_dtype(x):
  return jnp.dtype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def residual_sum(x, residual):
  compute = compute_dtype(x)
  return (x.astype(compute) + residual.astype(compute)).astype(x.dtype)


def _per_feature(parameter, y):
  """A [W] parameter at y's rank, so it broadcasts without implicit rank promotion."""
  return parameter.astype(y.dtype).reshape((1,) * (y.ndim - 1) + parameter.shape)


def _finish(y, h, scale, bias, scale_offset, dtype, residual):
  if scale is not None:
    y = y * (_per_feature(scale, y) + scale_offset)
  if bias is not None:
    y = y + _per_feature(bias, y)
  y = y.astype(dtype)
  return (y, h) if residual is not None else y


def layer_norm_reference(
  x,
  scale=None,
  bias=None,
  *,
  epsilon=1e-6,
  residual=None,
  scale_offset=0.0,
  use_fast_variance=False,
):
  """Pure-JAX LayerNorm; the "xla" implementation and what the kernels are tested on."""
  h = residual_sum(x, residual) if residual is not None else x
  hf = h.astype(compute_dtype(h))
  mean = jnp.mean(hf, axis=-1, keepdims=True)
  if use_fast_variance:
    var = jnp.maximum(jnp.mean(hf * hf, axis=-1, keepdims=True) - mean * mean, 0.0)
  else:
    var = jnp.mean(jnp.square(hf - mean), axis=-1, keepdims=True)
  y = (hf - mean) * lax.rsqrt(var + epsilon)
  return _finish(y, h, scale, bias, scale_offset, x.dtype, residual)


def rms_norm_reference(x, scale=None, *, epsilon=1e-6, residual=None, scale_offset=0.0):
  """Pure-JAX RMSNorm; the "xla" implementation and what the kernels are tested on."""
  h = residual_sum(x, residual) if residual is not None else x
  hf = h.astype(compute_dtype(h))
  y = hf * lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + epsilon)
  return _finish(y, h, scale, None, scale_offset, x.dtype, residual)
