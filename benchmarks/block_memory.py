"""Where a transformer block's training step keeps its temporary memory: XLA's buffer
assignment of the compiled step, per implementation, largest allocations first.

  PYTHONPATH=. python3 -m benchmarks.block_memory [--block-shapes gpt,llama]
      [--implementations pallas_mosaic,pallas_mosaic_recompute,cudnn] [--out-dir DIR]
  PYTHONPATH=. python3 -m benchmarks.block_memory --quick   # tiny blocks, any machine
  PYTHONPATH=. python3 -m benchmarks.block_memory --deviceless   # for an H100, without one

The step is `jfused bench block`'s (forward and backward with respect to the parameters and
the input, bf16). Each (shape, implementation) compiles in a child process with XLA's dumps
on, so the program's memory-usage report lands under --out-dir/<shape>_<implementation>/
(beside the optimized program; the dump's other files are deleted): every allocation of the
step's temporary buffer with the arrays XLA placed in it. The parent
prints the temporary size (the bench's "temp MiB") and the report's largest allocations,
which name the arrays that make the difference between two implementations. With
--deviceless the steps compile for an H100 on a machine without a GPU (`deviceless.py`: the
CUDA build of jaxlib, no device): the GPT block's numbers are the H100's own.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil

from benchmarks import deviceless as h100
from benchmarks.child_process import run_one

REPORT_LINES = 24  # Allocations printed per implementation.


def compile_step(shape_name: str, implementation: str, quick: bool, deviceless: bool) -> dict:
  """Compiles the block's step (in this process, with whatever XLA_FLAGS it was given; for an
  abstract H100 if `deviceless`) and returns its temporary size."""
  import jax
  import jax.numpy as jnp

  from jfused.cli.bench import block as block_bench

  presets = ["quick"] if quick else list(block_bench.PRESETS)
  (shape,) = [s for p in presets for s in block_bench.PRESETS[p] if s.name == shape_name]
  params, _, step, _ = block_bench._step_function(
    block_bench._block(shape, implementation, jnp.bfloat16)
  )
  x = jax.ShapeDtypeStruct((shape.batch, shape.seq, shape.features), jnp.bfloat16)
  if deviceless:
    compiled = h100.compile_for_h100(step, params, x, x)
  else:
    compiled = jax.jit(step).lower(params, x, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  return dict(shape=shape_name, implementation=implementation, temp_mib=round(temp / 2**20, 1))


# The dump's files kept: the memory report, the live ranges (what is alive at the peak),
# the optimized program (its fusions name the arrays) and, from a GPU, the autotuner's
# choices (a deviceless compile can take them, --autotune-from); the rest (LLVM, PTX,
# object files, other modules) is deleted.
KEPT = (
  "memory-usage-report.txt",
  "live-range.txt",
  "after_optimizations.txt",
  "autotune_results.pbtxt",
)
PEAK_LINES = 16  # Values printed of those alive at the peak.


def prune(dump_dir: str) -> None:
  for path in glob.glob(os.path.join(dump_dir, "*")):
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif not ("jit_step" in path and path.endswith(KEPT)):
      os.remove(path)


def xla_flags(dump_dir: str, deviceless: bool, autotune_from: str | None) -> str:
  """A child's XLA flags: its dumps under dump_dir; deviceless, the matmuls as a GPU's
  autotuner chose them where its dumps of the same row are under autotune_from, else
  `deviceless.XLA_FLAGS`."""
  flags = f"--xla_dump_to={dump_dir} --xla_dump_hlo_module_re=jit_step"
  if not deviceless:
    return flags
  row = os.path.basename(dump_dir)
  found = glob.glob(os.path.join(autotune_from or "", row, "*jit_step*autotune_results.pbtxt"))
  if autotune_from and found:
    return f"{flags} --xla_gpu_load_autotune_results_from={found[0]}"
  return f"{flags} {h100.XLA_FLAGS}"


def largest_allocations(dump_dir: str, count: int = REPORT_LINES) -> list[str]:
  """The first memory space's largest allocations in the step's memory-usage report."""
  reports = glob.glob(os.path.join(dump_dir, "*jit_step*memory-usage-report.txt"))
  if not reports:
    return [f"(no memory-usage report under {dump_dir})"]
  with open(max(reports, key=os.path.getmtime)) as f:
    lines = f.read().splitlines()
  rows = [line for line in lines if "MiB(" in line or "KiB(" in line]
  return rows[:count]


def peak_values(dump_dir: str, count: int = PEAK_LINES) -> list[str]:
  """The largest values alive at the step's peak, each with the operation that made it
  (XLA's op_name: which part of the forward or backward), from the dumped live ranges."""
  ranges = glob.glob(os.path.join(dump_dir, "*jit_step*live-range.txt"))
  programs = glob.glob(os.path.join(dump_dir, "*jit_step*after_optimizations.txt"))
  if not ranges or not programs:
    return [f"(no live ranges under {dump_dir})"]
  with open(ranges[0]) as f:
    text = f.read()
  at_peak = re.search(r"Live ranges at (\d+) \(peak\):\n((?:    .*\n)+)", text)
  if at_peak is None:
    return ["(no peak in the live ranges)"]
  with open(programs[0]) as f:
    program = f.read()
  rows = [f"alive at instruction {at_peak.group(1)}, the peak:"]
  for line in at_peak.group(2).splitlines()[:count]:
    value, size = re.match(r"\s+(\S+): (\d+) bytes", line).groups()
    name = value.split("{")[0]
    made_by = re.search(rf"%{re.escape(name)} = .*?op_name=\"([^\"]*)\"", program)
    what = made_by.group(1).replace("\\'", "'") if made_by else ""
    rows.append(f"{int(size) / 2**20:9.2f} MiB  {value}  {what}")
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--block-shapes", default="gpt,llama")
  parser.add_argument("--implementations", default="pallas_mosaic,pallas_mosaic_recompute,cudnn")
  parser.add_argument("--out-dir", default="block_memory")
  parser.add_argument("--quick", action="store_true", help="tiny blocks, plain XLA, any machine")
  parser.add_argument(
    "--deviceless", action="store_true", help="compile for an H100 on a machine without a GPU"
  )
  parser.add_argument(
    "--autotune-from",
    help="with --deviceless: a GPU run's --out-dir, whose autotuner choices each row takes",
  )
  parser.add_argument("--one", help=argparse.SUPPRESS)  # A child's "shape:implementation:where".
  args = parser.parse_args()
  if args.one:
    shape_name, implementation, where = args.one.split(":")
    result = compile_step(shape_name, implementation, args.quick, where == "deviceless")
    print(json.dumps(result), flush=True)
    return

  from jfused.cli.bench import block as block_bench

  where = "deviceless" if args.deviceless else "here"
  presets = ["quick"] if args.quick else args.block_shapes.split(",")
  implementations = ["xla"] if args.quick else args.implementations.split(",")
  for preset in presets:
    for shape in block_bench.PRESETS[preset]:
      for implementation in implementations:
        dump_dir = os.path.abspath(os.path.join(args.out_dir, f"{shape.name}_{implementation}"))
        result = run_one(
          "benchmarks.block_memory",
          f"{shape.name}:{implementation}:{where}",
          quick=args.quick,
          xla_flags=xla_flags(dump_dir, args.deviceless, args.autotune_from),
          env=h100.ENV if args.deviceless else None,
        )
        if "error" in result:
          print(f"{shape.name} {implementation}: failed: {result['error']}", flush=True)
          continue
        prune(dump_dir)
        print(f"\n{shape.name} {implementation}: {result['temp_mib']} MiB temporary", flush=True)
        for row in largest_allocations(dump_dir) + peak_values(dump_dir):
          print(f"  {row.strip()[:160]}", flush=True)


if __name__ == "__main__":
  main()
