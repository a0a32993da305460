"""`feed_forward`: a transformer's whole MLP, `down(activation(up(x)))` or
`down(activation(gate(x)) * up(x))`, whose backward runs in token chunks.

Differentiated as written, the MLP's backward holds several [tokens, hidden] arrays at once:
the up projection's output kept from the forward (and the gate's), the down projection's
input gradient, the recomputed activation and the up projection's output gradient (twice for
a gated unit). In a transformer block those are the largest buffers of the whole step, four
times the width of everything else. Here the forward keeps only x and the projections'
outputs, and the backward walks the tokens in `backward_chunks` slices: each slice's
[chunk, hidden] arrays are made, used by the slice's matmuls and dropped before the next, so
the backward's extra memory is one slice's instead of the whole batch's. The weight and bias
gradients accumulate over the slices in float32 (more exact than one rounded product) and
come back in each parameter's own dtype; the parameters are cast to x's dtype for the
matmuls, as `nnx.Linear` does with `dtype=`, so the caller passes its float32 parameters
as they are and no rounded gradient copy is made.

The matmuls are XLA's (cuBLAS on a GPU); the slices are large enough (thousands of tokens)
that each still runs at cuBLAS's full rate.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp

from jfused.mlp.api import ACTIVATIONS, activated

DEFAULT_BACKWARD_CHUNKS = 4


def _matmul(a, b, contract_a, contract_b, dtype=None):
  return lax.dot_general(
    a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=dtype
  )


def _rows(a):
  return a.reshape(-1, a.shape[-1])


def _linear(x, kernel, bias):
  y = _matmul(x, kernel.astype(x.dtype), x.ndim - 1, 0)
  if bias is not None:
    y = y + bias.astype(x.dtype).reshape((1,) * (y.ndim - 1) + bias.shape)  # Strict ranks.
  return y


def _projections(x, params):
  """The up (and gate) projections' outputs, both in x's dtype."""
  hidden = _linear(x, params["up_kernel"], params["up_bias"])
  gate = None
  if params["gate_kernel"] is not None:
    gate = _linear(x, params["gate_kernel"], params["gate_bias"])
  return hidden, gate


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _feed_forward(activation, chunks, x, params):
  hidden, gate = _projections(x, params)
  h = activated(hidden, gate, activation)
  return _linear(h, params["down_kernel"], params["down_bias"])


def _feed_forward_fwd(activation, chunks, x, params):
  hidden, gate = _projections(x, params)
  out = _linear(activated(hidden, gate, activation), params["down_kernel"], params["down_bias"])
  return out, (x, hidden, gate, params)


def _slice_gradients(activation, kernels, x, hidden, gate, dout):
  """One token slice's input gradient and its float32 parameter gradient terms;
  `kernels` are the weights already cast to x's dtype."""
  f32 = jnp.float32
  dh = _matmul(dout, kernels["down_kernel"], dout.ndim - 1, 1)  # In x's dtype, as autodiff's.
  h, dhidden, dgate = activated(hidden, gate, activation, dh)
  terms = {
    "down_kernel": _matmul(_rows(h), _rows(dout), 0, 0, f32),
    "up_kernel": _matmul(_rows(x), _rows(dhidden), 0, 0, f32),
    "down_bias": _rows(dout).astype(f32).sum(0),
    "up_bias": _rows(dhidden).astype(f32).sum(0),
  }
  if gate is None:
    return _matmul(dhidden, kernels["up_kernel"], dhidden.ndim - 1, 1), terms
  terms["gate_kernel"] = _matmul(_rows(x), _rows(dgate), 0, 0, f32)
  terms["gate_bias"] = _rows(dgate).astype(f32).sum(0)
  # The two products summed in float32 before the one rounding to x's dtype.
  dx = _matmul(dhidden, kernels["up_kernel"], dhidden.ndim - 1, 1, f32)
  dx = dx + _matmul(dgate, kernels["gate_kernel"], dgate.ndim - 1, 1, f32)
  return dx.astype(x.dtype), terms


def _feed_forward_bwd(activation, chunks, residuals, dout):
  x, hidden, gate, params = residuals
  axis = x.ndim - 2  # The token axis walked: the sequence of [..., T, D], or N of [N, D].
  length = x.shape[axis]
  size = length // chunks
  present = {name: p for name, p in params.items() if p is not None}
  sums = {name: jnp.zeros(p.shape, jnp.float32) for name, p in present.items()}
  # Cast once, outside the loop: every slice reads the same weights.
  kernels = {name: p.astype(x.dtype) for name, p in present.items() if name.endswith("kernel")}

  def slice_step(start, width, carry):
    dx, sums = carry
    take = functools.partial(
      lax.dynamic_slice_in_dim, start_index=start, slice_size=width, axis=axis
    )
    gate_slice = None if gate is None else take(gate)
    dx_slice, terms = _slice_gradients(
      activation, kernels, take(x), take(hidden), gate_slice, take(dout)
    )
    dx = lax.dynamic_update_slice_in_dim(dx, dx_slice, start, axis)
    return dx, {name: sums[name] + terms[name] for name in sums}

  carry = (jnp.zeros_like(x), sums)
  carry = lax.fori_loop(0, chunks, lambda i, c: slice_step(i * size, size, c), carry)
  if length > chunks * size:  # The tokens left when the chunks do not divide the axis.
    carry = slice_step(chunks * size, length - chunks * size, carry)
  dx, sums = carry
  grads = {name: None if p is None else sums[name].astype(p.dtype) for name, p in params.items()}
  return dx, grads


_feed_forward.defvjp(_feed_forward_fwd, _feed_forward_bwd, optimize_remat=True)


def _validate(x, params, activation, backward_chunks):
  if activation not in ACTIVATIONS:
    raise ValueError(f"feed_forward: activation must be one of {ACTIVATIONS}, got {activation!r}")
  if isinstance(backward_chunks, bool) or not isinstance(backward_chunks, int):
    raise TypeError(f"feed_forward: backward_chunks must be an int, got {backward_chunks!r}")
  if backward_chunks < 1:
    raise ValueError(f"feed_forward: backward_chunks must be at least 1, got {backward_chunks}")
  named = [("x", x)] + [(name, p) for name, p in params.items() if p is not None]
  for name, a in named:
    if not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype, jnp.floating):
      raise TypeError(
        f"feed_forward: {name} must be a floating array, got {getattr(a, 'dtype', a)!r}"
      )
  if x.ndim < 2:
    raise ValueError(f"feed_forward: x must be [..., tokens, D], got shape {tuple(x.shape)}")
  features = x.shape[-1]
  up = params["up_kernel"]
  if up.ndim != 2 or up.shape[0] != features:
    raise ValueError(
      f"feed_forward: up_kernel must be [D, F] with D={features} (x's last axis), "
      f"got {tuple(up.shape)}"
    )
  hidden_features = up.shape[1]
  expected = {
    "gate_kernel": (features, hidden_features),
    "down_kernel": (hidden_features, features),
    "up_bias": (hidden_features,),
    "gate_bias": (hidden_features,),
    "down_bias": (features,),
  }
  for name, shape in expected.items():
    if params[name] is not None and params[name].shape != shape:
      raise ValueError(
        f"feed_forward: {name} must be {list(shape)}, got {tuple(params[name].shape)}"
      )
  if params["gate_bias"] is not None and params["gate_kernel"] is None:
    raise ValueError("feed_forward: gate_bias needs gate_kernel")


def feed_forward(
  x,
  up_kernel,
  down_kernel,
  *,
  up_bias=None,
  down_bias=None,
  gate_kernel=None,
  gate_bias=None,
  activation: str = "gelu",
  backward_chunks: int = DEFAULT_BACKWARD_CHUNKS,
):
  """A transformer MLP whose backward runs in token slices, holding one slice's [tokens,
  hidden] arrays at a time instead of the whole batch's.

  Args:
    x: [..., T, D]; its dtype is the matmuls' (the parameters are cast to it, as
      `nnx.Linear(dtype=x.dtype)` does).
    up_kernel: [D, F], as `nnx.Linear`'s kernel; down_kernel: [F, D].
    up_bias, down_bias: optional [F] and [D].
    gate_kernel, gate_bias: a gated linear unit's gate projection, [D, F] and optional [F]:
      the activation then applies to the gate and multiplies the up projection (SwiGLU with
      "silu", GeGLU with "gelu").
    activation: "gelu" (tanh approximation, GPT-2's) or "silu".
    backward_chunks: how many slices of the T axis the backward walks (the last takes the
      remainder when they do not divide T). 1 is the unchunked backward.

  Returns:
    [..., T, D] in x's dtype: `act(x @ up + up_bias) @ down + down_bias`, or
    `(act(x @ gate + gate_bias) * (x @ up + up_bias)) @ down + down_bias`. Gradients come back
    in each argument's dtype, the parameters' summed over the slices in float32.

  Example:
    >>> y = jfused.feed_forward(x, w_up, w_down, gate_kernel=w_gate, activation="silu")
  """
  params = dict(
    up_kernel=up_kernel,
    up_bias=up_bias,
    gate_kernel=gate_kernel,
    gate_bias=gate_bias,
    down_kernel=down_kernel,
    down_bias=down_bias,
  )
  _validate(x, params, activation, backward_chunks)
  chunks = min(backward_chunks, x.shape[-2]) if x.shape[-2] else 1
  return _feed_forward(activation, chunks, x, params)
