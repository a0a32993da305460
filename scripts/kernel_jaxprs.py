"""Writes the traced jaxpr of every Pallas kernel at a fixed set of settings, one file.

A refactor that must not change what the kernels compute (moving files, splitting a kernel
body into named steps) is checked by running this before and after and diffing the two files:

  python scripts/kernel_jaxprs.py before.txt   # on the old commit
  python scripts/kernel_jaxprs.py after.txt    # on the new one
  diff before.txt after.txt

Only the kernels' own jaxprs are written (each kernel launch found anywhere in the traced
program, with its grid and name), with source locations and object addresses removed, so
moving a function to another file or line does not show as a change. Runs on CPU: the
Triton kernels are traced in interpret mode, the Mosaic GPU ones under an abstract H100.
"""

from __future__ import annotations

import re
import sys

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp

import jfused
from jfused import config
from pallas_kernels.attention.mosaic import bwd as mosaic_bwd
from pallas_kernels.attention.mosaic import fwd as mosaic_fwd
from tests.cuda_lowering import H100

# Triton kernels trace to pallas_call; Mosaic GPU ones (plgpu.kernel) to mpmd_map.
_KERNEL_PRIMITIVES = ("pallas_call", "mpmd_map")
_LOCATION = re.compile(r" at [^\s]+\.py:\d+|0x[0-9a-f]+")


def _kernels(jaxpr, found: list[str]) -> None:
  """Appends the text of every kernel launch under `jaxpr`, in program order."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _KERNEL_PRIMITIVES:
      params = {name: value for name, value in eqn.params.items() if name != "debug"}
      found.append(
        _LOCATION.sub("", "\n".join(f"{name} = {value}" for name, value in sorted(params.items())))
      )
      continue
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          _kernels(sub.jaxpr, found)
        elif isinstance(sub, jax_core.Jaxpr):
          _kernels(sub, found)


def _traced_kernels(fn, *args) -> list[str]:
  found: list[str] = []
  _kernels(jax.make_jaxpr(fn)(*args).jaxpr, found)
  return found


def _attention_grads(implementation, **kwargs):
  def grads(q, k, v):
    def loss(q, k, v):
      out = jfused.dot_product_attention(q, k, v, implementation=implementation, **kwargs)
      return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return grads


def _qkv(t, s, heads, kv_heads, head_dim, dtype):
  return (
    jax.ShapeDtypeStruct((2, t, heads, head_dim), dtype),
    jax.ShapeDtypeStruct((2, s, kv_heads, head_dim), dtype),
    jax.ShapeDtypeStruct((2, s, kv_heads, head_dim), dtype),
  )


def _features(t, s):
  segments = jnp.repeat(jnp.arange(4, dtype=jnp.int32), t // 4)[None].repeat(2, axis=0)
  lengths = jnp.array([t - 50, t], jnp.int32)
  return {
    "plain": {},
    "causal": dict(is_causal=True),
    "everything": dict(
      is_causal=True,
      dropout_rate=0.1,
      dropout_rng=jax.random.key(0),
      logits_soft_cap=2.0,
      query_seq_lengths=lengths,
      key_value_seq_lengths=jnp.array([s - 40, s], jnp.int32),
      q_segment_ids=segments,
      kv_segment_ids=segments,
    ),
    "window": dict(local_window_size=(37, 50)),
  }


def attention_settings():
  """(label, fn, args) for the public attention call through each Pallas implementation."""
  for head_dim in (64, 128, 256):
    for label, kwargs in _features(200, 200).items():
      args = _qkv(200, 200, 4, 2, head_dim, jnp.bfloat16)
      yield (
        f"triton d={head_dim} {label}",
        _attention_grads("pallas_triton", **kwargs),
        args,
        True,
      )
      yield (
        f"mosaic d={head_dim} {label}",
        _attention_grads("pallas_mosaic", **kwargs),
        args,
        False,
      )


def mosaic_block_settings():
  """(label, fn, args) for the Mosaic forward and backward at non-default blocks."""
  forward_variants = {
    "persistent": dict(persistent=True),
    "not persistent": dict(persistent=False),
    "overlap softmax": dict(overlap_softmax=True),
    "mbarrier releases": dict(named_releases=False),
    "late row sum": dict(late_row_sum=True),
  }
  backward_variants = {
    "split": dict(dkv_split=True, dq_split=True, dkv_overlap=False),
    "dq overlap": dict(dq_overlap=True, dq_stages=3),
    "dkv overlap named": dict(dkv_split=False, dkv_overlap=True, named_releases=True),
  }
  for head_dim in (64, 128, 256):
    for causal in (False, True):
      q, k, v = _qkv(256, 384, 4, 2, head_dim, jnp.bfloat16)
      for label, fields in forward_variants.items():
        base = mosaic_fwd.default_forward_blocks(head_dim, causal, 2)
        blocks = mosaic_fwd.MosaicForwardBlocks(**{**base.__dict__, **fields})

        def forward(q, k, v, blocks=blocks, causal=causal):
          return mosaic_fwd.attention_forward(q, k, v, scale=0.1, is_causal=causal, blocks=blocks)

        yield f"mosaic forward d={head_dim} causal={causal} {label}", forward, (q, k, v), False
      for label, fields in backward_variants.items():
        base = mosaic_bwd.default_backward_blocks(head_dim)
        blocks = mosaic_bwd.MosaicBackwardBlocks(**{**base.__dict__, **fields})
        out = jax.ShapeDtypeStruct(q.shape, q.dtype)
        lse = jax.ShapeDtypeStruct((2, 4, 256), jnp.float32)

        def backward(q, k, v, out, lse, blocks=blocks, causal=causal):
          return mosaic_bwd.attention_backward(
            q, k, v, out, lse, out, scale=0.1, is_causal=causal, blocks=blocks
          )

        yield (
          f"mosaic backward d={head_dim} causal={causal} {label}",
          backward,
          (q, k, v, out, lse),
          False,
        )


def norm_settings():
  """(label, fn, args) for both norms' forward and gradients at widths that pick each
  tiling (fused, looped, persistent forward) and with the residual add."""
  for width in (7, 200, 1024, 4096, 8192, 20000):
    for rows in (3, 300):
      for op in ("layer_norm", "rms_norm"):
        for residual in (False, True):

          def loss(x, r, scale, op=op, residual=residual):
            norm = getattr(jfused, op)
            y = norm(x, scale, residual=r if residual else None, implementation="pallas_triton")
            y = y[0] if residual else y
            return y.astype(jnp.float32).sum()

          args = (
            jax.ShapeDtypeStruct((rows, width), jnp.bfloat16),
            jax.ShapeDtypeStruct((rows, width), jnp.bfloat16),
            jax.ShapeDtypeStruct((width,), jnp.float32),
          )
          yield (
            f"{op} {rows}x{width} residual={residual}",
            jax.grad(loss, argnums=(0, 1, 2)),
            args,
            True,
          )


def main(path: str) -> None:
  lines = []
  for settings in (attention_settings(), mosaic_block_settings(), norm_settings()):
    for label, fn, args, interpret in settings:
      with config.interpret_mode(interpret):
        if interpret:
          kernels = _traced_kernels(fn, *args)
        else:
          mesh = jax.sharding.AbstractMesh((), (), abstract_device=H100)
          with jax.sharding.use_abstract_mesh(mesh):
            kernels = _traced_kernels(fn, *args)
      lines.append(f"### {label}: {len(kernels)} kernels")
      lines.extend(kernels)
      print(f"{label}: {len(kernels)} kernels", flush=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main(sys.argv[1])
