"""Time of each Mosaic backward kernel alone (Hopper only): where the backward's time goes,
for backward-tile variants and, when installed, tokamax's Mosaic backward.

  PYTHONPATH=. python3 -m benchmarks.time_attention_mosaic_bwd_kernels \\
      --shapes d128,d128_causal --variants default,dkv_overlap --tokamax

For each shape, the forward's residuals are computed once; then the whole backward, the
backward keeping only dq (XLA drops the unused dK/dV kernel) and the backward keeping only
dk and dv (the dQ kernel dropped) are timed. TFLOP/s count the products each part runs:
5 for the backward (2.5x the forward's 4 B N T S D), 3 for the dQ kernel (S, dP, dQ), 4 for
the dK/dV kernel (S^T, dP^T, dV, dK); halved under causal masking.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp

from jfused.cli import timing
from jfused.cli.bench.measure import describe_failure, measure
from pallas_kernels.attention.mosaic import bwd, fwd

# name: (batch, seq, heads, kv_heads, head_dim, causal).
SHAPES = {
  "d128": (4, 4096, 16, 16, 128, False),
  "d128_causal": (4, 4096, 16, 16, 128, True),
  "d128_gqa_causal": (4, 4096, 32, 8, 128, True),
  "d64": (8, 2048, 16, 16, 64, False),
  "d64_causal": (8, 2048, 16, 16, 64, True),
  "d256": (4, 2048, 16, 16, 256, False),
}
# name: MosaicBackwardBlocks fields changed from the head dim's default.
VARIANTS = {
  "default": {},
  "dkv_overlap": {"dkv_overlap": True},
  "no_dkv_overlap": {"dkv_overlap": False},
  "dkv_split": {"dkv_split": True, "dkv_overlap": False},
  "dq_3_stages": {"dq_stages": 3},
  # d=64 with tokamax's 64 x 64 steps (the default's are 64 x 128, three stages).
  "steps_64x64": {"dkv_block_q": 64, "dkv_stages": 2, "dq_block_kv": 64, "dq_stages": 2},
  "named": {"named_releases": True},  # Ring slots released on named barriers.
  # The fused backward (one kernel; its "dq" and "dk/dv" parts both time that kernel) with
  # two stages, each consumer adding all of dQ's columns for its keys (what
  # bwd.fused_backward_blocks takes at d=64), with and without the overlapped steps.
  "fused": {"fused": True, "dkv_stages": 2},
  "fused_no_overlap": {"fused": True, "dkv_stages": 2, "dkv_overlap": False},
  "fused_overlap": {"fused": True, "dkv_stages": 2, "dkv_overlap": True},
  # dQ's columns divided between the consumers (d=128 only; what bwd.fused_backward_blocks
  # takes there).
  "fused_split_dq": {"fused": True, "dkv_stages": 2, "fused_split_dq": True},
  "fused_split_dq_no_overlap": {
    "fused": True,
    "dkv_stages": 2,
    "fused_split_dq": True,
    "dkv_overlap": False,
  },
  # FlashAttention-3's register split (240 a consumer thread, 24 for the producer) against
  # the default 232 / 40: for the fused kernel's spills, and the pair's.
  "fused_split_dq_240": {
    "fused": True,
    "dkv_stages": 2,
    "fused_split_dq": True,
    "consumer_registers": 240,
  },
  "default_240": {"consumer_registers": 240},
}
PARTS = {
  "backward": (lambda grads: grads, 5),
  "dq kernel": (lambda grads: grads[0], 3),
  "dk/dv kernel": (lambda grads: grads[1:], 4),
}


def _inputs(shape, seed):
  batch, seq, heads, kv_heads, head_dim, _ = shape
  keys = jax.random.split(jax.random.key(seed), 4)
  q, dout = (
    jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16) for key in keys[:2]
  )
  k, v = (
    jax.random.normal(key, (batch, seq, kv_heads, head_dim), jnp.bfloat16) for key in keys[2:]
  )
  return q, k, v, dout


def _ours(shape, overrides):
  """(prepare, backward): prepare maps (q, k, v, dout) to the backward's arguments."""
  head_dim, causal = shape[4], shape[5]
  blocks = dataclasses.replace(bwd.default_backward_blocks(head_dim), **overrides)
  scale = head_dim**-0.5

  def prepare(q, k, v, dout):
    out, lse = jax.jit(
      lambda q, k, v: fwd.attention_forward(q, k, v, scale=scale, is_causal=causal)
    )(q, k, v)
    return q, k, v, out, lse, dout

  def backward(q, k, v, out, lse, dout):
    return bwd.attention_backward(
      q, k, v, out, lse, dout, scale=scale, is_causal=causal, blocks=blocks
    )

  return prepare, backward


def _tokamax(shape):
  import tokamax  # Optional; main() checks it is installed.

  causal = shape[5]

  def prepare(q, k, v, dout):
    _, vjp = jax.vjp(
      lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal), q, k, v
    )
    return vjp, dout

  return prepare, lambda vjp, dout: vjp(dout)


def _time(label, shape, prepare, backward, parts):
  batch, seq, heads, _, head_dim, causal = shape
  argument_sets = [prepare(*_inputs(shape, seed)) for seed in range(2)]
  product_flops = 2.0 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
  print(f"  {label}", flush=True)
  for part in parts:
    pick, products = PARTS[part]
    try:
      seconds = measure(
        lambda *args, pick=pick: pick(backward(*args)), argument_sets, quick=False
      ).seconds
    except Exception as failure:  # noqa: BLE001 - report the row, keep going
      print(f"    {part:<13} failed: {describe_failure(failure)}", flush=True)
      continue
    print(
      f"    {part:<13} {seconds * 1e3:7.3f} ms "
      f"{products * product_flops / seconds / 1e12:6.0f} TFLOP/s",
      flush=True,
    )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="d128,d256", help=f"of {', '.join(SHAPES)}")
  parser.add_argument("--variants", default="default,dkv_split", help=f"of {', '.join(VARIANTS)}")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"of {', '.join(PARTS)}")
  parser.add_argument(
    "--tokamax", action="store_true", help="also tokamax's Mosaic backward (if installed)"
  )
  args = parser.parse_args(argv)
  print(timing.environment(), flush=True)
  for shape_name in args.shapes.split(","):
    shape = SHAPES[shape_name]
    batch, seq, heads, kv_heads, head_dim, causal = shape
    print(
      f"{shape_name}: B{batch} T{seq} {heads} heads ({kv_heads} kv) d{head_dim} causal={causal}",
      flush=True,
    )
    for variant in args.variants.split(","):
      try:
        functions = _ours(shape, VARIANTS[variant])
      except ValueError as reason:  # An option this head dim's default tiles cannot take.
        print(f"  {variant}: not applicable ({reason})", flush=True)
        continue
      _time(variant, shape, *functions, args.parts.split(","))
    if args.tokamax:
      if importlib.util.find_spec("tokamax") is None:
        print("  tokamax: not installed", flush=True)
      else:
        _time("tokamax", shape, *_tokamax(shape), args.parts.split(","))


if __name__ == "__main__":
  main()
