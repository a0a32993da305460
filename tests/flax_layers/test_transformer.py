"""flax_layers' TransformerBlock and GPT: fused against plain Flax math, transforms, training,
checkpoints (CPU; the Pallas kernels in interpret mode on one case)."""

from __future__ import annotations

import functools

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_layers
from flax_layers import linen as jfl
import jfused
from tests.flax_layers.test_modules import F32, close, perturb

# Errors relative to the largest magnitude of the reference (activations grow through the
# perturbed layers, so elementwise tolerances would be meaningless near zero).
OUT_TOL, GRAD_TOL = 1e-5, 5e-5


def scaled_close(a, b, rel):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    err, size = np.max(np.abs(x - y), initial=0.0), max(1.0, np.max(np.abs(y), initial=0.0))
    assert err <= rel * size, f"max error {err} > {rel} * {size}"


def max_error(a, reference):
  """Largest error of tree a against a float32 reference tree, relative to its magnitude."""
  errors = [
    np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))
    / max(1.0, np.max(np.abs(np.asarray(y, np.float32))))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(reference), strict=True)
  ]
  return max(errors)


X = jax.random.normal(jax.random.key(0), (2, 16, 32))
SEGMENTS = jnp.array([[0] * 6 + [1] * 10, [0] * 16], jnp.int32)
CONFIGS = {
  "gpt2": dict(),
  "llama": dict(norm="rms_norm", activation="swiglu", num_kv_heads=2, local_window_size=(5, 0)),
  "llama_rope": dict(
    norm="rms_norm", activation="swiglu", num_kv_heads=2, use_bias=False, rope_theta=500000.0
  ),
  # The MLPs' activations recomputed in the backward (jfused.mlp_down_projection).
  "gpt2_recompute": dict(recompute_mlp_activation=True),
  "llama_recompute": dict(
    norm="rms_norm", activation="swiglu", use_bias=False, recompute_mlp_activation=True
  ),
}


def block_pair(config, **kwargs):
  fused = flax_layers.TransformerBlock(32, 4, rngs=nnx.Rngs(0), **config, **kwargs)
  plain = flax_layers.TransformerBlock(32, 4, fused=False, rngs=nnx.Rngs(1), **config)
  perturb(fused, 11)
  nnx.update(plain, nnx.state(fused))
  return fused, plain


@nnx.jit  # One compiled program instead of hundreds of eager ops: keeps CI fast.
def output_and_grads(block, x, segment_ids=None):
  def loss(m, x):
    y = m(x, segment_ids=segment_ids)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(block, x)
  return y, grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_block_fused_matches_plain_flax(name):
  fused, plain = block_pair(CONFIGS[name])
  assert jax.tree.structure(nnx.state(fused)) == jax.tree.structure(nnx.state(plain))
  y1, g1 = output_and_grads(fused, X, segment_ids=SEGMENTS)
  y2, g2 = output_and_grads(plain, X, segment_ids=SEGMENTS)
  scaled_close(y1, y2, OUT_TOL)
  scaled_close(g1, g2, GRAD_TOL)


def test_block_with_pallas_kernels():
  config = CONFIGS["llama"]
  fused, plain = block_pair(
    config, attention_implementation="pallas_triton", norm_implementation="pallas_triton"
  )
  y1, g1 = output_and_grads(fused, X, segment_ids=SEGMENTS)
  y2, g2 = output_and_grads(plain, X, segment_ids=SEGMENTS)
  scaled_close(y1, y2, OUT_TOL)
  scaled_close(g1, g2, GRAD_TOL)


def test_block_is_flax_modules_composed_by_hand():
  """The block against Flax's own nnx.RMSNorm, nnx.MultiHeadAttention and nnx.Linear."""
  block = flax_layers.TransformerBlock(32, 4, rngs=nnx.Rngs(0), **CONFIGS["llama"])
  perturb(block, 12)
  norm1, norm2 = (nnx.RMSNorm(32, rngs=nnx.Rngs(0)) for _ in range(2))
  attention = nnx.MultiHeadAttention(4, 32, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0))
  for theirs, ours in ((norm1, block.norm1), (norm2, block.norm2), (attention, block.attention)):
    nnx.update(theirs, nnx.state(ours))
  t = jnp.arange(16)
  visible = (t[None, :] <= t[:, None]) & (t[None, :] >= t[:, None] - 5)
  visible = visible[None] & (SEGMENTS[:, :, None] == SEGMENTS[:, None, :])
  h = X + attention(norm1(X), mask=visible[:, None])
  mlp = block.mlp
  y = norm2(h)
  expected = h + mlp.down(jax.nn.silu(mlp.gate(y)) * mlp.up(y))
  scaled_close(nnx.jit(lambda b, x: b(x, segment_ids=SEGMENTS))(block, X), expected, OUT_TOL)


def test_deferred_residual_equals_the_plain_sum():
  fused, _ = block_pair(CONFIGS["gpt2"])
  residual = jax.random.normal(jax.random.key(3), X.shape)
  delta, stream = fused(X, residual=residual, return_residual=True)
  close(delta + stream, fused(X + residual), F32)


@pytest.mark.parametrize("deterministic_backward", [None, True, False])
def test_blocks_pass_deterministic_backward_to_attention(monkeypatch, deterministic_backward):
  """The NNX block, a GPT built from it and the Linen block hand the setting to
  jfused.dot_product_attention (whose Mosaic backward acts on it)."""
  seen = []
  original = jfused.dot_product_attention

  def recording(*args, **kwargs):
    seen.append(kwargs.get("deterministic_backward", "absent"))
    return original(*args, **kwargs)

  monkeypatch.setattr(jfused, "dot_product_attention", recording)
  option = dict(deterministic_backward=deterministic_backward)
  flax_layers.TransformerBlock(32, 4, rngs=nnx.Rngs(0), **option)(X)
  gpt = flax_layers.GPT(16, 2, 32, 4, max_length=16, rngs=nnx.Rngs(0), **option)
  gpt(jnp.zeros((2, 16), jnp.int32))
  linen_block = jfl.TransformerBlock(num_heads=4, **option)
  linen_block.apply(linen_block.init(jax.random.key(0), X), X)
  # init and apply each run the Linen block's attention once.
  assert seen == [deterministic_backward] * 5


def test_linen_block_matches_nnx_block():
  for config in CONFIGS.values():
    block, _ = block_pair(config)
    linen_block = jfl.TransformerBlock(num_heads=4, **config)
    params = {"params": nnx.to_pure_dict(nnx.state(block, nnx.Param))}
    initial = linen_block.init(jax.random.key(0), X)
    assert jax.tree.structure(initial) == jax.tree.structure(params)
    close(linen_block.apply(params, X, segment_ids=SEGMENTS), block(X, segment_ids=SEGMENTS), F32)
    plain = jfl.TransformerBlock(num_heads=4, fused=False, **config)
    # Fused against Flax's own math: the tolerance of test_block_fused_matches_plain_flax.
    scaled_close(
      plain.apply(params, X, segment_ids=SEGMENTS), block(X, segment_ids=SEGMENTS), OUT_TOL
    )


def test_block_bf16_mixed_precision():
  """bf16 compute, f32 parameters: bf16 out, f32 gradients, and no less accurate than plain
  Flax in bf16 (both measured against the f32 block), the FlashAttention rule."""
  blocks = {}
  for fused, dtype in ((True, jnp.bfloat16), (False, jnp.bfloat16), (False, None)):
    blocks[fused, dtype] = flax_layers.TransformerBlock(
      32, 4, fused=fused, dtype=dtype, rngs=nnx.Rngs(0), **CONFIGS["llama"]
    )
  perturb(blocks[True, jnp.bfloat16], 16)
  for block in blocks.values():
    nnx.update(block, nnx.state(blocks[True, jnp.bfloat16]))
  x = X.astype(jnp.bfloat16)
  results = {key: output_and_grads(block, x, segment_ids=SEGMENTS) for key, block in blocks.items()}
  (y_fused, (g_fused, _)), (y_plain, (g_plain, _)) = (
    results[True, jnp.bfloat16],
    results[False, jnp.bfloat16],
  )
  y_ref, (g_ref, _) = results[False, None]
  assert y_fused.dtype == y_plain.dtype == jnp.bfloat16
  params = lambda g: nnx.state(g, nnx.Param)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(params(g_fused)))
  y_ref = y_ref.astype(jnp.bfloat16)  # The f32-parameter block returns f32 for bf16 input.
  assert max_error(y_fused, y_ref) <= 2 * max_error(y_plain, y_ref) + 1e-2
  assert max_error(params(g_fused), params(g_ref)) <= (
    2 * max_error(params(g_plain), params(g_ref)) + 1e-2
  )


def test_jit_grad_remat():
  block, _ = block_pair(CONFIGS["llama"])

  def loss(m, x, remat):
    apply = (
      nnx.remat(lambda m, x: m(x, segment_ids=SEGMENTS))
      if remat
      else (lambda m, x: m(x, segment_ids=SEGMENTS))
    )
    return jnp.sum(jnp.sin(apply(m, x)))

  grad = nnx.jit(nnx.grad(loss), static_argnums=2)
  scaled_close(grad(block, X, True), grad(block, X, False), OUT_TOL)
  _, eager = output_and_grads(block, X, segment_ids=SEGMENTS)
  scaled_close(grad(block, X, True), eager[0], GRAD_TOL)


def test_scan_over_stacked_layers():
  num_layers = 2

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make_layers(rngs):
    return flax_layers.TransformerBlock(32, 4, rngs=rngs, **CONFIGS["llama"])

  layers = make_layers(nnx.Rngs(0))
  perturb(layers, 13)

  @nnx.jit
  def forward(layers, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def step(layer, x):
      return layer(x, segment_ids=SEGMENTS)

    return step(layers, x)

  graphdef, state = nnx.split(layers)
  apply = nnx.jit(lambda layer, x: layer(x, segment_ids=SEGMENTS))
  expected = X
  for i in range(num_layers):
    expected = apply(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)), expected)
  scaled_close(forward(layers, X), expected, OUT_TOL)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(forward(m, X) ** 2)))(layers)
  assert jax.tree.leaves(grads)[0].shape[0] == num_layers


def make_gpt(fused, seed=0, **kwargs):
  return flax_layers.GPT(
    64, 2, 32, 4, max_length=16, fused=fused, rngs=nnx.Rngs(seed), **CONFIGS["llama"], **kwargs
  )


# The fused GPT's loss is jfused.linear_cross_entropy on the tied table, with the Triton kernel
# (interpreted here) or XLA; the unfused one Flax's head and log_softmax.
@pytest.mark.parametrize("loss_implementation", ["pallas_triton", "xla_chunked"])
def test_training_loop_matches_unfused_step_by_step(loss_implementation):
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  losses = {}
  for fused in (True, False):
    model = make_gpt(fused, loss_implementation=loss_implementation)
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, tokens):
      loss_fn = lambda m, t: flax_layers.next_token_loss(m, t, segment_ids=SEGMENTS)
      loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
      optimizer.update(model, grads)
      return loss

    losses[fused] = [float(train_step(model, optimizer, tokens)) for _ in range(4)]
  np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
  assert losses[True][-1] < losses[True][0]


def test_saved_parameters_load_into_plain_flax_and_back():
  # The GPT, fused -> bytes -> plain-Flax-math GPT with other weights.
  model, plain = make_gpt(True), make_gpt(False, seed=1)
  tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, 64)
  saved = flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  target = nnx.to_pure_dict(nnx.state(plain, nnx.Param))
  restored = nnx.state(plain, nnx.Param)
  nnx.replace_by_pure_dict(restored, flax.serialization.from_bytes(target, saved))
  nnx.update(plain, restored)
  close(plain(tokens), model(tokens), F32)
  # Our modules -> Flax's own modules -> ours again.
  for ours, theirs in (
    (
      flax_layers.MultiHeadAttention(4, 32, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0)),
      nnx.MultiHeadAttention(4, 32, num_kv_heads=2, decode=False, rngs=nnx.Rngs(1)),
    ),
    (flax_layers.LayerNorm(32, rngs=nnx.Rngs(0)), nnx.LayerNorm(32, rngs=nnx.Rngs(0))),
  ):
    perturb(ours, 14)
    expected = ours(X)
    blob = flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(ours, nnx.Param)))
    state = nnx.state(theirs, nnx.Param)
    nnx.replace_by_pure_dict(state, flax.serialization.from_bytes(nnx.to_pure_dict(state), blob))
    nnx.update(theirs, state)
    close(theirs(X), expected, F32)
    perturb(ours, 15)  # Overwrite ours, then load Flax's saved state back.
    blob = flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(theirs, nnx.Param)))
    state = nnx.state(ours, nnx.Param)
    nnx.replace_by_pure_dict(state, flax.serialization.from_bytes(nnx.to_pure_dict(state), blob))
    nnx.update(ours, state)
    close(ours(X), expected, F32)


def test_scanned_gpt_matches_the_loop_with_converted_parameters():
  """GPT(scan_blocks=True) holds the same parameters stacked: converted with stack_blocks, it
  gives the per-block model's logits and gradients; unstack_blocks converts back exactly."""
  kwargs = dict(
    vocab_size=64,
    num_layers=3,
    num_features=32,
    num_heads=2,
    max_length=16,
    attention_implementation="pallas_triton",
    norm_implementation="pallas_triton",
  )
  loop = flax_layers.GPT(**kwargs, rngs=nnx.Rngs(0))
  scan = flax_layers.GPT(**kwargs, scan_blocks=True, rngs=nnx.Rngs(1))
  tree = nnx.to_pure_dict(nnx.state(loop, nnx.Param))
  stacked = flax_layers.stack_blocks(tree)
  assert jax.tree.leaves(stacked["blocks"])[0].shape[0] == 3
  state = nnx.state(scan, nnx.Param)
  nnx.replace_by_pure_dict(state, stacked)
  nnx.update(scan, state)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)
  np.testing.assert_allclose(scan(tokens), loop(tokens), atol=1e-5)
  grads_loop = nnx.grad(lambda m: flax_layers.next_token_loss(m, tokens))(loop)
  grads_scan = nnx.grad(lambda m: flax_layers.next_token_loss(m, tokens))(scan)
  expected = flax_layers.stack_blocks(nnx.to_pure_dict(grads_loop))
  got = nnx.to_pure_dict(grads_scan)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  back = flax_layers.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)


# --- rotary position embeddings (LLaMA) ------------------------------------------------------


def test_rope_attention_matches_flax_rope_attention():
  ours = flax_layers.MultiHeadAttention(
    4, 32, num_kv_heads=2, decode=False, rope_theta=1000.0, rngs=nnx.Rngs(0)
  )
  rope = nnx.RoPE(theta=1000.0)
  theirs = nnx.MultiHeadAttention(
    4,
    32,
    num_kv_heads=2,
    decode=False,
    attention_fn=functools.partial(nnx.dot_product_attention_with_rope, rope=rope),
    rngs=nnx.Rngs(1),
  )
  nnx.update(theirs, nnx.state(ours, nnx.Param))
  close(ours(X, is_causal=True), theirs(X, is_causal=True), F32)


def test_rope_needs_the_jfused_attention_and_no_decode():
  with pytest.raises(ValueError, match="rope_theta is not supported with decode"):
    flax_layers.MultiHeadAttention(4, 32, decode=True, rope_theta=1e4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pass no attention_fn"):
    flax_layers.MultiHeadAttention(
      4, 32, decode=False, rope_theta=1e4, attention_fn=nnx.dot_product_attention, rngs=nnx.Rngs(0)
    )


@pytest.mark.parametrize("attention_implementation", [None, "pallas_triton"])
def test_packed_sequences_with_rope_equal_separate_runs(attention_implementation):
  # A LLaMA-style GPT has no learned positions: a packed row with per-segment positions and
  # segment ids computes exactly what each sequence computes alone.
  model = flax_layers.GPT(
    64,
    2,
    32,
    4,
    max_length=16,
    attention_implementation=attention_implementation,
    rngs=nnx.Rngs(0),
    **CONFIGS["llama_rope"],
  )
  assert model.position_embed is None
  first = jax.random.randint(jax.random.key(3), (1, 6), 0, 64)
  second = jax.random.randint(jax.random.key(4), (1, 10), 0, 64)
  segments = jnp.array([[0] * 6 + [1] * 10], jnp.int32)
  packed = model.hidden_states(
    jnp.concatenate([first, second], axis=1),
    segment_ids=segments,
    positions=jfused.segment_positions(segments),
  )
  close(packed[:, :6], model.hidden_states(first), F32)
  close(packed[:, 6:], model.hidden_states(second), F32)
