"""Linen twins: `LayerNorm`, `RMSNorm` and `TransformerBlock` on jfused.

The norms subclass `flax.linen.LayerNorm` / `RMSNorm`: same attributes, parameters (`scale`,
`bias`) and dtype rules (statistics in float32; the result in the promotion of x, the
parameters and `dtype`). What the kernels do not serve (reduction or feature axes other than
the last, `mask`, `axis_name`, `force_float32_reductions=False`) runs Flax's own `__call__`.

`TransformerBlock` mirrors `flax_layers.TransformerBlock`: the same computation and parameter
names (`norm1`, `attention/{query,key,value,out}`, `norm2`, `mlp/{up,gate,down}`), so a
parameter dict converts between the two by `nnx.to_pure_dict(nnx.state(block))`.

Example:
  >>> import flax_layers.linen as jfl
  >>> block = jfl.TransformerBlock(num_heads=4, norm="rms_norm", activation="swiglu")
  >>> params = block.init(jax.random.key(0), x)
  >>> y = block.apply(params, x)
"""

from __future__ import annotations

import math
from typing import Any

from flax import linen as nn
from flax.linen import dtypes
import jax
import jax.numpy as jnp

from flax_layers.attention import attention_fn
from flax_layers.norms import KERNEL_DTYPES, last_axis_only, residual_add
from flax_layers.transformer import recomputing_mlp
import jfused

__all__ = ["LayerNorm", "RMSNorm", "TransformerBlock"]


class _LinenFusedNorm(nn.Module):
  """The fused/fallback dispatch and the extra attributes shared by the Linen norms.

  Attributes:
    implementation: passed to jfused; None picks the fastest on this device.
    fused: False runs Flax's own math.
  """

  # A class constant, not a dataclass field (no annotation): LayerNorm has a bias, RMSNorm none.
  with_bias = True
  implementation: Any = None
  fused: bool = True

  @nn.compact
  def __call__(self, x, *, mask=None, residual=None):
    """The norm of x (or x + residual); with residual returns `(y, x + residual)`."""
    return self._apply(x, mask, residual)

  def _servable(self, x, mask) -> bool:
    return (
      self.fused
      and mask is None
      and self.axis_name is None
      and self.force_float32_reductions
      and last_axis_only(x.ndim, self.reduction_axes)
      and last_axis_only(x.ndim, self.feature_axes)
    )

  def _apply(self, x, mask, residual):
    h = x if residual is None else residual_add(x, residual)
    if not self._servable(h, mask):
      y = super().__call__(h, mask=mask)
      return y if residual is None else (y, h)
    width = h.shape[-1]
    scale = (
      self.param("scale", self.scale_init, (width,), self.param_dtype) if self.use_scale else None
    )
    bias = (
      self.param("bias", self.bias_init, (width,), self.param_dtype)
      if self.with_bias and self.use_bias
      else None
    )
    # Linen keeps x as is and the parameters in param_dtype, computes in float32 and returns
    # the promotion of all of them with `dtype`: run jfused in the wider of x's and that dtype.
    out_dtype = dtypes.canonicalize_dtype(
      *(a for a in (h, scale, bias) if a is not None), dtype=self.dtype
    )
    work_dtype = jnp.promote_types(h.dtype, out_dtype)
    if work_dtype not in KERNEL_DTYPES:
      y = super().__call__(h, mask=mask)
      return y if residual is None else (y, h)
    fuse_add = residual is not None and residual.dtype == x.dtype == work_dtype
    source = x if fuse_add else h.astype(work_dtype)
    out = self._jfused(source, scale, bias, residual if fuse_add else None)
    y, h = out if fuse_add else (out, h)
    y = y.astype(out_dtype)
    return y if residual is None else (y, h)


class LayerNorm(_LinenFusedNorm, nn.LayerNorm):
  """`flax.linen.LayerNorm` running `jfused.layer_norm`.

  Attributes:
    (all of `flax.linen.LayerNorm`'s), and `implementation` (passed to jfused; None picks the
    fastest on this device) and `fused` (False runs Flax's own math).
  """

  def _jfused(self, x, scale, bias, residual):
    return jfused.layer_norm(
      x,
      scale,
      bias,
      epsilon=float(self.epsilon),
      residual=residual,
      use_fast_variance=bool(self.use_fast_variance),
      implementation=self.implementation,
    )


class RMSNorm(_LinenFusedNorm, nn.RMSNorm):
  """`flax.linen.RMSNorm` running `jfused.rms_norm`.

  Attributes:
    (all of `flax.linen.RMSNorm`'s), and `implementation` (passed to jfused; None picks the
    fastest on this device) and `fused` (False runs Flax's own math).
  """

  with_bias = False

  def _jfused(self, x, scale, bias, residual):
    del bias
    return jfused.rms_norm(
      x, scale, epsilon=float(self.epsilon), residual=residual, implementation=self.implementation
    )


class _Attention(nn.Module):
  """Projections named as nnx.MultiHeadAttention's (`query`, `key`, `value`, `out`)."""

  num_heads: int
  num_kv_heads: int
  use_bias: bool
  dtype: Any
  param_dtype: Any
  fused: bool
  implementation: Any
  rope_theta: float | None = None
  deterministic_backward: bool | None = None

  @nn.compact
  def __call__(self, x, *, is_causal, local_window_size, segment_ids, positions=None):
    width = x.shape[-1]
    head_dim = width // self.num_heads
    dense = dict(
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.lecun_normal(),
    )
    query = nn.DenseGeneral((self.num_heads, head_dim), name="query", **dense)(x)
    key = nn.DenseGeneral((self.num_kv_heads, head_dim), name="key", **dense)(x)
    value = nn.DenseGeneral((self.num_kv_heads, head_dim), name="value", **dense)(x)
    if self.rope_theta is not None:
      query = jfused.rotary_embedding(query, positions, theta=self.rope_theta)
      key = jfused.rotary_embedding(key, positions, theta=self.rope_theta)
    # force_fp32_for_softmax given (Linen's default) marks a Linen caller: what jfused does
    # not serve (fused=False) runs Linen's own function, as under Linen's attention module.
    out = attention_fn(
      query,
      key,
      value,
      dtype=self.dtype,
      is_causal=is_causal,
      force_fp32_for_softmax=False,
      local_window_size=local_window_size,
      q_segment_ids=segment_ids,
      implementation=self.implementation,
      fused=self.fused,
      deterministic_backward=self.deterministic_backward,
    )
    return nn.DenseGeneral(width, axis=(-2, -1), name="out", **dense)(out)


class _DenseParameters(nn.Module):
  """nn.Dense's parameters (`kernel` [in, features], `bias`) under its names, returned rather
  than applied (the recomputing MLP hands them to jfused's ops as they are)."""

  features: int
  use_bias: bool
  param_dtype: Any

  @nn.compact
  def __call__(self, in_features: int):
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (in_features, self.features), self.param_dtype
    )
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    return kernel, bias


class _MLP(nn.Module):
  hidden_features: int
  activation: str
  use_bias: bool
  dtype: Any
  param_dtype: Any
  recompute_activation: bool = False

  @nn.compact
  def __call__(self, x):
    if self.recompute_activation:  # As the NNX MLP's option.
      return self._recomputing(x)
    dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    up = nn.Dense(self.hidden_features, name="up", **dense)(x)
    gate = None
    if self.activation == "swiglu":
      gate = nn.Dense(self.hidden_features, name="gate", **dense)(x)
    if gate is not None:
      hidden = jax.nn.silu(gate) * up
    else:
      hidden = jax.nn.gelu(up, approximate=True)
    return nn.Dense(x.shape[-1], name="down", **dense)(hidden)

  def _recomputing(self, x):
    width, wide = x.shape[-1], self.hidden_features

    def parameters(name, fan_in, features):
      return _DenseParameters(features, self.use_bias, self.param_dtype, name=name)(fan_in)

    up = parameters("up", width, wide)
    gate = parameters("gate", width, wide) if self.activation == "swiglu" else None
    return recomputing_mlp(x, up, parameters("down", wide, width), gate, self.dtype)


class TransformerBlock(nn.Module):
  """Linen twin of `flax_layers.TransformerBlock` (see there for the computation).

  Attributes:
    num_heads, num_kv_heads, mlp_features, norm, activation, is_causal, local_window_size,
    epsilon, use_bias, dtype, param_dtype, fused, attention_implementation,
    norm_implementation, rope_theta, deterministic_backward, recompute_mlp_activation: as the
    NNX block's arguments (the width comes from the input).
  """

  num_heads: int
  num_kv_heads: int | None = None
  mlp_features: int | None = None
  norm: str = "layer_norm"
  activation: str = "gelu"
  is_causal: bool = True
  local_window_size: Any = None
  epsilon: float = 1e-6
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  fused: bool = True
  attention_implementation: Any = None
  norm_implementation: Any = None
  rope_theta: float | None = None
  deterministic_backward: bool | None = None
  recompute_mlp_activation: bool = False

  @nn.compact
  def __call__(
    self, x, *, residual=None, segment_ids=None, positions=None, return_residual: bool = False
  ):
    """As `flax_layers.TransformerBlock.__call__`."""
    width = x.shape[-1]
    mlp_features = self.mlp_features
    if mlp_features is None:
      mlp_features = 8 * math.ceil(8 * width / 3 / 8) if self.activation == "swiglu" else 4 * width
    norm_cls = {"layer_norm": LayerNorm, "rms_norm": RMSNorm}[self.norm]
    norm = dict(
      epsilon=self.epsilon,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      fused=self.fused,
      implementation=self.norm_implementation,
    )
    norm1 = norm_cls(name="norm1", **norm)
    if residual is None:
      y, stream = norm1(x), x
    else:
      y, stream = norm1(x, residual=residual)
    window = self.local_window_size
    attended = _Attention(
      self.num_heads,
      self.num_kv_heads or self.num_heads,
      self.use_bias,
      self.dtype,
      self.param_dtype,
      self.fused,
      self.attention_implementation,
      self.rope_theta,
      self.deterministic_backward,
      name="attention",
    )(
      y,
      is_causal=self.is_causal,
      local_window_size=tuple(window) if isinstance(window, list) else window,
      segment_ids=segment_ids,
      positions=positions,
    )
    y, stream = norm_cls(name="norm2", **norm)(attended, residual=stream)
    delta = _MLP(
      mlp_features,
      self.activation,
      self.use_bias,
      self.dtype,
      self.param_dtype,
      self.fused and self.recompute_mlp_activation,
      name="mlp",
    )(y)
    if return_residual:
      return delta, stream
    return residual_add(delta, stream)
