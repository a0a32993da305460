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

The plans:

* Attention: batch and query heads. With GQA the key/value heads shard over the same mesh axes
  when their count divides; otherwise, when a leading part of the head axes spans exactly as
  many devices as there are key/value heads (MQA: none), each device holds the one key/value
  head its query heads share and dk, dv are summed over the rest; otherwise heads stay whole.
  Sequence axes and head dims stay whole: a sequence-sharded operand is gathered first
  (correct, but no context parallelism). bias and mask follow batch and heads unless those
  dims broadcast.
* Norms: every leading (row) axis; a sharded normalised axis is gathered first. The backward's
  dscale and dbias, per device sums over its rows, are summed across devices.

A dim whose mesh axes do not divide it stays whole rather than padded (padded rows would add
garbage into summed gradients). On one device, and inside a shard_map with every axis manual,
custom_partitioning lowers straight to the launcher, so nothing changes there; under `jax.vmap`
the launcher is vmapped as before, unpartitioned (custom_partitioning has no batching rule).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import custom_batching
from jax.experimental.custom_partitioning import (
    ArrayMapping, SdyShardingRule, custom_partitioning)
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pallas_kernels import attention_common as common
from pallas_kernels import attention_triton_bwd, attention_triton_fwd
from pallas_kernels import layer_norm_triton, layer_norm_triton_bwd

__all__ = ["attention_backward", "attention_forward", "norm_backward", "norm_forward"]


# --- shared machinery ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Op:
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


def _sharding_rule(op: _Op) -> SdyShardingRule:
  # Shardy wants the special factors in the order the factors first appear.
  factors = dict.fromkeys(f for dims in (*op.operand_dims, *op.result_dims) if dims
                          for f in dims)
  return SdyShardingRule(
      tuple(ArrayMapping(*d) for d in op.operand_dims if d is not None),
      tuple(ArrayMapping(*d) for d in op.result_dims if d is not None),
      need_replication_factors=tuple(f for f in factors if f not in op.shardable))


def _spec(dims, axes) -> PartitionSpec:
  return PartitionSpec(*(axes.get(f) or None for f in dims))


def _per_device(op: _Op, axes):
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


def _partition(op: _Op, mesh, arg_shapes, result_shape):
  del result_shape  # The results follow the plan, whatever propagation proposed.
  axes = op.choose_axes(mesh, arg_shapes)
  to_sharding = lambda dims: None if dims is None else NamedSharding(mesh, _spec(dims, axes))
  arg_shardings = tuple(to_sharding(d) for d in op.operand_dims)
  result_shardings = tuple(to_sharding(d) for d in op.result_dims)
  return mesh, _per_device(op, axes), result_shardings, arg_shardings


def _custom_partitioned(op: _Op, arrays):
  partitioned = custom_partitioning(op.launch)
  partitioned.def_partition(functools.partial(_partition, op), decode_shardings=False,
                            sharding_rule=_sharding_rule(op))

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


def _shard_mapped(op: _Op, mesh, arrays):
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

  operands = [jax.sharding.reshard(arrays[i], NamedSharding(mesh, spec))
              for i, spec in zip(given, in_specs)]
  # check_vma=False: the launchers' pallas_calls do not declare how outputs vary over axes.
  outputs = jax.shard_map(
      run, mesh=mesh, in_specs=in_specs, check_vma=False,
      out_specs=tuple(_spec(op.result_dims[i], axes) for i in returned))(*operands)
  results = [None] * len(op.result_dims)
  for i, x in zip(returned, outputs):
    # A result with an operand's dims (y like x, dq like q) takes that operand's sharding
    # back, as custom_vjp wants of gradients: a local slice where the plan kept a dim whole.
    like = [a for a, dims in zip(arrays, op.operand_dims)
            if a is not None and dims == op.result_dims[i]]
    results[i] = jax.sharding.reshard(x, jax.typeof(like[0]).sharding) if like else x
  return tuple(results)


def _explicit_mesh(arrays):
  """The mesh of the first operand typed with Explicit mesh axes, or None."""
  for x in arrays:
    mesh = None if x is None else getattr(jax.typeof(x).sharding, "mesh", None)
    if mesh is not None and not mesh.empty and AxisType.Explicit in mesh.axis_types:
      return mesh
  return None


def _partitioned_call(op: _Op, *arrays):
  """Runs `op.launch(*arrays)`, each device on its shards under sharding."""
  explicit_mesh = _explicit_mesh(arrays)
  if explicit_mesh is not None:
    return _shard_mapped(op, explicit_mesh, arrays)
  return _custom_partitioned(op, arrays)


def _devices(mesh, axes) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def _dim_axes(mesh, arg) -> list[tuple[str, ...]]:
  """The mesh axes of each dim of `arg`: () for a dim unsharded or not divided evenly."""
  shape = tuple(arg.shape)
  spec = _spec_over_mesh(mesh, arg.sharding, shape) or PartitionSpec()
  entries = [*spec, *(None,) * (len(shape) - len(spec))]
  axes = [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]
  return [a if n % _devices(mesh, a) == 0 else () for a, n in zip(axes, shape)]


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
        if _devices(mesh, chosen) == counts[dim]:
          rest = [a for a in free if a not in chosen]
          for tail in candidates(dim + 1, rest):
            yield (chosen or None, *tail)

  for entries in candidates(0, [a for a in mesh.axis_names if mesh.shape[a] > 1]):
    spec = PartitionSpec(*entries)
    if NamedSharding(mesh, spec).is_equivalent_to(sharding, len(shape)):
      return spec
  return None


# --- attention -------------------------------------------------------------------------------
#
# Factors: b batch, t query positions, s key positions, h query heads, k key/value heads,
# d query/key head dim, e value head dim. Query head n reads key/value head n // (N / K), so
# h and k must be sharded together. A compound factor h = (k, group) would tell Shardy so, but
# Shardy then splits mesh axes into sub-axes when K is smaller than the head axes, and the
# plans here use whole axes; so h and k are separate factors and `_kv_head_axes` pairs them.

ATTENTION_OPERAND_DIMS = {  # One entry per AttentionOperands field, in its order.
    "q": ("b", "t", "h", "d"),
    "k": ("b", "s", "k", "d"),
    "v": ("b", "s", "k", "e"),
    "bias": ("b", "h", "t", "s"),  # [Bb, Nb, T, S]; a dim of size 1 broadcasts.
    "mask": ("b", "h", "t", "s"),
    "q_length": ("b",),
    "kv_length": ("b",),
    "q_segments": ("b", "t"),
    "kv_segments": ("b", "s"),
    "dropout_seeds": ("b", "h"),
}
_OUT, _LSE, _DBIAS = ("b", "t", "h", "e"), ("b", "h", "t"), ("b", "h", "t", "s")
_ATTENTION_SHARDABLE = frozenset("bhk")

_FIELDS = tuple(f.name for f in dataclasses.fields(common.AttentionOperands))
if tuple(ATTENTION_OPERAND_DIMS) != _FIELDS:
  raise ImportError(f"ATTENTION_OPERAND_DIMS must name the fields of AttentionOperands "
                    f"{_FIELDS} in order, got {tuple(ATTENTION_OPERAND_DIMS)}")


def _all_fields(operands: tuple) -> tuple:
  if len(operands) > len(_FIELDS):
    raise ValueError(f"at most {len(_FIELDS)} attention operands {_FIELDS}, got {len(operands)}")
  return (*operands, *(None,) * (len(_FIELDS) - len(operands)))


def _kv_head_axes(mesh, head_axes, num_kv_heads: int) -> tuple[str, ...] | None:
  """Mesh axes for the key/value heads when the query heads shard over `head_axes`; None when
  no choice keeps every device's query heads with their key/value heads."""
  if num_kv_heads % _devices(mesh, head_axes) == 0:
    return head_axes  # Each device holds whole groups: key/value heads and their queries.
  for end in range(len(head_axes)):
    # The devices along head_axes[end:] split one group's query heads; each holds the one
    # key/value head they share (MQA: end = 0, key/value heads replicated).
    if _devices(mesh, head_axes[:end]) == num_kv_heads:
      return head_axes[:end]
  return None


def _choose_attention_axes(mesh, operands):
  q_axes = _dim_axes(mesh, operands[0])
  head_axes = q_axes[2]
  kv_axes = _kv_head_axes(mesh, head_axes, operands[1].shape[2])
  if kv_axes is None:
    head_axes = kv_axes = ()
  return {"b": q_axes[0], "h": head_axes, "k": kv_axes}


def _shared_kv_partial_sums(axes):
  # Devices that share key/value heads each saw only their own query heads.
  shared = tuple(a for a in axes["h"] if a not in axes["k"])
  return {1: shared, 2: shared}  # dk, dv


def _attention_dims(operands):
  """Each operand's dims; a bias or mask dim of size 1 that broadcasts gets its own factor."""
  q = operands[0]
  sizes = {"b": q.shape[0], "h": q.shape[2]}
  return tuple(
      None if x is None else tuple(f"{name}_{f}1" if f in sizes and n != sizes[f] else f
                                   for f, n in zip(dims, x.shape, strict=True))
      for (name, dims), x in zip(ATTENTION_OPERAND_DIMS.items(), operands, strict=True))


def attention_forward(config: common.AttentionConfig, operands: tuple,
                      kernel: Callable = attention_triton_fwd.attention_forward):
  """A forward kernel on `operands` (AttentionOperands' fields in order, None for absent
  ones), each device on its batch and head shard.

  Args:
    config: the static settings, passed on to `kernel`.
    operands: the arrays; a trailing run of absent ones may be left out.
    kernel: (AttentionOperands, config) -> (out [B, T, N, Dv], lse [B, N, T]), the launcher
      to run per device (the Triton forward by default).

  Returns:
    (out, lse) as `kernel` returns them, for the whole arrays.
  """
  operands = _all_fields(operands)

  def launch(*ops):
    return kernel(common.AttentionOperands(*ops), config)

  op = _Op(launch=launch, operand_dims=_attention_dims(operands), result_dims=(_OUT, _LSE),
           shardable=_ATTENTION_SHARDABLE, choose_axes=_choose_attention_axes)
  return _partitioned_call(op, *operands)


def attention_backward(config: common.AttentionConfig, operands: tuple, out, lse, dout,
                       kernel: Callable = attention_triton_bwd.attention_backward):
  """The backward kernels on `operands` (as `attention_forward`'s), sharded as the forward.

  `kernel` is (AttentionOperands, config, out, lse, dout) -> (dq, dk, dv, dbias), the Triton
  backward by default. Returns (dq, dk, dv, dbias): dbias is [B, N, T, S] with a bias, else
  None."""
  operands = _all_fields(operands)
  has_bias = operands[_FIELDS.index("bias")] is not None

  def launch(*arrays):
    *ops, out, lse, dout = arrays
    return kernel(common.AttentionOperands(*ops), config, out, lse, dout)

  dims = ATTENTION_OPERAND_DIMS
  op = _Op(launch=launch, operand_dims=(*_attention_dims(operands), _OUT, _LSE, _OUT),
           result_dims=(dims["q"], dims["k"], dims["v"], _DBIAS if has_bias else None),
           shardable=_ATTENTION_SHARDABLE, choose_axes=_choose_attention_axes,
           partial_sums=_shared_kv_partial_sums)
  return _partitioned_call(op, *operands, out, lse, dout)


# --- norms -----------------------------------------------------------------------------------
#
# Factors: r0, r1, ... the leading (row) axes of x; w the normalised axis.


def _if_given(array, dims):
  return None if array is None else dims


def _norm_op(launch, rows, operand_dims, result_dims, partial_sums=lambda axes: {}) -> _Op:
  return _Op(launch=launch, operand_dims=operand_dims, result_dims=result_dims,
             shardable=frozenset(rows),
             choose_axes=lambda mesh, arrays: dict(zip(rows, _dim_axes(mesh, arrays[0]))),
             partial_sums=partial_sums)


def norm_forward(x, residual, scale, bias, *, spec, interpret: bool):
  """The norm forward kernel on x [..., width], each device on its rows.

  Returns:
    (y, h, mean, rstd): y like x; h = x + residual, or None without a residual; mean (None for
    RMSNorm) and rstd, float32 with x's leading shape.
  """

  def launch(x, residual, scale, bias):
    as_rows = lambda a: None if a is None else a.reshape(-1, x.shape[-1])
    y, h, mean, rstd = layer_norm_triton.norm_forward(
        as_rows(x), as_rows(residual), scale, bias, spec=spec, interpret=interpret)
    like = lambda a, shape: None if a is None else a.reshape(shape)
    return (like(y, x.shape), like(h, x.shape), like(mean, x.shape[:-1]),
            like(rstd, x.shape[:-1]))

  if x.ndim < 2:
    return launch(x, residual, scale, bias)  # One row: nothing to shard.
  rows = tuple(f"r{i}" for i in range(x.ndim - 1))
  full = (*rows, "w")
  op = _norm_op(
      launch, rows,
      operand_dims=(full, _if_given(residual, full), _if_given(scale, ("w",)),
                    _if_given(bias, ("w",))),
      result_dims=(full, _if_given(residual, full), rows if spec.subtract_mean else None, rows))
  return _partitioned_call(op, x, residual, scale, bias)


def norm_backward(h, dy, dh_in, scale, mean, rstd, *, spec, with_bias: bool, interpret: bool):
  """The norm backward kernel on h [..., width], each device on its rows.

  Returns:
    (dh, dscale, dbias): dh like h; dscale (None without scale) and dbias (None unless
    `with_bias`) float32 [width], summed over all rows of all devices.
  """

  def launch(h, dy, dh_in, scale, mean, rstd):
    as_rows = lambda a: None if a is None else a.reshape(-1, h.shape[-1])
    flat = lambda a: None if a is None else a.reshape(-1)
    dh, dscale, dbias = layer_norm_triton_bwd.norm_backward(
        as_rows(h), as_rows(dy), as_rows(dh_in), scale, flat(mean), flat(rstd), spec=spec,
        with_bias=with_bias, interpret=interpret)
    return dh.reshape(h.shape), dscale, dbias

  if h.ndim < 2:
    return launch(h, dy, dh_in, scale, mean, rstd)
  rows = tuple(f"r{i}" for i in range(h.ndim - 1))
  full = (*rows, "w")
  op = _norm_op(
      launch, rows,
      operand_dims=(full, full, _if_given(dh_in, full), _if_given(scale, ("w",)),
                    _if_given(mean, rows), rows),
      result_dims=(full, _if_given(scale, ("w",)), ("w",) if with_bias else None),
      # Each device's dscale and dbias sum its own rows only.
      partial_sums=lambda axes: dict.fromkeys((1, 2), tuple(a for r in rows for a in axes[r])))
  return _partitioned_call(op, h, dy, dh_in, scale, mean, rstd)
