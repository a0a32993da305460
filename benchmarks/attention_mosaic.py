"""The Mosaic GPU attention beside cuDNN and the Pallas-Triton path, on the guide's rows.

  PYTHONPATH=. python3 -m benchmarks.attention_mosaic [--rows NAME,...] [--sweep NAME,...] \
      [--out rows.json]

Prints the environment, then one line per (shape, implementation) with forward and
forward+backward TFLOP/s (4*B*N*T*S*D forward, halved when causal, 3.5 times that for both
passes) and the largest error of the forward output against the float32 XLA reference on the
first batch entry and key/value head group. --sweep adds forward TFLOP/s of the Mosaic kernel
alone under a few tile configurations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp

import jfused
from jfused import timing
from pallas_kernels import attention_mosaic_fwd as mosaic

IMPLEMENTATIONS = ("pallas_mosaic", "cudnn", "pallas_triton")


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  batch: int
  seq: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool

  def forward_flops(self) -> float:
    flops = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
    return flops / 2 if self.causal else flops


# The rows of the guide's table (section 5): 16k tokens, bf16.
SHAPES = {s.name: s for s in [
    Shape("T4096_d128", 4, 4096, 16, 16, 128, False),
    Shape("T4096_d128_causal", 4, 4096, 16, 16, 128, True),
    Shape("T16384_d128_causal_B1", 1, 16384, 16, 16, 128, True),
    Shape("T2048_d64_B8", 8, 2048, 16, 16, 64, False),
    Shape("T2048_d256_B4", 4, 2048, 16, 16, 256, False),
    Shape("T4096_gqa32q8kv_causal", 4, 4096, 32, 8, 128, True),
]}

# (block_q, block_kv, num_stages) per head dim, for the forward kernel alone.
FORWARD_SWEEP = {
    64: [(64, 128, 3), (64, 128, 2), (64, 64, 4), (128, 64, 3), (64, 256, 2)],
    128: [(64, 128, 2), (64, 64, 3), (64, 64, 4), (128, 64, 2)],
    256: [(64, 64, 2)],
}


def make_inputs(shape: Shape, count: int = 3):
  sets = []
  for i in range(count):
    keys = jax.random.split(jax.random.key(i), 4)
    q = jax.random.normal(keys[0], (shape.batch, shape.seq, shape.heads, shape.head_dim),
                          jnp.bfloat16)
    kv_shape = (shape.batch, shape.seq, shape.kv_heads, shape.head_dim)
    k = jax.random.normal(keys[1], kv_shape, jnp.bfloat16)
    v = jax.random.normal(keys[2], kv_shape, jnp.bfloat16)
    sets.append((q, k, v, jax.random.normal(keys[3], q.shape, jnp.bfloat16)))
  return sets


def _describe(error: Exception) -> str:
  lines = str(error).splitlines()
  return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _max_error(attend, shape: Shape, q, k, v) -> float:
  group = shape.heads // shape.kv_heads
  q, k, v = q[:1, :, :group], k[:1, :, :1], v[:1, :, :1]
  out = jax.jit(attend)(q, k, v).astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    reference = jfused.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        is_causal=shape.causal, implementation="xla")
  return float(jnp.max(jnp.abs(out - reference)))


def measure_row(shape: Shape, implementation: str, inputs) -> dict:
  def attend(q, k, v):
    return jfused.dot_product_attention(q, k, v, is_causal=shape.causal,
                                        implementation=implementation)

  def forward_backward(q, k, v, dout):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(dout)

  row = {"shape": shape.name, "implementation": implementation}
  try:
    forward = timing.median_seconds(jax.jit(lambda q, k, v, dout: attend(q, k, v)), inputs,
                                    calls=20, repeats=7)
    both = timing.median_seconds(jax.jit(forward_backward), inputs, calls=20, repeats=7)
    error = _max_error(attend, shape, *inputs[0][:3])
  except Exception as failure:  # One failing cell must not end the table.
    return {**row, "error": _describe(failure)}
  flops = shape.forward_flops()
  return {**row, "fwd_ms": forward * 1e3, "fwd_tflops": flops / forward / 1e12,
          "fwd_bwd_ms": both * 1e3, "fwd_bwd_tflops": 3.5 * flops / both / 1e12,
          "max_error": error}


def print_row(row: dict) -> None:
  lead = f"{row['shape']:<24} {row['implementation']:<14}"
  if "error" in row:
    print(f"{lead} {row['error']}", flush=True)
    return
  print(f"{lead} fwd {row['fwd_ms']:7.3f} ms {row['fwd_tflops']:6.1f} TFLOP/s   fwd+bwd "
        f"{row['fwd_bwd_ms']:7.3f} ms {row['fwd_bwd_tflops']:6.1f} TFLOP/s   "
        f"max_err {row['max_error']:.2e}", flush=True)


def sweep(shape: Shape, inputs) -> list[dict]:
  """Forward TFLOP/s of the Mosaic kernel alone under a few tile configurations; max_diff is
  the largest difference from cuDNN's output on the first input set."""
  rows = []
  scale = shape.head_dim ** -0.5
  q, k, v, _ = inputs[0]
  try:
    expected = jax.jit(lambda q, k, v: jfused.dot_product_attention(
        q, k, v, is_causal=shape.causal, implementation="cudnn"))(q, k, v).astype(jnp.float32)
  except NotImplementedError:  # No GPU: the sweep rows will report why.
    expected = None
  for block_q, block_kv, stages in FORWARD_SWEEP[shape.head_dim]:
    blocks = mosaic.MosaicForwardBlocks(block_q, block_kv, stages)
    label = f"mosaic fwd {(block_q, block_kv, stages)}"
    row = {"shape": shape.name, "config": label}
    try:
      forward = jax.jit(lambda q, k, v, dout, blocks=blocks: mosaic.attention_forward(
          q, k, v, scale=scale, is_causal=shape.causal, blocks=blocks)[0])
      seconds = timing.median_seconds(forward, inputs, calls=20, repeats=7)
      diff = jnp.max(jnp.abs(forward(q, k, v, None).astype(jnp.float32) - expected))
      row.update(ms=seconds * 1e3, tflops=shape.forward_flops() / seconds / 1e12,
                 max_diff=float(diff))
      print(f"{shape.name:<24} {label:<28} {row['ms']:7.3f} ms {row['tflops']:6.1f} TFLOP/s "
            f"max_diff vs cudnn {row['max_diff']:.2e}", flush=True)
    except Exception as error:  # Report, don't abort the sweep (smem overflow, say).
      row["error"] = _describe(error)
      print(f"{shape.name:<24} {label:<28} {row['error']}", flush=True)
    rows.append(row)
  return rows


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", help=f"comma-separated, from {', '.join(SHAPES)}")
  parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
  parser.add_argument("--sweep", default="",
                      help="comma-separated shapes on which to sweep Mosaic forward tiles")
  parser.add_argument("--out", help="write the rows as JSON here")
  args = parser.parse_args(argv)
  env = timing.environment()
  print(env, flush=True)
  rows, sweep_rows = [], []
  names = [name for name in args.rows.split(",") if name] if args.rows is not None else list(
      SHAPES)
  swept = [name for name in args.sweep.split(",") if name]
  for name in names + [name for name in swept if name not in names]:
    shape = SHAPES[name]
    inputs = make_inputs(shape)
    if name in names:
      for implementation in args.implementations.split(","):
        rows.append(measure_row(shape, implementation, inputs))
        print_row(rows[-1])
    if name in swept:
      sweep_rows += sweep(shape, inputs)
    if args.out:  # Written after every shape, so a cut-off run keeps what it measured.
      with open(args.out, "w") as f:
        json.dump({**env, "dtype": "bfloat16", "rows": rows, "sweep": sweep_rows}, f,
                  indent=1)


if __name__ == "__main__":
  main()
