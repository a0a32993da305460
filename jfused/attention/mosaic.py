"""The Pallas Mosaic GPU attention (Hopper): its forward and backward kernels joined by
custom_vjp.

The backward kernels (`pallas_kernels/attention/mosaic/bwd.py`) serve what the forward
serves; a call they could not serve would take the Pallas-Triton backward, which reads the
same natural-log logsumexp and the same dropout hash. Every launch goes through
`jfused.attention.sharding`, so under sharding each device runs the kernels on its own batch
and head shard.
"""

from __future__ import annotations

import functools

import jax

from jfused import config
from jfused.attention import args as attention_args
from jfused.attention import sharding
from pallas_kernels.attention import common

# Importing Mosaic GPU takes about 0.3 s; only calls the kernels serve pay for it.


def _forward_kernels():
  from pallas_kernels.attention.mosaic import fwd

  return fwd


def _backward_kernels():
  from pallas_kernels.attention.mosaic import bwd

  return bwd


def _kernel_helpers():
  from pallas_kernels.attention.mosaic import common

  return common


def _operands(q, k, v, q_length, kv_length, q_segments, kv_segments, dropout_seeds):
  """The partitioning layer's operand tuple (AttentionOperands' fields in order)."""
  return (q, k, v, None, None, q_length, kv_length, q_segments, kv_segments, dropout_seeds)


def _kernel_arguments(ops: common.AttentionOperands, attention_config):
  """Keyword arguments both Mosaic kernel entry points take for these operands."""
  lengths = _kernel_helpers().sequence_lengths_table(
    ops.q_length, ops.kv_length, ops.q.shape[1], ops.k.shape[1]
  )
  return dict(
    scale=attention_config.scale,
    is_causal=attention_config.rules.is_causal,
    dropout_rate=attention_config.dropout_rate,
    dropout_seeds=ops.dropout_seeds,
    soft_cap=attention_config.soft_cap,
    window=attention_config.rules.window,
    lengths=lengths,
    q_segments=ops.q_segments,
    kv_segments=ops.kv_segments,
  )


def _mosaic_forward(ops: common.AttentionOperands, attention_config):
  return _forward_kernels().attention_forward(
    ops.q, ops.k, ops.v, **_kernel_arguments(ops, attention_config)
  )


def _mosaic_backward(ops: common.AttentionOperands, attention_config, out, lse, dout):
  kernels = _backward_kernels()
  blocks = None  # The head dim's default: the deterministic dK/dV and dQ kernels.
  head_dim = ops.q.shape[-1]
  masked = (
    attention_config.rules.is_causal
    or attention_config.rules.window is not None
    or any(a is not None for a in (ops.q_length, ops.kv_length, ops.q_segments, ops.kv_segments))
  )
  # Not asked to repeat bit for bit: the fastest backward, the fused kernel where it wins.
  if not attention_config.deterministic_backward and kernels.fused_backward_is_faster(
    head_dim, masked=masked, dropout=attention_config.dropout_rate > 0.0
  ):
    blocks = kernels.fused_backward_blocks(head_dim)
  dq, dk, dv = kernels.attention_backward(
    ops.q,
    ops.k,
    ops.v,
    out,
    lse,
    dout,
    blocks=blocks,
    **_kernel_arguments(ops, attention_config),
  )
  return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mosaic_attention(attention_config, q, k, v, masking):
  """Returns (out [B, T, N, D], lse [B, N, T]); differentiable in q, k and v. masking:
  (q_length, kv_length, q_segments, kv_segments, dropout_seeds), each an array or None."""
  return sharding.attention_forward(
    attention_config, _operands(q, k, v, *masking), kernel=_mosaic_forward
  )


def _mosaic_attention_fwd(attention_config, q, k, v, masking):
  out, lse = mosaic_attention(attention_config, q, k, v, masking)
  return (out, lse), (q, k, v, masking, out, lse)


def _mosaic_attention_bwd(attention_config, residuals, cotangents):
  q, k, v, masking, out, lse = residuals
  dout, _ = cotangents  # The logsumexp is returned without a gradient, as in jax.nn.
  kwargs = {}
  if _backward_kernels().unsupported_reason(q, v) is None:
    kwargs["kernel"] = _mosaic_backward
  dq, dk, dv, _ = sharding.attention_backward(
    attention_config, _operands(q, k, v, *masking), out, lse, dout.astype(out.dtype), **kwargs
  )
  return dq, dk, dv, jax.tree.map(lambda _: None, masking)


mosaic_attention.defvjp(_mosaic_attention_fwd, _mosaic_attention_bwd, optimize_remat=True)


def _unsupported_reason(call) -> str | None:
  """Why the Mosaic kernel cannot serve a validated call, or None if it can."""
  ops = call.ops
  reason = config.mosaic_unavailable_reason()
  if reason is not None:
    return reason
  features = {"bias": ops.bias is not None, "mask": ops.mask is not None}
  used = [name for name, present in features.items() if present]
  if used:
    return f"the Mosaic kernel does not serve {', '.join(used)} yet"
  return None


def pallas_mosaic_attention(call):
  """Runs the Mosaic kernels on a validated call; returns (out, lse [B, N, T]).

  Raises:
    NotImplementedError: for devices, dtypes, head dims or features the kernel does not serve.
  """
  reason = _unsupported_reason(call)
  if reason is not None:
    raise NotImplementedError(reason)
  ops = call.ops
  _forward_kernels().check_supported(ops.q, ops.k, ops.v)
  attention_config = common.AttentionConfig(
    scale=call.scale,
    rules=call.rules,
    soft_cap=call.soft_cap,
    has_q_length=ops.q_length is not None,
    dropout_rate=call.dropout_rate,
    deterministic_backward=attention_args.deterministic_backward_value(call.deterministic_backward),
  )
  masking = (ops.q_length, ops.kv_length, ops.q_segments, ops.kv_segments, ops.dropout_seeds)
  return mosaic_attention(attention_config, ops.q, ops.k, ops.v, masking)
