"""The Pallas Mosaic GPU attention (Hopper): its forward kernel joined to a backward by custom_vjp.

The backward is, for now, the Pallas-Triton one: it recomputes the probabilities from q, k, v
and the forward's natural-log logsumexp, which is the convention the Mosaic forward writes.
Both go through `jfused.partitioning`, so under sharding each device runs them on its own
batch and head shard.
"""

from __future__ import annotations

import functools

import jax

from jfused import config, partitioning
from pallas_kernels import attention_common as common


def _kernels():
  # Importing Mosaic GPU takes about 0.3 s; only calls the kernel serves pay for it.
  from pallas_kernels import attention_mosaic_fwd
  return attention_mosaic_fwd


def _mosaic_forward(ops: common.AttentionOperands, attention_config):
  return _kernels().attention_forward(
      ops.q, ops.k, ops.v, scale=attention_config.scale,
      is_causal=attention_config.rules.is_causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mosaic_attention(attention_config, q, k, v):
  """Returns (out [B, T, N, D], lse [B, N, T]); differentiable in q, k and v."""
  return partitioning.attention_forward(attention_config, (q, k, v), kernel=_mosaic_forward)


def _mosaic_attention_fwd(attention_config, q, k, v):
  out, lse = mosaic_attention(attention_config, q, k, v)
  return (out, lse), (q, k, v, out, lse)


def _mosaic_attention_bwd(attention_config, residuals, cotangents):
  q, k, v, out, lse = residuals
  dout, _ = cotangents  # The logsumexp is returned without a gradient, as in jax.nn.
  dq, dk, dv, _ = partitioning.attention_backward(
      attention_config, (q, k, v), out, lse, dout.astype(out.dtype))
  return dq, dk, dv


mosaic_attention.defvjp(_mosaic_attention_fwd, _mosaic_attention_bwd, optimize_remat=True)


def _unsupported_reason(call) -> str | None:
  """Why the Mosaic kernel cannot serve a validated call, or None if it can."""
  ops = call.ops
  if config.use_interpret():
    return "Mosaic GPU kernels (wgmma) have no interpreter; they need a Hopper GPU"
  capability = config.gpu_compute_capability()
  if capability is not None and capability[0] != 9:
    return f"Mosaic GPU kernels need an sm90 (Hopper) GPU, found {capability}"
  features = {
      "bias": ops.bias is not None, "mask": ops.mask is not None,
      "query_seq_lengths": ops.q_length is not None,
      "key_value_seq_lengths": ops.kv_length is not None,
      "segment ids": ops.q_segments is not None,
      "local_window_size": call.rules.window is not None,
      "logits_soft_cap": call.soft_cap is not None,
  }
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
  _kernels().check_supported(ops.q, ops.k, ops.v)
  attention_config = common.AttentionConfig(scale=call.scale, rules=call.rules)
  return mosaic_attention(attention_config, ops.q, ops.k, ops.v)
