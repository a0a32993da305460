"""Attention benchmark: jfused's kernels beside XLA, cuDNN, tokamax and FlashAttention-3.

tokamax and FlashAttention-3 (the `flash_attn3_jax` package: FA3 through XLA FFI, its wheel
built for Hopper at head dim 128) are measured where they are importable.

TFLOP/s count 4*B*N*T*S*D for the forward (halved under causal masking) and 2.5 times that
for the backward, as FlashAttention's benchmarks do; under a sliding window (`window`: each
query sees itself and the `window` keys before it) they count the visible pairs only. The
error column is the largest difference from a float32 reference computed on the first batch
entry and first kv-head group (attention is independent across them, so this bounds the cost
without hiding errors).

With attention dropout (`dropout_rates`), each rate is its own row group, named by the shape
with a `_dropout<rate>` suffix, against an "xla" reference that applies the same mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp

import jfused
from jfused import config
from jfused.cli.bench.measure import describe_failure, measure, measure_backward

IMPLEMENTATIONS = (
  "pallas_mosaic",
  "pallas_mosaic_fused",
  "pallas_triton",
  "cudnn",
  "cudnn_deterministic",
  "xla",
  "tokamax",
  "fa3",
)
# pallas_mosaic_fused is pallas_mosaic with `deterministic_backward=False`: the fastest
# backward, the fused kernel (one kernel, dQ added in float32 in any order) where it was
# measured faster (unmasked d=128, `bwd.fused_backward_is_faster`), the pair elsewhere;
# pallas_mosaic's row is `deterministic_backward=True`, the deterministic pair of kernels.
# The flash-attn3-jax wheel's kernels are built for this head dim only.
FA3_HEAD_DIM = 128
# cuDNN's backward accumulates dQ with atomic adds, so its result varies run to run; XLA's
# determinism flag makes it pick its deterministic algorithm instead: the like-for-like
# comparison for pallas_mosaic and pallas_triton, whose backward is deterministic.
COMPILER_OPTIONS = {"cudnn_deterministic": {"xla_gpu_deterministic_ops": True}}
PASSES = ("fwd", "bwd", "fwd+bwd")
# Each pass's FLOPs in forwards (FlashAttention's count: the backward does 2.5 forwards' work).
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# XLA materialises float32 logits and probabilities (several copies in the backward); past
# 8 GiB of logits its program needs over 50 GiB and minutes to compile, so skip those shapes.
XLA_MAX_LOGIT_BYTES = 8 * 2**30


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  name: str
  batch: int
  seq: int
  heads: int
  kv_heads: int
  head_dim: int
  causal: bool
  # Keys visible before each query under causal masking (jax.nn's local_window_size of
  # (window, 0)); None for no window.
  window: int | None = None

  def forward_flops(self) -> float:
    if self.window is not None:
      # Query t sees min(t, window) + 1 keys.
      wide = min(self.window, self.seq - 1)
      pairs = (wide + 1) * self.seq - wide * (wide + 1) / 2
      return 4.0 * self.batch * self.heads * pairs * self.head_dim
    flops = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
    return flops / 2 if self.causal else flops

  def logit_bytes(self) -> int:
    return 4 * self.batch * self.heads * self.seq * self.seq


def _shape(batch, seq, heads, kv_heads, head_dim, causal, window=None) -> AttentionShape:
  assert window is None or causal, "a window row is causal (keys before the query only)"
  name = (
    f"B{batch}_T{seq}_h{heads}"
    + (f"kv{kv_heads}" if kv_heads != heads else "")
    + f"_d{head_dim}"
    + ("_causal" if causal else "")
    + (f"_window{window}" if window is not None else "")
  )
  return AttentionShape(name, batch, seq, heads, kv_heads, head_dim, causal, window)


def _flash_grid(gqa: bool) -> list[AttentionShape]:
  """FlashAttention's grid: 16k tokens per batch, model width 2048, d in 64/128/256."""
  shapes = []
  for head_dim in (64, 128, 256):
    heads = 2048 // head_dim
    for causal in (False, True):
      for seq in (512, 1024, 2048, 4096, 8192, 16384):
        shapes.append(
          _shape(16384 // seq, seq, heads, heads // 4 if gqa else heads, head_dim, causal)
        )
  return shapes


DEFAULT_PRESET = "guide"
PRESETS: dict[str, Callable[[bool], list[AttentionShape]]] = {
  # The rows of the engineering guide's anchor table.
  "guide": lambda gqa: [
    _shape(4, 4096, 16, 4 if gqa else 16, 128, False),
    _shape(4, 4096, 16, 4 if gqa else 16, 128, True),
    _shape(1, 16384, 16, 4 if gqa else 16, 128, True),
    _shape(8, 2048, 16, 4 if gqa else 16, 64, False),
    _shape(4, 2048, 16, 4 if gqa else 16, 256, False),
    _shape(4, 4096, 32, 8, 128, True),
  ],
  "flash": _flash_grid,
  # The guide's d=256 row, without and with causal masking.
  "d256": lambda gqa: [
    _shape(4, 2048, 16, 4 if gqa else 16, 256, causal) for causal in (False, True)
  ],
  # The guide's d=64 row, without and with causal masking.
  "d64": lambda gqa: [
    _shape(8, 2048, 16, 4 if gqa else 16, 64, causal) for causal in (False, True)
  ],
  # The sliding-window row FA3 is measured on: 1023 keys back, causal.
  "window": lambda gqa: [_shape(2, 8192, 16, 4 if gqa else 16, 128, True, window=1023)],
  # The dropout acceptance shape: its forward+backward with dropout 0.1 against without.
  "causal_4k": lambda gqa: [_shape(4, 4096, 16, 4 if gqa else 16, 128, True)],
  # Small enough for interpret mode on a CPU.
  "quick": lambda gqa: (
    [
      _shape(1, seq, 4, 2 if gqa else 4, 64, causal)
      for causal in (False, True)
      for seq in (64, 128)
    ]
    + [_shape(1, 128, 4, 2 if gqa else 4, 64, True, window=31)]
  ),
}


DROPOUT_KEY_SEED = 0


def _attend(
  implementation: str, causal: bool, dropout_rate: float = 0.0, window: int | None = None
):
  """(q, k, v) -> out of one implementation; `window` as in AttentionShape."""
  if implementation == "cudnn_deterministic":
    implementation = "cudnn"  # Compiled with COMPILER_OPTIONS'.
  # Each library's (left, right) window, inclusive; right is 0 as the rows are causal.
  window_size = None if window is None else (window, 0)
  if implementation == "tokamax":
    import tokamax  # Optional; checked by `unavailable`.

    return lambda q, k, v: tokamax.dot_product_attention(
      q, k, v, is_causal=causal, local_window_size=window_size
    )
  if implementation == "fa3":
    from flash_attn3_jax import flash_mha  # Optional; checked by `unavailable`.

    # The same [B, T, N, D] layout as jax.nn, GQA included; the default scale is 1/sqrt(D).
    # Its "no window" is (-1, -1).
    return lambda q, k, v: flash_mha(q, k, v, is_causal=causal, window_size=window_size or (-1, -1))
  options = {} if window_size is None else {"local_window_size": window_size}
  if dropout_rate > 0.0:
    options.update(dropout_rate=dropout_rate, dropout_rng=jax.random.key(DROPOUT_KEY_SEED))
  if implementation == "pallas_mosaic":
    options["deterministic_backward"] = True
  if implementation == "pallas_mosaic_fused":
    implementation = "pallas_mosaic"
    options["deterministic_backward"] = False
  return lambda q, k, v: jfused.dot_product_attention(
    q, k, v, is_causal=causal, implementation=implementation, **options
  )


def unavailable(
  implementation: str, shape: AttentionShape, dropout_rate: float = 0.0, dtype=jnp.bfloat16
) -> str | None:
  """Why an implementation is not measured on this machine, shape and dtype, or None."""
  if dropout_rate > 0.0 and implementation in ("cudnn", "cudnn_deterministic", "tokamax", "fa3"):
    return f"{implementation} has no attention dropout here"
  if implementation.startswith("pallas_mosaic") and not config.on_hopper():
    return f"{implementation} needs a Hopper (sm90) GPU"
  if implementation == "pallas_mosaic_fused":
    from pallas_kernels.attention.mosaic import bwd  # Mosaic GPU: imported only on Hopper.

    if bwd.fused_backward_blocks(shape.head_dim) is None:
      return f"the fused Mosaic backward does not serve head dim {shape.head_dim}"
  if implementation.startswith("cudnn") and not config.on_gpu():
    return f"{implementation} needs a CUDA GPU"
  if implementation == "tokamax" and importlib.util.find_spec("tokamax") is None:
    return "tokamax is not installed"
  if implementation == "fa3":
    if importlib.util.find_spec("flash_attn3_jax") is None:
      return "flash_attn3_jax is not installed"
    if not config.on_hopper():
      return "fa3 needs a Hopper (sm90) GPU"
    if shape.head_dim != FA3_HEAD_DIM:
      return f"the flash-attn3-jax wheel serves head dim {FA3_HEAD_DIM} only"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      return "fa3 serves bfloat16 and float16"
  if implementation == "xla" and shape.logit_bytes() > XLA_MAX_LOGIT_BYTES:
    return "xla would materialise over 8 GiB of logits"
  return None


def make_inputs(shape: AttentionShape, dtype, count: int):
  sets = []
  for i in range(count):
    keys = jax.random.split(jax.random.key(i), 4)
    q = jax.random.normal(keys[0], (shape.batch, shape.seq, shape.heads, shape.head_dim), dtype)
    kv_shape = (shape.batch, shape.seq, shape.kv_heads, shape.head_dim)
    k = jax.random.normal(keys[1], kv_shape, dtype)
    v = jax.random.normal(keys[2], kv_shape, dtype)
    sets.append((q, k, v, jax.random.normal(keys[3], q.shape, dtype)))
  return sets


def _max_error(attend, shape: AttentionShape, q, k, v, dropout_rate: float) -> float:
  """Largest |out - reference32| on the first batch entry and kv-head group.

  The dropout mask depends on global (batch, head) indices; the slice keeps batch entry 0 and
  heads 0..group-1 at their indices, so the reference draws the same mask.
  """
  group = shape.heads // shape.kv_heads
  q, k, v = q[:1, :, :group], k[:1, :, :1], v[:1, :, :1]
  out = jax.jit(attend)(q, k, v).astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    reference = _attend("xla", shape.causal, dropout_rate, shape.window)(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    )
  return float(jnp.max(jnp.abs(out - reference)))


def count_steps(
  shapes: Sequence[AttentionShape],
  implementations: Sequence[str],
  dropout_rates: Sequence[float] = (0.0,),
) -> int:
  """How many times `run` calls `progress`: once per (shape, dropout rate, implementation)."""
  return len(shapes) * len(dropout_rates) * len(implementations)


def run(
  shapes: Sequence[AttentionShape],
  implementations: Sequence[str],
  passes: Sequence[str],
  dtype,
  *,
  quick: bool,
  progress=print,
  dropout_rates: Sequence[float] = (0.0,),
  rows: list | None = None,
) -> list[dict]:
  """Measures every (shape, dropout rate, implementation); one row per requested pass.

  `progress(message)` is called as each (shape, dropout rate, implementation) cell starts. The
  backward is timed on its own, from residuals a forward saved (`measure_backward`).
  `rows`, when given, receives the rows as they are measured (and is returned).
  """
  rows = [] if rows is None else rows
  cells = [(shape, rate) for shape in shapes for rate in dropout_rates]
  for shape, rate in cells:
    inputs = make_inputs(shape, dtype, 2 if quick else 3)
    row_name = shape.name + (f"_dropout{rate:g}" if rate > 0.0 else "")
    for implementation in implementations:
      progress(f"{row_name} {implementation}")
      base = {
        "suite": "attention",
        **dataclasses.asdict(shape),
        "shape": row_name,
        "dropout_rate": rate,
        "implementation": implementation,
        "dtype": jnp.dtype(dtype).name,
      }
      reason = unavailable(implementation, shape, rate, dtype)
      if reason is not None:
        rows.extend({**base, "pass": p, "skipped": reason} for p in passes)
        continue
      attend = _attend(implementation, shape.causal, rate, shape.window)
      options = COMPILER_OPTIONS.get(implementation)

      def forward_backward(q, k, v, dout, attend=attend):
        out, vjp = jax.vjp(attend, q, k, v)
        return out, vjp(dout)

      def pullback(q, k, v, dout, attend=attend):
        _, vjp = jax.vjp(attend, q, k, v)
        return vjp, dout

      measured = {}
      try:
        if "fwd" in passes:
          measured["fwd"] = measure(
            lambda q, k, v, dout, attend=attend: attend(q, k, v),
            inputs,
            quick=quick,
            compiler_options=options,
          )
        # Every row's scratch memory is the training step's: forward and backward together.
        both = measure(forward_backward, inputs, quick=quick, compiler_options=options)
        measured["fwd+bwd"] = both
        if "bwd" in passes:
          measured["bwd"] = measure_backward(
            pullback, inputs, quick=quick, compiler_options=options
          )
        error = _max_error(attend, shape, *inputs[0][:3], rate)
      except Exception as failure:  # One failing cell must not end the whole table.
        rows.extend({**base, "pass": p, "error": describe_failure(failure)} for p in passes)
        continue
      for name in passes:
        seconds = measured[name].seconds
        pass_flops = PASS_FLOPS[name] * shape.forward_flops()
        rows.append(
          {
            **base,
            "pass": name,
            "ms": seconds * 1e3,
            "tflops": pass_flops / seconds / 1e12 if seconds > 0 else None,
            "compile_s": measured[name].compile_seconds,
            "temp_mib": None if both.temp_bytes is None else both.temp_bytes / 2**20,
            "max_error": error,
          }
        )
  return rows
