"""The `jfused` command line.

  jfused bench {attention,norm,block,cross_entropy,all}
                                            the fused ops beside XLA, cuDNN, tokamax and FA3:
                                            tables, JSON and PNG charts
  jfused train                              a small GPT trained fused, on Flax + cuDNN (GPU)
                                            and on plain Flax: loss parity and speed

Without a GPU the Pallas kernels run in interpret mode at small sizes: the error column is
meaningful there, the timings are not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp

from jfused import config
from jfused.cli import terminal, timing


def _csv(known, what):
  """argparse type: a comma-separated subset of `known`."""

  def parse(text):
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
      raise argparse.ArgumentTypeError(
        f"unknown {what} {', '.join(unknown) or repr(text)}; choose from {', '.join(known)}"
      )
    return names

  return parse


def _dropout_rates(text):
  """argparse type: comma-separated attention dropout rates in [0, 1), e.g. `0,0.1`."""
  try:
    rates = [float(rate) for rate in text.split(",") if rate]
  except ValueError as error:
    raise argparse.ArgumentTypeError(f"dropout rates must be numbers: {error}") from error
  if not rates or not all(0.0 <= rate < 1.0 for rate in rates):
    raise argparse.ArgumentTypeError(f"dropout rates must be in [0, 1), got {text!r}")
  return rates


def _cell_progress(bars: terminal.ProgressBars, task, save_partial):
  """A suite's `progress` callback: each call starts the next cell, named by the message, after
  saving the rows measured so far (`save_partial`)."""
  started = itertools.count()

  def progress(message):
    save_partial()
    bars.show(task, completed=next(started), note=message)

  return progress


def bench(args) -> int:
  from jfused.cli.bench import attention, block, cross_entropy, norms, report

  on_gpu = config.on_gpu()
  env = timing.environment()
  quick = args.quick or not on_gpu
  print(f"jfused bench on {env['device']} (jax {env['jax']}, {env['date']})", flush=True)
  if not on_gpu:
    print(
      "No GPU found: small shapes, Pallas kernels in interpret mode. Timings here mean "
      "nothing; the error column still does.",
      flush=True,
    )
  dtype = jnp.dtype(args.dtype)
  rows = []
  settings = {
    "suite": args.suite,
    "dtype": dtype.name,
    "quick": quick,
    "gqa": args.gqa,
    "passes": args.passes,
    "dropout_rates": args.dropout_rate,
    "norm_param_dtype": args.norm_param_dtype,
  }
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, f"bench_{args.suite}.json")
  # Rows measured so far, rewritten as each cell starts: a run cut short (a GPU call's time
  # limit) keeps what it measured. Removed once the whole run is written.
  partial_path = path.replace(".json", ".partial.json")

  def save_partial():
    report.write_json(partial_path, env, settings, rows)

  # A cell takes seconds to minutes: estimate the rate over a whole suite, not rich's 30 s.
  with terminal.ProgressBars("cell", speed_estimate_period=3600) as bars:
    suites = (
      ("attention", attention),
      ("norm", norms),
      ("block", block),
      ("cross_entropy", cross_entropy),
    )
    for name, module in suites:
      if args.suite not in (name, "all"):
        continue
      preset = getattr(args, f"{name}_shapes") or ("quick" if quick else module.DEFAULT_PRESET)
      shapes = module.PRESETS[preset]
      shapes = shapes(args.gqa) if callable(shapes) else shapes  # Attention grids take --gqa.
      implementations = [
        i for i in args.implementations or module.IMPLEMENTATIONS if i in module.IMPLEMENTATIONS
      ]
      extra = {
        "attention": {"dropout_rates": args.dropout_rate},
        "norm": {"param_dtype": jnp.dtype(args.norm_param_dtype)},
      }.get(name, {})
      total = module.count_steps(shapes, implementations, **extra)
      task = bars.add_task(name, total=total)
      module.run(
        shapes,
        implementations,
        args.passes,
        dtype,
        quick=quick,
        progress=_cell_progress(bars, task, save_partial),
        rows=rows,
        **extra,
      )
      bars.show(task, completed=total, note="done")
  report.add_speedups(rows)
  stdout = terminal.console()
  for renderable in report.tables(rows, width=stdout.width):
    stdout.print(renderable)
  report.write_json(path, env, settings, rows)
  if os.path.exists(partial_path):
    os.remove(partial_path)
  written = [path] + ([] if args.no_plot else report.plot(rows, args.out_dir))
  print("wrote " + ", ".join(written))
  return 0


def train(args) -> int:
  import dataclasses

  from jfused.cli import train as training

  on_gpu = config.on_gpu()
  env = timing.environment()
  size = training.SIZES[args.size or ("small" if on_gpu and not args.quick else "tiny")]
  overrides = {
    "steps": args.steps,
    "batch": args.batch,
    "seq_len": args.seq_len,
    "num_layers": args.layers,
    "num_features": args.features,
    "num_heads": args.heads,
    "learning_rate": args.learning_rate,
    "vocab_size": args.vocab_size,
  }
  size = dataclasses.replace(size, **{k: v for k, v in overrides.items() if v is not None})
  if args.quick and args.steps is None:
    size = dataclasses.replace(size, steps=min(size.steps, 20))
  dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
  mesh = None
  if args.data_parallel:
    devices = jax.devices()
    if size.batch % len(devices):
      print(
        f"jfused train: error: --data-parallel splits the batch over {len(devices)} "
        f"devices; batch {size.batch} does not divide",
        file=sys.stderr,
      )
      return 2
    # Auto axes: jit propagates the batch sharding through the model by itself.
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  devices = f"data-parallel over {mesh.size} devices" if mesh else "1 device"
  print(
    f"jfused train on {env['device']} (jax {env['jax']}, {env['date']}): {size}, "
    f"{dtype.name}, {devices}",
    flush=True,
  )
  if not on_gpu:
    print(
      "No GPU found: the fused layers run their Pallas kernels in interpret mode. Step "
      "times here mean nothing; the loss parity still does.",
      flush=True,
    )
  variants = args.variants or list(training.default_variants())
  if "cudnn" in variants and not on_gpu:
    print("jfused train: the cudnn variant needs a CUDA GPU", file=sys.stderr)
    return 2
  batches, validation = training.make_batches(size, args.seed)
  with terminal.ProgressBars("step") as bars:
    records = [
      training.train_variant(
        variant, size, batches, validation, dtype=dtype, seed=args.seed, mesh=mesh, progress=bars
      )
      for variant in variants
    ]
  gap = training.loss_gap(records) if len(records) >= 2 else None
  stdout = terminal.console()
  for renderable in (training.table(records, stdout.width), *training.summary(records, gap)):
    stdout.print(renderable)
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, "train.json")
  settings = {
    **dataclasses.asdict(size),
    "dtype": dtype.name,
    "seed": args.seed,
    "devices": mesh.size if mesh else 1,
    "corpus": training.CORPUS,
  }
  with open(path, "w") as f:
    json.dump({**env, "settings": settings, "loss_gap": gap, "runs": records}, f, indent=1)
  written = [path]
  if not args.no_plot:
    title = (
      f"GPT {size.num_layers}x{size.num_features}, {size.batch}x{size.seq_len} tokens, "
      f"{dtype.name}, {env['device']}"
    )
    written.append(training.plot(records, gap, os.path.join(args.out_dir, "train_loss.png"), title))
  print("wrote " + ", ".join(written))
  return 0


def _positive(kind):
  """argparse type: a number of `kind` above zero."""

  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
    if value <= 0:
      raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value

  return parse


def _at_least(smallest: int):
  """argparse type: an int of at least `smallest`."""

  def parse(text):
    value = _positive(int)(text)
    if value < smallest:
      raise argparse.ArgumentTypeError(f"must be at least {smallest}, got {value}")
    return value

  return parse


def _add_train_parser(commands) -> None:
  from jfused.cli import train as training

  parser = commands.add_parser(
    "train", help="train a small GPT with fused and with plain Flax layers"
  )
  parser.add_argument(
    "--size",
    choices=sorted(training.SIZES),
    help="model and batch preset (default: small on a GPU, tiny elsewhere)",
  )
  parser.add_argument("--quick", action="store_true", help="tiny model, at most 20 steps")
  parser.add_argument("--steps", type=_positive(int))
  parser.add_argument("--batch", type=_positive(int))
  parser.add_argument("--seq-len", type=_positive(int))
  parser.add_argument("--layers", type=_positive(int))
  parser.add_argument("--features", type=_positive(int))
  parser.add_argument("--heads", type=_positive(int))
  parser.add_argument("--learning-rate", type=_positive(float))
  parser.add_argument(
    "--vocab-size",
    type=_at_least(training.BYTE_VOCABULARY),
    help="the model's vocabulary (default 256, the bytes the text is made of); a tokenizer's "
    "size (32768, 131072) gives the logits a real model carries, where the fused loss's "
    "memory shows",
  )
  parser.add_argument(
    "--dtype",
    choices=("bfloat16", "float16", "float32"),
    help="computation dtype (default: bfloat16 on a GPU, float32 elsewhere); "
    "parameters stay float32",
  )
  parser.add_argument(
    "--variants",
    type=_csv(training.VARIANTS, "variant"),
    help="comma-separated among fused, cudnn (Flax norms and loss with cuDNN attention: what "
    "a Flax user would otherwise run; GPU only) and plain (Flax throughout); default: all "
    "three on a GPU, fused,plain elsewhere",
  )
  parser.add_argument(
    "--data-parallel", action="store_true", help="split each batch over all visible devices"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out-dir", default="train_out", help="where train.json and the PNG go")
  parser.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")


def build_parser() -> argparse.ArgumentParser:
  from jfused.cli.bench import attention, block, cross_entropy, norms

  parser = argparse.ArgumentParser(prog="jfused", description="Fused GPU ops for JAX.")
  commands = parser.add_subparsers(dest="command", required=True)
  bench_parser = commands.add_parser(
    "bench", help="benchmark the fused ops beside XLA, cuDNN, tokamax and FA3"
  )
  bench_parser.add_argument("suite", choices=("attention", "norm", "block", "cross_entropy", "all"))
  bench_parser.add_argument(
    "--quick", action="store_true", help="small shapes and few runs (always so without a GPU)"
  )
  bench_parser.add_argument(
    "--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16"
  )
  bench_parser.add_argument(
    "--attention-shapes",
    choices=sorted(attention.PRESETS),
    help="attention shape grid (default: guide; quick off-GPU)",
  )
  bench_parser.add_argument(
    "--norm-shapes",
    choices=sorted(norms.PRESETS),
    help="norm shapes (default: default; quick off-GPU)",
  )
  bench_parser.add_argument(
    "--norm-param-dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="dtype of the norms' scale and bias",
  )
  bench_parser.add_argument(
    "--block-shapes",
    choices=sorted(block.PRESETS),
    help="transformer block shapes (default: gpt; quick off-GPU)",
  )
  bench_parser.add_argument(
    "--cross-entropy-shapes",
    choices=sorted(cross_entropy.PRESETS),
    help="linear cross-entropy shapes (default: default; quick off-GPU)",
  )
  bench_parser.add_argument(
    "--gqa", action="store_true", help="attention with 4 query heads per kv head"
  )
  bench_parser.add_argument(
    "--dropout-rate",
    type=_dropout_rates,
    default=[0.0],
    help="attention dropout rates, comma-separated (e.g. 0,0.1)",
  )
  known = sorted(
    set(attention.IMPLEMENTATIONS)
    | set(norms.IMPLEMENTATIONS)
    | set(block.IMPLEMENTATIONS)
    | set(cross_entropy.IMPLEMENTATIONS)
  )
  bench_parser.add_argument(
    "--implementations",
    type=_csv(known, "implementation"),
    help="comma-separated, default: all that apply",
  )
  bench_parser.add_argument(
    "--passes",
    type=_csv(attention.PASSES, "pass"),
    default=list(attention.PASSES),
    help="fwd, bwd, fwd+bwd",
  )
  bench_parser.add_argument(
    "--out-dir", default="bench_out", help="where the JSON and PNG files go"
  )
  bench_parser.add_argument("--no-plot", action="store_true", help="skip the PNG charts")
  _add_train_parser(commands)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  return {"bench": bench, "train": train}[args.command](args)
