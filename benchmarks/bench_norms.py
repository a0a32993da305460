"""LayerNorm / RMSNorm benchmark: jfused's Pallas kernels beside XLA, measured in one run.

  python -m benchmarks.bench_norms --out results.json [--quick]

GB/s counts the least memory traffic each pass needs, in multiples of x's size: forward reads x
and writes y (2); forward+backward adds reading x and dy and writing dx (5; the parameter
gradients are negligible); residual add + norm forward reads x and residual and writes y and
h (4). The copy ceiling is a jitted elementwise negation of x (read + write) timed in the same
run. `--quick` runs tiny shapes (in interpret mode off-GPU) as a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

from jfused import norms
from jfused.timing import environment, median_seconds

SHAPES = ((16384, 4096), (65536, 1024), (8192, 8192))
QUICK_SHAPES = ((64, 256), (8, 1000))
IMPLEMENTATIONS = ("pallas_triton", "xla")
INPUT_SETS = 3  # distinct inputs rotated through, so no run is flattered by a warm cache


@dataclasses.dataclass(frozen=True)
class Benchmark:
  name: str
  passes: int  # memory traffic in multiples of x's size

  def build(self, implementation: str):
    """(jitted function, which inputs it takes) for this benchmark."""
    kw = dict(implementation=implementation)
    if self.name == "layer_norm fwd":
      return jax.jit(lambda x, r, dy, s, b: norms.layer_norm(x, s, b, **kw))
    if self.name == "rms_norm fwd":
      return jax.jit(lambda x, r, dy, s, b: norms.rms_norm(x, s, **kw))
    if self.name == "residual+layer_norm fwd":
      return jax.jit(lambda x, r, dy, s, b: norms.layer_norm(x, s, b, residual=r, **kw))
    if self.name == "residual+rms_norm fwd":
      return jax.jit(lambda x, r, dy, s, b: norms.rms_norm(x, s, residual=r, **kw))
    if self.name == "layer_norm fwd+bwd":
      f = lambda x, s, b: norms.layer_norm(x, s, b, **kw)
    elif self.name == "rms_norm fwd+bwd":
      f = lambda x, s, b: norms.rms_norm(x, s, **kw)
    else:
      raise ValueError(self.name)

    def forward_backward(x, r, dy, s, b):
      y, vjp = jax.vjp(f, x, s, b)
      return y, vjp(dy)

    return jax.jit(forward_backward)


BENCHMARKS = (
    Benchmark("layer_norm fwd", 2),
    Benchmark("layer_norm fwd+bwd", 5),
    Benchmark("residual+layer_norm fwd", 4),
    Benchmark("rms_norm fwd", 2),
    Benchmark("rms_norm fwd+bwd", 5),
    Benchmark("residual+rms_norm fwd", 4),
)


def make_inputs(rows: int, width: int, dtype, param_dtype, count: int, seed: int = 0):
  """`count` sets of (x, residual, dy, scale, bias), random (never zeros)."""
  sets = []
  for key in jax.random.split(jax.random.key(seed), count):
    k = jax.random.split(key, 5)
    x, residual, dy = (jax.random.normal(k[i], (rows, width), dtype) for i in range(3))
    scale = 1 + 0.1 * jax.random.normal(k[3], (width,), param_dtype)
    bias = 0.1 * jax.random.normal(k[4], (width,), param_dtype)
    sets.append(jax.block_until_ready((x, residual, dy, scale, bias)))
  return sets


def run(shapes, *, dtype, param_dtype, **timing) -> list[dict]:
  rows_out = []
  for rows, width in shapes:
    inputs = make_inputs(rows, width, dtype, param_dtype, INPUT_SETS)
    x_bytes = rows * width * jnp.dtype(dtype).itemsize
    copy = jax.jit(jnp.negative)
    copy_seconds = median_seconds(copy, [(args[0],) for args in inputs], **timing)
    copy_gbps = 2 * x_bytes / copy_seconds / 1e9
    rows_out.append(dict(benchmark="copy ceiling", shape=[rows, width], implementation="xla",
                         ms=copy_seconds * 1e3, gbps=copy_gbps, of_copy=1.0))
    for benchmark in BENCHMARKS:
      seconds = {}
      for implementation in IMPLEMENTATIONS:
        fn = benchmark.build(implementation)
        seconds[implementation] = median_seconds(fn, inputs, **timing)
      for implementation, time_s in seconds.items():
        gbps = benchmark.passes * x_bytes / time_s / 1e9
        rows_out.append(dict(
            benchmark=benchmark.name, shape=[rows, width], implementation=implementation,
            ms=time_s * 1e3, gbps=gbps, of_copy=gbps / copy_gbps,
            speedup_vs_xla=seconds["xla"] / time_s))
  return rows_out


def print_table(rows: list[dict]) -> None:
  header = (f"{'shape':>12} {'benchmark':<26} {'impl':<14} {'ms':>9} {'GB/s':>8} {'copy%':>6} "
            f"{'vs xla':>7}")
  print(header)
  print("-" * len(header))
  for row in rows:
    shape = "x".join(map(str, row["shape"]))
    speedup = f"{row['speedup_vs_xla']:.2f}x" if "speedup_vs_xla" in row else ""
    print(f"{shape:>12} {row['benchmark']:<26} {row['implementation']:<14} {row['ms']:9.3f} "
          f"{row['gbps']:8.1f} {100 * row['of_copy']:5.0f}% {speedup:>7}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", help="write the results as JSON here")
  parser.add_argument("--quick", action="store_true", help="tiny shapes, few runs (smoke test)")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--param-dtype", default="bfloat16", help="dtype of scale and bias")
  parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
  parser.add_argument("--calls", type=int, default=None, help="calls per timed repeat")
  args = parser.parse_args(argv)
  shapes = QUICK_SHAPES if args.quick else SHAPES
  timing = dict(warmup=1 if args.quick else 5,
                repeats=args.repeats or (3 if args.quick else 11),
                calls=args.calls or (2 if args.quick else 20))
  rows = run(shapes, dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.param_dtype),
             **timing)
  print_table(rows)
  if args.out:
    result = dict(environment(), dtype=args.dtype, param_dtype=args.param_dtype,
                  quick=args.quick, timing=timing, rows=rows)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
