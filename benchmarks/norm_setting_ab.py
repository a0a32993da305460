"""A/B of one tuning constant of the norm kernels' modules.

  PYTHONPATH=. python -m benchmarks.norm_setting_ab MODULE.NAME VALUE,VALUE,... [--quick]
  e.g. triton_bwd.BWD_RESIDENT_ELEMENTS 1081344,2162688

Runs the norm benchmark (`jfused bench norm`'s table: forward, backward and forward+backward
GB/s beside the copy ceiling) for the Pallas-Triton kernels under each value, for float32 and
bfloat16 scale and bias. Values are Python literals (`None`, `True`, numbers).
"""

from __future__ import annotations

import argparse
import ast
import importlib

import jax.numpy as jnp

from benchmarks.kernel_setting import kernel_setting
from jfused.cli import timing
from jfused.cli.bench import norms as norm_bench

QUICK_SHAPES = ((64, 256),)  # runs anywhere, in interpret mode without a GPU


def run(module, name: str, values, param_dtypes, quick: bool) -> None:
  """Prints one line per (shape, parameter dtype, op, pass, value)."""
  print(timing.environment(), flush=True)
  shapes = QUICK_SHAPES if quick else norm_bench.PRESETS["default"]
  print(
    f"{'shape':<12} {'params':<9} {'op':<20} {'pass':<8} {name:<12} {'ms':>8} "
    f"{'GB/s':>7} {'of copy':>7}",
    flush=True,
  )
  for param_dtype in param_dtypes:
    for value in values:
      with kernel_setting(module, name, value):
        rows = norm_bench.run(
          shapes,
          ["pallas_triton"],
          norm_bench.PASSES,
          jnp.bfloat16,
          quick=quick,
          progress=lambda _: None,
          param_dtype=param_dtype,
        )
      for row in rows:
        if "error" in row:
          print(f"{row['shape']:<12} {row['op']} {row['pass']} ERROR {row['error']}")
          continue
        if row["op"] == "copy":
          continue
        gbps = "-" if row["gbps"] is None else f"{row['gbps']:.0f}"  # bwd of a noisy split
        of_copy = "-" if row["of_copy"] is None else f"{row['of_copy']:.2f}"
        print(
          f"{row['shape']:<12} {row['param_dtype']:<9} {row['op']:<20} {row['pass']:<8} "
          f"{value!s:<12} {row['ms']:>8.4f} {gbps:>7} {of_copy:>7}",
          flush=True,
        )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("setting", help="MODULE.NAME of a constant in pallas_kernels")
  parser.add_argument("values", help="comma-separated Python literals")
  parser.add_argument(
    "--param-dtypes", default="float32,bfloat16", help="comma-separated scale/bias dtypes"
  )
  parser.add_argument(
    "--quick", action="store_true", help=f"tiny shapes {QUICK_SHAPES}, few repeats (a smoke test)"
  )
  args = parser.parse_args(argv)
  module_name, name = args.setting.rsplit(".", 1)
  module = importlib.import_module(f"pallas_kernels.norms.{module_name}")
  getattr(module, name)  # a misspelt constant fails here, before any run
  values = [ast.literal_eval(value) for value in args.values.split(",")]
  run(module, name, values, args.param_dtypes.split(","), args.quick)


if __name__ == "__main__":
  main()
