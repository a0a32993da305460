"""Shared linear cross-entropy cases and the comparison rule, used on CPU and on the GPU."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

import jfused
from tests import closeness

# Error floor relative to max(1, max|reference|), per dtype (FlashAttention's rule, as the
# attention tests: err(implementation) <= 2 * err(xla in the same dtype) + floor).
RELATIVE_FLOOR = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 2e-3}
assert_close_three_way = functools.partial(
  closeness.assert_close_three_way, relative_floor=RELATIVE_FLOOR
)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  lead: tuple[int, ...]  # labels' shape; x is lead + (width,)
  width: int
  vocab: int
  layout: str = "dv"
  bias: bool = False
  options: tuple = ()  # keyword arguments of linear_cross_entropy
  ignored_fraction: float = 0.2

  def __str__(self):
    return self.name

  @property
  def kwargs(self) -> dict:
    return dict(self.options)


def make_inputs(case: Case, dtype, seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (*case.lead, case.width), jnp.float32)
  shape = (case.width, case.vocab) if case.layout == "dv" else (case.vocab, case.width)
  # Logits of a few units: a softmax that is neither flat nor one-hot.
  weight = jax.random.normal(keys[1], shape, jnp.float32) * (2.0 / math.sqrt(case.width))
  labels = jax.random.randint(keys[2], case.lead, 0, case.vocab)
  ignored = jax.random.uniform(keys[3], case.lead) < case.ignored_fraction
  labels = jnp.where(ignored, -1, labels)
  args = {"x": x.astype(dtype), "weight": weight.astype(dtype), "labels": labels}
  if case.bias:
    args["bias"] = (jax.random.normal(keys[4], (case.vocab,), jnp.float32) * 0.5).astype(dtype)
  return args


def loss_and_grads(case: Case, args: dict, implementation: str, *, precision=None):
  """(loss, {name: gradient}) of a random projection of the loss (a per-token cotangent for
  reduction "none")."""
  names = [n for n in ("x", "weight", "bias") if n in args]

  def loss(*diff):
    a = {**args, **dict(zip(names, diff))}
    with jax.default_matmul_precision(precision or "default"):
      return jfused.linear_cross_entropy(
        a["x"],
        a["weight"],
        a["labels"],
        bias=a.get("bias"),
        weight_layout=case.layout,
        implementation=implementation,
        **case.kwargs,
      )

  value, vjp = jax.vjp(loss, *(args[n] for n in names))
  cotangent = jax.random.normal(jax.random.key(7), value.shape, value.dtype)
  return value, dict(zip(names, vjp(cotangent)))


def check_against_reference(case: Case, dtype, implementation: str):
  """Loss and gradients of an implementation against the float32 reference."""
  args = make_inputs(case, dtype)
  value, grads = loss_and_grads(case, args, implementation)
  args32 = {k: (v.astype(jnp.float32) if k != "labels" else v) for k, v in args.items()}
  value32, grads32 = loss_and_grads(case, args32, "xla", precision="highest")
  value_same, grads_same = loss_and_grads(case, args, "xla")
  assert value.dtype == jnp.float32 and value.shape == value32.shape
  assert_close_three_way(f"{case} loss", value, value_same, value32, dtype)
  for name, grad in grads.items():
    assert grad.dtype == args[name].dtype and grad.shape == args[name].shape, name
    assert_close_three_way(f"{case} d{name}", grad, grads_same[name], grads32[name], dtype)
