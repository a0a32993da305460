"""Time of each Mosaic backward kernel alone (Hopper only): where the backward's time goes.

  PYTHONPATH=. python3 -m benchmarks.time_attention_mosaic_bwd_kernels

For each setting, the forward's out and logsumexp are computed once; then the whole backward,
the backward keeping only dq (XLA drops the unused dK/dV kernel) and the backward keeping only
dk and dv (the dQ kernel dropped) are timed. TFLOP/s count the products each part runs:
5 for the backward (2.5x the forward's 4 B N T S D), 3 for the dQ kernel (S, dP, dQ), 4 for
the dK/dV kernel (S^T, dP^T, dV, dK).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jfused import timing
from jfused.bench.measure import describe_failure, measure
from pallas_kernels import attention_mosaic_bwd as bwd
from pallas_kernels import attention_mosaic_fwd as fwd

# (batch, seq, heads, head_dim, backward blocks or None for the default).
SETTINGS = (
    (4, 4096, 16, 128, None),
    (4, 4096, 16, 128, bwd.MosaicBackwardBlocks(dkv_split=True)),
    (4, 2048, 16, 256, None),
)
PARTS = {"backward": (lambda grads: grads, 5), "dq kernel": (lambda grads: grads[0], 3),
         "dk/dv kernel": (lambda grads: grads[1:], 4)}


def _inputs(batch, seq, heads, head_dim, seed):
  keys = jax.random.split(jax.random.key(seed), 4)
  q, k, v, dout = (jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16)
                   for key in keys)
  out, lse = jax.jit(lambda q, k, v: fwd.attention_forward(
      q, k, v, scale=head_dim ** -0.5, is_causal=False))(
      q, k, v)
  return q, k, v, out, lse, dout


def main() -> None:
  print(timing.environment(), flush=True)
  for batch, seq, heads, head_dim, blocks in SETTINGS:
    inputs = [_inputs(batch, seq, heads, head_dim, seed) for seed in range(2)]
    product_flops = 2.0 * batch * heads * seq * seq * head_dim  # One T x S x D product.
    label = f"B{batch} T{seq} {heads}x{head_dim} {blocks or 'default blocks'}"
    print(label, flush=True)
    for part, (pick, products) in PARTS.items():
      def run(q, k, v, out, lse, dout, pick=pick):
        return pick(bwd.attention_backward(q, k, v, out, lse, dout, scale=head_dim ** -0.5,
                                           is_causal=False, blocks=blocks))
      try:
        seconds = measure(run, inputs, quick=False).seconds
      except Exception as failure:  # noqa: BLE001 - report the row, keep going
        print(f"  {part:<13} failed: {describe_failure(failure)}", flush=True)
        continue
      print(f"  {part:<13} {seconds * 1e3:7.3f} ms {products * product_flops / seconds / 1e12:6.0f}"
            " TFLOP/s", flush=True)


if __name__ == "__main__":
  main()
