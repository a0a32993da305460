"""The `jfused` command line.

  jfused demo     fused attention and norms beside XLA: time, throughput, error vs float32

Without a GPU the Pallas kernels run in interpret mode at small sizes: the error column is
meaningful there, the timings are not.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import jfused
from jfused import config, timing


def _attention_rows(on_gpu: bool) -> list[dict]:
  batch, seq, heads, head_dim = (4, 4096, 16, 128) if on_gpu else (1, 256, 2, 64)
  dtype = jnp.bfloat16
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, dout = (jax.random.normal(key, (batch, seq, heads, head_dim), dtype) for key in keys)
  flops = 4.0 * batch * heads * seq * seq * head_dim / 2  # causal
  with jax.default_matmul_precision("highest"):
    reference = jfused.dot_product_attention(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), is_causal=True,
        implementation="xla")
  rows = []
  for implementation in ("pallas_triton", "xla"):
    def attend(q, k, v, implementation=implementation):
      return jfused.dot_product_attention(q, k, v, is_causal=True,
                                          implementation=implementation)

    forward = jax.jit(attend)

    @jax.jit
    def forward_backward(q, k, v, dout, attend=attend):
      out, vjp = jax.vjp(attend, q, k, v)
      return out, vjp(dout)

    error = float(jnp.max(jnp.abs(forward(q, k, v).astype(jnp.float32) - reference)))
    fwd_s = timing.median_seconds(forward, [(q, k, v)], calls=5, repeats=3)
    both_s = timing.median_seconds(forward_backward, [(q, k, v, dout)], calls=5, repeats=3)
    rows.append({
        "op": f"attention causal B={batch} T={seq} N={heads} H={head_dim}",
        "implementation": implementation,
        "forward_ms": fwd_s * 1e3, "forward_backward_ms": both_s * 1e3,
        "throughput": f"{flops / fwd_s / 1e12:.1f} / {3.5 * flops / both_s / 1e12:.1f} TFLOP/s",
        "max_error": error,
    })
  return rows


def _norm_rows(on_gpu: bool) -> list[dict]:
  rows_, width = (16384, 4096) if on_gpu else (64, 512)
  x = jax.random.normal(jax.random.key(1), (rows_, width), jnp.bfloat16)
  scale = jnp.ones((width,), jnp.float32)
  bias = jnp.zeros((width,), jnp.float32)
  reference = jfused.layer_norm(x.astype(jnp.float32), scale, bias, implementation="xla")
  rows = []
  for implementation in ("pallas_triton", "xla"):
    forward = jax.jit(lambda x, s, b, i=implementation: jfused.layer_norm(
        x, s, b, implementation=i))
    error = float(jnp.max(jnp.abs(forward(x, scale, bias).astype(jnp.float32) - reference)))
    seconds = timing.median_seconds(forward, [(x, scale, bias)], calls=5, repeats=3)
    rows.append({
        "op": f"layer_norm {rows_}x{width}", "implementation": implementation,
        "forward_ms": seconds * 1e3, "forward_backward_ms": float("nan"),
        "throughput": f"{2 * x.nbytes / seconds / 1e9:.0f} GB/s",
        "max_error": error,
    })
  return rows


def demo(args) -> int:
  on_gpu = config.on_gpu()
  env = timing.environment()
  print(f"jfused demo on {env['device']} (jax {env['jax']}, {env['date']})")
  if not on_gpu:
    print("No GPU found: Pallas kernels run in interpret mode at small sizes. The error "
          "column is meaningful; the timings are not.")
  rows = _attention_rows(on_gpu) + _norm_rows(on_gpu)
  header = (f"{'op':<44} {'implementation':<15} {'fwd ms':>9} {'fwd+bwd ms':>11} "
            f"{'throughput (fwd / fwd+bwd)':>28} {'max err vs f32':>15}")
  print(header)
  print("-" * len(header))
  for row in rows:
    print(f"{row['op']:<44} {row['implementation']:<15} {row['forward_ms']:9.3f} "
          f"{row['forward_backward_ms']:11.3f} {row['throughput']:>28} "
          f"{row['max_error']:15.2e}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="jfused", description="Fused GPU ops for JAX.")
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("demo", help="fused attention and LayerNorm beside XLA")
  args = parser.parse_args(argv)
  return {"demo": demo}[args.command](args)


if __name__ == "__main__":
  sys.exit(main())
