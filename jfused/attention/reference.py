"""Pure-JAX attention: the "xla" implementation and the reference every kernel is tested against.

It follows jax.nn.dot_product_attention's XLA path step for step (float32 logits, masked
logits filled with -0.7 * float32 max, float32 softmax, probabilities cast to the key dtype)
and adds what jax.nn lacks: a logits soft cap, segment ids, and a value head dim that differs
from the query/key one. The masking rules come from pallas_kernels.attention.mask, the same
predicate the kernels evaluate; the dropout keep mask comes from
pallas_kernels.attention.dropout, the same hash the kernels evaluate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import dropout as attention_dropout
from pallas_kernels.attention import mask as attention_mask
from pallas_kernels.attention.common import AttentionOperands

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def visibility_grid(ops: AttentionOperands, rules: attention_mask.MaskRules):
  """The element predicate over the whole [B, Nm, T, S] grid, or None if nothing is masked."""
  t, s = ops.q.shape[1], ops.k.shape[1]
  q_positions = jnp.arange(t)[None, None, :, None]
  k_positions = jnp.arange(s)[None, None, None, :]

  def per_batch(x):
    return None if x is None else x[:, None, None, None]

  return attention_mask.element_visible(
    rules,
    q_positions,
    k_positions,
    q_length=per_batch(ops.q_length),
    kv_length=per_batch(ops.kv_length),
    q_segments=None if ops.q_segments is None else ops.q_segments[:, None, :, None],
    kv_segments=None if ops.kv_segments is None else ops.kv_segments[:, None, None, :],
    mask=ops.mask,
  )


def dropout_keep_grid(seeds: jax.Array, t: int, s: int, rate: float) -> jax.Array:
  """The dense dropout keep mask, bool [B, N, T, S], from uint32 seeds [B, N]."""
  return attention_dropout.keep_mask(
    seeds[:, :, None, None],
    jnp.arange(t)[None, None, :, None],
    jnp.arange(s)[None, None, None, :],
    rate,
  )


def attention_reference(
  ops: AttentionOperands,
  *,
  scale: float,
  rules: attention_mask.MaskRules,
  soft_cap: float | None = None,
  precision=None,
  dropout_rate: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
  """Attention on normalised operands (see AttentionOperands).

  With dropout_rate > 0, the softmax probabilities are multiplied by keep / (1 - rate), keep
  from `dropout_keep_grid(ops.dropout_seeds, ...)`, except on rows with no visible key, which
  keep jax.nn's undropped uniform average. The logsumexp is that of the undropped logits.

  Returns:
    (out [B, T, N, Dv] in the value dtype, lse [B, T, N] in the key dtype), like jax.nn's
    `return_residual=True`.
  """
  batch, t, num_heads, head_dim = ops.q.shape
  # Softmax in float32, or float64 for float64 inputs (under x64), as jax.nn computes it.
  compute = jnp.dtype(jnp.float64 if ops.q.dtype == jnp.float64 else jnp.float32)
  s, num_kv_heads = ops.k.shape[1:3]
  group = num_heads // num_kv_heads
  q = ops.q.reshape(batch, t, num_kv_heads, group, head_dim)
  logits = jnp.einsum(
    "btkgd,bskd->bkgts", q, ops.k, precision=precision, preferred_element_type=compute
  )
  logits = logits.reshape(batch, num_heads, t, s) * compute.type(scale)
  if ops.bias is not None:
    logits = logits + ops.bias.astype(compute)
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  visible = visibility_grid(ops, rules)
  if visible is not None:
    logits = jnp.where(visible, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0:
    keep = dropout_keep_grid(ops.dropout_seeds, t, s, dropout_rate)
    factor = jnp.where(keep, compute.type(1.0 / (1.0 - dropout_rate)), compute.type(0.0))
    if visible is not None:
      factor = jnp.where(jnp.any(visible, axis=-1, keepdims=True), factor, 1.0)
    probs = probs * factor
  probs = probs.astype(ops.k.dtype)
  probs = probs.reshape(batch, num_kv_heads, group, t, s)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, ops.v, precision=precision)
  out = out.reshape(batch, t, num_heads, ops.v.shape[-1])
  if ops.q_length is not None:
    valid = jnp.arange(t)[None, :] < ops.q_length[:, None]
    out = out * valid[:, :, None, None].astype(out.dtype)
  lse = jax.nn.logsumexp(logits, axis=-1).astype(ops.k.dtype)
  return out, jax.lax.stop_gradient(jnp.swapaxes(lse, 1, 2))
