"""The Pallas-Triton attention: forward and backward kernels joined by jax.custom_vjp."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jfused.attention import sharding
from pallas_kernels.attention import common

MAX_HEAD_DIM = 256


def _operands(q, k, v, bias, mask, q_length, kv_length, q_segments, kv_segments, dropout_seeds):
  return common.AttentionOperands(
    q, k, v, bias, mask, q_length, kv_length, q_segments, kv_segments, dropout_seeds
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def flash_attention(config, *operands):
  """Kernel attention on normalised operands (q, k, v, bias, mask, q_length, kv_length,
  q_segments, kv_segments, dropout_seeds); returns (out, lse [B, N, T]) with empty rows as
  the kernel reports them. Differentiable in q, k, v and bias."""
  return sharding.attention_forward(config, operands)


def _flash_attention_fwd(config, *operands):
  # Under sharding each device runs the kernels on its batch and head shard (sharding.py).
  out, lse = sharding.attention_forward(config, operands)
  return (out, lse), (operands, out, lse)


def _flash_attention_bwd(config, residuals, cotangents):
  operands, out, lse = residuals
  dout, _ = cotangents  # The logsumexp is returned without a gradient, as in jax.nn.
  ops = _operands(*operands)
  dq, dk, dv, dbias = sharding.attention_backward(
    config, operands, out, lse, dout.astype(out.dtype)
  )
  if dbias is not None:
    # The kernel writes one gradient per batch entry and query head; sum the broadcast dims.
    keep_batch, keep_heads = ops.bias.shape[0] > 1, ops.bias.shape[1] > 1
    axes = tuple(a for a, keep in ((0, keep_batch), (1, keep_heads)) if not keep)
    if axes:
      dbias = dbias.astype(jnp.float32).sum(axis=axes, keepdims=True)
    dbias = dbias.astype(ops.bias.dtype)
  return (dq, dk, dv, dbias) + (None,) * 6


flash_attention.defvjp(_flash_attention_fwd, _flash_attention_bwd, optimize_remat=True)


def pallas_triton_attention(call, *, interpret: bool):
  """Runs the Pallas-Triton kernels on a validated call; returns (out, lse [B, N, T])."""
  ops = call.ops
  if ops.q.dtype == jnp.float64:
    raise NotImplementedError("pallas_triton serves bfloat16, float16 and float32, not float64")
  if ops.q.shape[-1] > MAX_HEAD_DIM or ops.v.shape[-1] > MAX_HEAD_DIM:
    raise NotImplementedError(
      f"pallas_triton serves head dims up to {MAX_HEAD_DIM}, got "
      f"{ops.q.shape[-1]} (query/key) and {ops.v.shape[-1]} (value)"
    )
  config = common.AttentionConfig(
    scale=call.scale,
    rules=call.rules,
    soft_cap=call.soft_cap,
    has_bias=ops.bias is not None,
    has_q_length=ops.q_length is not None,
    interpret=interpret,
    dropout_rate=call.dropout_rate,
  )
  return flash_attention(
    config,
    ops.q,
    ops.k,
    ops.v,
    ops.bias,
    ops.mask,
    ops.q_length,
    ops.kv_length,
    ops.q_segments,
    ops.kv_segments,
    ops.dropout_seeds,
  )
