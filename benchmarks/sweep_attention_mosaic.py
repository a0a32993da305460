"""Tile sweep of the Mosaic GPU attention forward kernel on the guide's attention rows.

  PYTHONPATH=. python3 -m benchmarks.sweep_attention_mosaic [--shapes NAME,...] [--out F]

Prints forward TFLOP/s of the kernel alone under a few (block_q, block_kv, stages, overlapped
softmax) settings per head dim, and the largest difference from cuDNN's output. Comparisons
with cuDNN and the Triton path over whole forward+backward passes are `jfused bench
attention`'s job.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import jfused
from jfused import timing
from jfused.bench import attention as attention_bench
from jfused.bench.measure import MIN_REPEAT_SECONDS, describe_failure
from pallas_kernels import attention_mosaic_fwd as mosaic

# (block_q, block_kv, num_stages, overlap_softmax) per head dim. With the softmax overlapped a
# consumer holds a second tile of probabilities: 64-row tiles keep it within its registers.
FORWARD_SWEEP = {
    64: [(128, 128, 2, False), (64, 128, 2, True), (64, 128, 3, True)],
    128: [(64, 128, 2, False), (64, 128, 2, True)],
    256: [(64, 64, 2, False), (64, 64, 2, True)],
}


def sweep(shape, inputs) -> list[dict]:
  """One row per tile setting: forward ms, TFLOP/s and the largest difference from cuDNN."""
  rows = []
  q, k, v = inputs[0][:3]
  expected = jax.jit(lambda q, k, v: jfused.dot_product_attention(
      q, k, v, is_causal=shape.causal, implementation="cudnn"))(q, k, v).astype(jnp.float32)
  for tile in FORWARD_SWEEP[shape.head_dim]:
    blocks = mosaic.MosaicForwardBlocks(*tile)
    label = f"mosaic fwd {tile}"
    row = {"shape": shape.name, "config": label}
    try:
      forward = jax.jit(lambda q, k, v, *rest, blocks=blocks: mosaic.attention_forward(
          q, k, v, scale=shape.head_dim ** -0.5, is_causal=shape.causal, blocks=blocks)[0])
      seconds = timing.median_seconds(forward, inputs, calls=20, repeats=7,
                                      min_repeat_seconds=MIN_REPEAT_SECONDS)
      diff = jnp.max(jnp.abs(forward(q, k, v).astype(jnp.float32) - expected))
      row.update(ms=seconds * 1e3, tflops=shape.forward_flops() / seconds / 1e12,
                 max_diff=float(diff))
      print(f"{shape.name:<30} {label:<32} {row['ms']:7.3f} ms {row['tflops']:6.1f} TFLOP/s "
            f"max_diff vs cudnn {row['max_diff']:.2e}", flush=True)
    except Exception as error:  # Report, don't abort the sweep (smem overflow, say).
      row["error"] = describe_failure(error)
      print(f"{shape.name:<30} {label:<32} {row['error']}", flush=True)
    rows.append(row)
  return rows


def main(argv=None) -> None:
  shapes = {s.name: s for s in attention_bench.PRESETS["guide"](False)}
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(shapes),
                      help=f"comma-separated, from {', '.join(shapes)}")
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args(argv)
  env = timing.environment()
  print(env, flush=True)
  rows = []
  for name in (name for name in args.shapes.split(",") if name):
    shape = shapes[name]
    rows += sweep(shape, attention_bench.make_inputs(shape, jnp.bfloat16, 3))
    if args.out:  # Written after every shape, so a cut-off run keeps what it measured.
      with open(args.out, "w") as f:
        json.dump({**env, "dtype": "bfloat16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
