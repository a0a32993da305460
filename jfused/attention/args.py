"""Validation and normalisation of dot_product_attention's arguments.

Everything a user can get wrong is caught here, as a ValueError or TypeError naming the
argument, before any implementation runs. The result is the rank-4 form the implementations
share: leading batch dims flattened into one, bias and mask brought to [Bb, Nb, T, S].
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jfused import config
from pallas_kernels.attention import dropout as attention_dropout
from pallas_kernels.attention.common import AttentionOperands
from pallas_kernels.attention.mask import MaskRules

# float64 (under jax_enable_x64) is accepted as jax.nn accepts it; the kernels decline it, so
# dispatch serves it with the XLA implementation.
FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64))
_FLOAT_NAMES = "bfloat16, float16, float32 or float64"


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """A validated call: rank-4 operands plus the static settings."""

  ops: AttentionOperands
  rules: MaskRules
  scale: float
  soft_cap: float | None
  batch_shape: tuple[int, ...]
  # 0.0 is no dropout; otherwise ops.dropout_seeds holds the per-(batch, head) seeds.
  dropout_rate: float = 0.0
  # The caller's deterministic_backward (validated; None: XLA's flag decides). Each
  # implementation resolves it with `deterministic_backward_value`.
  deterministic_backward: bool | None = None


def _as_array(name, x):
  # NumPy arrays go through jnp.asarray too, so their dtype is JAX's (float64 -> float32
  # without x64), as jax.nn sees it.
  if not isinstance(x, jax.Array) and not hasattr(x, "__jax_array__"):
    try:
      x = jnp.asarray(x)
    except TypeError as error:
      raise TypeError(f"{name} must be an array, got {type(x).__name__}") from error
  return x


def _positive_number(name, value):
  if value is None:
    return None
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} must be a static Python number, not a traced value")
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a number, got {value!r}")
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return float(value)


def dropout_rate_value(dropout_rate) -> float:
  """Checks a dropout rate: a static Python number in [0, 1)."""
  if isinstance(dropout_rate, jax.core.Tracer):
    raise TypeError("dropout_rate must be a static Python number, not a traced value")
  if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, numbers.Real):
    raise TypeError(f"dropout_rate must be a number, got {dropout_rate!r}")
  if not 0.0 <= dropout_rate < 1.0:  # Also rejects NaN.
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
  return float(dropout_rate)


def typed_dropout_key(dropout_rng) -> jax.Array:
  """Checks a dropout key (typed, `jax.random.key`, or raw uint32, `jax.random.PRNGKey`)."""
  if dropout_rng is None:
    raise ValueError(
      "dropout_rng is required when dropout_rate > 0 (pass a key from jax.random.key)"
    )
  if not isinstance(dropout_rng, jax.Array):
    raise TypeError(f"dropout_rng must be a JAX PRNG key, got {type(dropout_rng).__name__}")
  key = dropout_rng
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.dtype != jnp.uint32:
      raise TypeError(
        f"dropout_rng must be a PRNG key (jax.random.key or a raw uint32 "
        f"jax.random.PRNGKey), got dtype {key.dtype}"
      )
    try:
      key = jax.random.wrap_key_data(key)
    except (TypeError, ValueError) as error:
      raise ValueError(
        f"dropout_rng of shape {dropout_rng.shape} is not a raw key of the "
        f"default PRNG implementation"
      ) from error
  if key.shape != ():
    raise ValueError(f"dropout_rng must be a single key, got {key.shape} keys")
  return key


def _window(local_window_size):
  if local_window_size is None:
    return None
  if isinstance(local_window_size, numbers.Integral) and not isinstance(local_window_size, bool):
    local_window_size = (local_window_size, local_window_size)
  if (
    not isinstance(local_window_size, (tuple, list))
    or len(local_window_size) != 2
    or not all(
      isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in local_window_size
    )
  ):
    raise ValueError(
      f"local_window_size must be an int or a (left, right) pair of ints, got {local_window_size!r}"
    )
  left, right = (int(w) for w in local_window_size)
  if left < 0 or right < 0:
    raise ValueError(f"local_window_size must not be negative, got {local_window_size!r}")
  return left, right


def _broadcast_logit_array(name, x, batch_shape, num_heads, t, s):
  """Brings a bias or mask to [Bb, Nb, T, S] with Bb in (1, B) and Nb in (1, N)."""
  target = (*batch_shape, num_heads, t, s)
  if x.ndim > len(target):
    raise ValueError(
      f"{name} must have at most {len(target)} dims (broadcastable to "
      f"{target}), got shape {x.shape}"
    )
  shape = (1,) * (len(target) - x.ndim) + tuple(x.shape)
  for dim, want in zip(shape, target):
    if dim not in (1, want):
      raise ValueError(f"{name} of shape {x.shape} is not broadcastable to {target}")
  x = x.reshape(shape)
  batch_part = shape[: len(batch_shape)]
  if all(d == 1 for d in batch_part):
    lead = (1,)
  else:
    lead = (math.prod(batch_shape),)
    x = jnp.broadcast_to(x, (*batch_shape, *shape[len(batch_shape) :]))
  x = x.reshape(*lead, *shape[len(batch_shape) :])
  return jnp.broadcast_to(x, (lead[0], x.shape[1], t, s))


def _int32_array(name, x, shape):
  if x is None:
    return None
  x = _as_array(name, x)
  if x.dtype != jnp.int32:
    raise TypeError(f"{name} must be int32, got {x.dtype}")
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
  return x


def _bool_or_none(name, value):
  if value is not None and not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool or None, got {value!r}")
  return value


def deterministic_backward_value(value: bool | None) -> bool:
  """A validated `deterministic_backward` resolved: None follows XLA's
  `--xla_gpu_deterministic_ops`, as jax.nn's cuDNN attention does (deterministic when it is
  on; otherwise the fastest backward, which is deterministic too wherever the fused Mosaic
  kernel does not win: `bwd.fused_backward_is_faster`)."""
  if value is None:
    return config.xla_deterministic_ops()
  return value


def normalize(
  query,
  key,
  value,
  bias,
  mask,
  *,
  scale,
  is_causal,
  query_seq_lengths,
  key_value_seq_lengths,
  local_window_size,
  logits_soft_cap,
  q_segment_ids,
  kv_segment_ids,
  dropout_rate=0.0,
  dropout_rng=None,
  broadcast_dropout=False,
  deterministic_backward=None,
) -> AttentionCall:
  """Checks every argument and returns the rank-4 call the implementations take."""
  query, key, value = (
    _as_array(n, x) for n, x in (("query", query), ("key", key), ("value", value))
  )
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.dtype not in FLOAT_DTYPES:
      raise TypeError(f"{name} must be {_FLOAT_NAMES}, got {x.dtype}")
  if not (query.dtype == key.dtype == value.dtype):
    raise TypeError(
      f"query, key and value must share a dtype, got {query.dtype}, {key.dtype} and {value.dtype}"
    )
  if query.ndim < 3:
    raise ValueError(f"query must be [..., T, N, H] (rank >= 3), got shape {query.shape}")
  if key.ndim != query.ndim or value.ndim != query.ndim:
    raise ValueError(
      f"q, k, v must have same rank: key and value must have query's rank "
      f"{query.ndim}, got shapes {key.shape} and {value.shape}"
    )
  batch_shape = tuple(query.shape[:-3])
  t, num_heads, head_dim = query.shape[-3:]
  s, num_kv_heads, key_dim = key.shape[-3:]
  if tuple(key.shape[:-3]) != batch_shape or tuple(value.shape[:-3]) != batch_shape:
    raise ValueError(
      f"q, k, v batch dims must match: query, key and value must share batch "
      f"dims, got shapes {query.shape}, {key.shape} and {value.shape}"
    )
  if key_dim != head_dim:
    raise ValueError(
      f"q, k depths must match: key head dim {key_dim} must equal query head dim {head_dim}"
    )
  if tuple(value.shape[-3:-1]) != (s, num_kv_heads):
    raise ValueError(
      f"{'k, v lengths' if value.shape[-3] != s else 'k, v num_heads'} must "
      f"match: value must be [..., S={s}, K={num_kv_heads}, Hv], got "
      f"{value.shape}"
    )
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(
      f"Query heads ({num_heads}) must be multiple of Key heads "
      f"({num_kv_heads}) for Grouped Query Attention: the number of query "
      f"heads must be a multiple of key/value heads"
    )
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f"is_causal must be a bool, got {is_causal!r}")

  scale = _positive_number("scale", scale)
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
  soft_cap = _positive_number("logits_soft_cap", logits_soft_cap)
  rules = MaskRules(is_causal=bool(is_causal), window=_window(local_window_size))

  batch = math.prod(batch_shape)
  if bias is not None:
    bias = _as_array("bias", bias)
    if bias.dtype not in FLOAT_DTYPES:
      raise TypeError(f"bias must be {_FLOAT_NAMES}, got {bias.dtype}")
    bias = _broadcast_logit_array("bias", bias, batch_shape, num_heads, t, s)
  if mask is not None:
    mask = _as_array("mask", mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f"mask must be boolean (True = attend), got {mask.dtype}")
    mask = _broadcast_logit_array("mask", mask, batch_shape, num_heads, t, s)

  q_length = _int32_array("query_seq_lengths", query_seq_lengths, batch_shape)
  kv_length = _int32_array("key_value_seq_lengths", key_value_seq_lengths, batch_shape)
  if q_segment_ids is None and kv_segment_ids is not None:
    raise ValueError("kv_segment_ids needs q_segment_ids")
  if q_segment_ids is not None and kv_segment_ids is None:
    if t != s:
      raise ValueError(f"kv_segment_ids is required when T ({t}) != S ({s})")
    kv_segment_ids = q_segment_ids
  q_segments = _int32_array("q_segment_ids", q_segment_ids, (*batch_shape, t))
  kv_segments = _int32_array("kv_segment_ids", kv_segment_ids, (*batch_shape, s))

  dropout_rate = dropout_rate_value(dropout_rate)
  if not isinstance(broadcast_dropout, (bool, np.bool_)):
    raise TypeError(f"broadcast_dropout must be a bool, got {broadcast_dropout!r}")
  dropout_seeds = None
  if dropout_rate > 0.0:  # Rate 0 ignores the key: exactly the path without dropout.
    dropout_seeds = attention_dropout.head_seeds(
      typed_dropout_key(dropout_rng), batch, num_heads, broadcast=bool(broadcast_dropout)
    )

  def flat(x, *rest):
    return None if x is None else x.reshape(batch, *rest)

  ops = AttentionOperands(
    q=query.reshape(batch, t, num_heads, head_dim),
    k=key.reshape(batch, s, num_kv_heads, head_dim),
    v=value.reshape(batch, s, num_kv_heads, value.shape[-1]),
    bias=bias,
    mask=mask,
    q_length=flat(q_length),
    kv_length=flat(kv_length),
    q_segments=flat(q_segments, t),
    kv_segments=flat(kv_segments, s),
    dropout_seeds=dropout_seeds,
  )
  return AttentionCall(
    ops=ops,
    rules=rules,
    scale=scale,
    soft_cap=soft_cap,
    batch_shape=batch_shape,
    dropout_rate=dropout_rate,
    deterministic_backward=_bool_or_none("deterministic_backward", deterministic_backward),
  )
