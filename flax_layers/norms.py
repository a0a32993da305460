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

import jax
import jax.numpy as jnp
from flax import nnx

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


class _FusedNormMixin:
  """The fused/fallback dispatch shared by LayerNorm and RMSNorm."""

  def _servable(self, x, mask) -> bool:
    return (self.fused and mask is None and self.axis_name is None
            and last_axis_only(x.ndim, self.reduction_axes)
            and last_axis_only(x.ndim, self.feature_axes))

  def _norm(self, x, residual, mask):
    """Returns (y, h) where h is what was normalised (x, or x + residual)."""
    scale = self.scale[...] if self.scale is not None else None
    bias = getattr(self, "bias", None)
    bias = bias[...] if bias is not None else None
    if not self._servable(x, mask):
      h = x if residual is None else residual_add(x, residual)
      return super().__call__(h, mask=mask), h
    # Flax promotes x and the parameters to one dtype first (bf16 x and f32 parameters give a
    # f32 result when dtype=None); jfused computes in f32 and returns its input's dtype.
    promoted_x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    if promoted_x.dtype not in KERNEL_DTYPES:
      h = x if residual is None else residual_add(x, residual)
      return super().__call__(h, mask=mask), h
    fuse_add = (residual is not None and residual.dtype == x.dtype
                and promoted_x.dtype == x.dtype)
    if residual is not None and not fuse_add:
      # Promotion changes the dtype: add in the stream's dtype, then normalise the promoted sum.
      h = residual_add(x, residual)
      promoted_h, scale, bias = self.promote_dtype((h, scale, bias), dtype=self.dtype)
      return self._jfused(promoted_h, scale, bias, None), h
    if fuse_add:
      return self._jfused(x, scale, bias, residual)  # (y, h) from one fused pass.
    return self._jfused(promoted_x, scale, bias, None), x

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

  def _jfused(self, x, scale, bias, residual):
    out = jfused.layer_norm(x, scale, bias, epsilon=float(self.epsilon), residual=residual,
                            use_fast_variance=bool(self.use_fast_variance),
                            implementation=self.implementation)
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

  def _jfused(self, x, scale, bias, residual):
    del bias  # RMSNorm has none.
    out = jfused.rms_norm(x, scale, epsilon=float(self.epsilon), residual=residual,
                          implementation=self.implementation)
    return out
