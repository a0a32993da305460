"""The attention kernels' sharding plan: each device runs them on its batch and head shard.

The mechanism (custom_partitioning, shard_map under Explicit axes) is `jfused.partitioning`;
this module says what attention can serve sharded. Batch and query heads. With GQA the
key/value heads shard over the same mesh axes when their count divides; otherwise, when a
leading part of the head axes spans exactly as many devices as there are key/value heads
(MQA: none), each device holds the one key/value head its query heads share and dk, dv are
summed over the rest; otherwise heads stay whole. Sequence axes and head dims stay whole: a
sequence-sharded operand is gathered first (correct, but no context parallelism). bias and
mask follow batch and heads unless those dims broadcast.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

from jfused.partitioning import Op, devices, dim_axes, partitioned_call
from pallas_kernels.attention import common, triton_bwd, triton_fwd

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
  raise ImportError(
    f"ATTENTION_OPERAND_DIMS must name the fields of AttentionOperands "
    f"{_FIELDS} in order, got {tuple(ATTENTION_OPERAND_DIMS)}"
  )


def _all_fields(operands: tuple) -> tuple:
  if len(operands) > len(_FIELDS):
    raise ValueError(f"at most {len(_FIELDS)} attention operands {_FIELDS}, got {len(operands)}")
  return (*operands, *(None,) * (len(_FIELDS) - len(operands)))


def _kv_head_axes(mesh, head_axes, num_kv_heads: int) -> tuple[str, ...] | None:
  """Mesh axes for the key/value heads when the query heads shard over `head_axes`; None when
  no choice keeps every device's query heads with their key/value heads."""
  if num_kv_heads % devices(mesh, head_axes) == 0:
    return head_axes  # Each device holds whole groups: key/value heads and their queries.
  for end in range(len(head_axes)):
    # The devices along head_axes[end:] split one group's query heads; each holds the one
    # key/value head they share (MQA: end = 0, key/value heads replicated).
    if devices(mesh, head_axes[:end]) == num_kv_heads:
      return head_axes[:end]
  return None


def _choose_attention_axes(mesh, operands):
  q_axes = dim_axes(mesh, operands[0])
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
    None
    if x is None
    else tuple(
      f"{name}_{f}1" if f in sizes and n != sizes[f] else f
      for f, n in zip(dims, x.shape, strict=True)
    )
    for (name, dims), x in zip(ATTENTION_OPERAND_DIMS.items(), operands, strict=True)
  )


def attention_forward(
  config: common.AttentionConfig, operands: tuple, kernel: Callable = triton_fwd.attention_forward
):
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

  op = Op(
    launch=launch,
    operand_dims=_attention_dims(operands),
    result_dims=(_OUT, _LSE),
    shardable=_ATTENTION_SHARDABLE,
    choose_axes=_choose_attention_axes,
  )
  return partitioned_call(op, *operands)


def attention_backward(
  config: common.AttentionConfig,
  operands: tuple,
  out,
  lse,
  dout,
  kernel: Callable = triton_bwd.attention_backward,
):
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
  op = Op(
    launch=launch,
    operand_dims=(*_attention_dims(operands), _OUT, _LSE, _OUT),
    result_dims=(dims["q"], dims["k"], dims["v"], _DBIAS if has_bias else None),
    shardable=_ATTENTION_SHARDABLE,
    choose_axes=_choose_attention_axes,
    partial_sums=_shared_kv_partial_sums,
  )
  return partitioned_call(op, *operands, out, lse, dout)
