"""Transformer-block benchmark: one pre-norm GPT block's training step, fused and not.

Variants share one parameter tree (flax_layers.TransformerBlock):
  pallas_mosaic  the Hopper attention kernel, jfused's Pallas-Triton norms (sm90 only)
  pallas_mosaic_fused_bwd    the same with the fused attention backward
                             (deterministic_backward=False)
  pallas_mosaic_recompute    the same with the MLP's activation recomputed in the backward
                             (recompute_mlp_activation=True)
  pallas_triton  every fused op on jfused's Pallas-Triton kernels (norms with the residual
                 add, attention)
  cudnn          Flax's own norms, jfused's cuDNN attention
  xla            plain Flax/XLA ops throughout (fused=False)
The step is forward and backward with respect to the parameters and the input; the backward
alone runs on the residuals a forward saved. The error column compares the block's output
with the plain block run entirely in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import jax
import jax.numpy as jnp

from jfused import config
from jfused.cli.bench.measure import describe_failure, measure, measure_backward, measured_row

# pallas_mosaic with one option that is not yet the default, measured beside it.
OPTION_VARIANTS = {
  "pallas_mosaic_fused_bwd": {"deterministic_backward": False},
  "pallas_mosaic_recompute": {"recompute_mlp_activation": True},
}
IMPLEMENTATIONS = ("pallas_mosaic", *OPTION_VARIANTS, "pallas_triton", "cudnn", "xla")


@dataclasses.dataclass(frozen=True)
class BlockShape:
  """A block and its input: the TransformerBlock options (GPT-2 style by default)."""

  name: str
  batch: int
  seq: int
  features: int
  heads: int
  kv_heads: int | None = None
  norm: str = "layer_norm"
  activation: str = "gelu"
  use_bias: bool = True
  rope_theta: float | None = None


def _llama(name, batch, seq, features, heads, kv_heads) -> BlockShape:
  """A LLaMA-style block: GQA, RMSNorm, SwiGLU, no biases, rotary embeddings (LLaMA 3's base)."""
  return BlockShape(
    name, batch, seq, features, heads, kv_heads, "rms_norm", "swiglu", False, 500000.0
  )


DEFAULT_PRESET = "gpt"
PRESETS = {
  # The engineering guide's anchor: B=8, T=2048, D=2048, 16 heads, causal.
  "gpt": [BlockShape("B8_T2048_D2048_h16", 8, 2048, 2048, 16)],
  # LLaMA-style at the engineering guide's anchor (LLaMA-2-7B's width, 8 KV heads).
  "llama": [_llama("B2_T4096_D4096_h32kv8_llama", 2, 4096, 4096, 32, 8)],
  "quick": [
    BlockShape("B1_T64_D128_h4", 1, 64, 128, 4),
    _llama("B1_T64_D128_h4kv2_llama", 1, 64, 128, 4, 2),
  ],
}


def _block(shape: BlockShape, implementation: str, dtype):
  from flax import nnx  # The block comes from the Flax layer; imported only when benchmarked.

  from flax_layers import TransformerBlock

  kwargs = {
    "fused": implementation != "xla",
    "dtype": dtype,
    "is_causal": True,
    "num_kv_heads": shape.kv_heads,
    "norm": shape.norm,
    "activation": shape.activation,
    "use_bias": shape.use_bias,
    "rope_theta": shape.rope_theta,
  }
  if implementation in OPTION_VARIANTS:
    kwargs.update(OPTION_VARIANTS[implementation])
    implementation = "pallas_mosaic"
  if implementation in ("pallas_triton", "pallas_mosaic"):
    kwargs.update(attention_implementation=implementation, norm_implementation="pallas_triton")
  elif implementation == "cudnn":
    kwargs.update(attention_implementation="cudnn", norm_implementation="xla")
  return TransformerBlock(shape.features, shape.heads, rngs=nnx.Rngs(0), **kwargs)


def _step_function(block):
  """The block's parameters and three functions of them: `forward(params, x)`,
  `step(params, x, dy)` -> (output, gradients of <output, dy> for params and x), and
  `pullback(params, x, dy)` -> (the VJP of forward, dy as its cotangent)."""
  from flax import nnx

  graphdef, params = nnx.split(block)

  def forward(params, x):
    return nnx.merge(graphdef, params)(x)

  def step(params, x, dy):
    out, vjp = jax.vjp(forward, params, x)
    return out, vjp(dy.astype(out.dtype))

  def pullback(params, x, dy):
    out, vjp = jax.vjp(forward, params, x)
    return vjp, dy.astype(out.dtype)

  return params, forward, step, pullback


def unavailable(implementation: str) -> str | None:
  if implementation == "cudnn" and not config.on_gpu():
    return "cudnn needs a CUDA GPU"
  if implementation.startswith("pallas_mosaic") and not config.on_hopper():
    return f"{implementation} needs a Hopper (sm90) GPU"
  return None


def count_steps(shapes: Sequence[BlockShape], implementations: Sequence[str]) -> int:
  """How many times `run` calls `progress`: once per (shape, implementation)."""
  return len(shapes) * len(implementations)


def run(
  shapes: Sequence[BlockShape],
  implementations: Sequence[str],
  passes: Sequence[str],
  dtype,
  *,
  quick: bool,
  progress=print,
  rows: list | None = None,
) -> list[dict]:
  """Measures every (shape, implementation); one row per requested pass.

  `progress(message)` is called as each (shape, implementation) cell starts. The backward is
  timed on its own, from residuals a forward saved (`measure_backward`).
  `rows`, when given, receives the rows as they are measured (and is returned).
  """
  rows = [] if rows is None else rows
  for shape in shapes:
    keys = jax.random.split(jax.random.key(0), 2 * (2 if quick else 3))
    inputs = [
      (
        jax.random.normal(a, (shape.batch, shape.seq, shape.features), dtype),
        jax.random.normal(b, (shape.batch, shape.seq, shape.features), dtype),
      )
      for a, b in zip(keys[::2], keys[1::2])
    ]
    reference_params, reference_forward, *_ = _step_function(_block(shape, "xla", jnp.float32))
    with jax.default_matmul_precision("highest"):
      reference = jax.jit(reference_forward)(reference_params, inputs[0][0].astype(jnp.float32))
    for implementation in implementations:
      progress(f"{shape.name} {implementation}")
      base = {
        "suite": "block",
        "shape": shape.name,
        **dataclasses.asdict(shape),
        "implementation": implementation,
        "dtype": jnp.dtype(dtype).name,
      }
      reason = unavailable(implementation)
      if reason is not None:
        rows.extend({**base, "pass": p, "skipped": reason} for p in passes)
        continue
      try:
        params, forward, step, pullback = _step_function(_block(shape, implementation, dtype))
        argument_sets = [(params, x, dy) for x, dy in inputs]
        programs = {
          "fwd": (measure, lambda p, x, dy, forward=forward: forward(p, x)),
          "fwd+bwd": (measure, step),
          "bwd": (measure_backward, pullback),
        }
        measured = {
          name: programs[name][0](programs[name][1], argument_sets, quick=quick) for name in passes
        }
        out = jax.jit(forward)(params, inputs[0][0]).astype(jnp.float32)
        error = float(jnp.max(jnp.abs(out - reference)))
      except Exception as failure:  # One failing cell must not end the whole table.
        rows.extend({**base, "pass": p, "error": describe_failure(failure)} for p in passes)
        continue
      tokens = shape.batch * shape.seq
      rows.extend(
        measured_row(
          base, name, measured[name], per_second={"tokens_per_s": tokens}, max_error=error
        )
        for name in passes
      )
  return rows
