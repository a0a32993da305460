"""Softmax cross-entropy over rows of logits (Pallas, Triton lowering): loss and gradient.

The input is a `[rows, vocab]` float32 block of raw logits (one chunk of tokens' x @ W, made
by the caller's matmul). One program owns `block_rows` rows and walks the vocabulary in
`block_cols`-wide steps:

* forward pass: online logsumexp (running max and rescaled sum, as FlashAttention keeps per
  query row), the label's logit and the sum of all logits (label smoothing's uniform term);
  the per-row loss and lse are all it writes;
* gradient pass (when asked, after the forward pass or alone given the lse): the logits are
  read again and d loss / d logits written in the caller's dtype, scaled by a per-row factor
  (0 for ignored tokens, 1/count for a mean, the incoming cotangent).

Per row, with z the (optionally soft-capped) logits, p = softmax(z), y the label, eps the
label smoothing and c the z-loss coefficient:

  loss = lse - (1 - eps) * z_y - eps * mean(z) + c * lse^2
  dloss/dz = p * (1 + 2 c lse) - (1 - eps) * onehot(y) - eps / vocab

and a soft cap z = cap * tanh(raw / cap) multiplies the gradient by 1 - (z / cap)^2. Labels
outside [0, vocab) match no column; the caller masks those rows. Everything is float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.indexing import positions
from pallas_kernels.launcher import launcher

# Elements of a program's logits tile: 16 float32 values per thread at 8 warps.
TILE_ELEMENTS = 4096
# Widest vocabulary step; wider rows are walked in steps of this many columns.
MAX_BLOCK_COLS = 4096
# Fill of columns past the vocabulary: finite (debug_infs must not fire), exp() of it is 0.
MASKED_LOGIT = -(2.0**126)


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The loss's options; static, hashable.

  Attributes:
    label_smoothing: eps in [0, 1): the target is (1 - eps) * onehot + eps / vocab.
    z_loss: coefficient of lse^2 added to each row's loss (PaLM's z-loss).
    soft_cap: None, or cap > 0: logits become cap * tanh(logits / cap) (Gemma 2).
    vocab_size: the whole vocabulary when the rows hold a slice of it (the smoothing's
      uniform target is spread over all of it); None: the rows' own width.
  """

  label_smoothing: float = 0.0
  z_loss: float = 0.0
  soft_cap: float | None = None
  vocab_size: int | None = None


@dataclasses.dataclass(frozen=True)
class Tiling:
  block_rows: int
  block_cols: int
  num_warps: int


def _next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def tiling_for(rows: int, vocab: int) -> Tiling:
  block_cols = min(max(_next_power_of_2(vocab), 16), MAX_BLOCK_COLS)
  block_rows = max(1, min(TILE_ELEMENTS // block_cols, _next_power_of_2(rows)))
  num_warps = max(1, min(block_rows * block_cols // 512, 8))
  return Tiling(block_rows, block_cols, num_warps)


def _capped(raw, spec: LossSpec):
  if spec.soft_cap is None:
    return raw
  return spec.soft_cap * jnp.tanh(raw / spec.soft_cap)


def _load_capped_logits(refs, r0, c0, spec: LossSpec, tiling: Tiling, rows: int, vocab: int):
  """(z [R, C] float32, column ids [C], column mask [C] or None, element mask or None) of the
  tile at (r0, c0); masked elements of z are 0 (the bias and cap keep 0 at 0)."""
  row_ids = positions(r0, tiling.block_rows)
  col_ids = positions(c0, tiling.block_cols)
  row_mask = None if rows % tiling.block_rows == 0 else row_ids < rows
  col_mask = None if vocab % tiling.block_cols == 0 else col_ids < vocab
  shape = (tiling.block_rows, tiling.block_cols)
  mask = None
  if row_mask is not None:
    mask = jnp.broadcast_to(row_mask[:, None], shape)
  if col_mask is not None:
    cols = jnp.broadcast_to(col_mask[None, :], shape)
    mask = cols if mask is None else mask & cols
  view = refs["logits"].at[row_ids[:, None], col_ids[None, :]]
  raw = pltriton.load(view) if mask is None else pltriton.load(view, mask=mask, other=0.0)
  raw = raw.astype(jnp.float32)
  if "bias" in refs:
    bias_view = refs["bias"].at[col_ids]
    bias = (
      pltriton.load(bias_view, mask=col_mask, other=0.0)
      if col_mask is not None
      else (pltriton.load(bias_view))
    )
    raw = raw + bias.astype(jnp.float32)[None, :]
  return _capped(raw, spec), col_ids, col_mask, mask


def _rows_kernel(*refs, names, spec: LossSpec, tiling: Tiling, rows: int, vocab: int):
  refs = dict(zip(names, refs))
  r0 = pl.program_id(0) * tiling.block_rows
  row_ids = positions(r0, tiling.block_rows)
  row_mask = None if rows % tiling.block_rows == 0 else row_ids < rows

  def load_rows(name, other):
    view = refs[name].at[row_ids]
    return (
      pltriton.load(view, mask=row_mask, other=other)
      if row_mask is not None
      else (pltriton.load(view))
    )

  def store_rows(name, value):
    pltriton.store(refs[name].at[row_ids], value, mask=row_mask)

  labels = load_rows("labels", -1)
  steps = pl.cdiv(vocab, tiling.block_cols)
  zeros = jnp.zeros((tiling.block_rows,), jnp.float32)

  if "lse" in refs:  # Gradient only: the forward's lse is given.
    lse = load_rows("lse", 0.0)
  else:

    def forward_step(step, carry):
      running_max, running_sum, label_logit, logit_sum = carry
      c0 = step * tiling.block_cols
      z, col_ids, col_mask, _ = _load_capped_logits(refs, r0, c0, spec, tiling, rows, vocab)
      in_vocab = z if col_mask is None else jnp.where(col_mask[None, :], z, MASKED_LOGIT)
      new_max = jnp.maximum(running_max, jnp.max(in_vocab, axis=1))
      running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
        jnp.exp(in_vocab - new_max[:, None]), axis=1
      )
      label_logit += jnp.sum(jnp.where(col_ids[None, :] == labels[:, None], z, 0.0), axis=1)
      return new_max, running_sum, label_logit, logit_sum + jnp.sum(z, axis=1)

    initial = (jnp.full_like(zeros, MASKED_LOGIT), zeros, zeros, zeros)
    row_max, row_sum, label_logit, logit_sum = lax.fori_loop(0, steps, forward_step, initial)
    lse = row_max + jnp.log(row_sum)
    smoothing = spec.label_smoothing
    loss = lse - (1.0 - smoothing) * label_logit + spec.z_loss * lse * lse
    if smoothing:
      loss -= smoothing * logit_sum / (spec.vocab_size or vocab)
    if "loss" in refs:
      store_rows("loss", loss)
    else:  # Statistics of a slice of the vocabulary, merged by the caller.
      store_rows("label_logit", label_logit)
      store_rows("logit_sum", logit_sum)
    store_rows("lse_out", lse)

  if "dlogits" not in refs:
    return
  row_scale = load_rows("row_scale", 0.0)
  # p * (1 + 2 c lse): the z-loss term's gradient is 2 c lse p.
  p_factor = (1.0 + 2.0 * spec.z_loss * lse) * row_scale
  label_weight = (1.0 - spec.label_smoothing) * row_scale
  uniform = spec.label_smoothing / (spec.vocab_size or vocab) * row_scale

  def gradient_step(step, carry):
    c0 = step * tiling.block_cols
    z, col_ids, _, mask = _load_capped_logits(refs, r0, c0, spec, tiling, rows, vocab)
    p = jnp.exp(z - lse[:, None])
    grad = p * p_factor[:, None] - uniform[:, None]
    grad -= jnp.where(col_ids[None, :] == labels[:, None], label_weight[:, None], 0.0)
    if spec.soft_cap is not None:
      grad *= 1.0 - (z / spec.soft_cap) ** 2
    view = refs["dlogits"].at[row_ids[:, None], col_ids[None, :]]
    pltriton.store(view, grad.astype(refs["dlogits"].dtype), mask=mask)
    return carry

  lax.fori_loop(0, steps, gradient_step, 0)


def _launch(name, inputs: dict, row_outputs=(), *, grad_dtype=None, spec, interpret):
  """`_rows_kernel` on `inputs["logits"]` [rows, vocab]: the float32 [rows] outputs named in
  `row_outputs` and, with `grad_dtype`, "dlogits" [rows, vocab] of that dtype; a dict by name.

  The kernel tells what to do from the names of its refs, so inputs that are None are left
  out rather than passed.
  """
  rows, vocab = inputs["logits"].shape
  outputs = {key: jax.ShapeDtypeStruct((rows,), jnp.float32) for key in row_outputs}
  if grad_dtype is not None:
    outputs["dlogits"] = jax.ShapeDtypeStruct((rows, vocab), grad_dtype)
  tiling = tiling_for(rows, vocab)
  inputs = {key: value for key, value in inputs.items() if value is not None}
  kernel = functools.partial(
    _rows_kernel, names=(*inputs, *outputs), spec=spec, tiling=tiling, rows=rows, vocab=vocab
  )
  results = pl.pallas_call(
    kernel,
    out_shape=tuple(outputs.values()),
    grid=(pl.cdiv(rows, tiling.block_rows),),
    compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=2),
    interpret=interpret,
    name=name,
  )(*inputs.values())
  return dict(zip(outputs, results))


@launcher(static_argnames=("spec", "grad_dtype", "interpret"))
def cross_entropy_rows_forward(logits, labels, bias, row_scale, *, spec, grad_dtype, interpret):
  """Per-row loss and lse of `[rows, vocab]` float32 logits; with `grad_dtype`, also the
  gradient, each row scaled by `row_scale`.

  Args:
    logits: [rows, vocab] float32 raw logits (before bias and soft cap).
    labels: [rows] int32; a label outside [0, vocab) matches no column.
    bias: None or [vocab], added to every row first.
    row_scale: [rows] float32 when `grad_dtype` is given, else None.
    spec: the loss's options.
    grad_dtype: None (no gradient) or the dtype of the returned gradient.
    interpret: run Pallas in interpret mode.

  Returns:
    (loss [rows] float32, lse [rows] float32, dlogits [rows, vocab] or None).
  """
  inputs = {"logits": logits, "labels": labels, "bias": bias, "row_scale": row_scale}
  results = _launch(
    "jfused_cross_entropy_fwd",
    inputs,
    ("loss", "lse_out"),
    grad_dtype=grad_dtype,
    spec=spec,
    interpret=interpret,
  )
  return results["loss"], results["lse_out"], results.get("dlogits")


@launcher(static_argnames=("spec", "interpret"))
def cross_entropy_rows_statistics(logits, labels, bias, *, spec, interpret):
  """Per-row (lse, label logit, sum of logits) of `[rows, columns]` float32 logits that hold
  a slice of the vocabulary (labels shifted to it: others match no column); the caller merges
  the slices. Only `spec.soft_cap` applies. Arguments as `cross_entropy_rows_forward`."""
  inputs = {"logits": logits, "labels": labels, "bias": bias}
  row_outputs = ("lse_out", "label_logit", "logit_sum")
  results = _launch(
    "jfused_cross_entropy_stats", inputs, row_outputs, spec=spec, interpret=interpret
  )
  return tuple(results[key] for key in row_outputs)


@launcher(static_argnames=("spec", "grad_dtype", "interpret"))
def cross_entropy_rows_gradient(
  logits, labels, bias, lse, row_scale, *, spec, grad_dtype, interpret
):
  """d loss / d logits of `[rows, vocab]` float32 logits given the forward's lse, each row
  scaled by `row_scale` (arguments as `cross_entropy_rows_forward`)."""
  inputs = {"logits": logits, "labels": labels, "bias": bias, "lse": lse, "row_scale": row_scale}
  results = _launch(
    "jfused_cross_entropy_bwd", inputs, grad_dtype=grad_dtype, spec=spec, interpret=interpret
  )
  return results["dlogits"]
