"""jfused.mlp_down_projection against plain JAX autodiff of the same formula: forward and
gradients in every dtype, what its backward keeps, transforms, bad arguments, lowering, and
the Flax MLP on it against Flax's own layers."""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_layers.transformer import MLP
import jfused
from tests.closeness import assert_close_three_way
from tests.cuda_lowering import export_for_h100

RELATIVE_FLOOR = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def reference(hidden, kernel, bias, activation, gate):
  """The formula as Flax writes it, differentiated by JAX (every intermediate kept)."""
  fn = {"gelu": lambda x: jax.nn.gelu(x, approximate=True), "silu": jax.nn.silu}[activation]
  h = fn(hidden) if gate is None else fn(gate) * hidden
  y = h @ kernel
  return y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + bias.shape)


def make_inputs(leading, features, out, dtype, *, gated, with_bias, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(keys[0], (*leading, features), dtype)
  gate = jax.random.normal(keys[1], hidden.shape, dtype) if gated else None
  kernel = (jax.random.normal(keys[2], (features, out)) / features**0.5).astype(dtype)
  bias = jax.random.normal(keys[3], (out,), dtype) if with_bias else None
  return hidden, kernel, bias, gate


def outputs_and_grads(fn, hidden, kernel, bias, gate):
  """fn's output and the gradients of a non-linear loss of it, for every array given."""
  arrays = {"hidden": hidden, "kernel": kernel, "bias": bias, "gate": gate}
  given = {name: x for name, x in arrays.items() if x is not None}

  def loss(given):
    merged = {**arrays, **given}
    out = fn(merged["hidden"], merged["kernel"], merged["bias"], merged["gate"])
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(given)
  return out, grads


CASES = [
  # (leading shape, F, out, activation, gated, bias): F and out not multiples of anything.
  ((7,), 13, 5, "gelu", False, True),
  ((3, 5), 96, 24, "silu", True, False),
  ((2, 3, 4), 40, 17, "gelu", True, True),
  ((1,), 1, 1, "silu", False, False),
]


@pytest.mark.parametrize(
  "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__
)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_autodiff_of_the_formula(case, dtype):
  leading, features, out, activation, gated, with_bias = case
  inputs = make_inputs(leading, features, out, dtype, gated=gated, with_bias=with_bias)

  def ours(hidden, kernel, bias, gate):
    return jfused.mlp_down_projection(hidden, kernel, bias, activation=activation, gate=gate)

  def theirs(hidden, kernel, bias, gate):
    return reference(hidden, kernel, bias, activation, gate)

  actual, grads = outputs_and_grads(ours, *inputs)
  same, grads_same = outputs_and_grads(theirs, *inputs)
  with jax.default_matmul_precision("highest"):
    inputs32 = [None if x is None else x.astype(jnp.float32) for x in inputs]
    ref32, grads32 = outputs_and_grads(theirs, *inputs32)
  assert actual.dtype == jnp.dtype(dtype) and actual.shape == (*leading, out)
  floors = dict(relative_floor=RELATIVE_FLOOR)
  assert_close_three_way(f"{case} out", actual, same, ref32, dtype, **floors)
  assert set(grads) == set(grads32)
  for name in grads:
    assert grads[name].dtype == jnp.dtype(dtype) and grads[name].shape == grads32[name].shape
    assert_close_three_way(
      f"{case} d{name}", grads[name], grads_same[name], grads32[name], dtype, **floors
    )


@pytest.mark.parametrize("activation, gated", [("gelu", False), ("silu", True)])
def test_backward_keeps_only_the_inputs(activation, gated):
  """Autodiff of the formula keeps 5 (GELU) or 6 (SwiGLU) [..., F] intermediates; the op
  keeps hidden (and gate) only."""
  hidden, kernel, bias, gate = make_inputs(
    (4, 8), 32, 16, jnp.bfloat16, gated=gated, with_bias=True
  )
  wide = hidden.shape

  def kept(fn):
    # jax.vjp's function is a pytree whose leaves are the residuals it keeps.
    _, vjp_fn = jax.vjp(fn, hidden, kernel, bias, gate)
    return sum(1 for x in jax.tree.leaves(vjp_fn) if x.shape == wide)

  ours = kept(lambda h, k, b, g: jfused.mlp_down_projection(h, k, b, activation=activation, gate=g))
  theirs = kept(lambda h, k, b, g: reference(h, k, b, activation, g))
  assert ours == (2 if gated else 1)
  assert theirs >= (6 if gated else 5)


def test_jit_vmap_and_remat_compose():
  hidden, kernel, bias, gate = make_inputs((3, 6), 24, 8, jnp.float32, gated=True, with_bias=True)

  def loss(hidden, gate):
    out = jfused.mlp_down_projection(hidden, kernel, bias, activation="silu", gate=gate)
    return jnp.sum(out**2)

  plain = jax.grad(loss, argnums=(0, 1))(hidden, gate)
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(hidden, gate)
  # vmap over the leading axis: each row on its own.
  mapped = jax.vmap(jax.grad(loss, argnums=(0, 1)))(hidden[:, None], gate[:, None])
  for a, b, c in zip(plain, remat, mapped, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a, c.reshape(a.shape), rtol=1e-6, atol=1e-6)


GOOD = make_inputs((2, 4), 8, 3, jnp.float32, gated=True, with_bias=True)


@pytest.mark.parametrize(
  "overrides, error, words",
  [
    ({"activation": "relu"}, ValueError, "activation"),
    ({"hidden": jnp.zeros((2, 4, 8), jnp.int32)}, TypeError, "hidden"),
    ({"gate": jnp.zeros((2, 4, 8), jnp.bfloat16)}, TypeError, "gate must have hidden's dtype"),
    ({"kernel": jnp.zeros((8, 3), jnp.int32)}, TypeError, "kernel"),
    ({"kernel": jnp.zeros((9, 3))}, ValueError, "kernel"),
    ({"kernel": jnp.zeros((8,))}, ValueError, "kernel"),
    ({"gate": jnp.zeros((2, 5, 8))}, ValueError, "gate"),
    ({"bias": jnp.zeros((4,))}, ValueError, "bias"),
    ({"bias": jnp.zeros((3,), jnp.int32)}, TypeError, "bias"),
  ],
)
def test_bad_arguments_raise(overrides, error, words):
  hidden, kernel, bias, gate = GOOD
  args = dict(hidden=hidden, kernel=kernel, bias=bias, gate=gate, activation="silu")
  args.update(overrides)
  with pytest.raises(error, match=words):
    jfused.mlp_down_projection(
      args["hidden"], args["kernel"], args["bias"], activation=args["activation"], gate=args["gate"]
    )


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_float32_parameters_with_bfloat16_compute(gated):
  """Float32 kernel and bias with bf16 hidden (a model's mixed precision, as nnx.Linear with
  dtype=bfloat16 runs it): the output in bf16, the parameter gradients in float32, all
  within bf16 rounding of the float32 reference; the backward keeps the float32 kernel and
  no bf16 copy of it."""
  hidden, _, _, gate = make_inputs((3, 7), 24, 10, jnp.bfloat16, gated=gated, with_bias=True)
  _, kernel, bias, _ = make_inputs((1,), 24, 10, jnp.float32, gated=False, with_bias=True)
  activation = "silu" if gated else "gelu"

  def ours(hidden, kernel, bias, gate):
    return jfused.mlp_down_projection(hidden, kernel, bias, activation=activation, gate=gate)

  def flax_style(hidden, kernel, bias, gate):  # nnx.Linear: the parameters cast first.
    return reference(
      hidden, kernel.astype(hidden.dtype), bias.astype(hidden.dtype), activation, gate
    )

  actual, grads = outputs_and_grads(ours, hidden, kernel, bias, gate)
  same, grads_same = outputs_and_grads(flax_style, hidden, kernel, bias, gate)
  with jax.default_matmul_precision("highest"):
    inputs32 = [None if a is None else a.astype(jnp.float32) for a in (hidden, kernel, bias, gate)]
    ref32, grads32 = outputs_and_grads(lambda *a: reference(*a[:3], activation, a[3]), *inputs32)
  floors = dict(relative_floor=RELATIVE_FLOOR)
  assert actual.dtype == jnp.bfloat16
  assert_close_three_way("out", actual, same, ref32, jnp.bfloat16, **floors)
  for name in grads:
    want_dtype = jnp.float32 if name in ("kernel", "bias") else jnp.bfloat16
    assert grads[name].dtype == want_dtype, name
    assert_close_three_way(
      f"d{name}", grads[name], grads_same[name], grads32[name], jnp.bfloat16, **floors
    )
  _, vjp_fn = jax.vjp(ours, hidden, kernel, bias, gate)
  kept = [a.dtype for a in jax.tree.leaves(vjp_fn) if a.shape == kernel.shape]
  assert kept == [jnp.float32]


def test_lowers_for_cuda_with_three_matmuls():
  """Exported for CUDA, the gradient runs the forward's matmul and the backward's two (dh,
  dkernel): the activation is recomputed, not a product of a third."""
  hidden, kernel, bias, gate = make_inputs(
    (4, 64), 128, 32, jnp.bfloat16, gated=True, with_bias=True
  )

  def grads(hidden, kernel, bias, gate):
    def loss(*args):
      out = jfused.mlp_down_projection(*args[:3], activation="silu", gate=args[3])
      return jnp.sin(out.astype(jnp.float32)).sum()

    return jax.grad(loss, argnums=(0, 1, 2, 3))(hidden, kernel, bias, gate)

  text = export_for_h100(grads, hidden, kernel, bias, gate)
  assert text.count("stablehlo.dot_general") == 3


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_flax_mlp_matches_flax_layers_in_mixed_precision(activation):
  """The MLP recomputing its activation against Flax's layers (the default) on the same
  float32 parameters with bfloat16 compute: outputs and parameter gradients within bf16
  rounding."""
  options = dict(activation=activation, dtype=jnp.bfloat16)
  fused = MLP(32, 72, recompute_activation=True, rngs=nnx.Rngs(0), **options)
  plain = MLP(32, 72, rngs=nnx.Rngs(1), **options)
  nnx.update(plain, nnx.state(fused))
  x = jax.random.normal(jax.random.key(3), (2, 10, 32), jnp.bfloat16)

  def run(model):
    def loss(model):
      y = model(x)
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return y, grads

  (y1, g1), (y2, g2) = run(fused), run(plain)
  assert y1.dtype == y2.dtype == jnp.bfloat16
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  for a, b in zip(jax.tree.leaves((y1, g1)), jax.tree.leaves((y2, g2)), strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= 2e-2 * max(1.0, np.max(np.abs(b)))
