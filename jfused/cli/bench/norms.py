"""LayerNorm / RMSNorm benchmark: jfused's kernels beside XLA.

GB/s count the least memory traffic each pass needs, in multiples of x's size: the forward
reads x and writes y (2); the backward reads x and dy and writes dx (3; the parameter
gradients are negligible); forward+backward does both (5); the residual-add forward reads x
and the residual and writes y and h (4). A jitted elementwise negation of x (read + write)
gives the copy ceiling measured in the same run.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import jax
import jax.numpy as jnp

import jfused
from jfused.cli.bench.measure import describe_failure, measure, measure_backward

IMPLEMENTATIONS = ("pallas_triton", "xla")
PASSES = ("fwd", "bwd", "fwd+bwd")
# Least memory traffic of each pass, in multiples of x's size (the module docstring says why).
PASS_TRAFFIC = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}
DEFAULT_PRESET = "default"
PRESETS = {
  "default": [(16384, 4096), (65536, 1024), (8192, 8192)],
  "quick": [(64, 256), (8, 1000)],
}


@dataclasses.dataclass(frozen=True)
class NormOp:
  name: str
  residual: bool

  def apply(self, implementation, x, residual, scale, bias):
    kwargs = {"implementation": implementation}
    if self.residual:
      kwargs["residual"] = residual
    if self.name.endswith("layer_norm"):
      return jfused.layer_norm(x, scale, bias, **kwargs)
    return jfused.rms_norm(x, scale, **kwargs)


OPS = (
  NormOp("layer_norm", False),
  NormOp("rms_norm", False),
  NormOp("residual+layer_norm", True),
  NormOp("residual+rms_norm", True),
)


def make_inputs(rows: int, width: int, dtype, count: int, param_dtype=jnp.float32):
  """`count` argument sets (x, residual, dy, scale, bias), each from its own key."""
  sets = []
  for key in jax.random.split(jax.random.key(0), count):
    k = jax.random.split(key, 5)
    x, residual, dy = (jax.random.normal(k[i], (rows, width), dtype) for i in range(3))
    scale = (1 + 0.1 * jax.random.normal(k[3], (width,), jnp.float32)).astype(param_dtype)
    bias = (0.1 * jax.random.normal(k[4], (width,), jnp.float32)).astype(param_dtype)
    sets.append((x, residual, dy, scale, bias))
  return sets


def _max_error(op: NormOp, implementation, x, residual, scale, bias) -> float:
  out = jax.jit(lambda *a: op.apply(implementation, *a))(x, residual, scale, bias)
  reference = op.apply("xla", x.astype(jnp.float32), residual.astype(jnp.float32), scale, bias)
  pairs = zip(jax.tree.leaves(out), jax.tree.leaves(reference))
  return max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) for a, b in pairs)


def count_steps(
  shapes: Sequence[tuple[int, int]], implementations: Sequence[str], param_dtype=None
) -> int:
  """How many times `run` calls `progress`: once per (shape, op, implementation)."""
  del param_dtype  # Taken so that `run`'s options pass through unchanged.
  return len(shapes) * len(OPS) * len(implementations)


def run(
  shapes: Sequence[tuple[int, int]],
  implementations: Sequence[str],
  passes: Sequence[str],
  dtype,
  *,
  quick: bool,
  progress=print,
  param_dtype=jnp.float32,
  rows: list | None = None,
) -> list[dict]:
  """Rows of the table; scale and bias are `param_dtype` (Flax's default is float32: at
  wide rows they are a real part of each program's loads).

  `progress(message)` is called as each (shape, op, implementation) cell starts. The backward
  is timed on its own, from residuals a forward saved (`measure_backward`).
  `rows`, when given, receives the rows as they are measured (and is returned).
  """
  rows = [] if rows is None else rows
  for n_rows, width in shapes:
    shape = f"{n_rows}x{width}"
    inputs = make_inputs(n_rows, width, dtype, 2 if quick else 3, param_dtype)
    x_bytes = n_rows * width * jnp.dtype(dtype).itemsize
    copy = measure(jnp.negative, [(a[0],) for a in inputs], quick=quick)
    copy_gbps = 2 * x_bytes / copy.seconds / 1e9
    base = {
      "suite": "norm",
      "shape": shape,
      "rows": n_rows,
      "width": width,
      "dtype": jnp.dtype(dtype).name,
      "param_dtype": jnp.dtype(param_dtype).name,
    }
    rows.append(
      {
        **base,
        "op": "copy",
        "implementation": "xla",
        "pass": "fwd",
        "ms": copy.seconds * 1e3,
        "gbps": copy_gbps,
      }
    )
    for op in OPS:
      for implementation in implementations:
        progress(f"{shape} {op.name} {implementation}")
        cell = {**base, "op": op.name, "implementation": implementation}

        def forward(x, residual, dy, scale, bias, op=op, implementation=implementation):
          return op.apply(implementation, x, residual, scale, bias)

        def differentiate(x, residual, dy, scale, bias, op=op, implementation=implementation):
          """(y, pullback, dy as y's cotangent), differentiating through x, scale and bias."""
          f = lambda x, scale, bias: op.apply(implementation, x, residual, scale, bias)
          y, vjp = jax.vjp(f, x, scale, bias)
          return y, vjp, jax.tree.map(lambda t: dy.astype(t.dtype), y)

        def forward_backward(*arguments, differentiate=differentiate):
          y, vjp, cotangent = differentiate(*arguments)
          return y, vjp(cotangent)

        def pullback(*arguments, differentiate=differentiate):
          _, vjp, cotangent = differentiate(*arguments)
          return vjp, cotangent

        # The residual-add forms are measured forward only.
        wanted = [p for p in passes if p == "fwd" or not op.residual]
        programs = {
          "fwd": (measure, forward),
          "fwd+bwd": (measure, forward_backward),
          "bwd": (measure_backward, pullback),
        }
        try:
          measured = {
            name: programs[name][0](programs[name][1], inputs, quick=quick) for name in wanted
          }
          error = _max_error(op, implementation, *inputs[0][:2], *inputs[0][3:])
        except Exception as failure:  # One failing cell must not end the whole table.
          rows.extend({**cell, "pass": p, "error": describe_failure(failure)} for p in wanted)
          continue
        for name in wanted:
          seconds = measured[name].seconds
          traffic = 4 if name == "fwd" and op.residual else PASS_TRAFFIC[name]
          gbps = traffic * x_bytes / seconds / 1e9 if seconds > 0 else None
          temp_bytes = measured[name].temp_bytes
          rows.append(
            {
              **cell,
              "pass": name,
              "ms": seconds * 1e3,
              "gbps": gbps,
              "of_copy": None if gbps is None else gbps / copy_gbps,
              "compile_s": measured[name].compile_seconds,
              "temp_mib": None if temp_bytes is None else temp_bytes / 2**20,
              "max_error": error,
            }
          )
  return rows
