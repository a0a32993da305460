"""A/B of the norm backward's next-tile prefetch (`layer_norm_triton.PREFETCH_NEXT_TILE`).

  PYTHONPATH=. python -m benchmarks.norm_prefetch_ab [--quick]

Runs the norm benchmark (`jfused bench norm`'s table: forward, backward and forward+backward
GB/s beside the copy ceiling) for the Pallas-Triton kernels with the prefetch forced off,
forced on and as `layer_norm_triton_bwd.prefetches` chooses, for float32 and bfloat16 scale
and bias. The prefetch changes the fused backward's loop over row tiles. (The first run,
norms_prefetch_h100_2026-11-25.log, also prefetched in the persistent forward.)
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

from benchmarks.kernel_setting import kernel_setting
from jfused import timing
from jfused.bench import norms as norm_bench
from pallas_kernels import layer_norm_triton

QUICK_SHAPES = ((64, 256),)  # runs anywhere, in interpret mode without a GPU


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--param-dtypes", default="float32,bfloat16",
                      help="comma-separated scale/bias dtypes")
  parser.add_argument("--quick", action="store_true",
                      help=f"tiny shapes {QUICK_SHAPES}, few repeats (a smoke test)")
  args = parser.parse_args(argv)
  print(timing.environment(), flush=True)
  shapes = QUICK_SHAPES if args.quick else norm_bench.PRESETS["default"]
  print(f"{'shape':<12} {'params':<9} {'op':<20} {'pass':<8} {'prefetch':<9} {'ms':>8} "
        f"{'GB/s':>7} {'of copy':>7}", flush=True)
  for param_dtype in args.param_dtypes.split(","):
    for enabled in (False, True, None):
      with kernel_setting(layer_norm_triton, "PREFETCH_NEXT_TILE", enabled):
        rows = norm_bench.run(shapes, ["pallas_triton"], norm_bench.PASSES, jnp.bfloat16,
                              quick=args.quick, progress=lambda _: None,
                              param_dtype=param_dtype)
      for row in rows:
        if row["op"] == "copy" or "error" in row:
          if "error" in row:
            print(f"{row['shape']:<12} {row['op']} {row['pass']} ERROR {row['error']}")
          continue
        gbps = "-" if row["gbps"] is None else f"{row['gbps']:.0f}"  # bwd of a noisy split
        of_copy = "-" if row["of_copy"] is None else f"{row['of_copy']:.2f}"
        setting = "auto" if enabled is None else str(enabled)
        print(f"{row['shape']:<12} {row['param_dtype']:<9} {row['op']:<20} {row['pass']:<8} "
              f"{setting:<9} {row['ms']:>8.4f} {gbps:>7} {of_copy:>7}", flush=True)


if __name__ == "__main__":
  main()
