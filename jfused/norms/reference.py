"""The norms in pure JAX, float32: the "xla" implementation and what the kernels are tested on."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def residual_sum(x, residual):
  return (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype)


def _finish(y, h, scale, bias, scale_offset, dtype, residual):
  if scale is not None:
    y = y * (scale.astype(jnp.float32) + scale_offset)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  y = y.astype(dtype)
  return (y, h) if residual is not None else y


def layer_norm_reference(x, scale=None, bias=None, *, epsilon=1e-6, residual=None,
                         scale_offset=0.0, use_fast_variance=False):
  """Pure-JAX float32 LayerNorm; the "xla" implementation and what the kernels are tested on."""
  h = residual_sum(x, residual) if residual is not None else x
  hf = h.astype(jnp.float32)
  mean = jnp.mean(hf, axis=-1, keepdims=True)
  if use_fast_variance:
    var = jnp.maximum(jnp.mean(hf * hf, axis=-1, keepdims=True) - mean * mean, 0.0)
  else:
    var = jnp.mean(jnp.square(hf - mean), axis=-1, keepdims=True)
  y = (hf - mean) * lax.rsqrt(var + epsilon)
  return _finish(y, h, scale, bias, scale_offset, x.dtype, residual)


def rms_norm_reference(x, scale=None, *, epsilon=1e-6, residual=None, scale_offset=0.0):
  """Pure-JAX float32 RMSNorm; the "xla" implementation and what the kernels are tested on."""
  h = residual_sum(x, residual) if residual is not None else x
  hf = h.astype(jnp.float32)
  y = hf * lax.rsqrt(jnp.mean(hf * hf, axis=-1, keepdims=True) + epsilon)
  return _finish(y, h, scale, None, scale_offset, x.dtype, residual)
