"""Attention benchmark: jfused's kernels beside XLA and cuDNN, measured in one run.

  python -m benchmarks.bench_attention --out results.json [--quick] [--sweep]

TFLOP/s counts 4*B*N*T*S*D for the forward (halved under causal masking) and 2.5 times that
for the backward, as FlashAttention's benchmarks do. Memory is the compiled forward+backward
program's temporary allocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

import jfused
from jfused import timing
from jfused import attention_args
from jfused.attention_pallas import flash_attention
from pallas_kernels import attention_common
from pallas_kernels.attention_triton_bwd import BackwardBlocks
from pallas_kernels.attention_triton_fwd import ForwardBlocks


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  batch: int
  seq: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool
  run_xla: bool = True

  def flops_forward(self) -> float:
    flops = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
    return flops / 2 if self.causal else flops


SHAPES = [
    Shape("T4096_d128", 4, 4096, 16, 16, 128, False),
    Shape("T4096_d128_causal", 4, 4096, 16, 16, 128, True),
    Shape("T16384_d128_causal_B1", 1, 16384, 16, 16, 128, True, run_xla=False),
    Shape("T2048_d64_B8", 8, 2048, 16, 16, 64, False),
    Shape("T2048_d256_B4", 4, 2048, 16, 16, 256, False),
    Shape("T4096_gqa32x8_causal", 4, 4096, 32, 8, 128, True),
]
QUICK_SHAPES = [
    Shape("quick_T128_d64", 1, 128, 2, 2, 64, False),
    Shape("quick_T128_d64_causal_gqa", 1, 128, 4, 2, 64, True),
]


def make_inputs(shape: Shape, dtype, count: int, seed: int = 0):
  sets = []
  for i in range(count):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed + i), 4)
    q = jax.random.normal(kq, (shape.batch, shape.seq, shape.heads, shape.head_dim), dtype)
    k = jax.random.normal(kk, (shape.batch, shape.seq, shape.kv_heads, shape.head_dim), dtype)
    v = jax.random.normal(kv, k.shape, dtype)
    dout = jax.random.normal(kg, q.shape, dtype)
    sets.append((q, k, v, dout))
  return sets


def attention_functions(attend):
  """Jitted forward and forward+backward of attend(q, k, v)."""
  forward = jax.jit(lambda q, k, v, dout: attend(q, k, v))

  def forward_backward(q, k, v, dout):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)

  return forward, jax.jit(forward_backward)


def measure(shape: Shape, attend, inputs, label: str, memory: bool = True) -> dict:
  forward, forward_backward = attention_functions(attend)
  row = {"shape": shape.name, "implementation": label, **dataclasses.asdict(shape)}
  try:
    fwd_s = timing.median_seconds(forward, inputs)
    both_s = timing.median_seconds(forward_backward, inputs)
  except Exception as error:  # Report, don't abort the whole table.
    row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return row
  flops = shape.flops_forward()
  row.update(
      forward_ms=fwd_s * 1e3,
      forward_backward_ms=both_s * 1e3,
      forward_tflops=flops / fwd_s / 1e12,
      forward_backward_tflops=3.5 * flops / both_s / 1e12,
  )
  if memory:
    temp = timing.compiled_temp_bytes(forward_backward, *inputs[0])
    row["temp_mib"] = None if temp is None else temp / 2**20
  return row


def jfused_attend(shape: Shape, implementation: str):
  return lambda q, k, v: jfused.dot_product_attention(
      q, k, v, is_causal=shape.causal, implementation=implementation)


def blocks_attend(shape: Shape, forward_blocks, backward_blocks):
  """The Pallas-Triton kernels with explicit tile sizes (for the sweep)."""

  def attend(q, k, v):
    call = attention_args.normalize(
        q, k, v, None, None, scale=None, is_causal=shape.causal, query_seq_lengths=None,
        key_value_seq_lengths=None, local_window_size=None, logits_soft_cap=None,
        q_segment_ids=None, kv_segment_ids=None)
    config = attention_common.AttentionConfig(
        scale=call.scale, rules=call.rules, forward_blocks=forward_blocks,
        backward_blocks=backward_blocks)
    out, _ = flash_attention(config, q, k, v, None, None, None, None, None, None)
    return out

  return attend


def print_row(row: dict) -> None:
  if "error" in row:
    print(f"{row['shape']:<24} {row['implementation']:<40} ERROR {row['error']}", flush=True)
    return
  temp = row.get("temp_mib")
  print(f"{row['shape']:<24} {row['implementation']:<40} fwd {row['forward_tflops']:7.1f} "
        f"TFLOP/s ({row['forward_ms']:8.3f} ms)  fwd+bwd {row['forward_backward_tflops']:7.1f} "
        f"TFLOP/s ({row['forward_backward_ms']:8.3f} ms)  temp "
        f"{'n/a' if temp is None else f'{temp:.1f} MiB'}", flush=True)


def run_table(shapes, implementations, dtype, input_sets) -> list[dict]:
  rows = []
  for shape in shapes:
    inputs = make_inputs(shape, dtype, input_sets)
    for implementation in implementations:
      if implementation == "xla" and not shape.run_xla:
        continue
      row = measure(shape, jfused_attend(shape, implementation), inputs, implementation)
      print_row(row)
      rows.append(row)
  return rows


FORWARD_SWEEP = {
    128: [(128, 64, 4, 2), (128, 64, 4, 3), (128, 32, 4, 2), (128, 128, 8, 2),
          (128, 128, 8, 3), (64, 64, 4, 2)],
    64: [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 2)],
    256: [(64, 32, 4, 2), (64, 64, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 2),
          (128, 32, 8, 2)],
}
# (block_q, block_kv, num_warps, num_stages) of one backward kernel; the other keeps its default.
BACKWARD_KERNEL_SWEEP = {
    128: [(64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2),
          (64, 32, 4, 2), (128, 128, 8, 2), (32, 32, 4, 2)],
    64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3)],
    256: [(32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2)],
}


def run_sweep(dtype, names=None) -> list[dict]:
  """Tile sizes per kernel and head dim; each backward kernel varies while the other keeps its default."""
  rows = []

  def record(shape, inputs, forward_blocks, backward_blocks, label):
    row = measure(shape, blocks_attend(shape, forward_blocks, backward_blocks), inputs, label,
                  memory=False)
    print_row(row)
    rows.append(row)

  by_name = {shape.name: shape for shape in SHAPES}
  for name in names or ("T4096_d128", "T4096_d128_causal", "T2048_d64_B8", "T2048_d256_B4"):
    shape = by_name[name]
    inputs = make_inputs(shape, dtype, 2)
    for tiles in FORWARD_SWEEP[shape.head_dim]:
      record(shape, inputs, ForwardBlocks(*tiles), None, f"fwd {tiles}")
    if shape.causal:
      continue  # The backward kernels' tiles are swept on the non-causal shapes.
    for bq, bk, warps, stages in BACKWARD_KERNEL_SWEEP[shape.head_dim]:
      dkv = BackwardBlocks(dkv_block_q=bq, dkv_block_kv=bk, dkv_num_warps=warps,
                           dkv_num_stages=stages)
      record(shape, inputs, None, dkv, f"dkv {(bq, bk, warps, stages)}")
      dq = BackwardBlocks(dq_block_q=bq, dq_block_kv=bk, dq_num_warps=warps,
                          dq_num_stages=stages)
      record(shape, inputs, None, dq, f"dq {(bq, bk, warps, stages)}")
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="write the rows as JSON here")
  parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
  parser.add_argument("--sweep", action="store_true", help="tile-size sweep of the kernels")
  parser.add_argument("--implementations", default="pallas_triton,cudnn,xla")
  parser.add_argument("--shapes", help="comma-separated shape names (default: all)")
  args = parser.parse_args(argv)
  dtype = jnp.bfloat16
  env = timing.environment()
  print(env, flush=True)
  names = args.shapes.split(",") if args.shapes else None
  if args.sweep:
    rows = run_sweep(dtype, names)
  else:
    shapes = QUICK_SHAPES if args.quick else SHAPES
    shapes = [s for s in shapes if names is None or s.name in names]
    rows = run_table(shapes, args.implementations.split(","), dtype, 2 if args.quick else 3)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({**env, "dtype": "bfloat16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
