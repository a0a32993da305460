"""The fused ops under sharding: each device runs the kernels on its own shard, nothing gathered.

Eight CPU devices are simulated (tests/conftest.py sets XLA's device-count flag) as a 4 x 2 mesh
("data", "model") with Auto axes: plain `jax.jit` on NamedSharding inputs, as users write it.
Every check runs the same program on one device too and compares outputs and gradients, and
reads the compiled HLO for collectives. The kernels run in interpret mode on small shapes.
"""

from __future__ import annotations

import functools
import re

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import flax_layers
import jfused
from jfused import config

CPU = jax.devices("cpu")
assert len(CPU) >= 8, "tests/conftest.py must set --xla_force_host_platform_device_count=8"
MESH = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2, devices=CPU[:8])
# The same devices with Explicit axes: shardings are part of the types (sharding in types).
EXPLICIT_MESH = jax.make_mesh(
  (4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2, devices=CPU[:8]
)
KERNELS = "pallas_triton"
TOL = 2e-5  # float32, relative to the largest magnitude of the one-device result


@pytest.fixture(autouse=True)
def interpret_kernels():
  with config.interpret_mode(True):  # CPU devices, also on a machine with a GPU.
    yield


def put(x, spec, mesh=MESH):
  return jax.device_put(x, NamedSharding(mesh, spec))


def fit_spec(x, axes_by_dim) -> P:
  """A spec for x from {dim: mesh axes}, leaving out dims the axes do not divide."""

  def fits(dim, axes):
    names = (axes,) if isinstance(axes, str) else axes
    return x.shape[dim] % int(np.prod([MESH.shape[a] for a in names])) == 0

  return P(
    *(axes_by_dim.get(d) if fits(d, axes_by_dim.get(d, ())) else None for d in range(x.ndim))
  )


def collectives(hlo: str) -> dict[str, int]:
  names = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
  return {name: len(re.findall(rf"\b{name}(?:-start)?\(", hlo)) for name in names}


def compile_and_run(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled(*args), compiled.as_text()


def on_one_device(fn, *args):
  return jax.jit(fn)(*jax.device_put(args, CPU[0]))


def assert_close(actual, expected, tol=TOL):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape, a.dtype, e.dtype)
    a, e = np.asarray(a), np.asarray(e)
    assert not np.isnan(a).any()
    size = max(1.0, float(np.max(np.abs(e), initial=0.0)))
    assert np.max(np.abs(a - e), initial=0.0) <= tol * size


# --- attention -------------------------------------------------------------------------------

B, T, D = 4, 16, 16
# The dims of each input that a test may shard: b batch, t positions, n heads.
ATTENTION_DIMS = {
  "query": "btn",
  "key": "btn",
  "value": "btn",
  "bias": "bnt",
  "mask": "bnt",
  "q_segment_ids": "bt",
  "query_seq_lengths": "b",
  "key_value_seq_lengths": "b",
}


@functools.cache
def attention_inputs(num_heads: int, num_kv_heads: int) -> dict:
  """Every feature at once: causal, a per-head bias shared over the batch, a per-batch mask
  shared over heads, packed segments, query and key lengths."""
  keys = jax.random.split(jax.random.key(num_heads * 10 + num_kv_heads), 5)
  segments = jnp.array([[0] * 16, [0] * 9 + [1] * 7, [0] * 4 + [1] * 12, [0] * 16], jnp.int32)
  mask = jax.random.bernoulli(keys[4], 0.8, (B, 1, T, T)) | jnp.eye(T, dtype=bool)[None, None]
  return {
    "query": jax.random.normal(keys[0], (B, T, num_heads, D)),
    "key": jax.random.normal(keys[1], (B, T, num_kv_heads, D)),
    "value": jax.random.normal(keys[2], (B, T, num_kv_heads, D)),
    "bias": jax.random.normal(keys[3], (1, num_heads, T, T)),
    "mask": mask,
    "q_segment_ids": segments,
    "query_seq_lengths": jnp.array([16, 13, 16, 5], jnp.int32),
    "key_value_seq_lengths": jnp.array([16, 16, 11, 7], jnp.int32),
  }


def attention_outputs(inputs):
  """Output and gradients (query, key, value, bias) of a loss on the fused attention."""
  differentiable = {k: inputs[k] for k in ("query", "key", "value", "bias")}
  rest = {k: v for k, v in inputs.items() if k not in differentiable}

  def loss(differentiable):
    out = jfused.dot_product_attention(
      **differentiable, **rest, is_causal=True, implementation=KERNELS
    )
    return jnp.sum(jnp.sin(out)), out

  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(differentiable)
  return out, grads


@functools.cache
def attention_on_one_device(num_heads: int, num_kv_heads: int):
  return on_one_device(attention_outputs, attention_inputs(num_heads, num_kv_heads))


def shard_attention_inputs(inputs, mesh=MESH, **axes):
  """Shards every input over the mesh axes given per dim letter (b, t, n)."""
  sharded = {}
  for name, x in inputs.items():
    dims = {
      d: axes[letter]
      for d, letter in enumerate(ATTENTION_DIMS[name])
      if letter in axes and x.shape[d] > 1
    }
    sharded[name] = put(x, fit_spec(x, dims), mesh)
  return sharded


@pytest.mark.parametrize(
  "num_heads, num_kv_heads, axes",
  [
    pytest.param(4, 4, dict(b="data"), id="batch"),
    pytest.param(4, 4, dict(n="model"), id="heads"),
    pytest.param(4, 2, dict(b="data", n="model"), id="gqa_batch_x_heads"),
    pytest.param(4, 1, dict(b="data", n="model"), id="mqa_batch_x_heads"),
    # Two key/value heads, query heads over 2 x 4 devices: the four devices of one "model"
    # index split one group's query heads and share its key/value head.
    pytest.param(8, 2, dict(n=("model", "data")), id="gqa_devices_share_kv_head"),
  ],
)
def test_attention_runs_per_shard_without_gathering(num_heads, num_kv_heads, axes):
  inputs = shard_attention_inputs(attention_inputs(num_heads, num_kv_heads), **axes)
  (out, grads), hlo = compile_and_run(attention_outputs, inputs)
  assert_close((out, grads), attention_on_one_device(num_heads, num_kv_heads))
  counts = collectives(hlo)
  assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
  # The kernels' results come out sharded like the query, not gathered.
  for result in (out, grads["query"]):
    expected = NamedSharding(MESH, P(axes.get("b"), None, axes.get("n")))
    assert result.sharding.is_equivalent_to(expected, 4), result.sharding


def test_attention_dropout_masks_follow_the_shards():
  # The keep mask is a function of (per batch-and-head seed, positions): each device's shard
  # of the seeds gives it exactly its part of the one-device mask.
  def outputs(inputs):
    def loss(query, key, value):
      out = jfused.dot_product_attention(
        query,
        key,
        value,
        is_causal=True,
        dropout_rate=0.25,
        dropout_rng=jax.random.key(5),
        implementation=KERNELS,
      )
      return jnp.sum(jnp.sin(out)), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      inputs["query"], inputs["key"], inputs["value"]
    )
    return out, grads

  inputs = {k: attention_inputs(4, 2)[k] for k in ("query", "key", "value")}
  (out, grads), hlo = compile_and_run(outputs, shard_attention_inputs(inputs, b="data", n="model"))
  assert_close((out, grads), on_one_device(outputs, inputs))
  assert collectives(hlo)["all-gather"] == 0, collectives(hlo)


def test_attention_keeps_heads_whole_when_kv_heads_cannot_follow():
  # Two key/value heads, query heads over 4 devices: no device holds whole groups and no two
  # devices share a key/value head exactly, so the heads are gathered; the result is right.
  inputs = shard_attention_inputs(attention_inputs(4, 2), n="data")
  (out, grads), _ = compile_and_run(attention_outputs, inputs)
  assert_close((out, grads), attention_on_one_device(4, 2))


def test_attention_gathers_a_sharded_sequence_axis():
  # No context parallelism: a sequence-sharded input is gathered first, and the result is
  # what one device computes.
  inputs = shard_attention_inputs(attention_inputs(4, 4), b="data", t="model")
  (out, grads), hlo = compile_and_run(attention_outputs, inputs)
  assert_close((out, grads), attention_on_one_device(4, 4))
  assert collectives(hlo)["all-gather"] > 0


def test_attention_under_explicit_mesh_axes():
  # Explicit axes carry the shardings in the types, and the op runs through shard_map.
  inputs = shard_attention_inputs(attention_inputs(4, 2), EXPLICIT_MESH, b="data", n="model")
  (out, grads), hlo = compile_and_run(attention_outputs, inputs)
  assert_close((out, grads), attention_on_one_device(4, 2))
  assert collectives(hlo)["all-gather"] == 0, collectives(hlo)
  assert out.sharding.spec == P("data", None, "model", None)


# --- norms -----------------------------------------------------------------------------------

NORM_SHAPE = (8, 6, 32)


def layer_norm_outputs(x, residual, scale, bias):
  def loss(x, residual, scale, bias):
    y, h = jfused.layer_norm(x, scale, bias, residual=residual, implementation=KERNELS)
    return jnp.sum(jnp.sin(y) * jnp.cos(h)), (y, h)

  (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
    x, residual, scale, bias
  )
  return outputs, grads


def rms_norm_outputs(x, residual, scale, bias):
  del bias

  def loss(x, residual, scale):
    y, h = jfused.rms_norm(x, scale, residual=residual, scale_offset=1.0, implementation=KERNELS)
    return jnp.sum(jnp.sin(y) * jnp.cos(h)), (y, h)

  (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
    x, residual, scale
  )
  return outputs, grads


NORMS = {"layer_norm": layer_norm_outputs, "rms_norm": rms_norm_outputs}


@functools.cache
def norm_inputs():
  keys = jax.random.split(jax.random.key(3), 4)
  width = NORM_SHAPE[-1]
  return (
    jax.random.normal(keys[0], NORM_SHAPE),
    jax.random.normal(keys[1], NORM_SHAPE),
    1.0 + 0.1 * jax.random.normal(keys[2], (width,)),
    0.1 * jax.random.normal(keys[3], (width,)),
  )


@functools.cache
def norm_on_one_device(name):
  return on_one_device(NORMS[name], *norm_inputs())


def sharded_norm_inputs(spec, mesh=MESH):
  x, residual, scale, bias = norm_inputs()
  return put(x, spec, mesh), put(residual, spec, mesh), put(scale, P(), mesh), put(bias, P(), mesh)


@pytest.mark.parametrize("name", sorted(NORMS))
@pytest.mark.parametrize(
  "spec",
  [P("data"), P("data", "model"), P(("data", "model"))],
  ids=["rows", "rows_2d", "rows_over_both_axes"],
)
def test_norm_runs_per_row_shard_without_gathering(name, spec):
  (outputs, grads), hlo = compile_and_run(NORMS[name], *sharded_norm_inputs(spec))
  # dscale and dbias are summed over every device's rows: they match one device.
  assert_close((outputs, grads), norm_on_one_device(name))
  counts = collectives(hlo)
  assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
  for result in (*outputs, grads[0]):
    assert result.sharding.is_equivalent_to(NamedSharding(MESH, spec), 3), result.sharding


@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_gathers_a_sharded_feature_axis(name):
  inputs = sharded_norm_inputs(P("data", None, "model"))
  (outputs, grads), hlo = compile_and_run(NORMS[name], *inputs)
  assert_close((outputs, grads), norm_on_one_device(name))
  assert collectives(hlo)["all-gather"] > 0


@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_under_explicit_mesh_axes(name):
  # Rows stay sharded; the sharded feature axis is gathered first (resharded in the types).
  (outputs, grads), hlo = compile_and_run(
    NORMS[name], *sharded_norm_inputs(P("data", "model", None), EXPLICIT_MESH)
  )
  assert_close((outputs, grads), norm_on_one_device(name))
  assert outputs[0].sharding.spec == P("data", "model", None)
  assert collectives(hlo)["all-gather"] == 0, collectives(hlo)
  (outputs, grads), _ = compile_and_run(
    NORMS[name], *sharded_norm_inputs(P("data", None, "model"), EXPLICIT_MESH)
  )
  assert_close((outputs, grads), norm_on_one_device(name))


def test_replicated_inputs_compute_what_one_device_does():
  (outputs, grads), hlo = compile_and_run(layer_norm_outputs, *sharded_norm_inputs(P()))
  expected = norm_on_one_device("layer_norm")
  for a, e in zip(jax.tree.leaves((outputs, grads)), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, e)
  assert not any(collectives(hlo).values())


def test_norm_inside_shard_map_runs_the_kernel_per_shard():
  # check_vma=False: the Pallas launchers do not declare how their outputs vary over the
  # manual axes, which shard_map's check asks of every pallas_call.
  @jax.jit
  @functools.partial(
    jax.shard_map,
    mesh=MESH,
    in_specs=(P("data"), P("data"), P(), P()),
    out_specs=P("data"),
    check_vma=False,
  )
  def per_shard(x, residual, scale, bias):
    return jfused.layer_norm(x, scale, bias, residual=residual, implementation=KERNELS)[0]

  assert_close(per_shard(*sharded_norm_inputs(P("data"))), norm_on_one_device("layer_norm")[0][0])


# --- linear cross-entropy ---------------------------------------------------------------------

CE_SHAPE, CE_VOCAB = (8, 6, 16), 40


@functools.cache
def cross_entropy_inputs():
  keys = jax.random.split(jax.random.key(4), 4)
  labels = jax.random.randint(keys[2], CE_SHAPE[:-1], -1, CE_VOCAB)  # some ignored
  return (
    jax.random.normal(keys[0], CE_SHAPE),
    0.3 * jax.random.normal(keys[1], (CE_SHAPE[-1], CE_VOCAB)),
    labels,
    0.1 * jax.random.normal(keys[3], (CE_VOCAB,)),
  )


def cross_entropy_outputs(x, weight, labels, bias, reduction="mean"):
  def loss(x, weight, bias):
    losses = jfused.linear_cross_entropy(
      x, weight, labels, bias=bias, reduction=reduction, z_loss=1e-3, implementation=KERNELS
    )
    return jnp.sum(jnp.sin(losses)), losses

  (_, losses), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(x, weight, bias)
  return losses, grads


@functools.cache
def cross_entropy_on_one_device(reduction):
  return on_one_device(
    functools.partial(cross_entropy_outputs, reduction=reduction), *cross_entropy_inputs()
  )


def sharded_cross_entropy_inputs(token_spec, weight_spec=None, mesh=MESH):
  x, weight, labels, bias = cross_entropy_inputs()
  return (
    put(x, token_spec, mesh),
    put(weight, weight_spec or P(), mesh),
    put(labels, token_spec, mesh),
    put(bias, P(), mesh),
  )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("spec", [P("data"), P("data", "model")], ids=["tokens", "tokens_2d"])
def test_cross_entropy_runs_per_token_shard_without_gathering(reduction, spec):
  run = functools.partial(cross_entropy_outputs, reduction=reduction)
  (losses, grads), hlo = compile_and_run(run, *sharded_cross_entropy_inputs(spec))
  # dweight and dbias are summed over every device's tokens: they match one device.
  assert_close((losses, grads), cross_entropy_on_one_device(reduction))
  counts = collectives(hlo)
  assert counts["all-gather"] == counts["all-to-all"] == counts["collective-permute"] == 0, counts
  assert grads[0].sharding.is_equivalent_to(NamedSharding(MESH, spec), 3), grads[0].sharding


def test_cross_entropy_gathers_a_vocabulary_sharded_weight():
  inputs = sharded_cross_entropy_inputs(P("data"), P(None, "model"))
  (losses, grads), hlo = compile_and_run(cross_entropy_outputs, *inputs)
  assert_close((losses, grads), cross_entropy_on_one_device("mean"))
  assert collectives(hlo)["all-gather"] > 0


def test_cross_entropy_under_explicit_mesh_axes():
  inputs = sharded_cross_entropy_inputs(P("data", "model"), mesh=EXPLICIT_MESH)
  (losses, grads), hlo = compile_and_run(
    functools.partial(cross_entropy_outputs, reduction="none"), *inputs
  )
  assert_close((losses, grads), cross_entropy_on_one_device("none"))
  assert losses.sharding.spec == P("data", "model")
  assert collectives(hlo)["all-gather"] == 0, collectives(hlo)


# --- flax_layers.GPT training ----------------------------------------------------------------

GPT_BATCH, GPT_LENGTH = 8, 16


def make_gpt():
  return flax_layers.GPT(
    64,
    1,
    32,
    4,
    max_length=GPT_LENGTH,
    num_kv_heads=2,
    norm="rms_norm",
    activation="swiglu",
    attention_implementation=KERNELS,
    norm_implementation=KERNELS,
    loss_implementation=KERNELS,
    rngs=nnx.Rngs(0),
  )


def head_parallel_spec(path, leaf) -> P:
  """Attention projections split over heads on "model"; every other parameter replicated."""
  names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
  if "attention" in names:
    layer, kind = names[names.index("attention") + 1], names[names.index("attention") + 2]
    if layer in ("query", "key", "value"):  # kernel [D, N, H], bias [N, H]
      return P(None, "model", None) if kind == "kernel" else P("model", None)
    if layer == "out" and kind == "kernel":  # [N, H, D]
      return P("model", None, None)
  return P()


def train(model, tokens, steps=3):
  """Losses of `steps` AdamW steps, the first step's gradients, and the step's compiled HLO."""
  optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  if isinstance(tokens.sharding, NamedSharding):  # Optimizer state made on one device: replicate.
    state = jax.tree.map(
      lambda x: x if isinstance(x.sharding, NamedSharding) else put(x, P()), state
    )

  def step(state, tokens):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda model: flax_layers.next_token_loss(model, tokens))(
      model
    )
    optimizer.update(model, grads)
    return loss, grads, nnx.state((model, optimizer))

  # The state keeps its shardings from step to step, so one compiled program serves them all.
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  compiled = (
    jax.jit(step, out_shardings=(None, None, state_shardings)).lower(state, tokens).compile()
  )
  losses, first_grads = [], None
  for _ in range(steps):
    loss, grads, state = compiled(state, tokens)
    losses.append(float(loss))
    first_grads = grads if first_grads is None else first_grads
  return losses, first_grads, compiled.as_text()


@functools.cache
def gpt_tokens():
  return jax.random.randint(jax.random.key(1), (GPT_BATCH, GPT_LENGTH), 0, 64)


@functools.cache
def gpt_on_one_device():
  with jax.default_device(CPU[0]):
    losses, grads, _ = train(make_gpt(), jax.device_put(gpt_tokens(), CPU[0]))
  return losses, grads


@pytest.mark.parametrize("parallel", ["data", "data_and_heads"])
def test_gpt_trains_sharded_like_one_device(parallel):
  model = make_gpt()
  spec = head_parallel_spec if parallel == "data_and_heads" else lambda path, leaf: P()
  nnx.update(
    model,
    jax.tree_util.tree_map_with_path(
      lambda path, leaf: put(leaf, spec(path, leaf)), nnx.state(model, nnx.Param)
    ),
  )
  losses, grads, hlo = train(model, put(gpt_tokens(), P("data")))
  expected_losses, expected_grads = gpt_on_one_device()
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  assert_close(grads, expected_grads)
  assert collectives(hlo)["all-gather"] == 0, collectives(hlo)


# --- on real GPUs (skipped without two) ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("shard", ["batch", "heads"])
def test_kernels_run_per_gpu_without_gathering(shard):
  gpus = jax.devices("gpu")
  if len(gpus) < 2:
    pytest.skip("needs two or more GPUs")
  mesh = jax.make_mesh((len(gpus),), ("gpus",), axis_types=(AxisType.Auto,), devices=gpus)
  keys = jax.random.split(jax.random.key(9), 5)
  batch, heads = 2 * len(gpus), 2 * len(gpus)
  q = jax.random.normal(keys[0], (batch, 512, heads, 128), jnp.bfloat16)
  k, v = (jax.random.normal(key, (batch, 512, heads // 2, 128), jnp.bfloat16) for key in keys[1:3])
  x = jax.random.normal(keys[3], (batch, 512, 1024), jnp.bfloat16)
  scale = 1.0 + 0.1 * jax.random.normal(keys[4], (1024,), jnp.bfloat16)

  def outputs(q, k, v, x, scale):
    def loss(q, k, v, x, scale):
      out = jfused.dot_product_attention(q, k, v, is_causal=True, implementation=KERNELS)
      y = jfused.rms_norm(x, scale, implementation=KERNELS)
      return jnp.sum(jnp.sin(out.astype(jnp.float32))) + jnp.sum(y.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, x, scale)

  heads_spec = P(None, None, "gpus") if shard == "heads" else P("gpus")
  sharded = [
    jax.device_put(a, NamedSharding(mesh, s))
    for a, s in zip((q, k, v, x, scale), (heads_spec, heads_spec, heads_spec, P("gpus"), P()))
  ]
  with config.interpret_mode(False):
    grads, hlo = compile_and_run(outputs, *sharded)
    expected = jax.jit(outputs)(*jax.device_put((q, k, v, x, scale), gpus[0]))
  assert collectives(hlo)["all-gather"] == 0, collectives(hlo)
  for a, e in zip(grads, expected, strict=True):
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=2e-2, atol=2e-2
    )
