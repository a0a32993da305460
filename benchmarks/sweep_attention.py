"""Tile-size sweep of the Pallas-Triton attention kernels (for choosing their defaults).

  python -m benchmarks.sweep_attention --out sweep.json [--shapes NAME,...]

The user-facing comparison with XLA, cuDNN and tokamax is `jfused bench attention`.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jfused.attention import args as attention_args
from jfused.attention.triton import flash_attention
from jfused.cli import timing
from jfused.cli.bench import attention
from jfused.cli.bench.measure import describe_failure
from jfused.cli.bench.measure import measure as bench_measure
from pallas_kernels.attention import common as attention_common
from pallas_kernels.attention.triton_bwd import BackwardBlocks
from pallas_kernels.attention.triton_fwd import ForwardBlocks

SHAPES = {shape.name: shape for shape in attention.PRESETS["guide"](False)}


def measure(shape, attend, inputs, label: str) -> dict:
  """Forward and forward+backward TFLOP/s of one tile configuration."""
  row = {"shape": shape.name, "implementation": label}
  try:
    forward = bench_measure(lambda q, k, v, dout: attend(q, k, v), inputs, quick=False)

    def forward_backward(q, k, v, dout):
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(dout)

    both = bench_measure(forward_backward, inputs, quick=False)
  except Exception as error:  # Report, don't abort the sweep.
    row["error"] = describe_failure(error)
    return row
  flops = shape.forward_flops()
  row.update(
    forward_tflops=flops / forward.seconds / 1e12,
    forward_backward_tflops=3.5 * flops / both.seconds / 1e12,
  )
  return row


def blocks_attend(shape: attention.AttentionShape, forward_blocks, backward_blocks):
  """The Pallas-Triton kernels with explicit tile sizes (for the sweep)."""

  def attend(q, k, v):
    call = attention_args.normalize(
      q,
      k,
      v,
      None,
      None,
      scale=None,
      is_causal=shape.causal,
      query_seq_lengths=None,
      key_value_seq_lengths=None,
      local_window_size=None,
      logits_soft_cap=None,
      q_segment_ids=None,
      kv_segment_ids=None,
    )
    config = attention_common.AttentionConfig(
      scale=call.scale,
      rules=call.rules,
      forward_blocks=forward_blocks,
      backward_blocks=backward_blocks,
    )
    out, _ = flash_attention(config, q, k, v, None, None, None, None, None, None)
    return out

  return attend


def print_row(row: dict) -> None:
  if "error" in row:
    print(f"{row['shape']:<24} {row['implementation']:<28} ERROR {row['error']}", flush=True)
    return
  print(
    f"{row['shape']:<24} {row['implementation']:<28} fwd {row['forward_tflops']:7.1f} "
    f"TFLOP/s  fwd+bwd {row['forward_backward_tflops']:7.1f} TFLOP/s",
    flush=True,
  )


FORWARD_SWEEP = {
  128: [
    (128, 64, 4, 2),
    (128, 64, 4, 3),
    (128, 32, 4, 2),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (64, 64, 4, 2),
  ],
  64: [(128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 2)],
  256: [
    (64, 32, 4, 2),
    (64, 64, 4, 2),
    (64, 32, 8, 2),
    (32, 32, 4, 2),
    (64, 64, 8, 2),
    (128, 32, 8, 2),
  ],
}
# (block_q, block_kv, num_warps, num_stages) of one backward kernel; the other keeps its default.
BACKWARD_KERNEL_SWEEP = {
  128: [
    (64, 64, 4, 2),
    (32, 64, 4, 2),
    (64, 64, 4, 3),
    (64, 128, 8, 2),
    (128, 64, 8, 2),
    (64, 32, 4, 2),
    (128, 128, 8, 2),
    (32, 32, 4, 2),
  ],
  64: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3)],
  256: [(32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2)],
}


def run_sweep(dtype, names=None) -> list[dict]:
  """Tile sizes per kernel and head dim.

  Each backward kernel's tiles vary while the other kernel keeps its default.
  """
  rows = []

  def record(shape, inputs, forward_blocks, backward_blocks, label):
    row = measure(shape, blocks_attend(shape, forward_blocks, backward_blocks), inputs, label)
    print_row(row)
    rows.append(row)

  for name in names or list(SHAPES)[:2] + list(SHAPES)[3:5]:
    shape = SHAPES[name]
    inputs = attention.make_inputs(shape, dtype, 2)
    for tiles in FORWARD_SWEEP[shape.head_dim]:
      record(shape, inputs, ForwardBlocks(*tiles), None, f"fwd {tiles}")
    if shape.causal:
      continue  # The backward kernels' tiles are swept on the non-causal shapes.
    for bq, bk, warps, stages in BACKWARD_KERNEL_SWEEP[shape.head_dim]:
      dkv = BackwardBlocks(
        dkv_block_q=bq, dkv_block_kv=bk, dkv_num_warps=warps, dkv_num_stages=stages
      )
      record(shape, inputs, None, dkv, f"dkv {(bq, bk, warps, stages)}")
      dq = BackwardBlocks(dq_block_q=bq, dq_block_kv=bk, dq_num_warps=warps, dq_num_stages=stages)
      record(shape, inputs, None, dq, f"dq {(bq, bk, warps, stages)}")
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="write the rows as JSON here")
  parser.add_argument("--shapes", help=f"comma-separated, from {', '.join(SHAPES)}")
  args = parser.parse_args(argv)
  env = timing.environment()
  print(env, flush=True)
  rows = run_sweep(jnp.bfloat16, args.shapes.split(",") if args.shapes else None)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({**env, "dtype": "bfloat16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
