"""The cross-entropy's two Mosaic kernels alone (Hopper only), per tile choice, beside what
they replace: their error against XLA and their time.

  PYTHONPATH=. python3 -m benchmarks.time_cross_entropy_mosaic \\
      --heads D2048_V131072 --statistics-blocks 128x128x3,256x64x4

For each head (N = 16384 tokens, bf16, weight [D, V]):

- statistics: `mosaic.logits_statistics` over the whole vocabulary, against XLA's float32
  logits chunk by chunk with the Triton row kernel's statistics (what pallas_triton's walk
  runs), and the bare matmul x @ W of the same FLOPs;
- gradient: `mosaic_gradient.logits_gradient` on one 4096-column chunk, against XLA's
  float32 logits of the chunk with the Triton row kernel's gradient, and the bare matmul.

Errors are the largest absolute difference from the float32 XLA computation of the same
numbers (lse, label logit and logit sum; the gradient). TFLOP/s count 2 N D V (statistics)
or 2 N D C (gradient).
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp

from jfused.cli import timing
from jfused.cli.bench.measure import describe_failure, measure
from jfused.cross_entropy import reference
from pallas_kernels.cross_entropy import mosaic, mosaic_gradient
from pallas_kernels.cross_entropy import triton as triton_rows
from pallas_kernels.cross_entropy.triton import LossSpec

TOKENS = 16384
CHUNK = 4096  # Columns of the gradient's chunk: the walk's at 16k tokens (256 MiB of logits).
HEADS = {
  "D2048_V32768": (2048, 32768),
  "D2048_V131072": (2048, 131072),
  "D4096_V131072": (4096, 131072),
  "D4096_V262144": (4096, 262144),
  "D4096_V128256": (4096, 128256),  # LLaMA 3's vocabulary (a tied table in the loss's bench).
}
# block_cols x block_k x num_stages per kernel: the first default (128 x 128 x 3), 256 x 64 x 3
# (wgmma's widest N, which led on 2026-12-07), then other widths in as many stages as shared
# memory holds; the gradient kernel also keeps its (128 x block_cols) output tile there.
# "c2": each weight tile multicast to a cluster of two CTAs (MosaicStatisticsBlocks.
# cluster_tiles); "s4": the vocabulary walked in four splits (MosaicStatisticsBlocks.splits);
# 256x64x3c2s4 is mosaic.DEFAULT_BLOCKS since the H100 run of 2026-12-07. Each choice fits
# its kernel (tests/cross_entropy/test_lowering.py).
STATISTICS_CHOICES = (
  "128x128x3",
  "256x64x3",
  "256x64x3c2",
  "256x64x3s4",
  "256x64x3c2s4",
  "256x64x4",
  "256x64x4c2",
  "256x128x2",
)
GRADIENT_CHOICES = ("128x128x3", "256x64x3", "256x64x3c2", "192x64x4", "128x64x5")


def blocks_of(text: str) -> mosaic.MosaicStatisticsBlocks:
  """ "COLSxKxSTAGES", e.g. 128x128x3, then optionally "cN" for clusters of N CTAs that share
  each weight tile and "sN" for N vocabulary splits (statistics kernel): 256x64x3c2s4."""
  found = re.fullmatch(r"(\d+)x(\d+)x(\d+)(?:c(\d+))?(?:s(\d+))?", text)
  if found is None:
    raise ValueError(f"a tile choice is COLSxKxSTAGES[cN][sN], got {text!r}")
  block_cols, block_k, stages, cluster, splits = found.groups()
  return mosaic.MosaicStatisticsBlocks(
    block_cols=int(block_cols),
    block_k=int(block_k),
    num_stages=int(stages),
    cluster_tiles=int(cluster or 1),
    splits=None if splits is None else int(splits),
  )


def make_inputs(width, vocab, seed):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (TOKENS, width), jnp.bfloat16)
  weight = (jax.random.normal(keys[1], (width, vocab)) * width**-0.5).astype(jnp.bfloat16)
  labels = jax.random.randint(keys[2], (TOKENS,), 0, vocab)
  return x, weight, labels


def _xla_logits(x, weight):
  return reference.logits_of(x, weight, "dv")


def _report(label, seconds, flops, error=None):
  rate = f"{flops / seconds / 1e12:6.0f} TFLOP/s"
  tail = "" if error is None else f"   max error {error:.2e}"
  print(f"    {label:<26} {seconds * 1e3:8.3f} ms {rate}{tail}", flush=True)


def _time(label, fn, argument_sets, flops, error=None):
  try:
    seconds = measure(fn, argument_sets, quick=False).seconds
  except Exception as failure:  # noqa: BLE001 - report the row, keep going
    print(f"    {label:<26} failed: {describe_failure(failure)}", flush=True)
    return
  _report(label, seconds, flops, error)


def _statistics(width, vocab, block_choices, spec):
  argument_sets = [make_inputs(width, vocab, seed) for seed in range(2)]
  x, weight, labels = argument_sets[0]
  flops = 2.0 * TOKENS * width * vocab
  with jax.default_matmul_precision("highest"):
    expected = jax.jit(
      lambda x, w, y: reference.rows_statistics(_xla_logits(x, w), y, None, spec=spec)
    )(x.astype(jnp.float32), weight.astype(jnp.float32), labels)
  print("  statistics", flush=True)
  _time("matmul x @ W", lambda x, w, y: x @ w, argument_sets, flops)

  def triton_walk(x, w, y):
    state = None
    for start in range(0, vocab, CHUNK):
      stats = triton_rows.cross_entropy_rows_statistics(
        _xla_logits(x, w[:, start : start + CHUNK]), y - start, None, spec=spec, interpret=False
      )
      if state is None:
        state = stats
      else:
        state = (jnp.logaddexp(state[0], stats[0]), state[1] + stats[1], state[2] + stats[2])
    return state

  _time("xla + triton rows", triton_walk, argument_sets, flops)
  for choice in block_choices:
    blocks = blocks_of(choice)

    def kernel(x, w, y, blocks=blocks):
      return mosaic.logits_statistics(x, w, y, weight_layout="dv", spec=spec, blocks=blocks)

    try:
      got = jax.jit(kernel)(x, weight, labels)
      error = max(float(jnp.max(jnp.abs(g - e))) for g, e in zip(got, expected))
    except Exception as failure:  # noqa: BLE001
      print(f"    mosaic {choice:<19} failed: {describe_failure(failure)}", flush=True)
      continue
    _time(f"mosaic {choice}", kernel, argument_sets, flops, error)


def _gradient(width, vocab, block_choices, spec):
  argument_sets = []
  for seed in range(2):
    x, weight, labels = make_inputs(width, vocab, seed)
    lse = jax.nn.logsumexp(_xla_logits(x, weight), axis=-1)
    row_scale = jnp.full((TOKENS,), 1.0 / TOKENS, jnp.float32)
    argument_sets.append((x, weight[:, :CHUNK], labels, lse, row_scale))
  x, chunk, labels, lse, row_scale = argument_sets[0]
  flops = 2.0 * TOKENS * width * CHUNK
  with jax.default_matmul_precision("highest"):
    expected = jax.jit(
      lambda x, w, y, lse, s: reference.rows_gradient(
        _xla_logits(x, w), y, None, lse, s, spec=spec, grad_dtype=jnp.float32
      )
    )(x.astype(jnp.float32), chunk.astype(jnp.float32), labels, lse, row_scale)
  print(f"  gradient of a {CHUNK}-column chunk", flush=True)
  _time("matmul x @ W_chunk", lambda x, w, *_: x @ w, argument_sets, flops)

  def triton_chunk(x, w, y, lse, s):
    return triton_rows.cross_entropy_rows_gradient(
      _xla_logits(x, w), y, None, lse, s, spec=spec, grad_dtype=x.dtype, interpret=False
    )

  _time("xla + triton rows", triton_chunk, argument_sets, flops)
  for choice in block_choices:
    blocks = blocks_of(choice)

    def kernel(x, w, y, lse, s, blocks=blocks):
      return mosaic_gradient.logits_gradient(
        x, w, y, lse, s, weight_layout="dv", spec=spec, grad_dtype=x.dtype, blocks=blocks
      )

    try:
      got = jax.jit(kernel)(*argument_sets[0]).astype(jnp.float32)
      error = float(jnp.max(jnp.abs(got - expected)))
    except Exception as failure:  # noqa: BLE001
      print(f"    mosaic {choice:<19} failed: {describe_failure(failure)}", flush=True)
      continue
    _time(f"mosaic {choice}", kernel, argument_sets, flops, error)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", default="D2048_V131072", help=f"of {', '.join(HEADS)}")
  for part, choices in (("statistics", STATISTICS_CHOICES), ("gradient", GRADIENT_CHOICES)):
    parser.add_argument(
      f"--{part}-blocks",
      default=",".join(choices),
      help=f"the {part} kernel's block_cols x block_k x num_stages choices, comma-separated",
    )
  parser.add_argument("--parts", default="statistics,gradient", help="statistics, gradient")
  args = parser.parse_args(argv)
  print(timing.environment(), flush=True)
  for head in args.heads.split(","):
    width, vocab = HEADS[head]
    print(f"{head}: N{TOKENS} D{width} V{vocab}", flush=True)
    spec = LossSpec(label_smoothing=0.1, z_loss=1e-4, vocab_size=vocab)
    if "statistics" in args.parts:
      _statistics(width, vocab, args.statistics_blocks.split(","), spec)
    if "gradient" in args.parts:
      _gradient(width, vocab, args.gradient_blocks.split(","), spec)


if __name__ == "__main__":
  main()
