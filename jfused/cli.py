"""The `jfused` command line.

  jfused bench {attention,norm,block,all}   the fused ops beside XLA, cuDNN and tokamax:
                                            tables, JSON and PNG charts

Without a GPU the Pallas kernels run in interpret mode at small sizes: the error column is
meaningful there, the timings are not.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

from jfused import config, timing


def _csv(known, what):
  """argparse type: a comma-separated subset of `known`."""
  def parse(text):
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
      raise argparse.ArgumentTypeError(
          f"unknown {what} {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}")
    return names
  return parse


def bench(args) -> int:
  from jfused.bench import attention, block, norms, report

  on_gpu = config.on_gpu()
  env = timing.environment()
  quick = args.quick or not on_gpu
  print(f"jfused bench on {env['device']} (jax {env['jax']}, {env['date']})", flush=True)
  if not on_gpu:
    print("No GPU found: small shapes, Pallas kernels in interpret mode. Timings here mean "
          "nothing; the error column still does.", flush=True)
  dtype = jnp.dtype(args.dtype)
  progress = lambda message: print(message, file=sys.stderr, flush=True)
  rows = []
  for name, module in (("attention", attention), ("norm", norms), ("block", block)):
    if args.suite not in (name, "all"):
      continue
    preset = getattr(args, f"{name}_shapes") or ("quick" if quick else module.DEFAULT_PRESET)
    shapes = module.PRESETS[preset]
    shapes = shapes(args.gqa) if callable(shapes) else shapes  # Attention grids take --gqa.
    implementations = [i for i in args.implementations or module.IMPLEMENTATIONS
                       if i in module.IMPLEMENTATIONS]
    rows += module.run(shapes, implementations, args.passes, dtype, quick=quick,
                       progress=progress)
  report.add_speedups(rows)
  print(report.format_table(rows))
  os.makedirs(args.out_dir, exist_ok=True)
  settings = {"suite": args.suite, "dtype": dtype.name, "quick": quick, "gqa": args.gqa,
              "passes": args.passes}
  path = os.path.join(args.out_dir, f"bench_{args.suite}.json")
  report.write_json(path, env, settings, rows)
  written = [path] + ([] if args.no_plot else report.plot(rows, args.out_dir))
  print("wrote " + ", ".join(written))
  return 0


def build_parser() -> argparse.ArgumentParser:
  from jfused.bench import attention, block, norms

  parser = argparse.ArgumentParser(prog="jfused", description="Fused GPU ops for JAX.")
  commands = parser.add_subparsers(dest="command", required=True)
  bench_parser = commands.add_parser(
      "bench", help="benchmark the fused ops beside XLA, cuDNN and tokamax")
  bench_parser.add_argument("suite", choices=("attention", "norm", "block", "all"))
  bench_parser.add_argument("--quick", action="store_true",
                            help="small shapes and few runs (always so without a GPU)")
  bench_parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                            default="bfloat16")
  bench_parser.add_argument("--attention-shapes", choices=sorted(attention.PRESETS),
                            help="attention shape grid (default: guide; quick off-GPU)")
  bench_parser.add_argument("--norm-shapes", choices=sorted(norms.PRESETS),
                            help="norm shapes (default: default; quick off-GPU)")
  bench_parser.add_argument("--block-shapes", choices=sorted(block.PRESETS),
                            help="transformer block shapes (default: gpt; quick off-GPU)")
  bench_parser.add_argument("--gqa", action="store_true",
                            help="attention with 4 query heads per kv head")
  known = sorted(set(attention.IMPLEMENTATIONS) | set(norms.IMPLEMENTATIONS)
                 | set(block.IMPLEMENTATIONS))
  bench_parser.add_argument("--implementations", type=_csv(known, "implementation"),
                            help="comma-separated, default: all that apply")
  bench_parser.add_argument("--passes", type=_csv(attention.PASSES, "pass"),
                            default=list(attention.PASSES), help="fwd, bwd, fwd+bwd")
  bench_parser.add_argument("--out-dir", default="bench_out",
                            help="where the JSON and PNG files go")
  bench_parser.add_argument("--no-plot", action="store_true", help="skip the PNG charts")
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return {"bench": bench}[args.command](args)


if __name__ == "__main__":
  sys.exit(main())
