"""`attention_fn` for Flax's attention modules, and an NNX `MultiHeadAttention` on jfused.

`attention_fn` has the signature of Flax's `dot_product_attention` (NNX's and Linen's keywords
both), so it plugs into `nnx.MultiHeadAttention(attention_fn=...)` and Linen's
`MultiHeadDotProductAttention(attention_fn=...)`. What the kernels serve goes to
`jfused.dot_product_attention`, training-time dropout included (`broadcast_dropout` too);
`sow_weights` (a `module` to sow into) and custom einsums go to Flax's own function, which
computes the same softmax explicitly.

Dropout on the jfused path draws its keep mask from jfused's in-kernel hash
(`jfused.attention_dropout_mask` shows it), not from Flax's `jax.random.bernoulli` stream: the
same key gives a different (equally distributed) mask than Flax's function would.

`MultiHeadAttention` is `nnx.MultiHeadAttention` (same constructor, parameters `query`, `key`,
`value`, `out`, GQA through `num_kv_heads`, the `decode` KV cache) whose default attention is
jfused, and whose call also takes sliding windows and segment ids.
"""

from __future__ import annotations

import dataclasses
import math

from flax import linen, nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes
import jax
import jax.numpy as jnp

from flax_layers.norms import _hashable
import jfused

__all__ = ["attention_fn", "JfusedAttention", "MultiHeadAttention", "visibility_mask"]

_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _positions_below(lengths, n):
  """[batch..., n]: whether position 0..n-1 lies below each of the lengths [batch...]."""
  # Explicit leading axes for the positions: implicit rank promotion may be disabled.
  positions = jnp.arange(n).reshape((1,) * lengths.ndim + (n,))
  return positions < lengths[..., None]


def _both_visible(a, b):
  """a AND b for masks of any ranks (None: no mask), broadcast from the right."""
  if a is None:
    return b
  # Masks come in different ranks (positions [1, T, S], batches [batch..., 1, T, S], a user's
  # [batch..., N, T, S]): give the shorter leading axes, as implicit rank promotion may be
  # disabled.
  rank = max(a.ndim, b.ndim)
  a, b = (m.reshape((1,) * (rank - m.ndim) + m.shape) for m in (a, b))
  return jnp.logical_and(a, b)


def visibility_mask(
  t,
  s,
  *,
  is_causal=False,
  local_window_size=None,
  q_segment_ids=None,
  kv_segment_ids=None,
  key_value_seq_lengths=None,
  q_offset=0,
):
  """The boolean mask [batch..., 1, T, S] (or [1, T, S]) of jfused's masking rules.

  Used where attention runs without jfused (Flax's fallback, plain-XLA blocks): the same
  rules as `pallas_kernels/attention/mask.py`, written out as a dense mask. Query t sits at
  position `q_offset + t` (the decode step), keys at 0..S-1.

  Returns:
    A boolean array, or None when no rule is active.
  """
  q_pos = q_offset + jnp.arange(t)[:, None]
  k_pos = jnp.arange(s)[None, :]
  visible = None
  if is_causal:
    visible = _both_visible(visible, k_pos <= q_pos)
  if local_window_size is not None:
    left, right = (
      (local_window_size, local_window_size)
      if isinstance(local_window_size, int)
      else local_window_size
    )
    visible = _both_visible(visible, (k_pos >= q_pos - left) & (k_pos <= q_pos + right))
  if visible is not None:
    visible = visible[None]  # [1, T, S]: the heads axis.
  if q_segment_ids is not None:
    if kv_segment_ids is None:
      kv_segment_ids = q_segment_ids
    same = q_segment_ids[..., :, None] == kv_segment_ids[..., None, :]
    visible = _both_visible(visible, same[..., None, :, :])
  if key_value_seq_lengths is not None:
    inside = _positions_below(key_value_seq_lengths, s)
    visible = _both_visible(visible, inside[..., None, None, :])
  return visible


def _flax_attention(
  query,
  key,
  value,
  bias,
  mask,
  *,
  module,
  linen_style,
  soft_cap,
  query_seq_lengths,
  promote_dtype,
  **flax_kwargs,
):
  """Flax's own dot_product_attention, with jfused's extra rules already folded into mask.

  query, key and value are the caller's, not yet promoted: Flax's function promotes them
  itself (NNX's with the caller's promote_dtype), so the result's dtype is Flax's.
  """
  if soft_cap is not None:
    raise NotImplementedError(
      "attention_fn: logits_soft_cap needs the jfused path; it cannot be combined with "
      "sow_weights, custom einsums, fused=False or dtypes the kernels do not take"
    )
  if linen_style:
    # Linen's function takes no promote_dtype (Linen's modules pass none): promote here with
    # the caller's, which is Flax's own unless one was given.
    query, key, value = promote_dtype((query, key, value), dtype=flax_kwargs["dtype"])
    # Linen's function has no GQA: repeat the key/value heads (Linen's modules never need it).
    repeats = query.shape[-2] // key.shape[-2]
    key, value = (jnp.repeat(a, repeats, axis=-2) for a in (key, value))
    out = linen.dot_product_attention(query, key, value, bias, mask, module=module, **flax_kwargs)
  else:
    out = nnx.dot_product_attention(
      query, key, value, bias, mask, module=module, promote_dtype=promote_dtype, **flax_kwargs
    )
  if query_seq_lengths is not None:
    # jax.nn semantics: rows past the query length are zero.
    valid = _positions_below(query_seq_lengths, query.shape[-3])
    out = jnp.where(valid[..., None, None], out, jnp.zeros((), out.dtype))
  return out


def attention_fn(
  query,
  key,
  value,
  bias=None,
  mask=None,
  broadcast_dropout: bool = True,
  dropout_rng=None,
  dropout_rate: float = 0.0,
  deterministic: bool = False,
  dtype=None,
  precision=None,
  module=None,
  promote_dtype=dtypes.promote_dtype,
  is_causal: bool = False,
  force_fp32_for_softmax: bool | None = None,
  einsum_dot_general=None,
  qk_attn_weights_einsum=None,
  attn_weights_value_einsum=None,
  *,
  local_window_size=None,
  q_segment_ids=None,
  kv_segment_ids=None,
  query_seq_lengths=None,
  key_value_seq_lengths=None,
  logits_soft_cap=None,
  implementation=None,
  fused: bool = True,
  deterministic_backward: bool | None = None,
):
  """Flax's `dot_product_attention`, computed by `jfused.dot_product_attention`.

  Layouts are Flax's: query [batch..., T, N, H], key/value [batch..., S, K, H] with N a
  multiple of K (GQA), bias and boolean mask broadcastable to [batch..., N, T, S]. Logits are
  scaled by 1/sqrt(H), as Flax does. The softmax is always float32 (what
  `force_fp32_for_softmax` asks for); `precision` is ignored on the jfused path, as Flax's own
  fast path (jax.nn) ignores it.

  Args:
    query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
      deterministic, dtype, precision, module, promote_dtype, is_causal,
      force_fp32_for_softmax, einsum_dot_general, qk_attn_weights_einsum,
      attn_weights_value_einsum: as in Flax (NNX's and Linen's). Active dropout
      (`dropout_rate > 0 and not deterministic`) runs in jfused's kernels, with a mask from
      jfused's hash rather than Flax's random stream. A `module` (sow_weights), custom
      einsums, `fused=False` or dtypes the kernels do not take (complex, float64) run Flax's
      own function instead of jfused (with Flax's dropout): Linen's when the caller is Linen
      (a Linen `module`, or any of the Linen-only keywords `force_fp32_for_softmax` and the
      einsums given, as Linen's `MultiHeadDotProductAttention` always does; the default
      None of `force_fp32_for_softmax` marks an NNX caller), NNX's otherwise.
    local_window_size, q_segment_ids, kv_segment_ids, query_seq_lengths,
      key_value_seq_lengths, logits_soft_cap: jfused's extras (see
      `jfused.dot_product_attention`).
    implementation: passed to jfused ("xla", "cudnn", "pallas_triton", "pallas_mosaic", a
      sequence, or None for the fastest on this device).
    fused: False always runs Flax's own function (the reference for tests and benchmarks).
    deterministic_backward: passed to jfused (bitwise-repeatable gradients; None follows
      XLA's `--xla_gpu_deterministic_ops`). Not Flax's `deterministic`, which turns dropout
      off.

  Returns:
    [batch..., T, N, Hv] in the promoted dtype.

  Example:
    >>> mha = nnx.MultiHeadAttention(8, 512, attention_fn=flax_layers.attention_fn,
    ...                              decode=False, rngs=nnx.Rngs(0))
    >>> y = mha(x, is_causal=True)
  """
  if not 0.0 <= dropout_rate < 1.0:
    # Flax's words, for code that matches them.
    raise ValueError(
      f"attention_fn: dropout_rate must be in the range [0, 1), got {dropout_rate!r}"
    )
  inputs = (query, key, value)
  query, key, value = promote_dtype(inputs, dtype=dtype)
  dropout_active = not deterministic and dropout_rate > 0.0
  custom_einsum = (
    einsum_dot_general is not None
    or qk_attn_weights_einsum is not None
    or attn_weights_value_einsum is not None
  )
  use_flax = not fused or module is not None or custom_einsum or query.dtype not in _KERNEL_DTYPES
  if mask is not None:
    mask = jnp.asarray(mask).astype(jnp.bool_)
  if not use_flax:
    dropout = {}
    if dropout_active:
      dropout = dict(
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        broadcast_dropout=bool(broadcast_dropout),
      )
    return jfused.dot_product_attention(
      query,
      key,
      value,
      bias,
      mask,
      scale=1.0 / math.sqrt(query.shape[-1]),
      is_causal=bool(is_causal),
      query_seq_lengths=query_seq_lengths,
      key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size,
      logits_soft_cap=logits_soft_cap,
      q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids,
      implementation=implementation,
      deterministic_backward=deterministic_backward,
      **dropout,
    )

  rules = visibility_mask(
    query.shape[-3],
    key.shape[-3],
    is_causal=bool(is_causal),
    local_window_size=local_window_size,
    q_segment_ids=q_segment_ids,
    kv_segment_ids=kv_segment_ids,
    key_value_seq_lengths=key_value_seq_lengths,
  )
  if rules is not None:
    mask = _both_visible(mask, rules)
  # The framework's own function: Linen's for a Linen caller (Linen's MultiHeadDotProductAttention
  # passes force_fp32_for_softmax and the einsums always, NNX's never), NNX's otherwise. They
  # differ beyond real floats (complex inputs, for one).
  linen_style = (
    isinstance(module, linen.Module) or force_fp32_for_softmax is not None or custom_einsum
  )
  flax_kwargs = dict(
    broadcast_dropout=broadcast_dropout,
    dropout_rng=dropout_rng,
    dropout_rate=dropout_rate,
    deterministic=deterministic,
    dtype=dtype,
    precision=precision,
  )
  if linen_style:
    flax_kwargs.update(
      force_fp32_for_softmax=bool(force_fp32_for_softmax),
      einsum_dot_general=einsum_dot_general,
      qk_attn_weights_einsum=qk_attn_weights_einsum,
      attn_weights_value_einsum=attn_weights_value_einsum,
    )
  return _flax_attention(
    *inputs,
    bias,
    mask,
    module=module,
    linen_style=linen_style,
    soft_cap=logits_soft_cap,
    query_seq_lengths=query_seq_lengths,
    promote_dtype=promote_dtype,
    **flax_kwargs,
  )


@dataclasses.dataclass(frozen=True)
class JfusedAttention:
  """`attention_fn` with jfused's settings bound; hashable, so a module attribute.

  A frozen dataclass rather than `functools.partial`: two equal settings compare equal, so
  `nnx.jit` reuses its compiled function across module instances.
  """

  implementation: str | tuple[str, ...] | None = None
  fused: bool = True
  rope_theta: float | None = None
  deterministic_backward: bool | None = None

  def __call__(
    self,
    query,
    key,
    value,
    bias=None,
    mask=None,
    broadcast_dropout=True,
    dropout_rng=None,
    dropout_rate=0.0,
    deterministic=False,
    dtype=None,
    precision=None,
    module=None,
    promote_dtype=dtypes.promote_dtype,
    is_causal=False,
    force_fp32_for_softmax=None,
    einsum_dot_general=None,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
    **extras,
  ):
    if self.rope_theta is not None:
      # RoPE on the projected query and key, the positions given or 0..T-1 (Flax's `nnx.RoPE`
      # formula: the same numbers on the fused and the unfused path).
      positions = extras.pop("input_positions", None)
      query = jfused.rotary_embedding(query, positions, theta=self.rope_theta)
      key = jfused.rotary_embedding(key, positions, theta=self.rope_theta)
    # Named parameters, not **kwargs: Linen passes only the keywords it finds in the signature.
    return attention_fn(
      query,
      key,
      value,
      bias,
      mask,
      broadcast_dropout,
      dropout_rng,
      dropout_rate,
      deterministic,
      dtype,
      precision,
      module,
      promote_dtype,
      is_causal,
      force_fp32_for_softmax,
      einsum_dot_general,
      qk_attn_weights_einsum,
      attn_weights_value_einsum,
      implementation=self.implementation,
      fused=self.fused,
      deterministic_backward=self.deterministic_backward,
      **extras,
    )


class MultiHeadAttention(nnx.MultiHeadAttention):
  """`nnx.MultiHeadAttention` whose attention runs on jfused, training-time dropout included.

  Constructor and parameters are Flax's (`query`, `key`, `value`, `out` LinearGeneral, the
  optional `query_ln`/`key_ln`), so state moves both ways with `nnx.update`. The call adds
  `local_window_size` and segment ids. With `decode=True` the KV cache works as in Flax; the
  cache's occupancy (and a window, relative to the decoded position) becomes a mask.

  Args:
    num_heads, in_features, qkv_features, out_features, num_kv_heads, in_kv_features: as in
      `nnx.MultiHeadAttention` (num_kv_heads < num_heads is grouped-query attention).
    implementation: passed to `jfused.dot_product_attention`.
    fused: False runs Flax's own attention (same parameters).
    rope_theta: None, or the base of rotary position embeddings applied to the projected
      query and key (`jfused.rotary_embedding`) at the call's `input_positions` (0..T-1 when
      not given), as LLaMA does. Not with `decode`.
    deterministic_backward: passed to `jfused.dot_product_attention`.
    attention_fn: overrides the jfused attention entirely (then implementation/fused unused).
    **kwargs: the other keywords of `nnx.MultiHeadAttention` (dtype, param_dtype,
      dropout_rate, kernel_init, use_bias, decode, normalize_qk, rngs, ...).

  Example:
    >>> mha = flax_layers.MultiHeadAttention(8, 512, num_kv_heads=2, decode=False,
    ...                                      rngs=nnx.Rngs(0))
    >>> y = mha(x, is_causal=True, q_segment_ids=segments)
  """

  def __init__(
    self,
    num_heads: int,
    in_features: int,
    qkv_features: int | None = None,
    out_features: int | None = None,
    num_kv_heads: int | None = None,
    in_kv_features: int | None = None,
    *,
    implementation=None,
    fused: bool = True,
    rope_theta: float | None = None,
    deterministic_backward: bool | None = None,
    attention_fn=None,
    **kwargs,
  ):
    if rope_theta is not None:
      if attention_fn is not None:
        raise ValueError("rope_theta applies to the jfused attention; pass no attention_fn")
      if kwargs.get("decode"):
        raise ValueError("rope_theta is not supported with decode=True")
    if attention_fn is None:
      attention_fn = JfusedAttention(
        _hashable(implementation),
        fused,
        None if rope_theta is None else float(rope_theta),
        deterministic_backward,
      )
    super().__init__(
      num_heads,
      in_features,
      qkv_features,
      out_features,
      num_kv_heads=num_kv_heads,
      in_kv_features=in_kv_features,
      attention_fn=attention_fn,
      **kwargs,
    )

  def __call__(
    self,
    inputs_q,
    inputs_k=None,
    inputs_v=None,
    *,
    mask=None,
    deterministic=None,
    rngs=None,
    sow_weights: bool = False,
    decode: bool | None = None,
    is_causal: bool = False,
    local_window_size=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    out_sharding=None,
    qkv_sharding=None,
    input_positions=None,
  ):
    """Projects, attends and projects back; Flax's call plus jfused's masking extras.

    Args:
      inputs_q, inputs_k, inputs_v, mask, deterministic, rngs, sow_weights, decode,
        is_causal, out_sharding, qkv_sharding: as in `nnx.MultiHeadAttention.__call__`.
      input_positions: as in Flax: [batch..., length] positions passed on, unchanged and also
        with decode, to an `attention_fn` that takes them (such as
        `functools.partial(nnx.dot_product_attention_with_rope, rope=...)`); given with the
        default jfused attention it is refused, as Flax's default attention refuses it.
      local_window_size: int or (left, right): query t sees keys in [t - left, t + right].
      q_segment_ids, kv_segment_ids: int32 [batch..., T] / [batch..., S]; packed sequences
        attend only within their segment. Not available with decode.

    Returns:
      [batch..., T, out_features].
    """
    if rngs is None:
      rngs = self.rngs
    elif isinstance(rngs, nnx.Rngs):
      rngs = rngs.dropout
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError(
          "`inputs_k` cannot be None if `inputs_v` is not None. To have both "
          "`inputs_k` and `inputs_v` be the same value, pass in the value to "
          "`inputs_k` and leave `inputs_v` as None."
        )
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(
        f"Incompatible input dimension, got {inputs_q.shape[-1]} but module "
        f"expects {self.in_features}."
      )
    query = self.query(inputs_q, out_sharding=qkv_sharding)
    key = self.key(inputs_k, out_sharding=qkv_sharding)
    value = self.value(inputs_v, out_sharding=qkv_sharding)
    if self.normalize_qk:
      query, key = self.query_ln(query), self.key_ln(key)

    # Flax's error texts here and below, for code that matches them.
    decode = first_from(
      decode,
      self.decode,
      error_msg="No `decode` argument was provided to MultiHeadAttention as "
      "either a __call__ argument, class attribute, or nnx.flag.",
    )
    extras = dict(
      q_segment_ids=q_segment_ids,
      kv_segment_ids=kv_segment_ids,
      local_window_size=local_window_size,
    )
    if decode:
      key, value, mask = self._update_cache(key, value, mask, extras)
      is_causal = False  # The occupancy mask is the causal mask of a one-token query.
    # input_positions after the cache update, as Flax passes it: unchanged, decode or not.
    extras["input_positions"] = input_positions
    extras = {name: v for name, v in extras.items() if v is not None}

    dropout_rng = None
    if self.dropout_rate > 0.0:  # Flax asks for `deterministic` only when there is dropout.
      deterministic = first_from(
        deterministic,
        self.deterministic,
        error_msg="No `deterministic` argument was provided to MultiHeadAttention as either "
        "a __call__ argument, class attribute, or nnx.flag.",
      )
      if not deterministic:
        if rngs is None:
          raise ValueError(
            "'rngs' must be provided to __call__ method if MultiHeadAttention "
            "instance is defined with keep_rngs=False."
          )
        dropout_rng = rngs()
    else:
      deterministic = True
    x = self.attention_fn(
      query,
      key,
      value,
      mask=mask,
      dropout_rng=dropout_rng,
      dropout_rate=self.dropout_rate,
      broadcast_dropout=self.broadcast_dropout,
      deterministic=deterministic,
      dtype=self.dtype,
      precision=self.precision,
      module=self if sow_weights else None,
      is_causal=is_causal,
      **extras,
    )
    return self.out(x, out_sharding=out_sharding)

  def _update_cache(self, key, value, mask, extras):
    """Writes this step's key/value into the cache; returns the cache and its visibility."""
    if self.cached_key is None or self.cached_value is None or self.cache_index is None:
      raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
    if extras["q_segment_ids"] is not None or extras["kv_segment_ids"] is not None:
      raise ValueError("segment ids are not supported with decode")
    *batch_dims, max_length, num_kv_heads, head_dim = self.cached_key.shape
    expected = (*batch_dims, 1, num_kv_heads, head_dim)
    if tuple(key.shape) != expected:
      raise ValueError(
        f"Autoregressive cache shape error, expected key shape {expected} instead got {key.shape}."
      )
    index = self.cache_index[...]
    zero = jnp.zeros((), index.dtype)
    start = (zero,) * len(batch_dims) + (index, zero, zero)
    key = jax.lax.dynamic_update_slice(self.cached_key[...], key, start)
    value = jax.lax.dynamic_update_slice(self.cached_value[...], value, start)
    self.cached_key[...] = key
    self.cached_value[...] = value
    self.cache_index[...] += 1
    # The one query sits at position `index`: it sees the filled slots, and with a window only
    # those within `left` of it (a top-left aligned window on a length-1 query would not).
    visible = visibility_mask(
      1,
      max_length,
      is_causal=True,
      q_offset=index,
      local_window_size=extras.pop("local_window_size"),
    )
    visible = jnp.broadcast_to(visible, (*batch_dims, 1, 1, max_length))
    # Flax's combination: the same rank check, and a float32 mask for a user's attention_fn.
    return key, value, nnx.combine_masks(mask, visible)
