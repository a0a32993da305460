"""`mlp_down_projection`: a transformer MLP's tail, `activation(hidden) @ kernel + bias` or
`(activation(gate) * hidden) @ kernel + bias` (GLU: SwiGLU with silu), whose backward
recomputes the activation instead of keeping it.

Differentiated by JAX as written, that tail keeps every intermediate of the activation until
the backward: five [tokens, hidden] arrays for tanh-GELU (its input, the tanh term, its
output and two products) and six for SwiGLU, on top of the projection's own input. In a
transformer block those are the largest activations held, several times the attention's.
Here only the inputs are kept (hidden, gate, kernel and bias): the backward recomputes the
activation elementwise for the kernel's gradient, then makes the activation's gradient in a
second pass once dh exists, and runs the same two matmuls as autodiff. It costs one more
elementwise read of the inputs; the forward writes one output instead of several.

`linear` is the projection feeding it (up, gate) with the same treatment of float32
parameters: both cast them to the compute dtype in the forward and again in the backward,
so no bf16 copy of a weight is held from one to the other.

The matmuls are XLA's (cuBLAS on a GPU): a Pallas matmul carrying the activation in its
prologue would have to beat cuBLAS on the same shapes to pay, so there is one
implementation, XLA.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp

ACTIVATIONS = ("gelu", "silu")


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu(x):
  """The tanh approximation (GPT-2's, and Flax's `nnx.gelu` default), and its derivative."""
  t = jnp.tanh(_GELU_C * (x + _GELU_A * x**3))
  value = 0.5 * x * (1.0 + t)
  slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * x * x)
  return value, slope


def _silu(x):
  sigmoid = jax.nn.sigmoid(x)
  return x * sigmoid, sigmoid * (1.0 + x * (1.0 - sigmoid))


_ACTIVATION_FNS = {"gelu": _gelu, "silu": _silu}


def activated(hidden, gate, activation: str, dh=None):
  """activation(hidden), or activation(gate) * hidden, computed in float32 and returned in
  hidden's dtype; given the cotangent `dh` of that result, also (dhidden, dgate).

  The derivatives are written out rather than left to autodiff, so that XLA makes each
  output in one elementwise pass over the inputs, with no float32 intermediate stored.
  """
  fn = _ACTIVATION_FNS[activation]
  dtype = hidden.dtype
  x = hidden.astype(jnp.float32)
  if gate is None:
    value, slope = fn(x)
    if dh is None:
      return value.astype(dtype)
    return value.astype(dtype), (dh.astype(jnp.float32) * slope).astype(dtype), None
  a, slope = fn(gate.astype(jnp.float32))
  h = (a * x).astype(dtype)
  if dh is None:
    return h
  dh = dh.astype(jnp.float32)
  return h, (dh * a).astype(dtype), (dh * x * slope).astype(gate.dtype)


def _project(h, kernel, bias):
  """h @ kernel + bias in h's dtype (the parameters cast to it, as `nnx.Linear(dtype=)`)."""
  y = lax.dot_general(h, kernel.astype(h.dtype), (((h.ndim - 1,), (0,)), ((), ())))
  if bias is not None:
    # Explicit ranks: strict rank promotion.
    y = y + bias.astype(h.dtype).reshape((1,) * (y.ndim - 1) + bias.shape)
  return y


def _parameter_gradients(x, dout, kernel, bias):
  """The gradients of `_project`'s kernel and bias, summed in float32 and returned in their
  own dtypes."""
  rows = x.reshape(-1, x.shape[-1])
  douts = dout.reshape(-1, dout.shape[-1])
  dkernel = lax.dot_general(
    rows, douts, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )
  dbias = None if bias is None else douts.astype(jnp.float32).sum(0).astype(bias.dtype)
  return dkernel.astype(kernel.dtype), dbias


@jax.custom_vjp
def _linear(x, kernel, bias):
  return _project(x, kernel, bias)


def _linear_fwd(x, kernel, bias):
  return _project(x, kernel, bias), (x, kernel, bias)


def _linear_bwd(residuals, dout):
  x, kernel, bias = residuals
  # Through a barrier with dout, the kernel's cast below is made only once dout exists and
  # cannot be merged with the forward's identical cast, which XLA would otherwise keep alive
  # from one to the other (the Llama-style block's memory report held all three).
  kernel, dout = lax.optimization_barrier((kernel, dout))
  dx = lax.dot_general(dout, kernel.astype(x.dtype), (((dout.ndim - 1,), (1,)), ((), ())))
  return (dx, *_parameter_gradients(x, dout, kernel, bias))


_linear.defvjp(_linear_fwd, _linear_bwd, optimize_remat=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _down_projection(activation, hidden, gate, kernel, bias):
  return _project(activated(hidden, gate, activation), kernel, bias)


def _down_projection_fwd(activation, hidden, gate, kernel, bias):
  out = _down_projection(activation, hidden, gate, kernel, bias)
  return out, (hidden, gate, kernel, bias)


def _down_projection_bwd(activation, residuals, dout):
  hidden, gate, kernel, bias = residuals
  # The order that holds the fewest [tokens, F] arrays at once: the recomputed activation
  # is used by the kernel's gradient and dropped before dh exists, and dh is consumed by
  # the one elementwise pass that makes dhidden (and dgate). Left to itself XLA made dh
  # first and held a float32 [tokens, F] array (H100 memory reports, 2026-12-07/08); the
  # barriers fix the order (the Llama-style block: 617 MiB against 702).
  dkernel, dbias = _parameter_gradients(activated(hidden, gate, activation), dout, kernel, bias)
  # The kernel passes the barrier too: its cast below then cannot be merged with the
  # forward's identical cast, which XLA would otherwise keep alive from one to the other.
  dkernel, dout, kernel = lax.optimization_barrier((dkernel, dout, kernel))
  # The kernel cast to the matmul's dtype again here, not kept from the forward.
  dh = lax.dot_general(dout, kernel.astype(hidden.dtype), (((dout.ndim - 1,), (1,)), ((), ())))
  # hidden and gate pass the barrier too, so that XLA cannot merge the two `activated`
  # passes and keep the first one's float32 slope alive until dh is made.
  dh, hidden, gate = lax.optimization_barrier((dh, hidden, gate))
  _, dhidden, dgate = activated(hidden, gate, activation, dh)
  return dhidden, dgate, dkernel, dbias


_down_projection.defvjp(_down_projection_fwd, _down_projection_bwd, optimize_remat=True)


def _check_floating(op: str, **arrays) -> None:
  """A TypeError naming the first given array (None: not given) that is not floating."""
  for name, a in arrays.items():
    if a is not None and (not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype, jnp.floating)):
      raise TypeError(f"{op}: {name} must be a floating array, got {getattr(a, 'dtype', a)!r}")


def _validate(hidden, kernel, bias, activation, gate):
  if activation not in ACTIVATIONS:
    raise ValueError(
      f"mlp_down_projection: activation must be one of {ACTIVATIONS}, got {activation!r}"
    )
  _check_floating("mlp_down_projection", hidden=hidden, kernel=kernel, gate=gate, bias=bias)
  if gate is not None and gate.dtype != hidden.dtype:
    raise TypeError(
      f"mlp_down_projection: gate must have hidden's dtype {hidden.dtype}, got {gate.dtype}"
    )
  if hidden.ndim < 1 or kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
    raise ValueError(
      "mlp_down_projection: kernel must be [F, out] with F the last axis of hidden "
      f"{tuple(hidden.shape)}, got {tuple(kernel.shape)}"
    )
  if gate is not None and gate.shape != hidden.shape:
    raise ValueError(
      f"mlp_down_projection: gate must have hidden's shape {tuple(hidden.shape)}, "
      f"got {tuple(gate.shape)}"
    )
  if bias is not None and bias.shape != (kernel.shape[1],):
    raise ValueError(
      f"mlp_down_projection: bias must be [{kernel.shape[1]}], got {tuple(bias.shape)}"
    )


def mlp_down_projection(hidden, kernel, bias=None, *, activation: str = "gelu", gate=None):
  """A transformer MLP's activation and down projection, keeping only its inputs for the
  backward.

  Args:
    hidden: [..., F]: the up projection's output.
    kernel: [F, out], as `nnx.Linear`'s kernel.
    bias: optional [out].
    activation: "gelu" (tanh approximation, GPT-2) or "silu".
    gate: optional [..., F]: a gated linear unit's gate projection; the activation then
      applies to it and multiplies `hidden` (SwiGLU with "silu", GeGLU with "gelu").

  hidden and gate share one floating dtype, the matmul's. kernel and bias may be of another
  (float32 parameters with bf16 compute): they are cast to it, as `nnx.Linear(dtype=...)`
  does, and cast again in the backward rather than kept; their gradients come back in their
  own dtype, summed in float32. The activation is computed in float32 and rounded to
  hidden's dtype before the matmul.

  Returns:
    [..., out] in hidden's dtype: `activation(hidden) @ kernel + bias`, or
    `(activation(gate) * hidden) @ kernel + bias`.

  Example:
    >>> out = jfused.mlp_down_projection(up, w_down, activation="silu", gate=gate)
  """
  _validate(hidden, kernel, bias, activation, gate)
  return _down_projection(activation, hidden, gate, kernel, bias)


def linear(x, kernel, bias=None):
  """`x @ kernel + bias` in x's dtype, as `nnx.Linear(dtype=x.dtype)` computes it, whose
  backward casts the kernel to x's dtype again where it uses it instead of keeping the
  forward's cast: with float32 parameters and bf16 compute, no bf16 copy of the weight is
  held from the forward to the backward (the MLP's projections with
  `recompute_activation`).

  Args:
    x: [..., in], a floating array.
    kernel: [in, out], a floating array of any width, as `nnx.Linear`'s kernel.
    bias: optional [out].

  Returns:
    [..., out] in x's dtype. The kernel's and bias's gradients come back in their own
    dtypes, summed in float32.
  """
  _check_floating("linear", x=x, kernel=kernel, bias=bias)
  if x.ndim < 1 or kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
    raise ValueError(
      f"linear: kernel must be [in, out] with in the last axis of x {tuple(x.shape)}, "
      f"got {tuple(kernel.shape)}"
    )
  if bias is not None and bias.shape != (kernel.shape[1],):
    raise ValueError(f"linear: bias must be [{kernel.shape[1]}], got {tuple(bias.shape)}")
  return _linear(x, kernel, bias)
