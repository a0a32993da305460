"""Where a transformer block's training step spends its time, kernel by kernel.

  PYTHONPATH=. python3 -m benchmarks.profile_step [--block-shapes gpt,llama]
      [--implementations pallas_mosaic,cudnn] [--steps 10] [--out profile.json] [--quick]
  PYTHONPATH=. python3 -m benchmarks.profile_step --from-json profile.json

For each block shape of `jfused bench block` and each implementation (the same variants:
pallas_mosaic / pallas_triton = jfused, cudnn = Flax norms + cuDNN attention, xla = plain
Flax), one jitted step (forward and backward with respect to parameters and input) is warmed
up, then `--steps` steps run under `jax.profiler` with a Perfetto trace. The device's kernel
events are summed per kernel name and per kind (matmul, attention, norm, cross-entropy,
transpose/copy, cast, other fusion, collectives), divided by the number of steps, and printed
side by side; `--out` keeps every kernel's time as JSON, and `--from-json` prints such a file
again (with today's kinds) without running anything. On a GPU the events are the CUDA
kernels of the device's streams; on a CPU (`--quick`, a check of the script) they are XLA's
CPU thunks.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp

from jfused.cli.bench import block as block_bench

# Kernel kinds by name, first match wins. Pallas kernels carry the names jfused gives them.
KINDS = (
  ("collective", r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter|collective"),
  ("cross-entropy", r"jfused_cross_entropy"),
  ("norm", r"jfused_(layer|rms)_norm"),
  ("attention", r"jfused_attention|attention|flash|fmha|cudnn|mha"),
  # nvjet_* are cuBLAS's Hopper GEMM kernels (what XLA's dots call on an H100/H200).
  ("matmul", r"gemm|xmma|cutlass|cublas|nvjet|matmul|\bdot|wgmma"),
  ("transpose/copy", r"transpose|copy|memcpy|memset"),
  ("cast", r"convert"),
  ("other fusion", r"fusion|loop|reduce|ynn|eigen"),
)


def kind_of(kernel: str) -> str:
  for kind, pattern in KINDS:
    if re.search(pattern, kernel, re.IGNORECASE):
      return kind
  return "other"


def device_kernel_times(trace_dir: str) -> dict[str, float]:
  """Microseconds per kernel name over the trace's device tracks (a GPU's streams; on a CPU,
  XLA's compute threads)."""
  (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for event in events:
    if event.get("ph") == "M" and event.get("name") == "process_name":
      processes[event["pid"]] = event["args"]["name"]
    if event.get("ph") == "M" and event.get("name") == "thread_name":
      threads[(event["pid"], event.get("tid"))] = event["args"]["name"]
  gpu = {pid for pid, name in processes.items() if name.startswith("/device:GPU")}
  # A GPU's kernels sit on its stream tracks; its "XLA Ops" / "XLA Modules" tracks repeat the
  # same time per HLO op and per program, so they are left out.
  streams = {key for key, name in threads.items() if key[0] in gpu and name.startswith("Stream")}

  def on_device(event) -> bool:
    key = (event["pid"], event.get("tid"))
    if gpu:
      return key in streams if streams else event["pid"] in gpu
    # CPU: XLA's compute threads, less the executor's own spans around the thunks.
    return threads.get(key, "").startswith("tf_XLA") and not event["name"].startswith(
      "ThunkExecutor"
    )

  times = collections.Counter()
  for event in events:
    if event.get("ph") == "X" and on_device(event):
      times[event["name"]] += float(event.get("dur", 0.0))
  return dict(times)


def profile(shape, implementation: str, dtype, steps: int) -> dict[str, float]:
  """Microseconds per kernel name in one training step of the block."""
  params, _, step, _ = block_bench._step_function(block_bench._block(shape, implementation, dtype))
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (shape.batch, shape.seq, shape.features), dtype)
  dy = jax.random.normal(keys[1], x.shape, dtype)
  return kernel_times_per_call(step, (params, x, dy), steps)


def kernel_times_per_call(fn, arguments, calls: int) -> dict[str, float]:
  """Microseconds per kernel name in one call of `jax.jit(fn)(*arguments)`: warmed up once,
  then `calls` calls traced."""
  compiled = jax.jit(fn)
  jax.block_until_ready(compiled(*arguments))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        result = compiled(*arguments)
      jax.block_until_ready(result)
    times = device_kernel_times(trace_dir)
  return {name: microseconds / calls for name, microseconds in times.items()}


def by_kind(times: dict[str, float]) -> dict[str, float]:
  kinds = collections.Counter()
  for name, microseconds in times.items():
    kinds[kind_of(name)] += microseconds
  return dict(kinds)


def largest(times: dict[str, float], count: int) -> list[tuple[str, float]]:
  """The `count` kernels that took longest, longest first."""
  return sorted(times.items(), key=lambda kv: -kv[1])[:count]


def print_run(name: str, times: dict[str, float]) -> None:
  kinds = by_kind(times)
  total = sum(kinds.values())
  print(f"\n{name}: {total / 1e3:.3f} ms of kernels per step")
  for kind, microseconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
    print(f"  {kind:16s} {microseconds / 1e3:8.3f} ms  {100 * microseconds / total:5.1f} %")
  for kernel, microseconds in largest(times, 12):
    print(f"    {microseconds / 1e3:8.3f} ms  {kind_of(kernel):14s} {kernel[:90]}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--block-shapes", default="gpt,llama")
  parser.add_argument("--implementations", default="pallas_mosaic,cudnn")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--out", help="JSON of every kernel's time per step")
  parser.add_argument("--quick", action="store_true", help="tiny blocks on any machine")
  parser.add_argument("--from-json", help="print a saved --out file again; runs nothing")
  args = parser.parse_args()
  if args.from_json:
    with open(args.from_json) as f:
      saved = json.load(f)
    print(f"{saved['device']}, jax {saved['jax']}")
    for run in saved["runs"]:
      print_run(f"{run['shape']} {run['implementation']}", run["kernel_us"])
    return
  presets = ["quick"] if args.quick else args.block_shapes.split(",")
  implementations = args.implementations.split(",")
  if args.quick:
    implementations = [i for i in implementations if block_bench.unavailable(i) is None] or ["xla"]
  results = []
  for preset in presets:
    for shape in block_bench.PRESETS[preset]:
      for implementation in implementations:
        times = profile(shape, implementation, jnp.dtype(args.dtype), args.steps)
        results.append({"shape": shape.name, "implementation": implementation, "kernel_us": times})
        print_run(f"{shape.name} {implementation}", times)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "runs": results}, f)


if __name__ == "__main__":
  main()
