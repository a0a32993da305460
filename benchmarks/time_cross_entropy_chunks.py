"""The linear cross-entropy's forward+backward per chunk size: how the time and scratch of
each implementation move with the columns (or tokens) one chunk holds.

  PYTHONPATH=. python3 -m benchmarks.time_cross_entropy_chunks \\
      --heads D2048_V131072 --chunk-mib 128,256,512 --implementations pallas_mosaic

Each size sets `api.LOGITS_CHUNK_BYTES`, the float32 logits of one chunk for every token
(256 MiB by default). The vocabulary walk sums dx in float32 once per chunk, so fewer,
wider chunks mean fewer passes over that sum; the Mosaic walk holds a chunk's gradient in
the inputs' dtype, half the bytes the size counts, so it could take chunks twice as wide for
the same memory. N = 16384 tokens, bf16, weight [D, V] (--layouts vd: a tied [V, D] table),
mean loss; TFLOP/s count 6 N D V. With --matmul the bare matmuls of those FLOPs are timed
first and each row also reads as a share of their rate (the issue's 70 % target).

With --profile each row is also traced (`benchmarks.profile_step`'s kernel sums, per call)
and the compiled program's cuBLAS calls are listed with their beta: 1 where XLA made the
matmul add its result into dx's float32 sum itself, 0 where a separate kernel adds it.
"""

from __future__ import annotations

import argparse
import collections
import re

import jax

from benchmarks import profile_step
from benchmarks.kernel_setting import kernel_setting
from benchmarks.time_cross_entropy_mosaic import HEADS, TOKENS, blocks_of, make_inputs
import jfused
from jfused.cli import timing
from jfused.cli.bench import cross_entropy as bench_cross_entropy
from jfused.cli.bench.cross_entropy import LossShape
from jfused.cli.bench.measure import describe_failure, measure
from jfused.cross_entropy import api
from pallas_kernels.cross_entropy import mosaic


def _forward_backward(implementation, layout="dv"):
  def loss(x, weight, labels):
    return jfused.linear_cross_entropy(
      x, weight, labels, implementation=implementation, weight_layout=layout
    )

  return jax.value_and_grad(loss, argnums=(0, 1))


def _inputs(width, vocab, layout, seed):
  x, weight, labels = make_inputs(width, vocab, seed)
  return x, weight if layout == "dv" else weight.T.copy(), labels


def _gemm_betas(fn, arguments) -> dict[str, int]:
  """How many cuBLAS calls of each beta the compiled program makes (per program, loops
  counted once)."""
  text = jax.jit(fn).lower(*arguments).compile().as_text()
  betas = collections.Counter()
  for line in text.splitlines():
    if "__cublas" in line and "custom_call_target" in line:
      found = re.search(r'"beta":\s*([0-9.]+)', line)
      betas[f"beta={found.group(1) if found else '?'}"] += 1
  return dict(betas)


def _profile(fn, arguments, calls: int = 5) -> None:
  """Kernel time per call by kind and the top kernels, as profile_step prints a step's."""
  per_call = profile_step.kernel_times_per_call(fn, arguments, calls)
  profile_step.print_run("    kernels per call", per_call)
  print(f"    cuBLAS calls in the program: {_gemm_betas(fn, arguments)}", flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", default="D2048_V131072", help=f"of {', '.join(HEADS)}")
  parser.add_argument("--chunk-mib", default="128,256,512", help="LOGITS_CHUNK_BYTES in MiB")
  parser.add_argument("--implementations", default="pallas_mosaic,pallas_triton")
  parser.add_argument("--profile", action="store_true", help="trace each row's kernels too")
  parser.add_argument(
    "--matmul", action="store_true", help="time the bare matmuls first; rows then read as % of them"
  )
  parser.add_argument("--layouts", default="dv", help='"dv" ([D, V]) and/or "vd" (a tied table)')
  parser.add_argument(
    "--mosaic-blocks",
    help="the Mosaic kernels' tiles for the whole run, as time_cross_entropy_mosaic's choices "
    "(256x64x3c2); default: mosaic.DEFAULT_BLOCKS",
  )
  args = parser.parse_args(argv)
  print(timing.environment(), flush=True)
  if args.mosaic_blocks:
    with kernel_setting(mosaic, "DEFAULT_BLOCKS", blocks_of(args.mosaic_blocks)):
      _run(args)
  else:
    _run(args)


def _run(args) -> None:
  for head in args.heads.split(","):
    for layout in args.layouts.split(","):
      _run_head(args, head, layout)


def _run_head(args, head: str, layout: str) -> None:
  width, vocab = HEADS[head]
  print(f"{head}: N{TOKENS} D{width} V{vocab}, weight {layout}", flush=True)
  argument_sets = [_inputs(width, vocab, layout, seed) for seed in range(2)]
  flops = 6.0 * TOKENS * width * vocab
  matmul_seconds = None
  if args.matmul:
    # `jfused bench cross_entropy`'s ceiling: x @ W, then dx and dweight from those logits.
    matmuls = bench_cross_entropy._matmuls(LossShape(TOKENS, width, vocab, layout), True)
    matmul_seconds = measure(matmuls, argument_sets, quick=False).seconds
    print(
      f"  {'matmul':<28} {matmul_seconds * 1e3:8.2f} ms "
      f"{flops / matmul_seconds / 1e12:6.0f} TFLOP/s",
      flush=True,
    )
  for mib in (int(m) for m in args.chunk_mib.split(",")):
    with kernel_setting(api, "LOGITS_CHUNK_BYTES", mib * 2**20):
      for implementation in args.implementations.split(","):
        label = f"{implementation} {mib} MiB"
        loss = _forward_backward(implementation, layout)
        try:
          measured = measure(loss, argument_sets, quick=False)
        except Exception as failure:  # noqa: BLE001 - report the row, keep going
          print(f"  {label:<28} failed: {describe_failure(failure)}", flush=True)
          continue
        share = "" if matmul_seconds is None else f" {matmul_seconds / measured.seconds:6.1%}"
        print(
          f"  {label:<28} {measured.seconds * 1e3:8.2f} ms "
          f"{flops / measured.seconds / 1e12:6.0f} TFLOP/s{share} "
          f"{measured.temp_bytes / 2**20:7.0f} MiB scratch",
          flush=True,
        )
        if args.profile:
          _profile(loss, argument_sets[0])


if __name__ == "__main__":
  main()
