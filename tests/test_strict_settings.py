"""The settings careful JAX users run with, through every public op: float64 under
jax_enable_x64 and jax.debug_nans / jax.debug_infs. (Implicit rank promotion is forbidden for
the whole suite, in conftest.py; zero-size inputs are tested beside each op:
tests/attention/test_kernels.py, tests/norms/test_norms.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfused

# --- float64 -----------------------------------------------------------------------------------


def _attention_float64_numpy(q, k, v, *, is_causal):
  """Softmax attention in NumPy float64, the independent reference for x64 calls."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(q.shape[-1])
  if is_causal:
    t, s = logits.shape[-2:]
    logits = np.where(np.tril(np.ones((t, s), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnd->btnd", probs, v)


@pytest.mark.parametrize("is_causal", [False, True])
def test_float64_attention_is_served_in_float64(is_causal):
  """jax.nn accepts float64; so does jfused: the kernels decline it and dispatch falls through
  to the XLA implementation, which keeps float64 all the way (jax.nn itself rounds its softmax
  to float32, hence the looser comparison with it)."""
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 33, 4, 16), jnp.float64)
    k = jax.random.normal(keys[1], (2, 40 if not is_causal else 33, 2, 16), jnp.float64)
    v = jax.random.normal(keys[2], k.shape, jnp.float64)
    out = jfused.dot_product_attention(
      q, k, v, is_causal=is_causal, implementation=("pallas_triton", "xla")
    )
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(
      out, _attention_float64_numpy(q, k, v, is_causal=is_causal), rtol=1e-12, atol=1e-12
    )

    def loss(attention):
      return lambda q, k, v: (attention(q, k, v, is_causal=is_causal) ** 2).sum()

    grads = jax.grad(loss(jfused.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, expected):
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_float64_attention_named_kernel_declines_with_a_reason():
  with jax.enable_x64(True):
    q = jnp.ones((1, 8, 2, 16), jnp.float64)
    with pytest.raises(NotImplementedError, match="float64"):
      jfused.dot_product_attention(q, q, q, implementation="pallas_triton")


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_float64_norms_compute_in_float64(op):
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (5, 200), jnp.float64) * 3.0 + 1.0
    scale = jax.random.normal(keys[1], (200,), jnp.float64)
    xn = np.asarray(x)
    if op == "layer_norm":
      bias = jax.random.normal(keys[2], (200,), jnp.float64)
      y = jfused.layer_norm(x, scale, bias, epsilon=1e-6)
      centred = xn - xn.mean(-1, keepdims=True)
      want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6)
      want = want * np.asarray(scale) + np.asarray(bias)
    else:
      y = jfused.rms_norm(x, scale, epsilon=1e-6)
      want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(scale)
    assert y.dtype == jnp.float64
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


# --- debug_nans / debug_infs -------------------------------------------------------------------

# Calls whose kernels meet padded query rows (T=100 is no multiple of a block), rows with no
# visible key and masked keys: where internal sentinels used to be infinities.
_MASKED_CALLS = {
  "lengths": dict(
    is_causal=True,
    query_seq_lengths=jnp.array([50, 100], jnp.int32),
    key_value_seq_lengths=jnp.array([70, 130], jnp.int32),
  ),
  "window_with_empty_rows": dict(
    local_window_size=(5, 5), key_value_seq_lengths=jnp.array([30, 130], jnp.int32)
  ),
  "segments": dict(
    q_segment_ids=jnp.repeat(jnp.array([[0, 1], [1, 2]], jnp.int32), 50, 1),
    kv_segment_ids=jnp.repeat(jnp.array([[0, 1], [0, 1]], jnp.int32), 65, 1),
  ),
  "boolean_mask": dict(
    mask=jnp.arange(130)[None, None, None, :] < jnp.arange(100)[None, None, :, None] - 10
  ),
  "dropout": dict(is_causal=True, dropout_rate=0.2, dropout_rng=jax.random.key(3)),
}


@pytest.mark.parametrize("name", sorted(_MASKED_CALLS))
def test_attention_under_debug_nans_and_infs(name):
  """jax.nn and the XLA path run under debug_nans/debug_infs; the Pallas path must too (its
  outputs and, interpreted, every intermediate stay finite) and give the same numbers."""
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (2, 100, 2, 32), jnp.float32)
  k = jax.random.normal(keys[1], (2, 130, 2, 32), jnp.float32)
  v = jax.random.normal(keys[2], (2, 130, 2, 32), jnp.float32)
  extra = _MASKED_CALLS[name]

  def value_and_grads(implementation):
    def loss(q, k, v):
      out, lse = jfused.dot_product_attention(
        q, k, v, implementation=implementation, return_residual=True, **extra
      )
      return (out**2).sum(), lse  # The logsumexp of an empty row is jax.nn's -0.7 * max.

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (want_value, want_lse), want_grads = value_and_grads("xla")
  with jax.debug_nans(True), jax.debug_infs(True):
    (value, lse), grads = value_and_grads("pallas_triton")
  np.testing.assert_allclose(value, want_value, rtol=1e-4)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_norms_under_debug_nans_and_infs(op):
  """A width with masked lanes (200 in a 256-wide chunk) and a residual, through the kernels."""
  keys = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(keys[0], (7, 200), jnp.float32)
  residual = jax.random.normal(keys[1], (7, 200), jnp.float32)
  scale = jax.random.normal(keys[2], (200,), jnp.float32)
  norm = getattr(jfused, op)

  def value_and_grads(implementation):
    def loss(x, residual, scale):
      y, h = norm(x, scale, residual=residual, implementation=implementation)
      return (y**2).sum() + (h * y).sum()

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, residual, scale)

  want_value, want_grads = value_and_grads("xla")
  with jax.debug_nans(True), jax.debug_infs(True):
    value, grads = value_and_grads("pallas_triton")
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- the Flax layers ---------------------------------------------------------------------------


def test_flax_block_gradient_under_debug_nans_and_infs():
  """A TransformerBlock on the Pallas kernels (window and packed segments: empty and masked
  rows) differentiates under debug_nans/debug_infs."""
  from flax import nnx

  import flax_layers

  block = flax_layers.TransformerBlock(
    32,
    2,
    local_window_size=(4, 0),
    attention_implementation="pallas_triton",
    norm_implementation="pallas_triton",
    rngs=nnx.Rngs(0),
  )
  x = jax.random.normal(jax.random.key(0), (2, 40, 32))
  segments = jnp.repeat(jnp.array([[0, 1], [1, 1]], jnp.int32), 20, axis=1)
  want = nnx.grad(lambda m: m(x, segment_ids=segments).sum())(block)
  with jax.debug_nans(True), jax.debug_infs(True):
    got = nnx.grad(lambda m: m(x, segment_ids=segments).sum())(block)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_flax_layers_keep_float64_like_flax():
  from flax import nnx

  import flax_layers

  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 12, 32), jnp.float64)
    pairs = [
      (
        flax_layers.LayerNorm(32, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
        nnx.LayerNorm(32, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
      ),
      (
        flax_layers.RMSNorm(32, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
        nnx.RMSNorm(32, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
      ),
      (
        flax_layers.MultiHeadAttention(
          2, 32, decode=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
        ),
        nnx.MultiHeadAttention(2, 32, decode=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0)),
      ),
    ]
    for ours, theirs in pairs:
      got, want = ours(x), theirs(x)
      assert got.dtype == want.dtype == jnp.float64
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
