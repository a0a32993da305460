"""Tile sweep of the Mosaic attention backward kernels (Hopper only).

For each MosaicBackwardBlocks setting: the largest relative error of dq, dk, dv against a
float32 XLA reference on a small awkward shape (causal, GQA, partial blocks), then the time of
the backward kernels alone (the forward's out and lse precomputed) at a benchmark shape.

  PYTHONPATH=. python3 -m benchmarks.sweep_attention_mosaic_bwd --head-dim 64
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import jax
import jax.numpy as jnp

from jfused.cli import timing
from jfused.cli.bench.measure import measure
from pallas_kernels.attention.mosaic import bwd, fwd


def _inputs(batch, t, s, heads, kv_heads, head_dim, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (batch, t, heads, head_dim), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, s, kv_heads, head_dim), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, s, kv_heads, head_dim), jnp.bfloat16)
  dout = jax.random.normal(keys[3], (batch, t, heads, head_dim), jnp.bfloat16)
  return q, k, v, dout


def _backward(blocks, causal):
  def run(q, k, v, dout):
    scale = q.shape[-1] ** -0.5
    out, lse = fwd.attention_forward(q, k, v, scale=scale, is_causal=causal)
    return bwd.attention_backward(
      q, k, v, out, lse, dout, scale=scale, is_causal=causal, blocks=blocks
    )

  return jax.jit(run)


def max_relative_error(blocks, head_dim) -> float:
  q, k, v, dout = _inputs(1, 1000, 1100, 8, 2, head_dim)
  grads = _backward(blocks, True)(q, k, v, dout)

  def reference(q, k, v):
    f32 = lambda x: x.astype(jnp.float32)
    return jax.nn.dot_product_attention(
      f32(q), f32(k), f32(v), is_causal=True, implementation="xla"
    )

  with jax.default_matmul_precision("highest"):
    _, vjp = jax.vjp(reference, q, k, v)
    expected = vjp(dout.astype(jnp.float32))
  return max(
    float(jnp.max(jnp.abs(g.astype(jnp.float32) - e)) / jnp.max(jnp.abs(e)))
    for g, e in zip(grads, expected)
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--head-dim", type=int, default=64, choices=bwd.SUPPORTED_HEAD_DIMS)
  parser.add_argument("--causal", action="store_true")
  parser.add_argument(
    "--settings",
    choices=("all", "overlap"),
    default="all",
    help="overlap: only the default tiles and the default with the dQ kernel's products overlapped",
  )
  args = parser.parse_args(argv)
  print(timing.environment(), flush=True)
  d = args.head_dim
  batch, t = {64: (8, 2048), 128: (4, 4096), 256: (4, 2048)}[d]
  inputs = [_inputs(batch, t, t, 16, 16, d, seed) for seed in range(2)]
  print(
    f"B{batch} T{t} 16 heads d{d} causal={args.causal}: backward kernels only "
    "(forward time subtracted)"
  )
  forward = jax.jit(
    lambda q, k, v, dout: fwd.attention_forward(q, k, v, scale=d**-0.5, is_causal=args.causal)
  )
  forward_s = measure(forward, inputs, quick=False).seconds
  for blocks in _settings(d, args.settings):
    label = (
      f"dkv_block_q={blocks.dkv_block_q:3d} dkv_stages={blocks.dkv_stages} "
      f"dkv_split={blocks.dkv_split!s:<5} dq_block_kv={blocks.dq_block_kv:3d} "
      f"dq_stages={blocks.dq_stages} dq_split={blocks.dq_split!s:<5} "
      f"dq_overlap={blocks.dq_overlap!s:<5}"
    )
    try:
      error = max_relative_error(blocks, d)
      seconds = measure(_backward(blocks, args.causal), inputs, quick=False).seconds - forward_s
      # The backward's 5 products of 2 * B * N * T * S * D flops (halved when causal).
      tflops = 5 * 2 * batch * 16 * t * t * d / (2 if args.causal else 1) / seconds / 1e12
      print(
        f"  {label}: {seconds * 1e3:.3f} ms, {tflops:.0f} TFLOP/s, max rel err {error:.1e}",
        flush=True,
      )
    except Exception as e:  # noqa: BLE001 - a sweep reports every setting that fails
      print(f"  {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


def _settings(head_dim: int, which: str = "all"):
  """The MosaicBackwardBlocks to time. At d=256 shared memory allows little: the split dK/dV
  kernel with 64-query steps, and a dQ kernel with 32-key steps, split consumers or a single
  stage. Each list starts with the default and its overlapped-dQ forms (two and three
  stages; a slot is then released a step later)."""
  default = bwd.default_backward_blocks(head_dim)
  overlapped = [
    dataclasses.replace(default, dq_overlap=True, dq_stages=stages) for stages in (2, 3)
  ]
  if which == "overlap":
    return [default, *overlapped]
  return list(dict.fromkeys([default, *overlapped, *_tile_settings(head_dim)]))


def _tile_settings(head_dim: int):
  if head_dim == 256:
    return [
      bwd.MosaicBackwardBlocks(dkv_split=True, dq_block_kv=32),
      bwd.MosaicBackwardBlocks(dkv_split=True, dq_split=True),
      bwd.MosaicBackwardBlocks(dkv_split=True, dq_split=True, dq_stages=3),
      bwd.MosaicBackwardBlocks(dkv_split=True, dq_block_kv=64, dq_stages=1),
    ]
  settings = [
    bwd.MosaicBackwardBlocks(
      dkv_block_q=dkv_q, dq_block_kv=dq_kv, dkv_stages=stages, dq_stages=stages
    )
    for dkv_q, dq_kv, stages in itertools.product((64, 128), (64, 128), (2, 3))
  ]
  if head_dim == 128:  # The split dK/dV kernel, which d=256 needs, at d=128 too.
    settings.append(bwd.MosaicBackwardBlocks(dkv_split=True))
  return settings


if __name__ == "__main__":
  main()
