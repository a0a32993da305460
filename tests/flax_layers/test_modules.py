"""flax_layers' norms and attention against Flax's own modules (CPU).

Each test copies state between our module and Flax's (both ways), with parameters moved off
their initial values so scale and bias matter, and compares outputs and gradients. The
default path on CPU is jfused's "xla"; a few cases run the Pallas kernels in interpret mode.
"""

from __future__ import annotations

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_layers
from flax_layers import linen as jfl

PALLAS = "pallas_triton"
F32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=2e-2, atol=2e-2)


def perturb(module, seed):
  """Moves every Param of `module` off its initial value (in place)."""
  state = nnx.state(module, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [
    leaf + 0.3 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)
  ]
  nnx.update(module, jax.tree.unflatten(treedef, noisy))


def close(a, b, tol):
  assert a.dtype == b.dtype, (a.dtype, b.dtype)
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def tree_close(a, b, tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    close(x, y, tol)


def loss_and_grads(module, **kwargs):
  """Output, and gradients of a random projection of it wrt the Params and X (jitted: one
  compiled program runs much faster on CPU than hundreds of eager ops)."""
  static = {k: v for k, v in kwargs.items() if isinstance(v, bool)}
  arrays = {k: v for k, v in kwargs.items() if not isinstance(v, bool)}

  @nnx.jit
  def run(module, x, arrays):
    def loss(m, x):
      y = m(x, **arrays, **static)
      weights = jax.random.normal(jax.random.key(7), y.shape, jnp.float32)
      return jnp.sum(y.astype(jnp.float32) * weights), y

    (_, y), (grads, dx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(module, x)
    return y, grads, dx

  return run(module, X, arrays)


X = jax.random.normal(jax.random.key(0), (2, 16, 32)) * 1.5 + 0.5


# --- NNX norms ------------------------------------------------------------------------------

NORM_PAIRS = [
  (flax_layers.LayerNorm, nnx.LayerNorm, "layer_norm"),
  (flax_layers.RMSNorm, nnx.RMSNorm, "rms_norm"),
]


@pytest.mark.parametrize("ours_cls,theirs_cls,op", NORM_PAIRS, ids=["layer", "rms"])
@pytest.mark.parametrize(
  "x_dtype,dtype", [("float32", None), ("bfloat16", None), ("bfloat16", "bfloat16")]
)
def test_norm_matches_flax_both_ways(ours_cls, theirs_cls, op, x_dtype, dtype, count_calls):
  kwargs = dict(dtype=dtype and jnp.dtype(dtype), epsilon=1e-5)
  ours = ours_cls(32, rngs=nnx.Rngs(0), **kwargs)
  theirs = theirs_cls(32, rngs=nnx.Rngs(1), **kwargs)
  x = X.astype(x_dtype)
  tol = F32 if (dtype or "float32") == "float32" else BF16
  for source, target, seed in ((theirs, ours, 1), (ours, theirs, 2)):
    perturb(source, seed)
    nnx.update(target, nnx.state(source))
    y_ours, y_theirs = ours(x), theirs(x)
    # Flax's promotion: bf16 x with f32 parameters and dtype=None gives f32.
    assert y_ours.dtype == y_theirs.dtype == jnp.dtype(dtype or "float32")
    close(y_ours, y_theirs, tol)
  assert count_calls.get(op, 0) >= 2
  grads_ours = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x).astype(jnp.float32))))(ours)
  grads_theirs = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x).astype(jnp.float32))))(theirs)
  tree_close(grads_ours, grads_theirs, dict(rtol=1e-4, atol=1e-4) if tol is F32 else BF16)


@pytest.mark.parametrize("ours_cls,theirs_cls,op", NORM_PAIRS, ids=["layer", "rms"])
def test_norm_pallas_with_residual(ours_cls, theirs_cls, op, count_calls):
  ours = ours_cls(32, implementation=PALLAS, rngs=nnx.Rngs(0))
  theirs = theirs_cls(32, rngs=nnx.Rngs(0))
  perturb(theirs, 3)
  nnx.update(ours, nnx.state(theirs))
  residual = jax.random.normal(jax.random.key(1), X.shape)
  y, h = ours(X, residual=residual)
  close(h, X + residual, F32)
  close(y, theirs(X + residual), F32)

  # Gradients through the fused residual add wrt parameters, x and residual.
  def loss(m, x, r, use_residual):
    y = m(x, residual=r)[0] if use_residual else m(x + r)
    return jnp.sum(y * jnp.cos(jnp.arange(32.0))[None, None])

  g1 = nnx.grad(loss, argnums=(0, 1, 2))(ours, X, residual, True)
  g2 = nnx.grad(loss, argnums=(0, 1, 2))(theirs, X, residual, False)
  tree_close(g1, g2, dict(rtol=1e-4, atol=1e-4))
  assert count_calls[op] >= 2


@pytest.mark.parametrize(
  "kwargs,call",
  [
    (dict(reduction_axes=(-2, -1), feature_axes=-1), {}),
    (dict(feature_axes=(-2, -1), reduction_axes=(-2, -1)), {}),
    ({}, dict(mask=X > 0)),
    (dict(fused=False), {}),
  ],
  ids=["two-reduction-axes", "two-feature-axes", "mask", "unfused"],
)
@pytest.mark.parametrize("ours_cls,theirs_cls,op", NORM_PAIRS, ids=["layer", "rms"])
def test_norm_falls_back_to_flax(ours_cls, theirs_cls, op, kwargs, call, count_calls):
  width = 16 * 32 if "feature_axes" in kwargs and kwargs["feature_axes"] != -1 else 32
  flax_kwargs = {k: v for k, v in kwargs.items() if k != "fused"}
  ours = ours_cls(32, rngs=nnx.Rngs(0), **kwargs)
  theirs = theirs_cls(32, rngs=nnx.Rngs(0), **flax_kwargs)
  if width != 32:  # Flax sizes parameters by num_features; two feature axes need 16 x 32.
    ours = ours_cls(width, rngs=nnx.Rngs(0), **kwargs)
    theirs = theirs_cls(width, rngs=nnx.Rngs(0), **flax_kwargs)
    reshape = lambda m: nnx.update(
      m, jax.tree.map(lambda p: p.reshape(16, 32), nnx.state(m, nnx.Param))
    )
    reshape(ours), reshape(theirs)
  perturb(theirs, 4)
  nnx.update(ours, nnx.state(theirs))
  np.testing.assert_array_equal(ours(X, **call), theirs(X, **call))
  assert count_calls.get(op, 0) == 0


def test_norm_state_has_flax_names_and_initialisers():
  for ours, theirs in (
    (flax_layers.LayerNorm(8, rngs=nnx.Rngs(0)), nnx.LayerNorm(8, rngs=nnx.Rngs(0))),
    (
      flax_layers.RMSNorm(8, use_scale=False, rngs=nnx.Rngs(0)),
      nnx.RMSNorm(8, use_scale=False, rngs=nnx.Rngs(0)),
    ),
  ):
    ours_state, theirs_state = (nnx.to_pure_dict(nnx.state(m)) for m in (ours, theirs))
    assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)
    tree_close(ours_state, theirs_state, dict(rtol=0, atol=0))
    assert isinstance(ours, type(theirs))


# --- Linen norms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "ours_cls,theirs_cls",
  [(jfl.LayerNorm, nn.LayerNorm), (jfl.RMSNorm, nn.RMSNorm)],
  ids=["layer", "rms"],
)
@pytest.mark.parametrize(
  "x_dtype,dtype,implementation",
  [("float32", None, None), ("bfloat16", None, None), ("bfloat16", "bfloat16", PALLAS)],
)
def test_linen_norm_matches_flax(ours_cls, theirs_cls, x_dtype, dtype, implementation):
  x = X.astype(x_dtype)
  theirs = theirs_cls(dtype=dtype and jnp.dtype(dtype), epsilon=1e-5)
  ours = ours_cls(dtype=dtype and jnp.dtype(dtype), epsilon=1e-5, implementation=implementation)
  params = theirs.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(5), p.shape), params)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)
  tol = F32 if dtype is None and x_dtype == "float32" else BF16
  if dtype is None and x_dtype == "bfloat16":
    tol = F32  # Linen computes in float32 and returns float32: so do we, exactly as precise.
  close(ours.apply(params, x), theirs.apply(params, x), tol)
  residual = jax.random.normal(jax.random.key(2), x.shape).astype(x_dtype)
  y, h = ours.apply(params, x, residual=residual)
  close(h, (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype), F32)
  close(y, theirs.apply(params, h), tol)
  grad = lambda m, r: jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32))))(
    params
  )
  tree_close(grad(ours, 0), grad(theirs, 0), dict(rtol=1e-4, atol=1e-4) if tol is F32 else BF16)


def test_linen_norm_falls_back_for_mask_and_axes(count_calls):
  for kwargs, call in ((dict(reduction_axes=(-2, -1)), {}), ({}, dict(mask=X > 0))):
    ours, theirs = jfl.LayerNorm(**kwargs), nn.LayerNorm(**kwargs)
    params = theirs.init(jax.random.key(0), X)
    np.testing.assert_array_equal(ours.apply(params, X, **call), theirs.apply(params, X, **call))
  assert count_calls.get("layer_norm", 0) == 0


# --- attention ------------------------------------------------------------------------------


def _mha_pair(num_kv_heads=4, **kwargs):
  ours = flax_layers.MultiHeadAttention(
    4, 32, num_kv_heads=num_kv_heads, decode=False, rngs=nnx.Rngs(0), **kwargs
  )
  theirs = nnx.MultiHeadAttention(
    4,
    32,
    num_kv_heads=num_kv_heads,
    decode=False,
    rngs=nnx.Rngs(1),
    **{k: v for k, v in kwargs.items() if k != "implementation"},
  )
  perturb(theirs, 6)
  nnx.update(ours, nnx.state(theirs))
  return ours, theirs


MASK = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 16, 16))


@pytest.mark.parametrize(
  "num_kv_heads,call",
  [
    (4, {}),
    (4, dict(is_causal=True)),
    (2, dict(is_causal=True)),
    (1, dict(mask=MASK)),
    (2, dict(mask=MASK, is_causal=True)),
  ],
  ids=["plain", "causal", "gqa-causal", "mqa-mask", "gqa-mask-causal"],
)
def test_mha_matches_flax(num_kv_heads, call, count_calls):
  ours, theirs = _mha_pair(num_kv_heads)
  y1, g1, dx1 = loss_and_grads(ours, **call)
  y2, g2, dx2 = loss_and_grads(theirs, **call)
  close(y1, y2, F32)
  tree_close(g1, g2, dict(rtol=1e-4, atol=1e-4))
  close(dx1, dx2, dict(rtol=1e-4, atol=1e-4))
  nnx.update(theirs, nnx.state(ours))  # And back: the same state serves both.
  close(theirs(X, **call), y1, F32)
  assert count_calls["dot_product_attention"] >= 1


def test_mha_pallas_gqa_causal_mask(count_calls):
  ours, theirs = _mha_pair(2, implementation=PALLAS)
  call = dict(is_causal=True, mask=MASK)
  y1, g1, _ = loss_and_grads(ours, **call)
  y2, g2, _ = loss_and_grads(theirs, **call)
  close(y1, y2, F32)
  tree_close(g1, g2, dict(rtol=1e-4, atol=1e-4))
  assert count_calls["dot_product_attention"] >= 1


def test_attention_fn_in_flax_mha_bf16():
  theirs = nnx.MultiHeadAttention(
    4, 32, num_kv_heads=2, decode=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
  )
  ours = nnx.MultiHeadAttention(
    4,
    32,
    num_kv_heads=2,
    decode=False,
    dtype=jnp.bfloat16,
    attention_fn=flax_layers.attention_fn,
    rngs=nnx.Rngs(0),
  )
  perturb(theirs, 8)
  nnx.update(ours, nnx.state(theirs))
  reference = nnx.MultiHeadAttention(4, 32, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0))
  nnx.update(reference, nnx.state(theirs))
  y32 = reference(X, is_causal=True)
  y_ours, y_theirs = ours(X, is_causal=True), theirs(X, is_causal=True)
  assert y_ours.dtype == y_theirs.dtype == jnp.bfloat16
  err = lambda y: float(jnp.max(jnp.abs(y.astype(jnp.float32) - y32)))
  # Mixed precision: no worse than Flax's own bf16 path, against the f32 result.
  assert err(y_ours) <= 2 * err(y_theirs) + 1e-2, (err(y_ours), err(y_theirs))


def test_sow_weights_falls_back_to_flax(count_calls):
  # Training-time dropout runs in jfused's kernels: tests/attention/test_dropout.py.
  ours, theirs = _mha_pair(2, dropout_rate=0.5)
  # Deterministic: jfused, and equal to Flax's result without dropout.
  close(
    ours(X, is_causal=True, deterministic=True), theirs(X, is_causal=True, deterministic=True), F32
  )
  assert count_calls["dot_product_attention"] == 1
  ours(X, sow_weights=True, deterministic=True)
  theirs(X, sow_weights=True, deterministic=True)
  weights = lambda m: nnx.state(m, nnx.Intermediate)["attention_weights"][0]
  close(weights(ours), weights(theirs), F32)


def test_window_and_segments_match_an_explicit_mask():
  ours, theirs = _mha_pair(2)
  segments = jnp.array([[0] * 5 + [1] * 11, [0] * 16], jnp.int32)
  got = ours(X, is_causal=True, local_window_size=(3, 0), q_segment_ids=segments)
  t = jnp.arange(16)
  band = (t[None, :] <= t[:, None]) & (t[None, :] >= t[:, None] - 3)
  same = segments[:, :, None] == segments[:, None, :]
  close(got, theirs(X, mask=(band[None] & same)[:, None]), F32)


def test_linen_mha_with_attention_fn():
  ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=flax_layers.attention_fn)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4)
  params = theirs.init(jax.random.key(0), X)
  # float32, as Linen makes it.
  mask = nn.combine_masks(nn.make_causal_mask(jnp.ones((2, 16))), MASK)
  close(ours.apply(params, X, mask=mask), theirs.apply(params, X, mask=mask), F32)
  # sow_weights: Flax's function with the Linen module, weights in 'intermediates'.
  _, state = ours.apply(params, X, mask=mask, sow_weights=True, mutable=["intermediates"])
  _, ref_state = theirs.apply(params, X, mask=mask, sow_weights=True, mutable=["intermediates"])
  tree_close(state, ref_state, F32)
  grads = [
    jax.grad(lambda p, m=m: jnp.sum(jnp.tanh(m.apply(p, X, mask=mask))))(params)
    for m in (ours, theirs)
  ]
  tree_close(grads[0], grads[1], dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("window", [None, 4])
def test_mha_decode_matches_full_sequence(window):
  ours, theirs = _mha_pair(2)
  full = ours(X, is_causal=True, local_window_size=None if window is None else (window, 0))
  decoder = flax_layers.MultiHeadAttention(4, 32, num_kv_heads=2, decode=True, rngs=nnx.Rngs(0))
  nnx.update(decoder, nnx.state(ours, nnx.Param))
  decoder.init_cache(X.shape)
  flax_decoder = nnx.MultiHeadAttention(4, 32, num_kv_heads=2, decode=True, rngs=nnx.Rngs(0))
  nnx.update(flax_decoder, nnx.state(ours, nnx.Param))
  flax_decoder.init_cache(X.shape)

  step = nnx.jit(lambda m, x: m(x, local_window_size=window))
  steps = [step(decoder, X[:, i : i + 1]) for i in range(X.shape[1])]
  close(jnp.concatenate(steps, axis=1), full, F32)
  if window is None:
    flax_steps = [flax_decoder(X[:, i : i + 1]) for i in range(4)]
    close(jnp.concatenate(flax_steps, axis=1), full[:, :4], F32)
