"""The linear cross-entropy's sharding plan: each device runs the chunked loss on its tokens.

The mechanism is `jfused.partitioning`. Every leading (token) axis of x, labels and the
per-token results is served sharded; the weight and bias are needed whole on every device, so
a vocabulary- or feature-sharded weight is gathered first (an all-gather of the weight, as
XLA would do for the unfused matmul's transpose; a partitioned logsumexp across vocabulary
shards is not implemented). dweight and dbias, per-device sums over its own tokens, are
summed across devices.
"""

from __future__ import annotations

import math

from jfused.cross_entropy import chunked, vocab_chunks
from jfused.cross_entropy.chunked import Plan
from jfused.partitioning import if_given, partitioned_call, row_sharded_op

# Factors: r0, r1, ... the leading (token) axes of x; d its features; v the vocabulary.


def _weight_dims(plan: Plan):
  return ("d", "v") if plan.weight_layout == "dv" else ("v", "d")


def _per_device(plan: Plan):
  """The module whose forward_tokens / backward_tokens each device runs."""
  return vocab_chunks if plan.vocab_outer else chunked


def _flat(x, labels, *per_token):
  """x as [N, D], and labels and the per-token vectors as [N]."""
  tokens = math.prod(labels.shape)
  flat = lambda a: None if a is None else a.reshape(tokens)
  return (x.reshape(tokens, x.shape[-1]), flat(labels), *(flat(a) for a in per_token))


def forward_tokens(plan: Plan, x, weight, labels, bias, row_scale):
  """`forward_tokens` (of `chunked` or `vocab_chunks`) on x [..., D], each device on its
  tokens.

  Returns:
    (losses, lse) with labels' shape; with a row_scale, also dx like x and dweight, dbias
    (float32) summed over all tokens of all devices; else three Nones.
  """

  def launch(x, weight, labels, bias, row_scale):
    x2, labels1, row_scale1 = _flat(x, labels, row_scale)
    losses, lse, dx, dweight, dbias = _per_device(plan).forward_tokens(
      plan, x2, weight, labels1, bias, row_scale1
    )
    dx = None if dx is None else dx.reshape(x.shape)
    return losses.reshape(labels.shape), lse.reshape(labels.shape), dx, dweight, dbias

  if x.ndim < 2:
    return launch(x, weight, labels, bias, row_scale)  # One token: nothing to shard.
  rows = tuple(f"r{i}" for i in range(x.ndim - 1))
  with_gradients = row_scale is not None
  op = row_sharded_op(
    launch,
    rows,
    operand_dims=(
      (*rows, "d"),
      _weight_dims(plan),
      rows,
      if_given(bias, ("v",)),
      if_given(row_scale, rows),
    ),
    result_dims=(
      rows,
      rows,
      (*rows, "d") if with_gradients else None,
      _weight_dims(plan) if with_gradients else None,
      ("v",) if with_gradients and bias is not None else None,
    ),
    summed=(3, 4),
  )
  return partitioned_call(op, x, weight, labels, bias, row_scale)


def backward_tokens(plan: Plan, x, weight, labels, bias, lse, row_scale):
  """`backward_tokens` (of `chunked` or `vocab_chunks`) on x [..., D], each device on its
  tokens: (dx like x, dweight, dbias or None) with the weight sums over all tokens of all
  devices."""

  def launch(x, weight, labels, bias, lse, row_scale):
    x2, labels1, lse1, row_scale1 = _flat(x, labels, lse, row_scale)
    dx, dweight, dbias = _per_device(plan).backward_tokens(
      plan, x2, weight, labels1, bias, lse1, row_scale1
    )
    return dx.reshape(x.shape), dweight, dbias

  if x.ndim < 2:
    return launch(x, weight, labels, bias, lse, row_scale)
  rows = tuple(f"r{i}" for i in range(x.ndim - 1))
  op = row_sharded_op(
    launch,
    rows,
    operand_dims=((*rows, "d"), _weight_dims(plan), rows, if_given(bias, ("v",)), rows, rows),
    result_dims=((*rows, "d"), _weight_dims(plan), if_given(bias, ("v",))),
    summed=(1, 2),
  )
  return partitioned_call(op, x, weight, labels, bias, lse, row_scale)
