"""First-step compile time of a GPT training step by number of blocks, and of one attention.

  PYTHONPATH=. python3 -m benchmarks.compile_time [--blocks 1,2,4,8] [--variants jfused,cudnn]
  PYTHONPATH=. python3 -m benchmarks.compile_time --deviceless ...   # for an H100, without one

Each measurement runs in a fresh process (nothing compiled by an earlier one is reused, no
persistent compilation cache): `flax_layers.GPT` (width 1024, 8 heads of 128, B=8, T=2048,
bf16 compute, f32 parameters, AdamW), one jitted training step traced, lowered and compiled
separately, then timed over 20 steps. Variants: `jfused` (the library's defaults),
`jfused_scan` (the same with `scan_blocks=True`; the variants of `SCAN_XLA_FLAGS` add an XLA
flag to a scanned one), `jfused_fused_bwd`
(the fused attention backward, `deterministic_backward=False`), `jfused_recompute` and
`jfused_scan_recompute` (the MLP's backward recomputing its activation), `cudnn` (Flax's
norms and cuDNN attention, what a user would otherwise pick), `xla` (plain Flax). Every GPT
row reports the step's temporary memory (XLA's buffer assignment). With --deviceless the
steps compile for an H100 on a machine without a GPU (`deviceless.py`): memory as on the GPU,
compile times of this machine's CPU without autotuning, no step time. The
attention rows time the first call of one jitted forward+backward at B4 T4096 16x128 causal
(`pallas_mosaic_fused`: with the fused backward).
Prints one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

from benchmarks import deviceless as h100
from benchmarks import profile_step
from benchmarks.child_process import run_one

PROFILE_KERNELS = 15  # The largest kernels listed per profiled step.

VARIANTS = {
  "jfused": dict(fused=True),
  "jfused_scan": dict(fused=True, scan_blocks=True),
  "jfused_recompute": dict(fused=True, recompute_mlp_activation=True),
  # Under scan every array the backward keeps is stacked over the blocks, zero-filled first
  # and written a slice a block: the recomputing MLP keeps one [tokens, hidden] array where
  # Flax's keeps five.
  "jfused_scan_recompute": dict(fused=True, scan_blocks=True, recompute_mlp_activation=True),
  # The fused attention backward (one kernel instead of two per block).
  "jfused_fused_bwd": dict(fused=True, deterministic_backward=False),
  "cudnn": dict(fused=True, attention_implementation="cudnn", norm_implementation="xla"),
  "xla": dict(fused=False),
}
# The scanned GPT under XLA options that may give back its step time (34 % slower than the
# unrolled loop on an H100, 2026-12-08). XLA's dynamic-slice fusion (on by default) fuses a
# kernel or matmul with the write of its result into the loop's stack of saved arrays, and
# runs it a second time for the result's other users: the attention forward and the query
# projection ran twice a block (deviceless H100 compile, 2026-12-08). Off, the write is a
# copy. While-loop double buffering overlaps two iterations.
NO_SLICE_FUSION = "--xla_gpu_enable_dynamic_slice_fusion=false"
SCAN_XLA_FLAGS = {
  "jfused_scan_no_slice_fusion": ("jfused_scan", NO_SLICE_FUSION),
  "jfused_scan_recompute_no_slice_fusion": ("jfused_scan_recompute", NO_SLICE_FUSION),
  "jfused_scan_double_buffering": (
    "jfused_scan",
    "--xla_gpu_enable_while_loop_double_buffering=true",
  ),
}
VARIANTS.update({name: VARIANTS[base] for name, (base, _) in SCAN_XLA_FLAGS.items()})


def _seconds(start: float) -> float:
  return round(time.perf_counter() - start, 3)


def measure_gpt(
  variant: str,
  num_blocks: int,
  quick: bool,
  steps: int = 20,
  profile: bool = False,
  deviceless: bool = False,
) -> dict:
  from flax import nnx
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from flax_layers import GPT

  batch, seq_len, width, heads = (2, 64, 64, 2) if quick else (8, 2048, 1024, 8)
  model = GPT(
    256,
    num_blocks,
    width,
    heads,
    max_length=seq_len,
    dtype=jnp.bfloat16,
    rngs=nnx.Rngs(0),
    **VARIANTS[variant],
  )
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)

  def train_step(params, opt_state, tokens):
    def loss_fn(params):
      logits = nnx.merge(graph, params, rest)(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:]
      ).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len + 1), 0, 256)
  step = jax.jit(train_step, donate_argnums=(0, 1))
  with h100.compiling_for_h100() if deviceless else contextlib.nullcontext():
    start = time.perf_counter()
    args = h100.on_h100((params, opt_state, tokens)) if deviceless else (params, opt_state, tokens)
    traced = step.trace(*args)
    trace_s = _seconds(start)
    start = time.perf_counter()
    lowered = traced.lower(lowering_platforms=("cuda",)) if deviceless else traced.lower()
    lower_s = _seconds(start)
    module_mb = round(len(lowered.as_text()) / 1e6, 2)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = _seconds(start)
  result = dict(
    kind="gpt",
    variant=variant,
    blocks=num_blocks,
    trace_s=trace_s,
    lower_s=lower_s,
    compile_s=compile_s,
    first_step_s=round(trace_s + lower_s + compile_s, 3),
    module_mb=module_mb,
    temp_mib=round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
  )
  if deviceless:  # Compiled for a GPU this machine does not have: nothing to run.
    return dict(result, where="deviceless H100")
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, tokens)
    loss.block_until_ready()
    times.append(time.perf_counter() - start)
  kernels = {}
  if profile:  # Where the step's time goes: kernel time per step by kind, the largest kernels.
    per_call = profile_step.kernel_times_per_call(train_step, (params, opt_state, tokens), 5)
    top = profile_step.largest(per_call, PROFILE_KERNELS)
    kernels = dict(
      kernels_ms={kind: round(us / 1e3, 3) for kind, us in profile_step.by_kind(per_call).items()},
      top_kernels_ms={name[:90]: round(us / 1e3, 3) for name, us in top},
    )
  return dict(
    result, step_ms=round(1e3 * float(np.median(times[5:])), 2), loss=float(loss), **kernels
  )


def measure_attention(implementation: str, quick: bool, deviceless: bool = False) -> dict:
  import jax
  import jax.numpy as jnp

  from jfused.cli.bench import attention as attention_bench

  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (
    jax.random.normal(key, (1, 128, 2, 64) if quick else (4, 4096, 16, 128), jnp.bfloat16)
    for key in keys
  )
  attend = attention_bench._attend(implementation, causal=True)  # The bench's rows, by name.

  def loss(q, k, v):
    return attend(q, k, v).astype(jnp.float32).sum()

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  start = time.perf_counter()
  if deviceless:  # Traced, lowered and compiled (Mosaic's kernels through ptxas), not run.
    h100.compile_for_h100(grads, q, k, v)
    return dict(kind="attention", variant=implementation, compile_s=_seconds(start))
  jax.block_until_ready(grads(q, k, v))
  return dict(kind="attention", variant=implementation, first_call_s=_seconds(start))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--blocks", default="1,2,4,8")
  parser.add_argument("--variants", default="jfused,cudnn")
  parser.add_argument("--attention", default="pallas_mosaic,cudnn")
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU check of the script")
  parser.add_argument(
    "--profile", action="store_true", help="also trace each GPT step's kernels (time by kind)"
  )
  parser.add_argument(
    "--deviceless",
    action="store_true",
    help="compile for an H100 on a machine without a GPU (nothing runs: no step time)",
  )
  parser.add_argument("--one", help=argparse.SUPPRESS)  # A child process's single measurement.
  args = parser.parse_args()
  if args.one:
    kind, name, *rest = args.one.split(":")
    result = (
      measure_gpt(
        name,
        int(rest[0]),
        args.quick,
        profile="profile" in rest,
        deviceless="deviceless" in rest,
      )
      if kind == "gpt"
      else measure_attention(name, args.quick, deviceless="deviceless" in rest)
    )
    print(json.dumps(result), flush=True)
    return
  jobs = [f"attention:{name}" for name in args.attention.split(",") if name]
  jobs += [
    f"gpt:{variant}:{blocks}" + ":profile" * args.profile
    for variant in args.variants.split(",")
    for blocks in args.blocks.split(",")
  ]
  jobs = [job + ":deviceless" * args.deviceless for job in jobs]
  for job in jobs:
    flags = SCAN_XLA_FLAGS.get(job.split(":")[1], ("", ""))[1]
    if args.deviceless:
      flags = f"{flags} {h100.XLA_FLAGS}"
    env = h100.ENV if args.deviceless else None
    result = run_one("benchmarks.compile_time", job, quick=args.quick, xla_flags=flags, env=env)
    print(json.dumps({"job": job, **result} if "error" in result else result), flush=True)


if __name__ == "__main__":
  main()
