"""Tile sweep of the Mosaic GPU attention forward kernel on the guide's attention rows.

  PYTHONPATH=. python3 -m benchmarks.sweep_attention_mosaic [--shapes NAME,...] [--tiles T]
      [--tokamax] [--out F]

Prints forward TFLOP/s of the kernel alone with the default blocks and a few (block_q,
block_kv, stages, overlapped softmax, persistent launch, named releases, late row sum)
settings per head dim, beside tokamax's forward if asked, and the largest difference from
cuDNN's output. Comparisons with cuDNN and the Triton path over whole forward+backward
passes are `jfused bench attention`'s job.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json

import jax
import jax.numpy as jnp

import jfused
from jfused.cli import timing
from jfused.cli.bench import attention as attention_bench
from jfused.cli.bench.measure import MIN_REPEAT_SECONDS, describe_failure
from pallas_kernels.attention.mosaic import fwd as mosaic

# MosaicForwardBlocks fields (block_q, block_kv, num_stages, overlap_softmax, persistent,
# named_releases, late_row_sum) per head dim, timed after the shape's default
# (default_forward_blocks). Longer key blocks spread the
# fixed cost of a step (barriers, row reductions, the turns) over more work but hold a wider
# logit tile in registers and mask more of it on a causal diagonal; with the softmax
# overlapped a consumer holds a second tile of probabilities, so those stay 64 x 128. The
# persistent launch applies only without causality or a window.
FORWARD_SWEEP = {
  64: [
    (64, 256, 2, False, False, True),
    (64, 128, 2, False, False, False),
    (128, 128, 2, False, False, True),
  ],
  128: [(64, 128, 2, False, False, True), (64, 128, 2, False, True, False)],
  256: [(64, 64, 2, False, False, True, True)],
}
# Flags of a --tiles item, MosaicForwardBlocks' fields after the sizes in order:
# overlap_softmax, persistent (off), named_releases, late_row_sum.
FLAGS = ("overlap", "not_persistent", "named", "late_sum")


def parse_tiles(text: str) -> list[tuple]:
  """'64,192,2;64,128,2,overlap,not_persistent' -> [(64, 192, 2, False, True, False, ...),
  (64, 128, 2, True, False, False, ...)] (MosaicForwardBlocks' fields in order)."""
  tiles = []
  for item in filter(None, text.split(";")):
    sizes, flags = item.split(",")[:3], item.split(",")[3:]
    if unknown := set(flags) - set(FLAGS):
      raise ValueError(f"unknown flags {sorted(unknown)}; known: {FLAGS}")
    tiles.append(
      (
        *(int(p) for p in sizes),
        "overlap" in flags,
        "not_persistent" not in flags,
        *(flag in flags for flag in FLAGS[2:]),
      )
    )
  return tiles


def tokamax_forwards(causal: bool) -> dict:
  """tokamax's Mosaic forward under its own heuristic tiles, and (without causal masking,
  where it launches persistently) with the persistent launch off: label -> function."""
  import tokamax  # Optional; main() checks it is installed.
  from tokamax._src.ops.attention import pallas_mosaic_gpu as tokamax_mosaic

  forwards = {
    "tokamax": lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, is_causal=causal, implementation="mosaic"
    )
  }
  if not causal:

    def not_persistent(q, k, v):
      # tokamax's heuristic tiles (sm90 get_heuristics_config) with the launch changed.
      config = tokamax_mosaic.ConfigSM90(
        block_q=64, block_kv=128 if q.shape[-1] <= 128 else 64, num_stages=2, persistent=False
      )
      op = tokamax_mosaic.PallasMosaicGpuFlashAttention(config=config)
      return op(q, k, v, is_causal=False)

    forwards["tokamax not persistent"] = not_persistent
  return forwards


def sweep(shape, inputs, tiles=None, with_tokamax: bool = False) -> list[dict]:
  """One row for the shape's default blocks, one per tile setting (`tiles`, default
  FORWARD_SWEEP's for the head dim), and with `with_tokamax` one per tokamax_forwards entry:
  forward ms, TFLOP/s and the largest difference from cuDNN."""
  rows = []
  q, k, v = inputs[0][:3]
  expected = jax.jit(
    lambda q, k, v: jfused.dot_product_attention(
      q, k, v, is_causal=shape.causal, implementation="cudnn"
    )
  )(q, k, v).astype(jnp.float32)
  settings = {
    "mosaic fwd default": mosaic.default_forward_blocks(
      shape.head_dim, shape.causal, shape.heads // shape.kv_heads
    )
  }
  for tile in tiles or FORWARD_SWEEP[shape.head_dim]:
    settings[f"mosaic fwd {tile}"] = mosaic.MosaicForwardBlocks(*tile)
  forwards = {}
  for label, blocks in settings.items():
    forwards[label] = functools.partial(
      lambda q, k, v, blocks: mosaic.attention_forward(
        q, k, v, scale=shape.head_dim**-0.5, is_causal=shape.causal, blocks=blocks
      )[0],
      blocks=blocks,
    )
  if with_tokamax:
    forwards.update(tokamax_forwards(shape.causal))
  for label, function in forwards.items():
    row = {"shape": shape.name, "config": label}
    try:
      forward = jax.jit(lambda q, k, v, *rest, function=function: function(q, k, v))
      seconds = timing.median_seconds(
        forward, inputs, calls=20, repeats=7, min_repeat_seconds=MIN_REPEAT_SECONDS
      )
      diff = jnp.max(jnp.abs(forward(q, k, v).astype(jnp.float32) - expected))
      row.update(
        ms=seconds * 1e3, tflops=shape.forward_flops() / seconds / 1e12, max_diff=float(diff)
      )
      print(
        f"{shape.name:<30} {label:<32} {row['ms']:7.3f} ms {row['tflops']:6.1f} TFLOP/s "
        f"max_diff vs cudnn {row['max_diff']:.2e}",
        flush=True,
      )
    except Exception as error:  # Report, don't abort the sweep (smem overflow, say).
      row["error"] = describe_failure(error)
      print(f"{shape.name:<30} {label:<32} {row['error']}", flush=True)
    rows.append(row)
  return rows


def main(argv=None) -> None:
  shapes = {
    s.name: s
    for preset in attention_bench.PRESETS.values()
    for gqa in (False, True)
    for s in preset(gqa)
  }
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  guide = [s.name for s in attention_bench.PRESETS["guide"](False)]
  parser.add_argument(
    "--shapes",
    default=",".join(guide),
    help="comma-separated names from jfused bench's attention presets, "
    "with --gqa's too "
    f"(default: the guide's rows, {', '.join(guide)})",
  )
  parser.add_argument(
    "--tiles",
    default="",
    help="settings to time instead of FORWARD_SWEEP's, e.g. "
    f"'64,192,2;64,128,2,overlap' (flags: {', '.join(FLAGS)})",
  )
  parser.add_argument(
    "--tokamax",
    action="store_true",
    help="also tokamax's Mosaic forward, persistent and not (if installed)",
  )
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args(argv)
  env = timing.environment()
  print(env, flush=True)
  rows = []
  for name in (name for name in args.shapes.split(",") if name):
    shape = shapes[name]
    rows += sweep(
      shape,
      attention_bench.make_inputs(shape, jnp.bfloat16, 3),
      parse_tiles(args.tiles),
      with_tokamax=args.tokamax and importlib.util.find_spec("tokamax") is not None,
    )
    if args.out:  # Written after every shape, so a cut-off run keeps what it measured.
      with open(args.out, "w") as f:
        json.dump({**env, "dtype": "bfloat16", "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
