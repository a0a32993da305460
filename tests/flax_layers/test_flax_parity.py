"""The drop-in promise, keyword by keyword: what Flax's own modules and functions accept, ours
accept, with Flax's numbers, dtypes and error words (CPU).

Each case builds Flax's module and ours with the same parameters, calls both on the same
inputs, and compares real numbers; the comments name the gap each one closes.
"""

from __future__ import annotations

import functools
import re

from flax import nnx
import flax.linen as nn
from flax.nnx.nn import attention as nnx_attention
from flax.nnx.nn import dtypes
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_layers
from tests.flax_layers.test_modules import BF16, F32, X, close, perturb

# --- MultiHeadAttention: input_positions -----------------------------------------------------


def rope_attention(
  query, key, value, *, input_positions, inner=nnx.dot_product_attention, **kwargs
):
  """An attention_fn that takes input_positions: RoPE on query and key, then `inner`.

  Positions are [T], shared by the batch (what nnx.RoPE's tables take).
  """
  rope = jax.vmap(nnx.RoPE(), in_axes=(-2, None), out_axes=-2)
  return inner(rope(query, input_positions), rope(key, input_positions), value, **kwargs)


@pytest.mark.parametrize("inner", ["flax", "jfused"])
def test_mha_passes_input_positions_to_attention_fn(inner):
  positions = 3.0 * jnp.arange(X.shape[-2]) + 5.0
  theirs = nnx.MultiHeadAttention(
    4, 32, num_kv_heads=2, decode=False, attention_fn=rope_attention, rngs=nnx.Rngs(1)
  )
  ours_fn = (
    rope_attention
    if inner == "flax"
    else functools.partial(rope_attention, inner=flax_layers.attention_fn)
  )
  ours = flax_layers.MultiHeadAttention(
    4, 32, num_kv_heads=2, decode=False, attention_fn=ours_fn, rngs=nnx.Rngs(0)
  )
  perturb(theirs, 11)
  nnx.update(ours, nnx.state(theirs))
  for is_causal in (False, True):
    expected = theirs(X, input_positions=positions, is_causal=is_causal)
    close(ours(X, input_positions=positions, is_causal=is_causal), expected, F32)
  # The positions reach the rotation: other positions, other numbers.
  other = ours(X, input_positions=jnp.arange(16.0), is_causal=True)
  assert float(jnp.max(jnp.abs(other - expected))) > 1e-2


def test_default_attention_refuses_input_positions_as_flax_does():
  positions = jnp.arange(16.0)
  for module in (
    nnx.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0)),
    flax_layers.MultiHeadAttention(4, 32, decode=False, rngs=nnx.Rngs(0)),
  ):
    with pytest.raises(TypeError, match="input_positions"):
      module(X, input_positions=positions)


def _recording(calls):
  def attend(query, key, value, **kwargs):
    calls.append(kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k != "input_positions"}
    return nnx.dot_product_attention(query, key, value, **kwargs)

  return attend


def test_mha_decode_passes_what_flax_passes():
  """Decode and not: the same keywords reach attention_fn, input_positions unchanged, the
  cache's float32 occupancy mask combined with the caller's, is_causal dropped in decode."""
  calls = {"ours": [], "theirs": []}
  modules = {
    "ours": flax_layers.MultiHeadAttention(
      4, 32, num_kv_heads=2, decode=True, attention_fn=_recording(calls["ours"]), rngs=nnx.Rngs(0)
    ),
    "theirs": nnx.MultiHeadAttention(
      4, 32, num_kv_heads=2, decode=True, attention_fn=_recording(calls["theirs"]), rngs=nnx.Rngs(1)
    ),
  }
  perturb(modules["theirs"], 12)
  nnx.update(modules["ours"], nnx.state(modules["theirs"], nnx.Param))
  step_mask = jax.random.bernoulli(jax.random.key(4), 0.7, (2, 1, 1, 16))
  outputs = {}
  for name, module in modules.items():
    module.init_cache(X.shape)
    outputs[name] = [
      module(
        X[:, i : i + 1],
        is_causal=True,
        input_positions=jnp.array([i]),
        mask=step_mask if i == 2 else None,
      )
      for i in range(4)
    ]
    outputs[name].append(module(X, decode=False, is_causal=True, input_positions=jnp.arange(16)))
  for ours, theirs in zip(outputs["ours"], outputs["theirs"]):
    close(ours, theirs, F32)
  assert len(calls["ours"]) == len(calls["theirs"]) == 5
  for ours, theirs in zip(calls["ours"], calls["theirs"]):
    assert sorted(ours) == sorted(theirs)
    assert ours["is_causal"] == theirs["is_causal"]
    np.testing.assert_array_equal(ours["input_positions"], theirs["input_positions"])
    if theirs["mask"] is None:
      assert ours["mask"] is None
    else:
      assert ours["mask"].dtype == theirs["mask"].dtype
      np.testing.assert_array_equal(ours["mask"], theirs["mask"])
  assert [c["is_causal"] for c in calls["theirs"]] == [False] * 4 + [True]


# --- norms: promote_dtype's contract and Flax's output dtype ----------------------------------

NORM_PAIRS = [
  (flax_layers.LayerNorm, nnx.LayerNorm, "layer_norm"),
  (flax_layers.RMSNorm, nnx.RMSNorm, "rms_norm"),
]


def recording_promote(log):
  """A promote_dtype that logs what it is given: tuple length, None slots, dtype keyword."""

  def promote(args, /, *, dtype=None):
    log.append((len(args), tuple(a is None for a in args), dtype))
    return dtypes.promote_dtype(args, dtype=dtype)

  return promote


def rms_contract_promote(args, /, *, dtype=None):
  """Written to nnx.RMSNorm's documented contract: it gets `(inputs, scale)`."""
  x, scale = args
  return dtypes.promote_dtype((x, scale), dtype=dtype)


def identity_promote(args, /, *, dtype=None):
  """Promotes nothing: float32 x stays float32 under dtype=float16."""
  del dtype
  return args


def bfloat16_promote(args, /, *, dtype=None):
  """Casts every array to bfloat16, whatever `dtype` asks."""
  del dtype
  return tuple(None if a is None else jnp.asarray(a, jnp.bfloat16) for a in args)


@pytest.mark.parametrize(
  "ours_cls,theirs_cls,op,params",
  [
    *[
      (flax_layers.LayerNorm, nnx.LayerNorm, "layer_norm", dict(use_scale=scale, use_bias=bias))
      for scale in (True, False)
      for bias in (True, False)
    ],
    *[
      (flax_layers.RMSNorm, nnx.RMSNorm, "rms_norm", dict(use_scale=scale))
      for scale in (True, False)
    ],
  ],
  ids=["layer-scale-bias", "layer-scale", "layer-bias", "layer-none", "rms-scale", "rms-none"],
)
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16], ids=["dtype-none", "dtype-bf16"])
def test_norm_calls_promote_dtype_as_flax(ours_cls, theirs_cls, op, params, dtype, count_calls):
  logs = [], []
  ours = ours_cls(
    32, dtype=dtype, promote_dtype=recording_promote(logs[0]), rngs=nnx.Rngs(0), **params
  )
  theirs = theirs_cls(
    32, dtype=dtype, promote_dtype=recording_promote(logs[1]), rngs=nnx.Rngs(1), **params
  )
  if params.get("use_scale") or params.get("use_bias"):
    perturb(theirs, 13)
    nnx.update(ours, nnx.state(theirs))
  y_ours, y_theirs = ours(X), theirs(X)
  assert logs[0] == logs[1]  # The same tuple (length, None slots) and dtype keyword.
  close(y_ours, y_theirs, F32 if dtype is None else BF16)
  assert count_calls[op] == 1


def test_rms_norm_takes_a_promote_dtype_written_to_flax_contract(count_calls):
  ours = flax_layers.RMSNorm(32, promote_dtype=rms_contract_promote, rngs=nnx.Rngs(0))
  theirs = nnx.RMSNorm(32, promote_dtype=rms_contract_promote, rngs=nnx.Rngs(1))
  perturb(theirs, 14)
  nnx.update(ours, nnx.state(theirs))
  close(ours(X), theirs(X), F32)
  assert count_calls["rms_norm"] == 1


@pytest.mark.parametrize("ours_cls,theirs_cls,op", NORM_PAIRS, ids=["layer", "rms"])
@pytest.mark.parametrize(
  "promote",
  [dtypes.promote_dtype, identity_promote, bfloat16_promote],
  ids=["flax-promote", "identity-promote", "bf16-promote"],
)
@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16", "float32"])
def test_norm_output_dtype_matches_flax(
  ours_cls, theirs_cls, op, promote, x_dtype, dtype, count_calls
):
  kwargs = dict(dtype=dtype and jnp.dtype(dtype), promote_dtype=promote, epsilon=1e-5)
  ours, theirs = (
    ours_cls(32, rngs=nnx.Rngs(0), **kwargs),
    theirs_cls(32, rngs=nnx.Rngs(1), **kwargs),
  )
  perturb(theirs, 15)
  nnx.update(ours, nnx.state(theirs))
  x = X.astype(x_dtype)
  y_ours, y_theirs = ours(x), theirs(x)
  assert y_ours.dtype == y_theirs.dtype
  # Both compute in float32 from the same promoted operands; only the final rounding differs.
  close(y_ours, y_theirs, F32 if y_theirs.dtype == jnp.float32 else BF16)
  # With residual: Flax's rules applied to the sum.
  residual = jax.random.normal(jax.random.key(16), x.shape).astype(x_dtype)
  y, h = ours(x, residual=residual)
  expected = theirs(h)
  assert y.dtype == expected.dtype
  close(y, expected, F32 if expected.dtype == jnp.float32 else BF16)
  assert count_calls[op] == 2  # Both on jfused's path, not Flax's fallback.


# --- attention_fn: the framework's own fallback and promote_dtype -----------------------------


def _complex(shape, seed):
  real, imag = jax.random.normal(jax.random.key(seed), (2, *shape))
  return (real + 1j * imag).astype(jnp.complex64)


def test_linen_attention_fn_falls_back_to_linen_function(count_calls):
  # Complex inputs are not the kernels': Linen's own function serves them under Linen.
  x = _complex((2, 8, 16), 0)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, param_dtype=jnp.complex64)
  ours = nn.MultiHeadDotProductAttention(
    num_heads=4, param_dtype=jnp.complex64, attention_fn=flax_layers.attention_fn
  )
  params = theirs.init(jax.random.key(1), x)
  mask = nn.make_causal_mask(jnp.ones((2, 8)))
  np.testing.assert_allclose(
    ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask), rtol=1e-5, atol=1e-5
  )
  assert count_calls.get("dot_product_attention", 0) == 0


def test_attention_fn_fallback_is_the_callers_framework():
  # In bfloat16 the two functions differ (Linen's softmax runs in bf16, NNX's in jax.nn): an
  # NNX-style call (no Linen-only keyword) gets NNX's answer, a Linen-style call Linen's.
  query, key, value = (
    jax.random.normal(jax.random.key(i), (2, 16, 4, 8), jnp.bfloat16) for i in range(3)
  )
  mask = jax.random.bernoulli(jax.random.key(5), 0.7, (2, 1, 16, 16))
  nnx_style = flax_layers.attention_fn(query, key, value, mask=mask, fused=False)
  linen_style = flax_layers.attention_fn(
    query, key, value, mask=mask, fused=False, force_fp32_for_softmax=False
  )
  np.testing.assert_array_equal(nnx_style, nnx.dot_product_attention(query, key, value, mask=mask))
  np.testing.assert_array_equal(linen_style, nn.dot_product_attention(query, key, value, mask=mask))
  assert (
    float(jnp.max(jnp.abs(nnx_style.astype(jnp.float32) - linen_style.astype(jnp.float32)))) > 0
  )


@pytest.mark.parametrize("fused", [True, False])
def test_attention_fn_promotes_with_the_callers_promote_dtype(fused):
  # Flax promotes once, with the caller's function: float32 stays float32 under dtype=bf16.
  query, key, value = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8)) for i in range(3))
  kwargs = dict(dtype=jnp.bfloat16, promote_dtype=identity_promote, is_causal=True)
  ours = flax_layers.attention_fn(query, key, value, fused=fused, **kwargs)
  theirs = nnx.dot_product_attention(query, key, value, **kwargs)
  assert ours.dtype == theirs.dtype == jnp.float32
  close(ours, theirs, F32)


# --- attention shape errors carry Flax's words -------------------------------------------------

_Q = jnp.zeros((2, 16, 4, 8))


@pytest.mark.parametrize(
  "words,overrides,flax_function",
  [
    ("same rank", dict(key=jnp.zeros((16, 4, 8))), nnx.dot_product_attention),
    (
      "batch dims must match",
      dict(key=jnp.zeros((3, 16, 4, 8)), value=jnp.zeros((3, 16, 4, 8))),
      nnx.dot_product_attention,
    ),
    ("lengths must match", dict(value=jnp.zeros((2, 12, 4, 8))), nnx.dot_product_attention),
    # Flax says this one where it computes the weights itself (NNX's fast path is jax.nn's).
    (
      "depths must match",
      dict(key=jnp.zeros((2, 16, 4, 16))),
      lambda query, key, value: nnx_attention.dot_product_attention_weights(query, key),
    ),
    (
      "must be multiple of Key heads",
      dict(key=jnp.zeros((2, 16, 3, 8)), value=jnp.zeros((2, 16, 3, 8))),
      lambda query, key, value: nnx_attention.dot_product_attention_weights(query, key),
    ),
  ],
  ids=["rank", "batch", "lengths", "depths", "heads"],
)
def test_attention_shape_errors_carry_flax_words(words, overrides, flax_function):
  args = dict(query=_Q, key=_Q, value=_Q) | overrides
  with pytest.raises(ValueError, match=words):
    flax_function(**args)  # Flax's own words...
  with pytest.raises(ValueError, match=words):
    flax_layers.attention_fn(**args)  # ...are in ours.
  with pytest.raises(ValueError, match=words):
    flax_layers.JfusedAttention(implementation="xla")(**args)


def test_bad_dropout_rate_carries_flax_words():
  query = jnp.zeros((2, 16, 4, 8))
  for function in (nnx.dot_product_attention, flax_layers.attention_fn):
    with pytest.raises(ValueError, match=re.escape("dropout_rate must be in the range [0, 1)")):
      function(query, query, query, dropout_rate=1.5, dropout_rng=jax.random.key(0))


@pytest.mark.parametrize(
  "call,words",
  [
    (lambda m: m(X, inputs_v=X), "`inputs_k` cannot be None if `inputs_v` is not None"),
    (lambda m: m(X), "No `decode` argument was provided to MultiHeadAttention"),
    (
      lambda m: m(X, decode=False),
      "No `deterministic` argument was provided to MultiHeadAttention",
    ),
    (
      lambda m: m(X, decode=False, deterministic=False),
      "'rngs' must be provided to __call__ method if MultiHeadAttention instance is defined "
      "with keep_rngs=False",
    ),
  ],
  ids=["inputs_k", "decode", "deterministic", "rngs"],
)
def test_mha_errors_carry_flax_words(call, words):
  kwargs = dict(dropout_rate=0.5, keep_rngs=False, rngs=nnx.Rngs(0))
  for module in (
    nnx.MultiHeadAttention(4, 32, **kwargs),
    flax_layers.MultiHeadAttention(4, 32, **kwargs),
  ):
    with pytest.raises(ValueError, match=re.escape(words)):
      call(module)


def test_flax_fallback_folds_jfused_rules_without_rank_promotion():
  # fused=False folds jfused's extras into Flax's mask: masks of several ranks, combined with
  # explicit axes (the tests forbid implicit rank promotion), giving jfused's answer.
  query, key, value = (jax.random.normal(jax.random.key(i), (2, 16, 4, 8)) for i in range(3))
  t = jnp.arange(16)
  diagonal = (t[:, None] == t[None, :])[None, None]  # No row fully masked.
  mask = jax.random.bernoulli(jax.random.key(6), 0.6, (2, 4, 16, 16)) | diagonal
  segments = jnp.array([[0] * 6 + [1] * 10, [0] * 16], jnp.int32)
  for extras in (
    dict(
      mask=mask,
      is_causal=True,
      local_window_size=(4, 0),
      q_segment_ids=segments,
      query_seq_lengths=jnp.array([10, 16], jnp.int32),
    ),
    dict(key_value_seq_lengths=jnp.array([16, 11], jnp.int32)),
  ):
    fused = flax_layers.attention_fn(query, key, value, implementation="xla", **extras)
    close(flax_layers.attention_fn(query, key, value, fused=False, **extras), fused, F32)
