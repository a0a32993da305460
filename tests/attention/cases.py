"""Shared attention test cases and the comparison rule, used on CPU (interpret) and GPU.

The comparison follows FlashAttention's rule: the kernel's error against a float32 reference
may be at most twice the error of the plain XLA computation in the same dtype, plus a small
floor. For float32 inputs that makes the check tight (about 1e-5 relative).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import jfused
from jfused.attention import args as attention_args
from jfused.attention.reference import attention_reference
from tests import closeness

# Floors relative to the reference's largest magnitude.
RELATIVE_FLOOR = {jnp.float32: 2e-5, jnp.bfloat16: 4e-3, jnp.float16: 1e-3}
assert_close_three_way = functools.partial(
  closeness.assert_close_three_way, relative_floor=RELATIVE_FLOOR
)


@dataclasses.dataclass(frozen=True)
class Case:
  """One attention call: shapes plus the features it turns on."""

  name: str
  batch: tuple[int, ...] = (2,)
  t: int = 16
  s: int = 16
  heads: int = 2
  kv_heads: int = 2
  head_dim: int = 32
  value_dim: int | None = None
  bias_shape: str | None = None  # "full", "shared", "per_batch_row"
  mask: bool = False
  q_lengths: bool = False
  kv_lengths: bool = False
  segments: str | None = None  # "packed" (sorted) or "scattered"
  options: tuple = ()  # extra keyword arguments as (name, value) pairs

  def __str__(self):
    return self.name


# Dropout on the GPU: causal GQA at d=128 with partial blocks, for each kernel that serves it.
DROPOUT_GPU_CASE = Case(
  "T1024_S1100_causal_gqa_d128",
  t=1024,
  s=1100,
  heads=8,
  kv_heads=2,
  head_dim=128,
  options=(("is_causal", True),),
)


def make_inputs(case: Case, dtype, seed: int = 0) -> dict:
  """Random inputs for a case, as keyword arguments of dot_product_attention."""
  keys = iter(jax.random.split(jax.random.key(seed), 12))
  b, n, k = case.batch, case.heads, case.kv_heads
  dv = case.value_dim or case.head_dim
  args = {
    "query": jax.random.normal(next(keys), (*b, case.t, n, case.head_dim), dtype),
    "key": jax.random.normal(next(keys), (*b, case.s, k, case.head_dim), dtype),
    "value": jax.random.normal(next(keys), (*b, case.s, k, dv), dtype),
  }
  if case.bias_shape is not None:
    shape = {
      "full": (*b, n, case.t, case.s),
      "shared": (1, 1, case.t, case.s),
      "per_batch_row": (*b, 1, 1, case.s),
    }[case.bias_shape]
    args["bias"] = jax.random.normal(next(keys), shape, dtype)
  if case.mask:
    args["mask"] = jax.random.bernoulli(next(keys), 0.7, (*b, n, case.t, case.s))
  if case.q_lengths:
    args["query_seq_lengths"] = jax.random.randint(next(keys), b, 1, case.t + 1).astype(jnp.int32)
  if case.kv_lengths:
    lengths = jax.random.randint(next(keys), b, 0, case.s + 1).astype(jnp.int32)
    args["key_value_seq_lengths"] = lengths.reshape(-1).at[0].set(0).reshape(b)
  if case.segments is not None:

    def ids(key, length):
      raw = jax.random.randint(key, (*b, length), 0, 3).astype(jnp.int32)
      return jnp.sort(raw, axis=-1) if case.segments == "packed" else raw

    args["q_segment_ids"] = ids(next(keys), case.t)
    args["kv_segment_ids"] = ids(next(keys), case.s)
  args.update(dict(case.options))
  return args


def reference(args: dict, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST):
  """The pure-JAX reference in `dtype` (float arguments cast to it); returns (out, lse)."""
  args = {
    name: (
      value.astype(dtype)
      if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.floating)
      else value
    )
    for name, value in args.items()
  }
  query, key, value = args.pop("query"), args.pop("key"), args.pop("value")
  call = attention_args.normalize(
    query,
    key,
    value,
    args.pop("bias", None),
    args.pop("mask", None),
    scale=args.pop("scale", None),
    is_causal=args.pop("is_causal", False),
    query_seq_lengths=args.pop("query_seq_lengths", None),
    key_value_seq_lengths=args.pop("key_value_seq_lengths", None),
    local_window_size=args.pop("local_window_size", None),
    logits_soft_cap=args.pop("logits_soft_cap", None),
    q_segment_ids=args.pop("q_segment_ids", None),
    kv_segment_ids=args.pop("kv_segment_ids", None),
  )
  assert not args, f"unhandled arguments {sorted(args)}"
  out, lse = attention_reference(
    call.ops, scale=call.scale, rules=call.rules, soft_cap=call.soft_cap, precision=precision
  )
  t, n = call.ops.q.shape[1:3]
  return (
    out.reshape(*call.batch_shape, t, n, call.ops.v.shape[-1]),
    lse.reshape(*call.batch_shape, t, n),
  )


DIFFERENTIABLE = ("query", "key", "value", "bias")


def outputs_and_grads(fn, args: dict, cotangent_seed: int = 7):
  """fn(args) -> (out, lse); returns (out, lse, {name: gradient of out}), all in one jit."""
  names = [n for n in DIFFERENTIABLE if n in args]
  fixed = {n: v for n, v in args.items() if n not in names and isinstance(v, jax.Array)}
  static = {n: v for n, v in args.items() if n not in names and n not in fixed}

  @jax.jit
  def run(diff, fixed):
    (out, lse), vjp = jax.vjp(lambda *d: fn({**static, **fixed, **dict(zip(names, d))}), *diff)
    cotangent = jax.random.normal(jax.random.key(cotangent_seed), out.shape, out.dtype)
    return out, lse, vjp((cotangent, jnp.zeros_like(lse)))

  out, lse, grads = run(tuple(args[n] for n in names), fixed)
  return out, lse, dict(zip(names, grads))


def check_against_reference(case: Case, dtype, implementation="pallas_triton", seed=0, **options):
  """Forward (output and logsumexp) and gradients of an implementation vs the reference;
  `options` go to the implementation's call only (e.g. deterministic_backward)."""
  args = make_inputs(case, dtype, seed)

  def run(a):
    return jfused.dot_product_attention(
      **a, implementation=implementation, return_residual=True, **options
    )

  def run_reference(precision, ref_dtype):
    return lambda a: reference(a, ref_dtype, precision)

  out, lse, grads = outputs_and_grads(run, args)
  assert out.dtype == args["query"].dtype
  with jax.default_matmul_precision("highest"):
    out32, lse32, grads32 = outputs_and_grads(
      run_reference(jax.lax.Precision.HIGHEST, jnp.float32), args
    )
  out_same, lse_same, grads_same = outputs_and_grads(run_reference(None, dtype), args)
  assert_close_three_way(f"{case} out", out, out_same, out32, dtype)
  for name in grads:
    assert grads[name].shape == args[name].shape
    assert_close_three_way(f"{case} d{name}", grads[name], grads_same[name], grads32[name], dtype)
  # Rows with every key masked carry jax.nn's huge negative fill; compare the rest normally.
  empty = lse32 < -1e37
  assert bool(jnp.all((lse.astype(jnp.float32) < -1e37) == empty)), f"{case} lse: empty rows"
  assert_close_three_way(
    f"{case} lse",
    jnp.where(empty, 0, lse),
    jnp.where(empty, 0, lse_same.astype(jnp.float32)),
    jnp.where(empty, 0, lse32),
    dtype,
  )


def assert_deterministic(case: Case, dtype, implementation="pallas_triton"):
  """Two runs of forward and backward give bitwise-equal results."""
  args = make_inputs(case, dtype)

  def run(a):
    return jfused.dot_product_attention(**a, implementation=implementation, return_residual=True)

  first, second = outputs_and_grads(run, args), outputs_and_grads(run, args)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def causal_value_and_grads(implementation: str, *, remat: bool):
  """(q, k, v) -> (loss, grads) of a causal attention loss; with remat, under jax.checkpoint.

  The lowering tests count its kernel launches: one forward, or two when checkpointed.
  """

  def loss(q, k, v):
    out = jfused.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jnp.sin(out.astype(jnp.float32)).sum()

  return jax.value_and_grad(jax.checkpoint(loss) if remat else loss, argnums=(0, 1, 2))
