"""jfused.feed_forward against JAX's autodiff of the MLP as Flax writes it: forward and
gradients in every dtype and over token slices that do or do not divide the sequence, what
the forward keeps, mixed precision, transforms, bad arguments, lowering, and the Flax MLP on
it."""

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
NAMES = ("up_kernel", "down_kernel", "up_bias", "down_bias", "gate_kernel", "gate_bias")


def reference(x, params, activation):
  """The MLP as Flax writes it (`nnx.Linear`s with dtype=x.dtype), differentiated by JAX."""
  fn = {"gelu": lambda a: jax.nn.gelu(a, approximate=True), "silu": jax.nn.silu}[activation]

  def linear(a, kernel, bias):
    y = a @ kernel.astype(a.dtype)
    if bias is None:
      return y
    return y + bias.astype(a.dtype).reshape((1,) * (y.ndim - 1) + bias.shape)

  hidden = linear(x, params["up_kernel"], params.get("up_bias"))
  if "gate_kernel" in params:
    hidden = fn(linear(x, params["gate_kernel"], params.get("gate_bias"))) * hidden
  else:
    hidden = fn(hidden)
  return linear(hidden, params["down_kernel"], params.get("down_bias"))


def make_inputs(leading, features, hidden, dtype, *, gated, with_bias, param_dtype=None, seed=0):
  param_dtype = param_dtype or dtype
  keys = iter(jax.random.split(jax.random.key(seed), 8))
  x = jax.random.normal(next(keys), (*leading, features), dtype)

  def weight(shape):
    return (jax.random.normal(next(keys), shape) / shape[0] ** 0.5).astype(param_dtype)

  def bias(size):
    return (0.5 * jax.random.normal(next(keys), (size,))).astype(param_dtype)

  params = {"up_kernel": weight((features, hidden)), "down_kernel": weight((hidden, features))}
  if gated:
    params["gate_kernel"] = weight((features, hidden))
  if with_bias:
    params.update(up_bias=bias(hidden), down_bias=bias(features))
    if gated:
      params["gate_bias"] = bias(hidden)
  return x, params


def ours(activation, chunks):
  def fn(x, params):
    return jfused.feed_forward(x, activation=activation, backward_chunks=chunks, **params)

  return fn


def outputs_and_grads(fn, x, params):
  """fn's output and the gradients of a non-linear loss of it for x and every parameter."""

  def loss(x, params):
    out = fn(x, params)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, params)
  return out, grads


CASES = [
  # (leading shape [..., T], D, F, activation, gated, bias, backward chunks): T of 11 in 4
  # slices leaves 3 tokens for a last, wider step; more chunks than tokens; no chunking.
  ((2, 11), 24, 40, "gelu", False, True, 4),
  ((3, 8), 16, 36, "silu", True, False, 4),
  ((2, 1, 7), 8, 20, "gelu", True, True, 3),
  ((5, 16), 12, 52, "silu", False, False, 1),
  ((2, 3), 4, 8, "silu", True, True, 8),
]


@pytest.mark.parametrize(
  "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__
)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_autodiff_of_the_formula(case, dtype):
  leading, features, hidden, activation, gated, with_bias, chunks = case
  x, params = make_inputs(leading, features, hidden, dtype, gated=gated, with_bias=with_bias)
  actual, grads = outputs_and_grads(ours(activation, chunks), x, params)
  same, grads_same = outputs_and_grads(lambda x, p: reference(x, p, activation), x, params)
  with jax.default_matmul_precision("highest"):
    x32, params32 = jax.tree.map(lambda a: a.astype(jnp.float32), (x, params))
    ref32, grads32 = outputs_and_grads(lambda x, p: reference(x, p, activation), x32, params32)
  assert actual.dtype == jnp.dtype(dtype) and actual.shape == x.shape
  floors = dict(relative_floor=RELATIVE_FLOOR)
  assert_close_three_way(f"{case} out", actual, same, ref32, dtype, **floors)
  (dx, dparams), (dx_same, dparams_same), (dx32, dparams32) = grads, grads_same, grads32
  assert set(dparams) == set(params)
  named = [("x", dx, dx_same, dx32)]
  named += [(name, dparams[name], dparams_same[name], dparams32[name]) for name in params]
  for name, grad, grad_same, grad32 in named:
    assert grad.dtype == jnp.dtype(dtype) and grad.shape == grad32.shape, name
    assert_close_three_way(f"{case} d{name}", grad, grad_same, grad32, dtype, **floors)


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_float32_parameters_with_bfloat16_compute(gated):
  """Float32 parameters with bf16 x (a model's mixed precision): the matmuls run in bf16,
  the parameter gradients come back in float32, summed over the slices in float32, within
  bf16 rounding of the float32 reference's."""
  x, params = make_inputs(
    (2, 13), 16, 48, jnp.bfloat16, gated=gated, with_bias=True, param_dtype=jnp.float32
  )
  activation = "silu" if gated else "gelu"
  actual, (dx, dparams) = outputs_and_grads(ours(activation, 4), x, params)
  same, (dx_same, dparams_same) = outputs_and_grads(
    lambda x, p: reference(x, p, activation), x, params
  )
  with jax.default_matmul_precision("highest"):
    ref32, (dx32, dparams32) = outputs_and_grads(
      lambda x, p: reference(x, p, activation), x.astype(jnp.float32), params
    )
  floors = dict(relative_floor=RELATIVE_FLOOR)
  assert actual.dtype == dx.dtype == jnp.bfloat16
  assert_close_three_way("out", actual, same, ref32, jnp.bfloat16, **floors)
  assert_close_three_way("dx", dx, dx_same, dx32, jnp.bfloat16, **floors)
  for name in params:
    assert dparams[name].dtype == jnp.float32, name
    assert_close_three_way(
      f"d{name}", dparams[name], dparams_same[name], dparams32[name], jnp.bfloat16, **floors
    )


def test_slices_change_only_rounding():
  """In float32 the backward's slicing is a regrouping of sums: gradients of 1, 2, 5 and 9
  slices of 9 tokens agree to float32 rounding."""
  x, params = make_inputs((3, 9), 8, 24, jnp.float32, gated=True, with_bias=True)
  results = [outputs_and_grads(ours("silu", c), x, params)[1] for c in (1, 2, 5, 9)]
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True], ids=["gelu", "swiglu"])
def test_forward_keeps_x_and_the_projections_only(gated):
  """Autodiff of the formula keeps several [..., F] intermediates (5 for GELU, 6 for
  SwiGLU); the op keeps the up projection's output (and the gate's), nothing else as wide."""
  x, params = make_inputs((4, 8), 16, 32, jnp.bfloat16, gated=gated, with_bias=True)
  wide = (4, 8, 32)

  def kept(fn):
    _, vjp_fn = jax.vjp(fn, x, params)  # A pytree whose leaves are the residuals kept.
    return sum(1 for a in jax.tree.leaves(vjp_fn) if a.shape == wide)

  activation = "silu" if gated else "gelu"
  assert kept(ours(activation, 4)) == (2 if gated else 1)
  assert kept(lambda x, p: reference(x, p, activation)) >= (6 if gated else 5)


def test_jit_vmap_and_remat_compose():
  x, params = make_inputs((3, 6), 8, 24, jnp.float32, gated=True, with_bias=True)

  def loss(x, params):
    return jnp.sum(ours("silu", 4)(x, params) ** 2)

  plain = jax.grad(loss, argnums=(0, 1))(x, params)
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1)))(x, params)
  # vmap over a batch axis in front: each sequence on its own, the parameters shared.
  mapped_dx = jax.vmap(jax.grad(loss), in_axes=(0, None))(x[:, None], params)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(plain[0], mapped_dx.reshape(x.shape), rtol=1e-5, atol=1e-6)


GOOD = make_inputs((2, 4), 8, 6, jnp.float32, gated=True, with_bias=True)


@pytest.mark.parametrize(
  "overrides, error, words",
  [
    ({"activation": "relu"}, ValueError, "activation"),
    ({"backward_chunks": 0}, ValueError, "backward_chunks"),
    ({"backward_chunks": 2.0}, TypeError, "backward_chunks"),
    ({"backward_chunks": True}, TypeError, "backward_chunks"),
    ({"x": jnp.zeros((2, 4, 8), jnp.int32)}, TypeError, "x"),
    ({"x": jnp.zeros((8,))}, ValueError, "x"),
    ({"up_kernel": jnp.zeros((9, 6))}, ValueError, "up_kernel"),
    ({"up_kernel": jnp.zeros((8,))}, ValueError, "up_kernel"),
    ({"down_kernel": jnp.zeros((6, 9))}, ValueError, "down_kernel"),
    ({"gate_kernel": jnp.zeros((8, 5))}, ValueError, "gate_kernel"),
    ({"gate_kernel": None}, ValueError, "gate_bias"),
    ({"up_bias": jnp.zeros((8,))}, ValueError, "up_bias"),
    ({"down_bias": jnp.zeros((6,))}, ValueError, "down_bias"),
    ({"down_bias": jnp.zeros((8,), jnp.int32)}, TypeError, "down_bias"),
  ],
)
def test_bad_arguments_raise(overrides, error, words):
  x, params = GOOD
  args = dict(x=x, **params, activation="silu", backward_chunks=2)
  args.update(overrides)
  with pytest.raises(error, match=words):
    jfused.feed_forward(**args)


@pytest.mark.parametrize("chunks, matmuls", [(1, 3 + 6), (4, 3 + 6), (3, 3 + 2 * 6)])
def test_lowers_for_cuda_with_one_loop_of_slices(chunks, matmuls):
  """Exported for CUDA, the gradient runs the forward's three matmuls and one loop whose
  body holds a slice's six (dh, three weight gradients, two input gradient products); 64
  tokens in 3 slices of 21 leave one token, whose step repeats the six after the loop."""
  x, params = make_inputs((2, 64), 128, 256, jnp.bfloat16, gated=True, with_bias=False)

  def grads(x, params):
    def loss(x, params):
      return jnp.sin(ours("silu", chunks)(x, params).astype(jnp.float32)).sum()

    return jax.grad(loss, argnums=(0, 1))(x, params)

  text = export_for_h100(grads, x, params)
  assert text.count("stablehlo.dot_general") == matmuls
  assert text.count("stablehlo.while") == 1


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_flax_mlp_matches_flax_layers_in_mixed_precision(activation):
  """The MLP on feed_forward against Flax's layers (the default) on the same float32
  parameters with bfloat16 compute: same parameter tree, outputs and gradients within bf16
  rounding."""
  options = dict(activation=activation, dtype=jnp.bfloat16)
  fused = MLP(32, 72, backward_chunks=4, rngs=nnx.Rngs(0), **options)
  plain = MLP(32, 72, rngs=nnx.Rngs(1), **options)
  nnx.update(plain, nnx.state(fused))
  x = jax.random.normal(jax.random.key(3), (2, 10, 32), jnp.float32)

  def run(model):
    def loss(model, x):
      y = model(x)
      return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

    (_, y), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return y, grads

  (y1, g1), (y2, g2) = run(fused), run(plain)
  assert y1.dtype == y2.dtype == jnp.bfloat16
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  for a, b in zip(jax.tree.leaves((y1, g1)), jax.tree.leaves((y2, g2)), strict=True):
    assert a.dtype == b.dtype
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.max(np.abs(a - b)) <= 2e-2 * max(1.0, np.max(np.abs(b)))


def test_flax_mlp_refuses_both_backward_options():
  with pytest.raises(ValueError, match="recompute_activation and backward_chunks"):
    MLP(8, 16, recompute_activation=True, backward_chunks=2, rngs=nnx.Rngs(0))
