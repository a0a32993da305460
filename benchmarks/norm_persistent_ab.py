"""A/B of the LayerNorm forward kernel's persistent launch (`PERSISTENT_PROGRAMS`).

  PYTHONPATH=. python -m benchmarks.norm_persistent_ab [--programs 264,528,1056] [--quick]

Times `jfused.layer_norm` forward (Pallas-Triton) with one program per row tile and with the
persistent launch, for float32 and bfloat16 scale and bias. GB/s count reading x and writing y
(2 x x's bytes), as `jfused bench norm` does; a jitted negation of x gives the copy ceiling.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.kernel_setting import kernel_setting
import jfused
from jfused.cli import timing
from jfused.cli.bench import norms as norm_bench
from jfused.cli.bench.measure import describe_failure, measure
from pallas_kernels.norms import triton_fwd as layer_norm_triton

SHAPES = ((16384, 4096), (65536, 1024), (8192, 8192))
QUICK_SHAPES = ((64, 256),)  # runs anywhere, in interpret mode without a GPU
PARAM_DTYPES = (jnp.float32, jnp.bfloat16)


def _forward(x, scale, bias):
  return jfused.layer_norm(x, scale, bias, implementation="pallas_triton")


def _forward_grid(args) -> int:
  """Programs the traced forward kernel launches: proves the setting took effect."""
  grids = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call" and str(eqn.params["name"]).endswith("_fwd"):
        grids.append(eqn.params["grid_mapping"].grid)
      for value in eqn.params.values():
        inner = getattr(value, "jaxpr", value)  # ClosedJaxpr or Jaxpr
        if hasattr(inner, "eqns"):
          visit(inner)

  visit(jax.make_jaxpr(_forward)(*args).jaxpr)
  assert len(grids) == 1, grids
  (programs,) = grids[0]
  return programs


def _inputs(rows: int, width: int, param_dtype, count: int):
  """(x, scale, bias) sets: the norm benchmark's inputs in bf16, less what a forward ignores."""
  sets = norm_bench.make_inputs(rows, width, jnp.bfloat16, count, param_dtype)
  return [(x, scale, bias) for x, _, _, scale, bias in sets]


def run(shapes, program_counts, *, quick: bool):
  variants = [("per tile", None)] + [(f"persistent {p}", p) for p in program_counts]
  print(
    f"{'shape':<12} {'params':<9} {'variant':<16} {'grid':>6} {'ms':>8} {'GB/s':>7} {'of copy':>7}",
    flush=True,
  )
  for rows, width in shapes:
    x_bytes = rows * width * jnp.dtype(jnp.bfloat16).itemsize
    for param_dtype in PARAM_DTYPES:
      inputs = _inputs(rows, width, param_dtype, 2 if quick else 3)
      copy = measure(jnp.negative, [(x,) for x, _, _ in inputs], quick=quick)
      copy_gbps = 2 * x_bytes / copy.seconds / 1e9
      params = jnp.dtype(param_dtype).name
      for label, programs in variants:
        head = f"{f'{rows}x{width}':<12} {params:<9} {label:<16}"
        with kernel_setting(layer_norm_triton, "PERSISTENT_PROGRAMS", programs):
          try:
            grid = _forward_grid(inputs[0])
            seconds = measure(_forward, inputs, quick=quick).seconds
          except Exception as failure:  # Report the cell, keep the table going.
            print(f"{head} ERROR {describe_failure(failure)}", flush=True)
            continue
        gbps = 2 * x_bytes / seconds / 1e9
        print(
          f"{head} {grid:>6} {seconds * 1e3:>8.4f} {gbps:>7.0f} {gbps / copy_gbps:>7.2f}",
          flush=True,
        )
    print(flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--programs",
    default=str(layer_norm_triton.PERSISTENT_PROGRAMS),
    help="comma-separated persistent program counts to try",
  )
  parser.add_argument(
    "--quick", action="store_true", help=f"tiny shapes {QUICK_SHAPES}, few repeats (a smoke test)"
  )
  args = parser.parse_args(argv)
  print(timing.environment(), flush=True)
  program_counts = [int(p) for p in args.programs.split(",")]
  if args.quick:
    program_counts = [2]  # the tiny shapes have 4 tiles: make the persistent launch happen
  run(QUICK_SHAPES if args.quick else SHAPES, program_counts, quick=args.quick)


if __name__ == "__main__":
  main()
