"""Linear + cross-entropy benchmark: jfused's chunked loss (Triton row kernel and XLA; on
Hopper also the Mosaic statistics kernel's forward) beside the plain XLA loss through the
whole logits, and the bare matmuls of the same FLOPs.

TFLOP/s count the matmuls of the unfused loss: 2*N*D*V for the forward, 4*N*D*V for the
backward, 6*N*D*V for forward+backward (so a recomputing implementation reads lower); the
"temp MiB" column is the compiled program's scratch memory, where the logits would live.
The "matmul" row is the ceiling: x @ W alone (fwd), and with dlogits @ W^T and x^T @ dlogits
(fwd+bwd, the logits standing in for their gradient), in the inputs' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

import jax
import jax.numpy as jnp

import jfused
from jfused import config
from jfused.cli.bench.measure import describe_failure, measure, measure_backward, measured_row

IMPLEMENTATIONS = ("pallas_mosaic", "pallas_triton", "xla_chunked", "xla", "matmul")
# A mean loss's cotangent is one scalar, so these make the gradients in the forward pass of the
# vjp and their backward only scales them: a "bwd" time alone would mislead.
GRADIENTS_IN_FORWARD = ("pallas_triton", "xla_chunked")
PASS_FLOPS = {"fwd": 2.0, "bwd": 4.0, "fwd+bwd": 6.0}


@dataclasses.dataclass(frozen=True)
class LossShape:
  tokens: int
  width: int
  vocab: int
  weight_layout: str = "dv"

  @property
  def name(self) -> str:
    return f"N{self.tokens}_D{self.width}_V{self.vocab}" + (
      "_tied" if self.weight_layout == "vd" else ""
    )


DEFAULT_PRESET = "default"
PRESETS = {
  # 16k tokens through heads of growing width and vocabulary (the last: 16 GiB of float32
  # logits).
  "default": [
    LossShape(16384, 2048, 32768),
    LossShape(16384, 2048, 131072),
    LossShape(16384, 4096, 131072),
    LossShape(16384, 4096, 262144),
  ],
  # Tied tables ([V, D]): LLaMA 3's vocabulary and GPT-2's.
  "tied": [LossShape(16384, 4096, 128256, "vd"), LossShape(16384, 768, 50257, "vd")],
  "quick": [LossShape(64, 32, 1000), LossShape(33, 16, 517, "vd")],
}


def make_inputs(shape: LossShape, dtype, count: int):
  sets = []
  for key in jax.random.split(jax.random.key(0), count):
    k = jax.random.split(key, 3)
    x = jax.random.normal(k[0], (shape.tokens, shape.width), dtype)
    weight_shape = (
      (shape.width, shape.vocab) if shape.weight_layout == "dv" else (shape.vocab, shape.width)
    )
    weight = (jax.random.normal(k[1], weight_shape) / math.sqrt(shape.width)).astype(dtype)
    labels = jax.random.randint(k[2], (shape.tokens,), 0, shape.vocab)
    sets.append((x, weight, labels))
  return sets


def _matmuls(shape: LossShape, with_gradients: bool):
  """The bare matmuls of the loss: logits, and with gradients (dx, dweight) from them."""
  v_axis = 1 if shape.weight_layout == "dv" else 0
  d_axis = 1 - v_axis

  def run(x, weight, labels):
    del labels
    logits = jax.lax.dot_general(x, weight, (((1,), (d_axis,)), ((), ())))
    if not with_gradients:
      return logits
    dx = jax.lax.dot_general(logits, weight, (((1,), (v_axis,)), ((), ())))
    if shape.weight_layout == "dv":
      dweight = jax.lax.dot_general(x, logits, (((0,), (0,)), ((), ())))
    else:
      dweight = jax.lax.dot_general(logits, x, (((0,), (0,)), ((), ())))
    return dx, dweight

  return run


def _loss(shape: LossShape, implementation: str):
  if implementation == "matmul":
    return _matmuls(shape, with_gradients=False)
  return lambda x, weight, labels: jfused.linear_cross_entropy(
    x, weight, labels, weight_layout=shape.weight_layout, implementation=implementation
  )


def unavailable(implementation: str, dtype) -> str | None:
  """Why an implementation is not measured on this machine and dtype, or None."""
  if implementation == "pallas_mosaic":
    if not config.on_hopper():
      return "pallas_mosaic needs a Hopper (sm90) GPU"
    from pallas_kernels.cross_entropy import mosaic  # Mosaic GPU: imported only on Hopper.

    if jnp.dtype(dtype) not in mosaic.SUPPORTED_DTYPES:
      return "pallas_mosaic serves bfloat16 and float16"
  return None


def count_steps(shapes: Sequence[LossShape], implementations: Sequence[str]) -> int:
  """How many times `run` calls `progress`: once per (shape, implementation)."""
  return len(shapes) * len(implementations)


def run(
  shapes: Sequence[LossShape],
  implementations: Sequence[str],
  passes: Sequence[str],
  dtype,
  *,
  quick: bool,
  progress=print,
  rows: list | None = None,
) -> list[dict]:
  """Rows of the table, appended to `rows` as they are measured (see the module docstring)."""
  rows = [] if rows is None else rows
  for shape in shapes:
    inputs = make_inputs(shape, dtype, 2 if quick else 3)
    x, weight, labels = inputs[0]
    with jax.default_matmul_precision("highest"):
      reference = _loss(shape, "xla")(x.astype(jnp.float32), weight.astype(jnp.float32), labels)
    base = {
      "suite": "cross_entropy",
      "shape": shape.name,
      "tokens": shape.tokens,
      "width": shape.width,
      "vocab": shape.vocab,
      "weight_layout": shape.weight_layout,
      "dtype": jnp.dtype(dtype).name,
    }
    for implementation in implementations:
      progress(f"{shape.name} {implementation}")
      cell = {**base, "implementation": implementation}
      reason = unavailable(implementation, dtype)
      if reason is not None:
        rows.extend({**cell, "pass": p, "skipped": reason} for p in passes)
        continue
      loss = _loss(shape, implementation)

      def forward_backward(x, weight, labels, loss=loss):
        return jax.value_and_grad(loss, argnums=(0, 1))(x, weight, labels)

      if implementation == "matmul":
        forward_backward = _matmuls(shape, with_gradients=True)

      def pullback(x, weight, labels, loss=loss):
        value, vjp = jax.vjp(lambda x, weight: loss(x, weight, labels), x, weight)
        return vjp, jnp.ones_like(value)

      programs = {
        "fwd": (measure, loss),
        "fwd+bwd": (measure, forward_backward),
        "bwd": (measure_backward, pullback),
      }
      wanted = list(passes)
      if implementation in (*GRADIENTS_IN_FORWARD, "matmul") and "bwd" in wanted:
        wanted.remove("bwd")
        reason = (
          "the matmul ceiling is measured fwd and fwd+bwd"
          if implementation == "matmul"
          else f"{implementation} makes a mean loss's gradients in its forward pass (see fwd+bwd)"
        )
        rows.append({**cell, "pass": "bwd", "skipped": reason})
      try:
        measured = {p: programs[p][0](programs[p][1], inputs, quick=quick) for p in wanted}
        error = (
          None
          if implementation == "matmul"
          else abs(float(jax.jit(loss)(x, weight, labels)) - float(reference))
        )
      except Exception as failure:  # One failing cell must not end the whole table.
        rows.extend({**cell, "pass": p, "error": describe_failure(failure)} for p in wanted)
        continue
      flops = shape.tokens * shape.width * shape.vocab
      rows.extend(
        measured_row(
          cell,
          name,
          measured[name],
          per_second={"tflops": PASS_FLOPS[name] * flops / 1e12},
          max_error=error,
        )
        for name in wanted
      )
  return rows
