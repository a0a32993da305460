"""Linear + softmax cross-entropy in pure JAX: the rules every implementation follows.

* `linear_cross_entropy_reference`: the "xla" implementation and what the others are tested
  against: the whole [tokens, vocab] logits, `log_softmax`, differentiated by JAX.
* `rows_forward` / `rows_gradient`: the same loss and its gradient in closed form on one chunk
  of logits, with the contract of the Triton kernels (`pallas_kernels.cross_entropy.triton`):
  what the "xla_chunked" implementation runs per chunk.

Computation is float32 (float64 for float64 inputs, under jax_enable_x64).
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.cross_entropy.triton import LossSpec

REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(dtype):
  return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def counted_tokens(labels, ignore_index: int | None):
  """Tokens that count: label >= 0 and not `ignore_index`."""
  counted = labels >= 0
  if ignore_index is not None:
    counted &= labels != ignore_index
  return counted


def flag_out_of_vocab(losses, labels, counted, vocab: int):
  """NaN for counted tokens whose label is >= vocab: their loss has no meaning, and a NaN
  says so where a clamped index would answer silently."""
  return jnp.where(counted & (labels >= vocab), jnp.nan, losses)


def reduce_losses(losses, counted, reduction: str):
  """Per-token losses (0 where not counted) reduced as asked; a mean is over counted tokens
  and is 0 when none counts."""
  if reduction == "none":
    return losses
  total = jnp.sum(losses)
  if reduction == "sum":
    return total
  return total / jnp.maximum(jnp.sum(counted), 1).astype(losses.dtype)


def logits_of(x, weight, weight_layout: str, precision=None):
  """x [..., D] times the weight, [D, V] ("dv") or [V, D] ("vd"), accumulated in float32 (or
  float64), without a transposed copy of the weight."""
  weight_axis = 0 if weight_layout == "dv" else 1
  return lax.dot_general(
    x,
    weight,
    (((x.ndim - 1,), (weight_axis,)), ((), ())),
    precision=precision,
    preferred_element_type=compute_dtype(x.dtype),
  )


def capped(logits, soft_cap: float | None):
  return logits if soft_cap is None else soft_cap * jnp.tanh(logits / soft_cap)


def token_losses(logits, labels, spec: LossSpec):
  """(loss, lse) per row of raw logits [..., V] (bias included), before masking."""
  z = capped(logits.astype(compute_dtype(logits.dtype)), spec.soft_cap)
  log_probs = jax.nn.log_softmax(z, axis=-1)
  lse = jax.nn.logsumexp(z, axis=-1)
  safe = jnp.clip(labels, 0, z.shape[-1] - 1)
  label_log_prob = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  loss = -(1.0 - spec.label_smoothing) * label_log_prob + spec.z_loss * lse * lse
  if spec.label_smoothing:
    loss -= spec.label_smoothing * jnp.mean(log_probs, axis=-1)
  return loss, lse


def linear_cross_entropy_reference(
  x,
  weight,
  labels,
  bias=None,
  *,
  weight_layout: str,
  spec: LossSpec,
  ignore_index: int | None,
  reduction: str,
  precision=None,
):
  """The loss through the whole logits (see `jfused.linear_cross_entropy`)."""
  logits = logits_of(x, weight, weight_layout, precision)
  if bias is not None:
    logits = logits + bias.astype(logits.dtype).reshape((1,) * (logits.ndim - 1) + bias.shape)
  losses, _ = token_losses(logits, labels, spec)
  counted = counted_tokens(labels, ignore_index)
  losses = flag_out_of_vocab(jnp.where(counted, losses, 0.0), labels, counted, logits.shape[-1])
  return reduce_losses(losses, counted, reduction)


# --- one chunk, in closed form (the kernels' contract) ----------------------------------------


def _with_bias(logits, bias):
  if bias is None:
    return logits
  return logits + bias.astype(logits.dtype)[None, :]


def rows_forward(logits, labels, bias, row_scale, *, spec: LossSpec, grad_dtype):
  """(loss, lse, dlogits or None) of [rows, V] raw logits; see the Triton kernel."""
  z = _with_bias(logits, bias)
  loss, lse = token_losses(z, labels, spec)
  if grad_dtype is None:
    return loss, lse, None
  return (
    loss,
    lse,
    rows_gradient(logits, labels, bias, lse, row_scale, spec=spec, grad_dtype=grad_dtype),
  )


def rows_statistics(logits, labels, bias, *, spec: LossSpec):
  """(lse, label logit, sum of logits) per row of [rows, columns] raw logits holding a slice
  of the vocabulary (labels shifted to it); see the Triton kernel."""
  z = capped(_with_bias(logits, bias), spec.soft_cap)
  lse = jax.nn.logsumexp(z, axis=-1)
  columns = jnp.arange(z.shape[-1])[None, :]
  label_logit = jnp.sum(jnp.where(columns == labels[:, None], z, 0.0), axis=-1)
  return lse, label_logit, jnp.sum(z, axis=-1)


def rows_gradient(logits, labels, bias, lse, row_scale, *, spec: LossSpec, grad_dtype):
  """d loss / d raw logits [rows, V], each row scaled by `row_scale`, given the lse."""
  raw = _with_bias(logits, bias)
  z = capped(raw, spec.soft_cap)
  vocab = z.shape[-1]
  p = jnp.exp(z - lse[:, None])
  row_scale = row_scale[:, None]
  onehot = labels[:, None] == jnp.arange(vocab)[None, :]
  grad = p * ((1.0 + 2.0 * spec.z_loss * lse[:, None]) * row_scale)
  grad -= spec.label_smoothing / (spec.vocab_size or vocab) * row_scale
  grad -= jnp.where(onehot, (1.0 - spec.label_smoothing) * row_scale, 0.0)
  if spec.soft_cap is not None:
    grad *= 1.0 - (z / spec.soft_cap) ** 2
  return grad.astype(grad_dtype)
