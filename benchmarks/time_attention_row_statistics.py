"""Time of the attention backward's per-query row statistics (XLA, before the kernels):
D = rowsum(dO * O) and the base-2 logsumexp, stacked into the [B, N, 2, T] rows the Mosaic
kernels stream, as written now and fused in one einsum (the former formulation).

  PYTHONPATH=. python3 -m benchmarks.time_attention_row_statistics
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jfused.cli import timing
from jfused.cli.bench.measure import measure
from pallas_kernels.attention import common

SHAPES = ((4, 4096, 16, 128), (8, 2048, 16, 64))


def current(out, dout, lse):
  return jnp.stack(common.backward_row_statistics(out, dout, lse, out.shape[1]), axis=2)


def fused_einsum(out, dout, lse):
  delta = jnp.einsum("btnd,btnd->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
  return jnp.stack((lse * common.LOG2_E, delta), axis=2)


def main() -> None:
  print(timing.environment(), flush=True)
  for batch, t, heads, head_dim in SHAPES:
    argument_sets = []
    for seed in range(2):
      keys = jax.random.split(jax.random.key(seed), 3)
      out, dout = (
        jax.random.normal(key, (batch, t, heads, head_dim), jnp.bfloat16) for key in keys[:2]
      )
      argument_sets.append((out, dout, jax.random.normal(keys[2], (batch, heads, t))))
    expected = jax.jit(fused_einsum)(*argument_sets[0])
    read_bytes = 2 * out.size * out.dtype.itemsize
    for name, fn in (("current", current), ("fused einsum", fused_einsum)):
      difference = float(jnp.max(jnp.abs(jax.jit(fn)(*argument_sets[0]) - expected)))
      seconds = measure(fn, argument_sets, quick=False).seconds
      print(
        f"B{batch} T{t} {heads}x{head_dim} {name:<13} {seconds * 1e6:7.1f} us "
        f"{read_bytes / seconds / 1e9:6.0f} GB/s (dO and O read), largest difference "
        f"from the fused einsum {difference:.1e}",
        flush=True,
      )


if __name__ == "__main__":
  main()
