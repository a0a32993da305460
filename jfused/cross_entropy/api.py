"""Linear + softmax cross-entropy: a language model's loss without its [tokens, vocab] logits.

`linear_cross_entropy(x, weight, labels)` is `softmax_cross_entropy(x @ weight, labels)` with
the options large models train with. Implementations:

* "xla": the reference: the whole logits in float32, differentiated by JAX. Its memory grows
  with tokens x vocab (8 GiB of float32 logits at 16k tokens and a 128k vocabulary, and as
  much again for their gradient).
* "xla_chunked" and "pallas_triton": tokens a chunk at a time (`jfused.cross_entropy.chunked`):
  XLA's matmuls, and the per-row softmax, loss and gradient in XLA or in one Triton kernel
  (`pallas_kernels.cross_entropy.triton`) that reads each chunk's logits once per pass. At
  most one chunk's logits (`LOGITS_CHUNK_BYTES`) exist at a time, and with a "mean" or "sum"
  reduction the gradients are made in the forward pass, so the logits are not computed again.
  That keeps a float32 dweight sum of the weight's size; past `FLOAT32_DWEIGHT_LIMIT_BYTES`
  the vocabulary is walked in chunks of columns instead (`jfused.cross_entropy.vocab_chunks`:
  an online logsumexp forward, a backward that computes the logits again).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jfused import config, dispatch
from jfused.cross_entropy import chunked, reference, sharding
from jfused.cross_entropy.chunked import Plan
from pallas_kernels.cross_entropy.triton import LossSpec

__all__ = ["linear_cross_entropy"]

_IMPLEMENTATIONS = ("xla", "xla_chunked", "pallas_triton", "pallas_mosaic")
# The float32 logits of one chunk of tokens: large enough that the chunk's matmuls fill a GPU
# (at a 128k vocabulary, 512 tokens: 0.5 TFLOP per matmul at D = 4096), small beside the
# model's own memory.
LOGITS_CHUNK_BYTES = 256 * 2**20
# Past this size of a float32 dweight sum ([D, V]: 512 MiB at D = 2048, V = 64k), the loss
# walks the vocabulary (one more matmul) rather than keep that sum (`vocab_chunks.py`).
FLOAT32_DWEIGHT_LIMIT_BYTES = 512 * 2**20
_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
WEIGHT_LAYOUTS = ("dv", "vd")


# --- validation ------------------------------------------------------------------------------


def _check_real(name, value, *, low=None, high=None, low_open=False, high_open=False):
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"linear_cross_entropy: {name} must be a Python float, got {value!r}")
  if not math.isfinite(value):
    raise ValueError(f"linear_cross_entropy: {name} must be finite, got {value}")
  below = low is not None and (value <= low if low_open else value < low)
  above = high is not None and (value >= high if high_open else value > high)
  if below or above:
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    interval = (
      f"{left}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}{right}"
    )
    raise ValueError(f"linear_cross_entropy: {name} must be in {interval}, got {value}")


def _weight_layout(x, weight, weight_layout):
  """The weight's layout, "dv" ([D, V]) or "vd" ([V, D]), inferred from the shapes when not
  given."""
  width = x.shape[-1]
  if weight_layout is not None:
    if weight_layout not in WEIGHT_LAYOUTS:
      raise ValueError(
        f"linear_cross_entropy: weight_layout must be one of {WEIGHT_LAYOUTS} or None, "
        f"got {weight_layout!r}"
      )
    d_axis = 0 if weight_layout == "dv" else 1
    if weight.shape[d_axis] != width:
      raise ValueError(
        f"linear_cross_entropy: weight of shape {tuple(weight.shape)} in layout "
        f"{weight_layout!r} has D = {weight.shape[d_axis]}, but x's last axis is {width}"
      )
    return weight_layout
  rows_match, cols_match = weight.shape[0] == width, weight.shape[1] == width
  if rows_match and cols_match:
    raise ValueError(
      f"linear_cross_entropy: weight {tuple(weight.shape)} is square, so its layout is "
      "ambiguous: pass weight_layout='dv' ([D, V], nnx.Linear's kernel) or 'vd' ([V, D], an "
      "nnx.Embed table)"
    )
  if not (rows_match or cols_match):
    raise ValueError(
      f"linear_cross_entropy: weight must be [D, V] or [V, D] with D = {width} (x's last "
      f"axis), got shape {tuple(weight.shape)}"
    )
  return "dv" if rows_match else "vd"


def _check_labels_in_vocab(labels, vocab):
  """Concrete labels are checked now; traced ones give a NaN loss for an out-of-range label."""
  if isinstance(labels, jax.core.Tracer):
    return
  largest = int(np.max(np.asarray(labels))) if labels.size else -1
  if largest >= vocab:
    raise ValueError(
      f"linear_cross_entropy: labels must be < the vocabulary size {vocab} (negative labels "
      f"are ignored), got a label {largest}"
    )


def _validate(
  x, weight, labels, bias, weight_layout, ignore_index, label_smoothing, z_loss, soft_cap, reduction
):
  """Checks a user can fail; raises before anything is traced or launched. Returns the
  weight's layout and the vocabulary size."""
  for name, value in (("x", x), ("weight", weight), ("labels", labels), ("bias", bias)):
    if value is not None and not hasattr(value, "shape"):
      raise TypeError(f"linear_cross_entropy: {name} must be an array, got {type(value).__name__}")
  for name, value in (("x", x), ("weight", weight), ("bias", bias)):
    if value is not None and not jnp.issubdtype(value.dtype, jnp.floating):
      raise TypeError(f"linear_cross_entropy: {name} must have a floating dtype, got {value.dtype}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"linear_cross_entropy: labels must have an integer dtype, got {labels.dtype}")
  if x.ndim < 1:
    raise ValueError("linear_cross_entropy: x must be [..., D], got a scalar")
  if weight.ndim != 2:
    raise ValueError(
      f"linear_cross_entropy: weight must be 2-D ([D, V] or [V, D]), got shape "
      f"{tuple(weight.shape)}"
    )
  if tuple(labels.shape) != tuple(x.shape[:-1]):
    raise ValueError(
      f"linear_cross_entropy: labels must have x's leading shape {tuple(x.shape[:-1])}, got "
      f"{tuple(labels.shape)}"
    )
  layout = _weight_layout(x, weight, weight_layout)
  vocab = weight.shape[1] if layout == "dv" else weight.shape[0]
  if bias is not None and tuple(bias.shape) != (vocab,):
    raise ValueError(
      f"linear_cross_entropy: bias must have shape ({vocab},) (the vocabulary of weight "
      f"{tuple(weight.shape)}), got {tuple(bias.shape)}"
    )
  if ignore_index is not None and (
    isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
  ):
    raise TypeError(
      f"linear_cross_entropy: ignore_index must be an int or None, got {ignore_index!r}"
    )
  _check_real("label_smoothing", label_smoothing, low=0.0, high=1.0, high_open=True)
  _check_real("z_loss", z_loss, low=0.0)
  if soft_cap is not None:
    _check_real("logits_soft_cap", soft_cap, low=0.0, low_open=True)
  if reduction not in reference.REDUCTIONS:
    raise ValueError(
      f"linear_cross_entropy: reduction must be one of {reference.REDUCTIONS}, got {reduction!r}"
    )
  _check_labels_in_vocab(labels, vocab)
  return layout, vocab


# --- implementations -------------------------------------------------------------------------


def _row_scale(plan: Plan, labels, vocab: int):
  """Each token's share of the reduced loss's gradient: 0 where it does not count (or its
  label is outside the vocabulary), 1 for "sum" and "none", 1 / count for "mean"."""
  counted = reference.counted_tokens(labels, plan.ignore_index)
  scale = (counted & (labels < vocab)).astype(jnp.float32)
  if plan.reduction == "mean":
    scale = scale / jnp.maximum(jnp.sum(counted), 1).astype(jnp.float32)
  return scale


def _reduced(plan: Plan, losses, labels, vocab: int):
  counted = reference.counted_tokens(labels, plan.ignore_index)
  losses = reference.flag_out_of_vocab(jnp.where(counted, losses, 0.0), labels, counted, vocab)
  return reference.reduce_losses(losses, counted, plan.reduction)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_loss(plan: Plan, x, weight, labels, bias):
  losses, _, *_ = sharding.forward_tokens(plan, x, weight, labels, bias, None)
  return _reduced(plan, losses, labels, chunked.vocab_of(weight, plan.weight_layout))


def _chunked_loss_fwd(plan: Plan, x, weight, labels, bias):
  vocab = chunked.vocab_of(weight, plan.weight_layout)
  if plan.reduction == "none" or plan.vocab_outer:
    # Each token's cotangent comes only in the backward pass, which computes the logits again
    # (as it does when walking the vocabulary, whatever the reduction).
    losses, lse, *_ = sharding.forward_tokens(plan, x, weight, labels, bias, None)
    return _reduced(plan, losses, labels, vocab), ((x, weight, labels, bias, lse), None)
  # A reduced loss has one scalar cotangent: the gradients are made now, and scaled later.
  row_scale = _row_scale(plan, labels, vocab)
  losses, _, dx, dweight, dbias = sharding.forward_tokens(plan, x, weight, labels, bias, row_scale)
  gradients = (dx, dweight.astype(weight.dtype), None if bias is None else dbias.astype(bias.dtype))
  # Nothing of size tokens x vocab is kept: the gradients have the inputs' sizes.
  return _reduced(plan, losses, labels, vocab), (None, gradients)


def _scaled(gradient, scale):
  if gradient is None:
    return None
  return (gradient.astype(jnp.float32) * scale).astype(gradient.dtype)


def _chunked_loss_bwd(plan: Plan, saved, cotangent):
  inputs, gradients = saved
  if gradients is None:
    x, weight, labels, bias, lse = inputs
    vocab = chunked.vocab_of(weight, plan.weight_layout)
    row_scale = _row_scale(plan, labels, vocab) * cotangent.astype(jnp.float32)
    dx, dweight, dbias = sharding.backward_tokens(plan, x, weight, labels, bias, lse, row_scale)
    dbias = None if bias is None else dbias.astype(bias.dtype)
    return dx, dweight.astype(weight.dtype), None, dbias
  scale = cotangent.astype(jnp.float32)
  dx, dweight, dbias = (_scaled(g, scale) for g in gradients)
  return dx, dweight, None, dbias


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd, optimize_remat=True)


def _chunked_implementation(
  row_kernel, x, weight, labels, bias, layout, spec, ignore_index, reduction, *, mosaic=False
):
  """The chunked loss with `row_kernel`'s row kernel; `mosaic`: the vocabulary walk with its
  logits kept in registers, the forward's statistics and each chunk's d loss / d logits in
  the backward from Mosaic GPU kernels (`pallas_kernels.cross_entropy.mosaic`,
  `mosaic_gradient`), dx and dweight from XLA's matmuls of that gradient."""
  if row_kernel == "pallas_triton" and x.dtype not in _KERNEL_DTYPES:
    raise NotImplementedError(
      f"pallas_triton supports float32, bfloat16 and float16, not {x.dtype}"
    )
  if mosaic:
    reason = config.mosaic_unavailable_reason()
    if reason is None:
      # Importing Mosaic GPU takes about 0.3 s: only calls that reach it pay for it.
      from pallas_kernels.cross_entropy import mosaic as mosaic_kernels

      reason = mosaic_kernels.unsupported_reason(x, weight, bias)
    if reason is not None:
      raise NotImplementedError(reason)
  plan = Plan(
    row_kernel=row_kernel,
    interpret=config.use_interpret(),
    weight_layout=layout,
    spec=spec,
    ignore_index=ignore_index,
    reduction=reduction,
    logits_chunk_bytes=LOGITS_CHUNK_BYTES,
    vocab_outer=mosaic or walks_vocabulary(weight),
    mosaic_kernels=mosaic,
  )
  return _chunked_loss(plan, x, weight, labels.astype(jnp.int32), bias)


def walks_vocabulary(weight) -> bool:
  """Whether the chunked loss walks the vocabulary for this weight (its float32 dweight sum
  would pass FLOAT32_DWEIGHT_LIMIT_BYTES) rather than chunk the tokens."""
  return 4 * math.prod(weight.shape) > FLOAT32_DWEIGHT_LIMIT_BYTES


def _default_order(weight) -> tuple[str, ...]:
  """On GPU the Triton row kernel's chunked loss, then chunked XLA. On Hopper the Mosaic
  kernels come first where a head walks the vocabulary anyway, in either layout: there they
  are ahead in less scratch (H100, 2026-12-07, N = 16384, fwd+bwd with the kernels' clustered
  tiles: 219.0 against 235.0 ms at D4096 V262144 in 384 against 544 MiB, 107.4 against
  114.5 ms for a tied [V, D] table at D4096 V128256 in 572 against 604 MiB;
  cross_entropy_mosaic_heads_h100_2026-12-07.log). On narrower heads the token chunks make
  the gradients in the forward pass, one matmul fewer than any walk: 11.7 ms against the
  Mosaic walk's 14.9 at D2048 V32768 (H200, 2026-12-07). The kernels read a [V, D] table's
  tiles transposed in shared memory, so the layout does not change the choice."""
  if not config.on_gpu():
    return ("xla",)
  order = ("pallas_triton", "xla_chunked")
  if config.on_hopper() and walks_vocabulary(weight):
    return ("pallas_mosaic", *order)
  return order


# --- public API ------------------------------------------------------------------------------


def linear_cross_entropy(
  x,
  weight,
  labels,
  *,
  bias=None,
  weight_layout: str | None = None,
  ignore_index: int | None = None,
  label_smoothing: float = 0.0,
  z_loss: float = 0.0,
  logits_soft_cap: float | None = None,
  reduction: str = "mean",
  implementation: str | Sequence[str] | None = None,
):
  """Softmax cross-entropy of the logits `x @ weight (+ bias)` against integer labels.

  Computed in float32 whatever the inputs' dtype (float64 for float64 inputs), without
  materialising the [tokens, vocab] logits except with implementation="xla".

  Per counted token, with z the logits (soft-capped when asked) and lse = logsumexp(z):
  `loss = (1 - label_smoothing) * (lse - z[label]) + label_smoothing * (lse - mean(z))
  + z_loss * lse**2`.

  Args:
    x: floating [..., D]: the last hidden states.
    weight: floating [D, V] (an `nnx.Linear` kernel) or [V, D] (a tied `nnx.Embed` table);
      neither is transposed in memory. x and weight are promoted to a common dtype, which the
      matmuls use (accumulating in float32).
    labels: integer [...] (x's leading shape). Negative labels, and `ignore_index`, do not
      count: their loss is 0 and they receive no gradient. A label >= V gives a NaN loss (a
      concrete `labels` array is checked up front and raises).
    bias: optional floating [V].
    weight_layout: "dv" or "vd"; None infers it from the shapes (a square weight must say).
    ignore_index: one more label value that does not count (PyTorch's -100, say).
    label_smoothing: in [0, 1); the target is (1 - label_smoothing) * onehot + label_smoothing / V.
    z_loss: coefficient >= 0 of lse**2 (PaLM's z-loss), added per counted token.
    logits_soft_cap: None or cap > 0: logits become cap * tanh(logits / cap) (Gemma 2).
    reduction: "mean" over counted tokens (0 when none counts), "sum", or "none" (per-token
      losses of labels' shape, 0 where not counted).
    implementation: "xla", "xla_chunked", "pallas_triton", "pallas_mosaic" (Hopper GPUs:
      the vocabulary walk with its logits kept in registers by two Mosaic kernels; bf16 or
      f16, D a multiple of 64, no bias), a sequence of them tried in order, or None:
      "pallas_triton" then "xla_chunked" on GPU, with "pallas_mosaic" first on Hopper for
      heads that walk the vocabulary (past 128 Mi elements, either layout); "xla" elsewhere.

  Returns:
    A float32 scalar ("mean", "sum") or per-token float32 losses ("none").

  Example:
    >>> loss = jfused.linear_cross_entropy(hidden, model.embed.embedding[...], targets,
    ...                                    weight_layout="vd", ignore_index=pad_id)
  """
  layout, vocab = _validate(
    x,
    weight,
    labels,
    bias,
    weight_layout,
    ignore_index,
    label_smoothing,
    z_loss,
    logits_soft_cap,
    reduction,
  )
  names = dispatch.resolve(
    "linear_cross_entropy", implementation, _IMPLEMENTATIONS, _default_order(weight)
  )
  spec = LossSpec(
    label_smoothing=float(label_smoothing),
    z_loss=float(z_loss),
    soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
    vocab_size=vocab,
  )
  ignore_index = None if ignore_index is None else int(ignore_index)
  dtype = jnp.promote_types(x.dtype, weight.dtype)
  x, weight = x.astype(dtype), weight.astype(dtype)
  common = (x, weight, labels, bias, layout, spec, ignore_index, reduction)

  def run_reference():
    return reference.linear_cross_entropy_reference(
      x,
      weight,
      labels,
      bias,
      weight_layout=layout,
      spec=spec,
      ignore_index=ignore_index,
      reduction=reduction,
    )

  implementations = {
    "xla": run_reference,
    "xla_chunked": lambda: _chunked_implementation("xla", *common),
    "pallas_triton": lambda: _chunked_implementation("pallas_triton", *common),
    "pallas_mosaic": lambda: _chunked_implementation("pallas_triton", *common, mosaic=True),
  }
  return dispatch.call_first_supported("linear_cross_entropy", names, implementations)
