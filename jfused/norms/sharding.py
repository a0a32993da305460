"""The norm kernels' sharding plan: each device runs them on its own rows.

The mechanism is `jfused.partitioning`; this module says what the norms serve sharded: every
leading (row) axis. A sharded normalised axis is gathered first. The backward's dscale and
dbias, per device sums over its rows, are summed across devices.
"""

from __future__ import annotations

from jfused.partitioning import if_given, partitioned_call, row_sharded_op
from pallas_kernels.norms import triton_bwd, triton_fwd

# Factors: r0, r1, ... the leading (row) axes of x; w the normalised axis.


def norm_forward(x, residual, scale, bias, *, spec, interpret: bool):
  """The norm forward kernel on x [..., width], each device on its rows.

  Returns:
    (y, h, mean, rstd): y like x; h = x + residual, or None without a residual; mean (None for
    RMSNorm) and rstd, float32 with x's leading shape.
  """

  def launch(x, residual, scale, bias):
    as_rows = lambda a: None if a is None else a.reshape(-1, x.shape[-1])
    y, h, mean, rstd = triton_fwd.norm_forward(
      as_rows(x), as_rows(residual), scale, bias, spec=spec, interpret=interpret
    )
    like = lambda a, shape: None if a is None else a.reshape(shape)
    return (like(y, x.shape), like(h, x.shape), like(mean, x.shape[:-1]), like(rstd, x.shape[:-1]))

  if x.ndim < 2:
    return launch(x, residual, scale, bias)  # One row: nothing to shard.
  rows = tuple(f"r{i}" for i in range(x.ndim - 1))
  full = (*rows, "w")
  op = row_sharded_op(
    launch,
    rows,
    operand_dims=(
      full,
      if_given(residual, full),
      if_given(scale, ("w",)),
      if_given(bias, ("w",)),
    ),
    result_dims=(full, if_given(residual, full), rows if spec.subtract_mean else None, rows),
  )
  return partitioned_call(op, x, residual, scale, bias)


def norm_backward(h, dy, dh_in, scale, mean, rstd, *, spec, with_bias: bool, interpret: bool):
  """The norm backward kernel on h [..., width], each device on its rows.

  Returns:
    (dh, dscale, dbias): dh like h; dscale (None without scale) and dbias (None unless
    `with_bias`) float32 [width], summed over all rows of all devices.
  """

  def launch(h, dy, dh_in, scale, mean, rstd):
    as_rows = lambda a: None if a is None else a.reshape(-1, h.shape[-1])
    flat = lambda a: None if a is None else a.reshape(-1)
    dh, dscale, dbias = triton_bwd.norm_backward(
      as_rows(h),
      as_rows(dy),
      as_rows(dh_in),
      scale,
      flat(mean),
      flat(rstd),
      spec=spec,
      with_bias=with_bias,
      interpret=interpret,
    )
    return dh.reshape(h.shape), dscale, dbias

  if h.ndim < 2:
    return launch(h, dy, dh_in, scale, mean, rstd)
  rows = tuple(f"r{i}" for i in range(h.ndim - 1))
  full = (*rows, "w")
  op = row_sharded_op(
    launch,
    rows,
    operand_dims=(
      full,
      full,
      if_given(dh_in, full),
      if_given(scale, ("w",)),
      if_given(mean, rows),
      rows,
    ),
    result_dims=(full, if_given(scale, ("w",)), ("w",) if with_bias else None),
    summed=(1, 2),  # Each device's dscale and dbias sum its own rows only.
  )
  return partitioned_call(op, h, dy, dh_in, scale, mean, rstd)
