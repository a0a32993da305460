"""The loss on one device's tokens, a chunk at a time: never more than one chunk's logits.

Tokens are cut into chunks of `chunk_rows`; for each, XLA's matmul (cuBLAS on a GPU) makes the
chunk's float32 logits [chunk_rows, V], a row kernel (`reference.rows_forward` in XLA, or the
Triton kernel) turns them into per-token losses and, when a gradient is wanted, d loss /
d logits, and two more matmuls give the chunk's dx and its share of dweight, summed over
chunks in float32 in a fixed order (deterministic, no atomics).

With a "mean" or "sum" reduction the cotangent is one scalar, so the forward pass of a
differentiated call already computes the gradients (scaled by that scalar in the backward
pass): three matmuls of tokens x D x V in all, as many as the unfused loss, and nothing of
size tokens x V is kept. With "none" each token's cotangent is known only in the backward
pass, which then computes the logits again (four matmuls).

The float32 sum of dweight has the weight's size (2 GiB for a 4096 x 128k head): past
`Plan.vocab_outer`'s threshold the loss walks the vocabulary instead (`vocab_chunks.py`).

`forward_tokens` and `backward_tokens` are what each device runs on its own tokens under
sharding (`jfused.cross_entropy.sharding`); the custom_vjp and the reduction are in `api.py`.
"""

from __future__ import annotations

import dataclasses

from jax import lax
import jax.numpy as jnp

from jfused.cross_entropy import reference
from pallas_kernels.cross_entropy import triton as triton_rows
from pallas_kernels.cross_entropy.triton import LossSpec


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about one call; hashable.

  Attributes:
    row_kernel: "xla" (closed form in XLA) or "pallas_triton".
    interpret: run the Triton kernel in Pallas' interpreter.
    weight_layout: "dv" ([D, V]) or "vd" ([V, D]).
    spec: the loss's options.
    ignore_index: a label value that does not count, besides negative ones.
    reduction: "mean", "sum" or "none".
    logits_chunk_bytes: the most float32 logits one chunk may make.
    vocab_outer: walk the vocabulary in chunks of columns (`vocab_chunks.py`) rather than the
      tokens in chunks of rows.
    mosaic_kernels: with `vocab_outer`, the walk's logits never leave registers: the
      forward pass takes each token's statistics from one Mosaic GPU kernel over the whole
      vocabulary (`pallas_kernels.cross_entropy.mosaic`), and the backward each chunk's
      d loss / d logits from another (`mosaic_gradient.py`) instead of XLA's matmul and the
      row kernel.
  """

  row_kernel: str
  interpret: bool
  weight_layout: str
  spec: LossSpec
  ignore_index: int | None
  reduction: str
  logits_chunk_bytes: int
  vocab_outer: bool = False
  mosaic_kernels: bool = False

  def rows_forward(self, logits, labels, bias, row_scale, grad_dtype):
    if self.row_kernel == "xla":
      return reference.rows_forward(
        logits, labels, bias, row_scale, spec=self.spec, grad_dtype=grad_dtype
      )
    return triton_rows.cross_entropy_rows_forward(
      logits, labels, bias, row_scale, spec=self.spec, grad_dtype=grad_dtype,
      interpret=self.interpret,
    )  # fmt: skip

  def rows_statistics(self, logits, labels, bias):
    if self.row_kernel == "xla":
      return reference.rows_statistics(logits, labels, bias, spec=self.spec)
    return triton_rows.cross_entropy_rows_statistics(
      logits, labels, bias, spec=self.spec, interpret=self.interpret
    )

  def rows_gradient(self, logits, labels, bias, lse, row_scale, grad_dtype):
    if self.row_kernel == "xla":
      return reference.rows_gradient(
        logits, labels, bias, lse, row_scale, spec=self.spec, grad_dtype=grad_dtype
      )
    return triton_rows.cross_entropy_rows_gradient(
      logits, labels, bias, lse, row_scale, spec=self.spec, grad_dtype=grad_dtype,
      interpret=self.interpret,
    )  # fmt: skip


# A chunk holds a multiple of this many tokens (the matmuls' tile).
CHUNK_ROW_MULTIPLE = 16


def chunk_rows_for(tokens: int, vocab: int, logits_chunk_bytes: int) -> int:
  """Tokens per chunk: as many as `logits_chunk_bytes` of float32 logits hold, in multiples
  of `CHUNK_ROW_MULTIPLE`; all tokens when they fit."""
  limit = logits_chunk_bytes // (4 * vocab) // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE
  return max(min(tokens, max(limit, CHUNK_ROW_MULTIPLE)), 1)


def _chunked(array, chunk_rows: int, fill):
  """[N, ...] -> [N_chunks, chunk_rows, ...], the last chunk padded with `fill`."""
  padding = -array.shape[0] % chunk_rows
  if padding:
    widths = [(0, padding)] + [(0, 0)] * (array.ndim - 1)
    array = jnp.pad(array, widths, constant_values=fill)
  return array.reshape(-1, chunk_rows, *array.shape[1:])


def _unchunked(array, count: int):
  return array.reshape(-1, *array.shape[2:])[:count]


def _gradient_products(plan: Plan, x_chunk, weight, dlogits):
  """(dx of the chunk [C, D], its dweight in the weight's layout), float32."""
  f32 = reference.compute_dtype(x_chunk.dtype)
  v_axis = 1 if plan.weight_layout == "dv" else 0
  dx = lax.dot_general(dlogits, weight, (((1,), (v_axis,)), ((), ())), preferred_element_type=f32)
  if plan.weight_layout == "dv":  # [D, V] = x^T dlogits
    dims = (((0,), (0,)), ((), ()))
    dweight = lax.dot_general(x_chunk, dlogits, dims, preferred_element_type=f32)
  else:  # [V, D] = dlogits^T x
    dims = (((0,), (0,)), ((), ()))
    dweight = lax.dot_general(dlogits, x_chunk, dims, preferred_element_type=f32)
  return dx, dweight


def vocab_of(weight, weight_layout: str) -> int:
  return weight.shape[1] if weight_layout == "dv" else weight.shape[0]


def forward_tokens(plan: Plan, x, weight, labels, bias, row_scale):
  """Per-token losses of x [N, D] (unmasked: every label read as is) and their lse; with a
  `row_scale` [N], also the gradients of sum(row_scale * losses): dx [N, D] in x's dtype,
  and dweight and dbias summed over these tokens in float32 (None without a row_scale).
  """
  tokens, vocab = x.shape[0], vocab_of(weight, plan.weight_layout)
  with_gradients = row_scale is not None
  grad_dtype = x.dtype if with_gradients else None
  chunk_rows = chunk_rows_for(tokens, vocab, plan.logits_chunk_bytes)
  f32 = reference.compute_dtype(x.dtype)
  if not with_gradients:
    row_scale = jnp.zeros((tokens,), jnp.float32)  # Carried through the scan, unused.
  chunks = tuple(
    _chunked(a, chunk_rows, fill) for a, fill in ((x, 0), (labels, -1), (row_scale, 0.0))
  )

  def step(carry, chunk):
    x_chunk, label_chunk, scale_chunk = chunk
    logits = reference.logits_of(x_chunk, weight, plan.weight_layout)
    loss, lse, dlogits = plan.rows_forward(
      logits, label_chunk, bias, scale_chunk if with_gradients else None, grad_dtype
    )
    if not with_gradients:
      return carry, (loss, lse, None)
    dweight_sum, dbias_sum = carry
    dx, dweight = _gradient_products(plan, x_chunk, weight, dlogits)
    if bias is not None:
      dbias_sum = dbias_sum + jnp.sum(dlogits.astype(f32), axis=0)
    return (dweight_sum + dweight, dbias_sum), (loss, lse, dx.astype(x.dtype))

  carry = (None, None)
  if with_gradients:
    dbias = None if bias is None else jnp.zeros((vocab,), f32)
    carry = (jnp.zeros(weight.shape, f32), dbias)
  (dweight, dbias), (losses, lse, dx) = lax.scan(step, carry, chunks)
  losses, lse = _unchunked(losses, tokens), _unchunked(lse, tokens)
  return losses, lse, (None if dx is None else _unchunked(dx, tokens)), dweight, dbias


def backward_tokens(plan: Plan, x, weight, labels, bias, lse, row_scale):
  """The gradients of sum(row_scale * losses) over x [N, D]'s tokens given their lse, the
  logits computed again chunk by chunk: dx [N, D] in x's dtype, dweight and dbias (None
  without a bias) summed over these tokens in float32."""
  tokens, vocab = x.shape[0], vocab_of(weight, plan.weight_layout)
  chunk_rows = chunk_rows_for(tokens, vocab, plan.logits_chunk_bytes)
  f32 = reference.compute_dtype(x.dtype)
  chunks = tuple(
    _chunked(a, chunk_rows, fill)
    for a, fill in ((x, 0), (labels, -1), (lse, 0.0), (row_scale, 0.0))
  )

  def step(carry, chunk):
    x_chunk, label_chunk, lse_chunk, scale_chunk = chunk
    logits = reference.logits_of(x_chunk, weight, plan.weight_layout)
    dlogits = plan.rows_gradient(logits, label_chunk, bias, lse_chunk, scale_chunk, x.dtype)
    dx, dweight = _gradient_products(plan, x_chunk, weight, dlogits)
    dweight_sum, dbias_sum = carry
    if bias is not None:
      dbias_sum = dbias_sum + jnp.sum(dlogits.astype(f32), axis=0)
    return (dweight_sum + dweight, dbias_sum), dx.astype(x.dtype)

  dbias = None if bias is None else jnp.zeros((vocab,), f32)
  (dweight, dbias), dx = lax.scan(step, (jnp.zeros(weight.shape, f32), dbias), chunks)
  return _unchunked(dx, tokens), dweight, dbias
