"""NNX `LayerNorm` and `RMSNorm` that run `jfused.layer_norm` / `jfused.rms_norm`.

Both subclass Flax's own modules, so the constructor, the parameters (`scale`, `bias`), their
initialisers and the dtype promotion are Flax's: `nnx.update(ours, nnx.state(theirs))` and the
reverse just work. `__call__` sends what the fused kernels serve (one reduction axis, the last,
that is also the feature axis; no `mask`, no `axis_name`; float32/bfloat16/float16) to jfused and
everything else to Flax's own `__call__`, so a configuration we do not fuse still gives Flax's
answer instead of an error.

Beyond Flax, both take `residual=`: `norm(x, residual=r)` returns `(norm(x + r), x + r)`, the
pre-norm transformer pattern, with the add fused into the norm's pass over memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from flax import nnx
from flax.nnx.nn import dtypes
import jax
import jax.numpy as jnp

import jfused

__all__ = ["LayerNorm", "RMSNorm", "KERNEL_DTYPES", "residual_add", "last_axis_only"]

# Dtypes the jfused norms compute exactly like Flax (float32 statistics, result in x's dtype).
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def last_axis_only(ndim: int, axes) -> bool:
  """Whether `axes` (an int or a sequence, possibly negative) names exactly the last axis."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return ndim >= 1 and {a % ndim for a in axes} == {ndim - 1}


def residual_add(x, residual):
  """x + residual in float32, rounded to the wider of the two dtypes (what a stream stores).

  The same rounding as jfused's fused add, so the fused and unfused paths agree bit for bit on
  the residual stream.
  """
  dtype = jnp.promote_types(x.dtype, residual.dtype)
  return (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(dtype)


def _hashable(implementation: str | Sequence[str] | None):
  # Module attributes that are not arrays are static: keep them hashable for nnx.jit's cache.
  if implementation is None or isinstance(implementation, str):
    return implementation
  return tuple(implementation)


class _Plan(NamedTuple):
  """Flax's promoted operands, the dtype jfused runs in, and the dtype Flax returns."""

  x: jax.Array
  scale: jax.Array | None
  bias: jax.Array | None
  work_dtype: jnp.dtype
  out_dtype: jnp.dtype


class _FusedNormMixin:
  """The fused/fallback dispatch shared by LayerNorm and RMSNorm.

  Flax's dtype rules, which the fused path reproduces: x and the parameters go through
  `self.promote_dtype` (the tuple Flax's own `__call__` passes: see `_promote`); statistics and
  arithmetic are float32 (at least); the result is cast to `canonicalize_dtype` of the promoted
  x and parameters with `dtype`. A custom promote_dtype can leave x wider or narrower than that
  result (float32 x with dtype=float16): jfused then runs in the wider of the two and the result
  is cast, as Flax's float32 arithmetic followed by its final cast does.
  """

  def _servable(self, x, mask) -> bool:
    return (
      self.fused
      and mask is None
      and self.axis_name is None
      and last_axis_only(x.ndim, self.reduction_axes)
      and last_axis_only(x.ndim, self.feature_axes)
    )

  def _plan(self, x) -> _Plan | None:
    """How jfused computes Flax's norm of x; None when the kernels do not take the dtypes."""
    x, scale, bias = self._promote(x)
    out_dtype = jnp.dtype(dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype))
    if out_dtype not in KERNEL_DTYPES or any(
      a is not None and a.dtype not in KERNEL_DTYPES for a in (x, scale, bias)
    ):
      return None
    return _Plan(x, scale, bias, jnp.promote_types(x.dtype, out_dtype), out_dtype)

  def _norm(self, x, residual, mask):
    """Returns (y, h) where h is what was normalised (x, or x + residual)."""
    if not self._servable(x, mask):
      h = x if residual is None else residual_add(x, residual)
      return super().__call__(h, mask=mask), h
    if residual is not None and residual.dtype == x.dtype:
      plan = self._plan(x)
      if plan is not None and plan.x.dtype == plan.work_dtype == plan.out_dtype == x.dtype:
        # No dtype changes anywhere: (y, h) from one fused pass.
        return self._jfused(x, plan.scale, plan.bias, residual)
    # The add in the stream's dtype, then the promoted sum normalised.
    h = x if residual is None else residual_add(x, residual)
    plan = self._plan(h)
    if plan is None:
      return super().__call__(h, mask=mask), h
    y = self._jfused(plan.x.astype(plan.work_dtype), plan.scale, plan.bias, None)
    return y.astype(plan.out_dtype), h

  def _call(self, x, mask, residual):
    y, h = self._norm(x, residual, mask)
    return y if residual is None else (y, h)


class LayerNorm(_FusedNormMixin, nnx.LayerNorm):
  """`nnx.LayerNorm` running jfused's fused LayerNorm.

  Takes every argument of `nnx.LayerNorm` (same defaults, including `epsilon=1e-6` and
  `use_fast_variance=True`) plus the two below.

  Args:
    num_features: the number of input features (the size of the last axis).
    implementation: passed to `jfused.layer_norm` ("xla", "pallas_triton", a sequence, or None
      for the fastest on this device).
    fused: False runs Flax's own math always (the reference the fused path is tested on).
    **kwargs: the keyword arguments of `nnx.LayerNorm` (epsilon, dtype, param_dtype, use_bias,
      use_scale, bias_init, scale_init, reduction_axes, feature_axes, axis_name, ..., rngs).

  Example:
    >>> norm = flax_layers.LayerNorm(512, rngs=nnx.Rngs(0))
    >>> y = norm(x)                                 # as nnx.LayerNorm
    >>> y, stream = norm(attn_out, residual=stream)  # LayerNorm(attn_out + stream), and the sum
  """

  def __init__(self, num_features: int, *, implementation=None, fused: bool = True, **kwargs):
    super().__init__(num_features, **kwargs)
    self.implementation = _hashable(implementation)
    self.fused = fused

  def __call__(self, x, *, mask: jax.Array | None = None, residual: jax.Array | None = None):
    """Normalises x (or x + residual) over the last axis.

    Args:
      x: the input [..., num_features].
      mask: as in `nnx.LayerNorm` (statistics over the True positions); runs Flax's math.
      residual: optional array of x's shape; then x + residual is normalised.

    Returns:
      The normalised array, in Flax's promoted dtype; with `residual`, the pair
      `(y, x + residual)`, the sum in the wider of x's and residual's dtypes.
    """
    return self._call(x, mask, residual)

  def _promote(self, x):
    # Flax's LayerNorm promotes (x, scale, bias), None in the slot of a parameter it lacks.
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    return self.promote_dtype((x, scale, bias), dtype=self.dtype)

  def _jfused(self, x, scale, bias, residual):
    out = jfused.layer_norm(
      x,
      scale,
      bias,
      epsilon=float(self.epsilon),
      residual=residual,
      use_fast_variance=bool(self.use_fast_variance),
      implementation=self.implementation,
    )
    return out


class RMSNorm(_FusedNormMixin, nnx.RMSNorm):
  """`nnx.RMSNorm` running jfused's fused RMSNorm.

  Takes every argument of `nnx.RMSNorm` plus the two below.

  Args:
    num_features: the number of input features (the size of the last axis).
    implementation: passed to `jfused.rms_norm`.
    fused: False runs Flax's own math always.
    **kwargs: the keyword arguments of `nnx.RMSNorm` (epsilon, dtype, param_dtype, use_scale,
      scale_init, reduction_axes, feature_axes, axis_name, ..., rngs).

  Example:
    >>> norm = flax_layers.RMSNorm(512, rngs=nnx.Rngs(0))
    >>> y, stream = norm(mlp_out, residual=stream)
  """

  def __init__(self, num_features: int, *, implementation=None, fused: bool = True, **kwargs):
    super().__init__(num_features, **kwargs)
    self.implementation = _hashable(implementation)
    self.fused = fused

  def __call__(self, x, mask: jax.Array | None = None, *, residual: jax.Array | None = None):
    """Normalises x (or x + residual) by its root mean square over the last axis.

    Args:
      x: the input [..., num_features].
      mask: as in `nnx.RMSNorm`; runs Flax's math.
      residual: optional array of x's shape; then x + residual is normalised.

    Returns:
      The normalised array; with `residual`, the pair `(y, x + residual)`.
    """
    return self._call(x, mask, residual)

  def _promote(self, x):
    # Flax's RMSNorm promotes the pair (x, scale), no bias slot: a user's promote_dtype is
    # written to that contract and may unpack exactly two.
    scale = self.scale[...] if self.scale is not None else None
    x, scale = self.promote_dtype((x, scale), dtype=self.dtype)
    return x, scale, None

  def _jfused(self, x, scale, bias, residual):
    del bias  # RMSNorm has none.
    out = jfused.rms_norm(
      x, scale, epsilon=float(self.epsilon), residual=residual, implementation=self.implementation
    )
    return out
