"""The kernels on sharded arrays: every device launches them on its own shard.

XLA cannot look inside a Pallas kernel, so by itself it partitions one by gathering every
operand whole onto every device: a batch-sharded activation becomes a replicated one, and each
device redoes all of the work. Here every kernel launcher (attention forward and backward, norm
forward and backward) is wrapped in `jax.experimental.custom_partitioning`:

* Shardy propagates shardings through the op with a sharding rule: one factor per dimension;
  those the kernel serves sharded (batch, heads, rows) pass through, the others (sequence
  positions, head dims, the normalised axis) are `need_replication`.
* When XLA partitions the program, `_partition` sees the operands' actual shardings, picks the
  ones the kernel can serve per shard (the plan), and returns the launcher to run on per-device
  shapes, adding a `psum` where a device's result is only a partial sum. XLA reshards operands
  to the plan: slicing is free, a sharded sequence or feature axis is gathered.

Why custom_partitioning and not shard_map: shard_map needs a mesh and partition specs when the
op is traced, and under plain `jax.jit` with `NamedSharding` inputs (Auto axes) the op knows
neither then: the shardings are settled later, by propagation. custom_partitioning defers the
choice to that point, so users write no mesh-aware code. The wrapper sits around the launchers
inside the custom_vjp rules, not around the differentiable op, because custom_partitioning has
no autodiff rules and the forward and backward kernels need plans of their own (the backward
sums gradients across devices). With Explicit mesh axes the shardings are part of the types
when the op is traced, so there the same plan runs through `jax.shard_map` directly.

Each op's plan lives beside the op (`jfused/attention/sharding.py`, `jfused/norms/sharding.py`,
`jfused/cross_entropy/sharding.py`): it names a factor per dimension of every operand and
result, which factors the kernel serves sharded, how to pick mesh axes for them, and which
results are partial sums. The ops that serve only their leading (row, token) axes sharded (the
norms, the cross-entropy) build that plan with `row_sharded_op`.

A dim whose mesh axes do not divide it stays whole rather than padded (padded rows would add
garbage into summed gradients). On one device, and inside a shard_map with every axis manual,
custom_partitioning lowers straight to the launcher, so nothing changes there; under `jax.vmap`
the launcher is vmapped as before, unpartitioned (custom_partitioning has no batching rule).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import itertools
import math

import jax
from jax import custom_batching
from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule, custom_partitioning
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

__all__ = ["Op", "devices", "dim_axes", "if_given", "partitioned_call", "row_sharded_op"]


@dataclasses.dataclass(frozen=True)
class Op:
  """How to run one launcher sharded.

  Attributes:
    launch: the kernel launcher on (per-device) arrays, operands positional, None allowed;
      returns a tuple, None allowed.
    operand_dims, result_dims: a factor name per dim of each array; None for an absent array.
    shardable: the factors the kernel serves sharded; the others stay whole on every device.
    choose_axes: (mesh, operand shapes with .sharding) -> {factor: mesh axes}: the plan.
    partial_sums: plan -> {result index: mesh axes}: results each device holds only a partial
      sum of, summed over those axes.
  """

  launch: Callable
  operand_dims: tuple
  result_dims: tuple
  shardable: frozenset
  choose_axes: Callable
  partial_sums: Callable = lambda axes: {}


def _sharding_rule(op: Op) -> SdyShardingRule:
  # Shardy wants the special factors in the order the factors first appear.
  factors = dict.fromkeys(f for dims in (*op.operand_dims, *op.result_dims) if dims for f in dims)
  return SdyShardingRule(
    tuple(ArrayMapping(*d) for d in op.operand_dims if d is not None),
    tuple(ArrayMapping(*d) for d in op.result_dims if d is not None),
    need_replication_factors=tuple(f for f in factors if f not in op.shardable),
  )


def _spec(dims, axes) -> PartitionSpec:
  return PartitionSpec(*(axes.get(f) or None for f in dims))


def _per_device(op: Op, axes):
  """The launcher on one device's shards, followed by the psums the plan `axes` needs."""
  partial_sums = {i: a for i, a in op.partial_sums(axes).items() if a}

  def run(*arrays):
    # Pallas tracing must not see the caller's mesh: the per-device program has none.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
      results = list(op.launch(*arrays))
    for i, summed_axes in partial_sums.items():
      if results[i] is not None:  # Summed in float32, rounded once.
        total = jax.lax.psum(results[i].astype(jnp.float32), summed_axes)
        results[i] = total.astype(results[i].dtype)
    return tuple(results)

  return run


def _partition(op: Op, mesh, arg_shapes, result_shape):
  del result_shape  # The results follow the plan, whatever propagation proposed.
  axes = op.choose_axes(mesh, arg_shapes)
  to_sharding = lambda dims: None if dims is None else NamedSharding(mesh, _spec(dims, axes))
  arg_shardings = tuple(to_sharding(d) for d in op.operand_dims)
  result_shardings = tuple(to_sharding(d) for d in op.result_dims)
  return mesh, _per_device(op, axes), result_shardings, arg_shardings


def _custom_partitioned(op: Op, arrays):
  partitioned = custom_partitioning(op.launch)
  partitioned.def_partition(
    functools.partial(_partition, op), decode_shardings=False, sharding_rule=_sharding_rule(op)
  )

  @custom_batching.custom_vmap
  def run(*arrays):
    return partitioned(*arrays)

  @run.def_vmap
  def _vmapped(axis_size, in_batched, *arrays):
    del axis_size
    in_axes = tuple(0 if batched else None for batched in in_batched)
    results = jax.vmap(op.launch, in_axes=in_axes)(*arrays)
    return results, jax.tree.map(lambda _: True, results)

  return run(*arrays)


def _shard_mapped(op: Op, mesh, arrays):
  axes = op.choose_axes(mesh, [None if x is None else jax.typeof(x) for x in arrays])
  given = [i for i, x in enumerate(arrays) if x is not None]
  returned = [i for i, dims in enumerate(op.result_dims) if dims is not None]
  in_specs = tuple(_spec(op.operand_dims[i], axes) for i in given)
  per_device = _per_device(op, axes)

  def run(*given_arrays):
    operands = [None] * len(arrays)
    for i, x in zip(given, given_arrays):
      operands[i] = x
    results = per_device(*operands)
    return tuple(results[i] for i in returned)

  operands = [
    jax.sharding.reshard(arrays[i], NamedSharding(mesh, spec)) for i, spec in zip(given, in_specs)
  ]
  # check_vma=False: the launchers' pallas_calls do not declare how outputs vary over axes.
  outputs = jax.shard_map(
    run,
    mesh=mesh,
    in_specs=in_specs,
    check_vma=False,
    out_specs=tuple(_spec(op.result_dims[i], axes) for i in returned),
  )(*operands)
  results = [None] * len(op.result_dims)
  for i, x in zip(returned, outputs):
    # A result with an operand's dims (y like x, dq like q) takes that operand's sharding
    # back, as custom_vjp wants of gradients: a local slice where the plan kept a dim whole.
    like = [
      a for a, dims in zip(arrays, op.operand_dims) if a is not None and dims == op.result_dims[i]
    ]
    results[i] = jax.sharding.reshard(x, jax.typeof(like[0]).sharding) if like else x
  return tuple(results)


def _explicit_mesh(arrays):
  """The mesh of the first operand typed with Explicit mesh axes, or None."""
  for x in arrays:
    mesh = None if x is None else getattr(jax.typeof(x).sharding, "mesh", None)
    if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
      return mesh
  return None


def partitioned_call(op: Op, *arrays):
  """Runs `op.launch(*arrays)`, each device on its shards under sharding."""
  explicit_mesh = _explicit_mesh(arrays)
  if explicit_mesh is not None:
    return _shard_mapped(op, explicit_mesh, arrays)
  return _custom_partitioned(op, arrays)


def row_sharded_op(launch, rows, operand_dims, result_dims, summed=()) -> Op:
  """An Op served sharded along its leading row axes `rows` only (the norms, the loss).

  The plan follows the first operand: each row factor takes that operand's mesh axes for the
  dim. The results at indices `summed` are per-device sums over the device's own rows, so they
  are summed across every mesh axis a row axis is sharded on.
  """
  return Op(
    launch=launch,
    operand_dims=operand_dims,
    result_dims=result_dims,
    shardable=frozenset(rows),
    choose_axes=lambda mesh, arrays: dict(zip(rows, dim_axes(mesh, arrays[0]))),
    partial_sums=lambda axes: dict.fromkeys(summed, tuple(a for r in rows for a in axes[r])),
  )


def if_given(array, dims):
  """`dims` for an array that is there, None (the slot of an absent array) for a None."""
  return None if array is None else dims


def devices(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def dim_axes(mesh, arg) -> list[tuple[str, ...]]:
  """The mesh axes of each dim of `arg`: () for a dim unsharded or not divided evenly."""
  shape = tuple(arg.shape)
  spec = _spec_over_mesh(mesh, arg.sharding, shape) or PartitionSpec()
  entries = [*spec, *(None,) * (len(shape) - len(spec))]
  axes = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]
  return [a if n % devices(mesh, a) == 0 else () for a, n in zip(axes, shape)]


def _spec_over_mesh(mesh, sharding, shape) -> PartitionSpec | None:
  """`sharding` as a PartitionSpec over whole axes of `mesh`, or None if it is not one.

  `_partition` gets bare HLO shardings (`decode_shardings=False`), since Shardy may split a
  mesh axis into sub-axes (through a reshape near the op, say), which no PartitionSpec names
  and JAX's own decoding rejects. So the specs whose shard counts match are tried in turn.
  """
  if sharding is None:
    return PartitionSpec()
  if isinstance(sharding, NamedSharding):
    return sharding.spec
  counts = [n // max(s, 1) for n, s in zip(shape, sharding.shard_shape(shape))]

  def candidates(dim, free):
    if dim == len(shape):
      yield ()
      return
    for size in range(len(free) + 1):
      for chosen in itertools.permutations(free, size):
        if devices(mesh, chosen) == counts[dim]:
          rest = [a for a in free if a not in chosen]
          for tail in candidates(dim + 1, rest):
            yield (chosen or None, *tail)

  for entries in candidates(0, [a for a in mesh.axis_names if mesh.shape[a] > 1]):
    spec = PartitionSpec(*entries)
    if NamedSharding(mesh, spec).is_equivalent_to(sharding, len(shape)):
      return spec
  return None
