"""LayerNorm and RMSNorm over the last axis, with the pre-norm residual add fused in.

`layer_norm(x, scale, bias)` computes, in float32, and returns in x's dtype

  y = (x - mean(x)) * rsqrt(var(x) + epsilon) * (scale + scale_offset) + bias

and `rms_norm(x, scale)` the same without the mean (var becomes the mean square). With
`residual=`, both first form h = x + residual (rounded to x's dtype, as the unfused code would
store it) and return `(norm(h), h)`: the pre-norm transformer pattern in one pass over memory.

Implementations: "xla" is the float32 reference below, differentiated by JAX; "pallas_triton"
runs the kernels of `pallas_kernels.norms` wired with `jax.custom_vjp`, which saves
only (mean, rstd) in float32 besides the inputs (`optimize_remat=True`: under `jax.remat` the
forward pass runs the plain primal, and the kernel is rerun in the backward pass only).
Under sharding the kernels run on each device's rows (`jfused.norms.sharding`).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
import numbers

import jax
import jax.numpy as jnp

from jfused import config, dispatch
from jfused.norms.reference import layer_norm_reference, residual_sum, rms_norm_reference

# The launchers, run per device under sharding (rows split across devices).
from jfused.norms.sharding import norm_backward, norm_forward
from pallas_kernels.norms.triton_fwd import NormSpec

__all__ = ["layer_norm", "rms_norm"]

_IMPLEMENTATIONS = ("xla", "pallas_triton")
# Kernels index with 32-bit offsets.
_MAX_KERNEL_ELEMENTS = 2**31 - 1


# --- validation ------------------------------------------------------------------------------


def _check_float(op, name, value):
  if not jnp.issubdtype(value.dtype, jnp.floating):
    raise TypeError(f"{op}: {name} must have a floating dtype, got {value.dtype}")


def _validate(op, x, scale, bias, residual, epsilon, scale_offset):
  """Checks a user can fail; raises before anything is traced or launched."""
  for name, value in (("x", x), ("scale", scale), ("bias", bias), ("residual", residual)):
    if value is not None and not hasattr(value, "shape"):
      raise TypeError(f"{op}: {name} must be an array, got {type(value).__name__}")
  if x.ndim < 1:
    raise ValueError(f"{op}: x must have at least one axis (the normalised one), got shape ()")
  _check_float(op, "x", x)
  width = x.shape[-1]
  for name, value in (("scale", scale), ("bias", bias)):
    if value is None:
      continue
    _check_float(op, name, value)
    if tuple(value.shape) != (width,):
      raise ValueError(
        f"{op}: {name} must have shape ({width},) to match the last axis of x "
        f"{tuple(x.shape)}, got {tuple(value.shape)}"
      )
  if residual is not None:
    if tuple(residual.shape) != tuple(x.shape):
      raise ValueError(
        f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}"
      )
    if residual.dtype != x.dtype:
      raise TypeError(f"{op}: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
  for name, value in (("epsilon", epsilon), ("scale_offset", scale_offset)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise TypeError(f"{op}: {name} must be a Python float, got {type(value).__name__}")
  if not (math.isfinite(epsilon) and epsilon > 0):
    raise ValueError(f"{op}: epsilon must be a finite number > 0, got {epsilon}")
  if not math.isfinite(scale_offset):
    raise ValueError(f"{op}: scale_offset must be finite, got {scale_offset}")


# --- the Pallas implementation ---------------------------------------------------------------


def _empty_forward(x, residual):
  h = residual_sum(x, residual) if residual is not None else x
  return jnp.zeros(x.shape, x.dtype), h


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _pallas_norm(x, scale, bias, residual, spec: NormSpec, interpret: bool):
  return _pallas_norm_fwd(x, scale, bias, residual, spec, interpret)[0]


def _pallas_norm_fwd(x, scale, bias, residual, spec, interpret):
  if x.size == 0:
    y, h = _empty_forward(x, residual)
    stats = jnp.zeros(x.shape[:-1], jnp.float32)
    mean, rstd = (stats if spec.subtract_mean else None), stats
  else:
    y, h, mean, rstd = norm_forward(x, residual, scale, bias, spec=spec, interpret=interpret)
    h = x if h is None else h
  out = (y, h) if residual is not None else y
  # h (x itself without a residual) is what was normalised, so it is what the backward needs.
  # bias is kept only to tell whether a dbias is wanted: an input, it costs no memory.
  return out, (h, scale, bias, mean, rstd)


def _pallas_norm_bwd(spec, interpret, saved, cotangent):
  h, scale, bias, mean, rstd = saved
  with_residual = isinstance(cotangent, tuple)
  dy, dh_in = cotangent if with_residual else (cotangent, None)
  if h.size == 0:
    dh = dh_in if dh_in is not None else jnp.zeros(h.shape, h.dtype)
    dscale = None if scale is None else jnp.zeros(scale.shape, jnp.float32)
    dbias = None if bias is None else jnp.zeros(bias.shape, jnp.float32)
  else:
    dh, dscale, dbias = norm_backward(
      h, dy, dh_in, scale, mean, rstd, spec=spec, with_bias=bias is not None, interpret=interpret
    )
  dscale = None if scale is None else dscale.astype(scale.dtype)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  # h = x + residual: both receive h's gradient.
  return dh, dscale, dbias, (dh if with_residual else None)


_pallas_norm.defvjp(_pallas_norm_fwd, _pallas_norm_bwd, optimize_remat=True)


def _pallas_implementation(x, scale, bias, residual, spec: NormSpec):
  if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise NotImplementedError(
      f"pallas_triton supports float32, bfloat16 and float16, not {x.dtype}"
    )
  if x.size > _MAX_KERNEL_ELEMENTS:
    raise NotImplementedError(f"pallas_triton indexes with int32; x has {x.size} elements")
  return _pallas_norm(x, scale, bias, residual, spec, config.use_interpret())


def _default_order() -> tuple[str, ...]:
  return ("pallas_triton", "xla") if config.on_gpu() else ("xla",)


# --- public API ------------------------------------------------------------------------------


def layer_norm(
  x,
  scale=None,
  bias=None,
  *,
  epsilon: float = 1e-6,
  residual=None,
  scale_offset: float = 0.0,
  use_fast_variance: bool = False,
  implementation: str | Sequence[str] | None = None,
):
  """LayerNorm over the last axis, optionally after a fused residual add.

  Statistics and arithmetic are float32; the result has x's dtype.

  Args:
    x: floating array [..., width].
    scale: optional [width] array; multiplies as `scale + scale_offset`.
    bias: optional [width] array, added last.
    epsilon: added to the variance; a Python float > 0.
    residual: optional array of x's shape and dtype. Then h = x + residual (in x's dtype) is
      normalised instead of x and `(y, h)` is returned: the pre-norm residual-stream pattern.
    scale_offset: added to `scale` (e.g. 1.0 for Gemma's `1 + scale` parametrisation);
      ignored when `scale` is None.
    use_fast_variance: compute var = E[x^2] - E[x]^2 (clipped at 0) in one pass over the row,
      as Flax's option of that name; slightly less accurate when |mean| >> std.
    implementation: "xla", "pallas_triton", a sequence of them tried in order, or None for the
      fastest on this device ("pallas_triton" on GPU, "xla" elsewhere).

  Returns:
    y with x's shape and dtype; `(y, h)` when `residual` is given.

  Example:
    >>> y = jfused.layer_norm(x, params["scale"], params["bias"])
    >>> y, stream = jfused.layer_norm(attn_out, scale, bias, residual=stream)
  """
  _validate("layer_norm", x, scale, bias, residual, epsilon, scale_offset)
  names = dispatch.resolve("layer_norm", implementation, _IMPLEMENTATIONS, _default_order())
  spec = NormSpec(
    subtract_mean=True,
    epsilon=float(epsilon),
    scale_offset=float(scale_offset),
    fast_variance=bool(use_fast_variance),
  )
  implementations = {
    "xla": lambda: layer_norm_reference(
      x,
      scale,
      bias,
      epsilon=spec.epsilon,
      residual=residual,
      scale_offset=spec.scale_offset,
      use_fast_variance=spec.fast_variance,
    ),
    "pallas_triton": lambda: _pallas_implementation(x, scale, bias, residual, spec),
  }
  return dispatch.call_first_supported("layer_norm", names, implementations)


def rms_norm(
  x,
  scale=None,
  *,
  epsilon: float = 1e-6,
  residual=None,
  scale_offset: float = 0.0,
  implementation: str | Sequence[str] | None = None,
):
  """RMSNorm over the last axis, optionally after a fused residual add.

  `y = x * rsqrt(mean(x^2) + epsilon) * (scale + scale_offset)`, in float32, returned in x's
  dtype.

  Args:
    x: floating array [..., width].
    scale: optional [width] array; multiplies as `scale + scale_offset`.
    epsilon: added to the mean square; a Python float > 0.
    residual: optional array of x's shape and dtype. Then h = x + residual (in x's dtype) is
      normalised instead of x and `(y, h)` is returned.
    scale_offset: added to `scale` (1.0 for Gemma's `1 + scale`); ignored when `scale` is None.
    implementation: "xla", "pallas_triton", a sequence of them tried in order, or None for the
      fastest on this device.

  Returns:
    y with x's shape and dtype; `(y, h)` when `residual` is given.

  Example:
    >>> y, stream = jfused.rms_norm(mlp_out, scale, residual=stream, scale_offset=1.0)
  """
  _validate("rms_norm", x, scale, None, residual, epsilon, scale_offset)
  names = dispatch.resolve("rms_norm", implementation, _IMPLEMENTATIONS, _default_order())
  spec = NormSpec(subtract_mean=False, epsilon=float(epsilon), scale_offset=float(scale_offset))
  implementations = {
    "xla": lambda: rms_norm_reference(
      x, scale, epsilon=spec.epsilon, residual=residual, scale_offset=spec.scale_offset
    ),
    "pallas_triton": lambda: _pallas_implementation(x, scale, None, residual, spec),
  }
  return dispatch.call_first_supported("rms_norm", names, implementations)
