"""The loss on one device's tokens, the vocabulary a chunk of columns at a time.

For heads whose float32 dweight sum would be large (`chunked.py` keeps one of the weight's
size), the vocabulary is walked instead, as FlashAttention walks keys: a forward pass over
column chunks keeps an online logsumexp per token (with the label's logit and the sum of the
logits), nothing else; the backward pass computes each chunk's logits again, turns them into
d loss / d logits with the final lse, and makes that chunk's dweight columns whole (one matmul
over all tokens, accumulated in float32 by the matmul itself) and its share of dx, summed in
float32 ([tokens, D]). Four matmuls of tokens x D x V in all, where `chunked.py` needs three;
the memory is one chunk's logits and dx's float32 sum.

The chunks are full slices of the weight (no padded copy of it): a loop over the whole chunks
and one last, narrower chunk for the rest.
"""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp

from jfused.cross_entropy import reference
from jfused.cross_entropy.chunked import Plan, vocab_of

# A chunk holds a multiple of this many vocabulary columns.
CHUNK_COLUMN_MULTIPLE = 128
# The float32 state of the online logsumexp before any column: exp() of it is 0, and it is
# finite (jax.debug_infs must not fire).
EMPTY_LSE = -(2.0**126)


def chunk_columns_for(tokens: int, vocab: int, logits_chunk_bytes: int) -> int:
  """Columns per chunk: as many as `logits_chunk_bytes` of float32 logits hold for every
  token, in multiples of `CHUNK_COLUMN_MULTIPLE`; the whole vocabulary when it fits."""
  limit = logits_chunk_bytes // (4 * max(tokens, 1))
  limit = max(limit // CHUNK_COLUMN_MULTIPLE * CHUNK_COLUMN_MULTIPLE, CHUNK_COLUMN_MULTIPLE)
  return min(vocab, limit)


def _columns(plan: Plan, weight, start, size: int):
  """Columns [start, start + size) of the weight in its own layout."""
  return lax.dynamic_slice_in_dim(weight, start, size, axis=1 if plan.weight_layout == "dv" else 0)


def _chunks(vocab: int, columns: int):
  """(number of whole chunks, width of the last narrower one or 0)."""
  return vocab // columns, vocab % columns


def forward_tokens(plan: Plan, x, weight, labels, bias, row_scale):
  """Per-token losses of x [N, D] (every label read as is) and their lse; the signature of
  `chunked.forward_tokens`, whose gradients made in the forward pass this mode does not
  offer (row_scale must be None)."""
  assert row_scale is None, "the vocabulary walk makes gradients in the backward pass only"
  tokens, vocab = x.shape[0], vocab_of(weight, plan.weight_layout)
  if plan.mosaic_kernels:
    from pallas_kernels.cross_entropy import mosaic  # Mosaic GPU: imported where it runs.

    lse, label_logit, logit_sum = mosaic.logits_statistics(
      x, weight, labels, weight_layout=plan.weight_layout, spec=plan.spec
    )
    return _token_losses(plan, lse, label_logit, logit_sum, vocab), lse, None, None, None
  columns = chunk_columns_for(tokens, vocab, plan.logits_chunk_bytes)
  whole, rest = _chunks(vocab, columns)

  def merge(state, start, size):
    lse, label_logit, logit_sum = state
    logits = reference.logits_of(x, _columns(plan, weight, start, size), plan.weight_layout)
    bias_chunk = None if bias is None else lax.dynamic_slice_in_dim(bias, start, size)
    chunk_lse, chunk_label, chunk_sum = plan.rows_statistics(logits, labels - start, bias_chunk)
    return jnp.logaddexp(lse, chunk_lse), label_logit + chunk_label, logit_sum + chunk_sum

  zeros = jnp.zeros((tokens,), jnp.float32)
  state = (jnp.full((tokens,), EMPTY_LSE, jnp.float32), zeros, zeros)
  state = lax.fori_loop(0, whole, lambda j, s: merge(s, j * columns, columns), state)
  if rest:
    state = merge(state, whole * columns, rest)
  lse, label_logit, logit_sum = state
  return _token_losses(plan, lse, label_logit, logit_sum, vocab), lse, None, None, None


def _token_losses(plan: Plan, lse, label_logit, logit_sum, vocab: int):
  """Each token's loss from its logits' statistics (the rule of `reference.token_losses`)."""
  spec = plan.spec
  losses = lse - (1.0 - spec.label_smoothing) * label_logit + spec.z_loss * lse * lse
  if spec.label_smoothing:
    losses -= spec.label_smoothing * logit_sum / vocab
  return losses


def backward_tokens(plan: Plan, x, weight, labels, bias, lse, row_scale):
  """The gradients of sum(row_scale * losses) over x [N, D]'s tokens given their lse, the
  signature of `chunked.backward_tokens`: dx [N, D] in x's dtype; dweight whole per chunk, in
  the weight's dtype; dbias (None without a bias) in float32."""
  tokens, vocab = x.shape[0], vocab_of(weight, plan.weight_layout)
  columns = chunk_columns_for(tokens, vocab, plan.logits_chunk_bytes)
  whole, rest = _chunks(vocab, columns)
  f32 = reference.compute_dtype(x.dtype)
  v_axis = 1 if plan.weight_layout == "dv" else 0

  def step(state, start, size):
    dx, dweight, dbias = state
    weight_chunk = _columns(plan, weight, start, size)
    bias_chunk = None if bias is None else lax.dynamic_slice_in_dim(bias, start, size)
    if plan.mosaic_kernels:
      from pallas_kernels.cross_entropy import mosaic_gradient  # Mosaic GPU: where it runs.

      dlogits = mosaic_gradient.logits_gradient(
        x, weight_chunk, labels - start, lse, row_scale,
        weight_layout=plan.weight_layout, spec=plan.spec, grad_dtype=x.dtype,
      )  # fmt: skip
    else:
      logits = reference.logits_of(x, weight_chunk, plan.weight_layout)
      dlogits = plan.rows_gradient(logits, labels - start, bias_chunk, lse, row_scale, x.dtype)
    dx = dx + lax.dot_general(
      dlogits, weight_chunk, (((1,), (v_axis,)), ((), ())), preferred_element_type=f32
    )
    dims = (((0,), (0,)), ((), ()))
    if plan.weight_layout == "dv":  # [D, size] = x^T dlogits
      chunk = lax.dot_general(x, dlogits, dims, preferred_element_type=f32)
    else:  # [size, D] = dlogits^T x
      chunk = lax.dot_general(dlogits, x, dims, preferred_element_type=f32)
    dweight = lax.dynamic_update_slice_in_dim(dweight, chunk.astype(dweight.dtype), start, v_axis)
    if bias is not None:
      column_sums = jnp.sum(dlogits.astype(f32), axis=0)
      dbias = lax.dynamic_update_slice_in_dim(dbias, column_sums, start, 0)
    return dx, dweight, dbias

  state = (
    jnp.zeros(x.shape, f32),
    jnp.zeros(weight.shape, weight.dtype),
    None if bias is None else jnp.zeros((vocab,), f32),
  )
  state = lax.fori_loop(0, whole, lambda j, s: step(s, j * columns, columns), state)
  if rest:
    state = step(state, whole * columns, rest)
  dx, dweight, dbias = state
  return dx.astype(x.dtype), dweight, dbias
