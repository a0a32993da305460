"""`jfused.dot_product_attention`: a superset of `jax.nn.dot_product_attention`."""

from __future__ import annotations

from collections.abc import Sequence
import math
import numbers

import jax
import jax.numpy as jnp

from jfused import config, dispatch
from jfused.attention import args as attention_args
from jfused.attention.mosaic import pallas_mosaic_attention
from jfused.attention.reference import MASK_VALUE, attention_reference, dropout_keep_grid
from jfused.attention.triton import pallas_triton_attention
from pallas_kernels.attention import common as kernel_common
from pallas_kernels.attention import dropout as attention_dropout

IMPLEMENTATIONS = ("xla", "cudnn", "pallas_triton", "pallas_mosaic")


def _xla(call):
  return attention_reference(
    call.ops,
    scale=call.scale,
    rules=call.rules,
    soft_cap=call.soft_cap,
    dropout_rate=call.dropout_rate,
  )


def _cudnn(call):
  ops = call.ops
  if not config.on_gpu():
    raise NotImplementedError("cudnn needs a CUDA GPU")
  if call.soft_cap is not None or ops.q_segments is not None:
    raise NotImplementedError("cudnn (through jax.nn) has no soft cap or segment ids")
  if ops.v.shape[-1] != ops.q.shape[-1]:
    raise NotImplementedError("cudnn (through jax.nn) needs equal query and value head dims")
  if call.deterministic_backward and not config.xla_deterministic_ops():
    # None is served: cuDNN follows XLA's flag, which is what None asks for.
    raise NotImplementedError(
      "cudnn adds dQ up with atomics unless XLA runs with --xla_gpu_deterministic_ops; "
      "deterministic_backward=True needs that flag or another implementation"
    )
  window = call.rules.window
  try:
    return jax.nn.dot_product_attention(
      ops.q,
      ops.k,
      ops.v,
      ops.bias,
      ops.mask,
      scale=call.scale,
      is_causal=call.rules.is_causal,
      query_seq_lengths=ops.q_length,
      key_value_seq_lengths=ops.kv_length,
      local_window_size=window,
      implementation="cudnn",
      return_residual=True,
    )
  except (ValueError, TypeError, RuntimeError) as error:
    raise NotImplementedError(f"cudnn cannot serve this call: {error}") from error


def _may_have_empty_rows(call) -> bool:
  """Whether some query row can have every key masked (decided statically)."""
  ops = call.ops
  if (
    ops.mask is not None
    or ops.q_length is not None
    or ops.kv_length is not None
    or ops.q_segments is not None
  ):
    return True
  window = call.rules.window
  t, s = ops.q.shape[1], ops.k.shape[1]
  # Causal rows always see key 0; a window's last row sees nothing once it starts past S.
  return window is not None and t - 1 - window[0] >= s


def _finish_kernel_output(call, out, lse):
  """Gives rows with no visible key jax.nn's result: the mean of all values.

  jax.nn fills masked logits with a large finite negative number, so a row whose keys are all
  masked gets a uniform softmax over all S keys. The kernels skip masked keys entirely and
  report such rows as empty (logsumexp EMPTY_ROW_LSE); here they get that uniform average back. Rows
  past query_seq_lengths stay zero, as in jax.nn.
  """
  ops = call.ops
  t, num_heads = ops.q.shape[1:3]
  s, num_kv_heads = ops.k.shape[1:3]
  empty = jnp.swapaxes(lse, 1, 2) >= kernel_common.EMPTY_ROW_LSE  # [B, T, N]
  if _may_have_empty_rows(call):
    mean_value = jnp.mean(ops.v.astype(jnp.float32), axis=1)  # [B, K, Dv]
    mean_value = jnp.repeat(mean_value, num_heads // num_kv_heads, axis=1)
    fill = empty
    if ops.q_length is not None:
      fill = fill & (jnp.arange(t)[None, :, None] < ops.q_length[:, None, None])
    out = jnp.where(fill[..., None], mean_value[:, None].astype(out.dtype), out)
  lse = jnp.where(empty, MASK_VALUE + math.log(s), jnp.swapaxes(lse, 1, 2))
  return out, jax.lax.stop_gradient(lse.astype(ops.k.dtype))


def _pallas_triton(call):
  out, lse = pallas_triton_attention(call, interpret=config.use_interpret())
  return _finish_kernel_output(call, out, lse)


def _pallas_mosaic(call):
  out, lse = pallas_mosaic_attention(call)
  return _finish_kernel_output(call, out, lse)


def _without_dropout(name, implementation):
  """Makes an implementation that has no attention dropout decline calls that ask for it."""

  def serve(call):
    if call.dropout_rate > 0.0:
      raise NotImplementedError(f"{name} has no attention dropout")
    return implementation(call)

  return serve


_IMPLEMENTATION_FUNCTIONS = {
  "xla": _xla,
  "cudnn": _without_dropout("cudnn", _cudnn),
  "pallas_triton": _pallas_triton,
  "pallas_mosaic": _pallas_mosaic,
}


def default_order() -> tuple[str, ...]:
  """What implementation=None tries, in order, on the current device."""
  if config.on_hopper():
    # Hopper: the Mosaic kernel, faster forward; it declines what it does not serve yet.
    return ("pallas_mosaic", "pallas_triton", "xla")
  if config.on_gpu():
    return ("pallas_triton", "xla")
  return ("xla",)


def dot_product_attention(
  query,
  key,
  value,
  bias=None,
  mask=None,
  *,
  scale: float | None = None,
  is_causal: bool = False,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  local_window_size: int | tuple[int, int] | None = None,
  logits_soft_cap: float | None = None,
  q_segment_ids=None,
  kv_segment_ids=None,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
  broadcast_dropout: bool = False,
  return_residual: bool = False,
  implementation: str | Sequence[str] | None = None,
  deterministic_backward: bool | None = None,
):
  """Scaled dot-product attention, fused: softmax(scale * Q K^T + bias) V per head.

  A drop-in superset of `jax.nn.dot_product_attention`, with the same layouts and semantics
  for everything that function has, and Pallas kernels for the forward and backward passes.

  Args:
    query: [..., T, N, H] array (bfloat16, float16, float32, or float64 under x64). Leading
      batch dims are optional and may be several.
    key: [..., S, K, H]; N must be a multiple of K (grouped-query / multi-query attention).
    value: [..., S, K, Hv]; Hv may differ from H.
    bias: optional additive bias broadcastable to [..., N, T, S]; it receives a gradient.
    mask: optional boolean mask broadcastable to [..., N, T, S]; True means attend.
    scale: logit scale; defaults to 1 / sqrt(H).
    is_causal: top-left aligned causal masking (query t sees keys s <= t).
    query_seq_lengths: int32 [...]; rows past it are zero in the output.
    key_value_seq_lengths: int32 [...]; keys past it are masked.
    local_window_size: int or inclusive (left, right) window: query t sees keys in
      [t - left, t + right].
    logits_soft_cap: if set, logits become cap * tanh(logits / cap) after scale and bias.
    q_segment_ids: int32 [..., T]; a query attends only to keys of its own segment.
    kv_segment_ids: int32 [..., S]; defaults to q_segment_ids when T == S.
    dropout_rate: attention dropout, a static float in [0, 1): after the softmax each
      probability is kept with probability 1 - rate and scaled by 1 / (1 - rate), before the
      product with V. The keep mask is a hash of (key, batch index, head, query position, key
      position) computed inside the kernels (never stored); `attention_dropout_mask` returns
      it materialised. 0 is exactly the call without dropout (dropout_rng is then ignored).
    dropout_rng: the PRNG key of the dropout mask (`jax.random.key`, or a raw
      `jax.random.PRNGKey`); required when dropout_rate > 0.
    broadcast_dropout: share one mask over the batch and the heads (Flax's default) instead
      of one per (batch entry, head).
    return_residual: also return the logsumexp of the masked logits, [..., T, N] (of the
      probabilities before dropout).
    implementation: "xla", "cudnn", "pallas_triton", "pallas_mosaic", a sequence of these
      tried in order, or None for the fastest available on the current device.
    deterministic_backward: True keeps the gradients bitwise repeatable from run to run;
      False lets the Mosaic backward take its fused kernel (one kernel for dQ, dK and dV,
      dQ summed with float32 adds in any order: equal up to float32 rounding, not bitwise);
      None (the default) follows XLA's `--xla_gpu_deterministic_ops` flag: deterministic
      when it is on, and today also when it is off, because the deterministic kernels are
      the faster ones (the fused kernel ran 2-10 % slower at d=128 on an H200). The XLA
      and Pallas-Triton backwards are deterministic whatever the setting; cuDNN follows
      XLA's flag, so with the flag off it declines True (a sequence of implementations then
      moves on to the next).

  Returns:
    The attention output [..., T, N, Hv] in query's dtype; with return_residual, a pair
    (output, logsumexp). Rows whose keys are all masked get the mean of all values, as in
    jax.nn; dropout leaves such rows alone (they have no probabilities to drop).

  Example:
    >>> q = k = v = jnp.ones((2, 128, 8, 64), jnp.bfloat16)
    >>> out = jfused.dot_product_attention(q, k, v, is_causal=True)
  """
  names = dispatch.resolve(
    "dot_product_attention", implementation, IMPLEMENTATIONS, default_order()
  )
  if not isinstance(return_residual, bool):
    raise TypeError(f"return_residual must be a bool, got {return_residual!r}")
  call = attention_args.normalize(
    query,
    key,
    value,
    bias,
    mask,
    scale=scale,
    is_causal=is_causal,
    query_seq_lengths=query_seq_lengths,
    key_value_seq_lengths=key_value_seq_lengths,
    local_window_size=local_window_size,
    logits_soft_cap=logits_soft_cap,
    q_segment_ids=q_segment_ids,
    kv_segment_ids=kv_segment_ids,
    dropout_rate=dropout_rate,
    dropout_rng=dropout_rng,
    broadcast_dropout=broadcast_dropout,
    deterministic_backward=deterministic_backward,
  )
  if any(size == 0 for size in (*call.ops.q.shape, *call.ops.k.shape, *call.ops.v.shape)):
    names = ("xla",)  # Nothing to launch: the reference handles empty arrays exactly.
  out, lse = dispatch.call_first_supported(
    "dot_product_attention", names, _IMPLEMENTATION_FUNCTIONS, call
  )
  t, num_heads = call.ops.q.shape[1:3]
  out = out.astype(call.ops.q.dtype).reshape(*call.batch_shape, t, num_heads, call.ops.v.shape[-1])
  if return_residual:
    return out, lse.reshape(*call.batch_shape, t, num_heads)
  return out


def attention_dropout_mask(
  dropout_rng,
  dropout_rate: float,
  *,
  batch_shape: Sequence[int],
  num_heads: int,
  q_length: int,
  kv_length: int,
  broadcast: bool = False,
) -> jax.Array:
  """The keep mask `dot_product_attention` applies for this key and rate, materialised.

  Every implementation regenerates exactly this mask from (key, batch index, head, query
  position, key position), whatever its tile sizes; kept probabilities are scaled by
  1 / (1 - dropout_rate). (Rows whose keys are all masked are not dropped, whatever the mask
  says there.)

  Args:
    dropout_rng: the key passed as `dot_product_attention(..., dropout_rng=)`.
    dropout_rate: float in [0, 1).
    batch_shape: the leading batch dims of the query ([..., T, N, H]).
    num_heads: N, the number of query heads.
    q_length: T, the query sequence length.
    kv_length: S, the key sequence length.
    broadcast: as `broadcast_dropout`: one mask for every batch entry and head.

  Returns:
    bool [*batch_shape, N, T, S]: True where the probability is kept.

  Example:
    >>> keep = jfused.attention_dropout_mask(jax.random.key(0), 0.1, batch_shape=(2,),
    ...                                      num_heads=8, q_length=128, kv_length=128)
  """
  rate = attention_args.dropout_rate_value(dropout_rate)

  def size(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
      raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)

  if not isinstance(batch_shape, Sequence):
    raise TypeError(f"batch_shape must be a sequence of ints, got {batch_shape!r}")
  batch_shape = tuple(size("batch_shape", d) for d in batch_shape)
  shape = (
    *batch_shape,
    size("num_heads", num_heads),
    size("q_length", q_length),
    size("kv_length", kv_length),
  )
  if rate == 0.0:
    return jnp.ones(shape, bool)
  batch = math.prod(batch_shape)
  seeds = attention_dropout.head_seeds(
    attention_args.typed_dropout_key(dropout_rng), batch, shape[-3], broadcast=bool(broadcast)
  )
  return dropout_keep_grid(seeds, shape[-2], shape[-1], rate).reshape(shape)
