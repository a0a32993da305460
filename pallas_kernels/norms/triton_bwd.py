"""LayerNorm and RMSNorm backward kernel (Pallas, Triton lowering).

With xhat = (h - mean) * rstd (no mean for RMSNorm) and g = dy * (scale + scale_offset), one
kernel computes

  dh     = rstd * (g - xhat * mean(g * xhat) - mean(g)) + dh_in   (no mean(g) for RMSNorm)
  dscale = sum over rows of dy * xhat,    dbias = sum over rows of dy.

dh_in is the incoming cotangent of the op's second output h = x + residual; the sum is the
gradient of both x and residual. dscale/dbias are not accumulated with atomics: each program
writes a float32 partial sum over its own rows to a `[programs, width]` buffer and the launcher
adds those up with `jnp.sum`, so the result is bitwise reproducible.

* Fused variant (whole rows fit in registers): a fixed number of programs (`bwd_programs`)
  each walk a contiguous range of row tiles, loading the scale once and carrying the
  dscale/dbias partials in registers, so the partial buffers stay small (a few MiB) whatever
  the row count.
* Looped variant (wider rows): one program per tile of a few rows, two passes over column
  chunks (row sums, then dh and partials per chunk). Its partial buffers hold one row per row
  tile; wide rows are rare enough that this extra traffic is accepted.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.indexing import positions
from pallas_kernels.launcher import launcher
from pallas_kernels.norms import triton_fwd as layer_norm_triton
from pallas_kernels.norms.triton_fwd import (
  H100_SMS,
  MAX_FUSED_WIDTH,
  NormSpec,
  Tiling,
  col_mask_of,
  load_columns,
  load_row_stat,
  load_tile,
  masked_load,
  named_refs,
  next_power_of_2,
  num_warps_for,
  row_mask_of,
  store_tile,
  tile_masks,
  tile_view,
)

# Elements per row tile; the backward holds about twice as many live tensors as the forward.
BWD_TILE_ELEMENTS = 4096
# The fused backward launches programs holding this many tile elements together: two
# 4096-element tiles per H100 SM, so 264 programs for narrow rows and 132 for
# 8192-wide ones (measured best on an H100: 264 programs of 8192 columns ran 4-5 % slower).
# More programs mean more bytes in flight but bigger partial buffers to write and sum.
BWD_RESIDENT_ELEMENTS = H100_SMS * 2 * 4096
# Whole-row tiles this wide with both parameter gradients (LayerNorm) run on half the warps a
# tile this size otherwise gets, with the next tile prefetched: each thread holds more of the
# row, but the loads stay in flight through the reductions (H200, float32 parameters,
# norms_ln8192_h200_2026-12-01.log: backward 0.127 ms against 0.177 ms, 3167 GB/s against
# 2277; with 16 warps the prefetch spills and runs slower, 0.193 ms). RMSNorm's single
# accumulator prefetches with 16 warps (0.113 ms; 8 warps: 0.119).
PREFETCH_HALF_WARPS_COLS = 8192
# Looped variant: tile of up to 4 rows x 2048 columns.
LOOPED_ROWS = 4
LOOPED_CHUNK = 2048


def backward_tiling(rows: int, width: int, accumulators: int) -> Tiling:
  """Tile and warps of the backward; `accumulators` counts the parameter gradients wanted
  (dscale, dbias), which the fused variant carries in registers."""
  cols = max(next_power_of_2(width), 16)
  if cols <= MAX_FUSED_WIDTH:
    block_rows = max(1, min(BWD_TILE_ELEMENTS // cols, next_power_of_2(rows)))
    warps = num_warps_for(block_rows * cols, cols)
    if _half_warps_with_prefetch(cols, accumulators):
      warps //= 2
    return Tiling(block_rows, cols, False, warps)
  block_rows = min(next_power_of_2(rows), LOOPED_ROWS)
  return Tiling(block_rows, LOOPED_CHUNK, True, num_warps_for(block_rows * LOOPED_CHUNK))


def load_raw_tiles(refs: dict, names, r0, c0, tiling: Tiling, mask) -> dict:
  """The [R, C] tiles at (r0, c0) of the named refs present, in their own dtype (half the
  registers of float32 while a prefetched tile waits), zero where masked."""
  raw = {}
  for name in names:
    if name in refs:
      raw[name] = masked_load(tile_view(refs[name], r0, c0, tiling), mask)
  return raw


def prefetch_mask(r0, tiling: Tiling, rows: int, width: int):
  """[R, C] element mask of a prefetched whole-row tile at r0, which may lie past the last
  tile (all false there): unlike `tile_masks`, its rows are always checked."""
  in_range = (r0 + jnp.arange(tiling.block_rows) < rows)[:, None]
  col_mask = col_mask_of(0, tiling, width)
  if col_mask is not None:
    in_range = in_range & col_mask[None, :]
  return jnp.broadcast_to(in_range, (tiling.block_rows, tiling.block_cols))


def _half_warps_with_prefetch(cols: int, accumulators: int) -> bool:
  return accumulators >= 2 and cols == PREFETCH_HALF_WARPS_COLS


def prefetches(tiling: Tiling, accumulators: int) -> bool:
  """Whether the fused backward loads the next row tile's inputs before working on the
  current one, so that its loads stay in flight through the row reductions.

  Measured on an H100 with float32 parameters (norms_prefetch_h100_2026-11-25.log): RMSNorm's
  backward ran 6-25 % faster at every benchmark shape, LayerNorm's 6 % faster with 1024-column
  tiles but 10-13 % slower with 4096 and 8192 columns, where its two parameter-gradient
  accumulators (`accumulators`), the scale and the waiting tiles outgrow the 128 registers a
  thread of a 512-thread SM can have; with half the warps at 8192 columns it pays again
  (PREFETCH_HALF_WARPS_COLS).
  """
  if layer_norm_triton.PREFETCH_NEXT_TILE is not None:  # An A/B run's override.
    return layer_norm_triton.PREFETCH_NEXT_TILE
  return (
    accumulators < 2
    or tiling.block_cols <= 1024
    or _half_warps_with_prefetch(tiling.block_cols, accumulators)
  )


def _row_stats(refs, r0, tiling: Tiling, rows: int):
  row_mask = row_mask_of(r0, tiling, rows)
  mean = load_row_stat(refs["mean"], r0, tiling, row_mask) if "mean" in refs else None
  return mean, load_row_stat(refs["rstd"], r0, tiling, row_mask)


def bwd_programs(row_tiles: int, tiling: Tiling) -> int:
  """Programs of the fused backward: BWD_RESIDENT_ELEMENTS worth of tiles, at least one per
  SM, each walking the same number of tiles (the last may have fewer)."""
  wanted = max(H100_SMS, BWD_RESIDENT_ELEMENTS // (tiling.block_rows * tiling.block_cols))
  return pl.cdiv(row_tiles, pl.cdiv(row_tiles, wanted))


def _scale_columns(refs, c0, tiling: Tiling, spec: NormSpec, width: int):
  """[1, C] float32 scale + offset of the columns at c0, or None without a scale."""
  if "scale" not in refs:
    return None
  return load_columns(refs["scale"], c0, tiling, col_mask_of(c0, tiling, width), spec.scale_offset)


# The tiles a backward step reads, which the fused loop prefetches.
TILE_INPUTS = ("h", "dy", "dh_in")


def _tile_terms(refs, r0, c0, tiling: Tiling, rows, width, mean, rstd, scale, raw=None):
  """(mask, xhat, dy, g) of the tile at (r0, c0), zero outside the array; `scale` is the
  tile's [1, C] scale columns (_scale_columns); `raw` the tile's inputs if prefetched."""
  _, _, mask = tile_masks(r0, c0, tiling, rows, width)
  if raw is None:
    raw = load_raw_tiles(refs, ("h", "dy"), r0, c0, tiling, mask)
  h = raw["h"].astype(jnp.float32)
  xhat = (h - mean[:, None]) if mean is not None else h
  # Rows out of range have rstd = 0; columns out of range need the mask (h - mean != 0).
  xhat = xhat * rstd[:, None] if mask is None else jnp.where(mask, xhat * rstd[:, None], 0.0)
  dy = raw["dy"].astype(jnp.float32)
  g = dy if scale is None else dy * scale
  return mask, xhat, dy, g


def _store_dh(refs, r0, c0, tiling: Tiling, mask, xhat, g, rstd, g_xhat_mean, g_mean, dh_in=None):
  dh = g - xhat * g_xhat_mean[:, None]
  if g_mean is not None:
    dh = dh - g_mean[:, None]
  dh = dh * rstd[:, None]
  if "dh_in" in refs:
    if dh_in is None:
      dh_in = load_tile(refs["dh_in"], r0, c0, tiling, mask)
    dh = dh + dh_in.astype(jnp.float32)
  store_tile(refs["dh"], r0, c0, tiling, mask, dh)


def _param_partials(refs, dy, xhat) -> dict:
  """This tile's column sums for the parameter gradients that are wanted."""
  partials = {}
  if "dscale" in refs:
    partials["dscale"] = jnp.sum(dy * xhat, axis=0)
  if "dbias" in refs:
    partials["dbias"] = jnp.sum(dy, axis=0)
  return partials


def _store_partials(refs, program, c0, tiling: Tiling, width: int, partials: dict):
  col_mask = col_mask_of(c0, tiling, width)
  for name, value in partials.items():
    view = refs[name].at[program, positions(c0, tiling.block_cols)]
    pltriton.store(view, value, mask=col_mask)


def _backward_kernel_fused(
  *refs,
  names,
  spec: NormSpec,
  tiling: Tiling,
  rows: int,
  width: int,
  tiles_per_program: int,
  prefetch_next: bool,
):
  refs = named_refs(names, refs)
  program = pl.program_id(0)
  inv_width = 1.0 / width
  scale = _scale_columns(refs, 0, tiling, spec, width)  # Once: every tile has whole rows.

  def row_start(t):
    return (program * tiles_per_program + t) * tiling.block_rows

  def prefetch(t):
    """Tile t's inputs and row statistics; nothing in range past the program's last tile
    (the row mask checks them), so the last step's prefetch reads nothing."""
    r0 = row_start(t)
    row_mask = r0 + jnp.arange(tiling.block_rows) < jnp.minimum(rows, row_start(tiles))
    stats = [
      load_row_stat(refs[name], r0, tiling, row_mask) for name in ("mean", "rstd") if name in refs
    ]
    mask = prefetch_mask(r0, tiling, jnp.minimum(rows, row_start(tiles)), width)
    return stats, load_raw_tiles(refs, TILE_INPUTS, r0, 0, tiling, mask)

  def step(r0, accumulators, stats=None, raw=None):
    if stats is None:
      mean, rstd = _row_stats(refs, r0, tiling, rows)
    else:
      mean, rstd = (stats[0], stats[1]) if spec.subtract_mean else (None, stats[0])
    mask, xhat, dy, g = _tile_terms(refs, r0, 0, tiling, rows, width, mean, rstd, scale, raw)
    g_mean = jnp.sum(g, axis=1) * inv_width if spec.subtract_mean else None
    _store_dh(
      refs,
      r0,
      0,
      tiling,
      mask,
      xhat,
      g,
      rstd,
      jnp.sum(g * xhat, axis=1) * inv_width,
      g_mean,
      dh_in=None if raw is None else raw.get("dh_in"),
    )
    partials = _param_partials(refs, dy, xhat)
    return {name: accumulators[name] + partials[name] for name in accumulators}

  def body(t, accumulators):
    return step(row_start(t), accumulators)

  def prefetching_body(t, carry):
    accumulators, (stats, raw) = carry
    following = prefetch(t + 1)
    return step(row_start(t), accumulators, stats, raw), following

  zeros = jnp.zeros((tiling.block_cols,), jnp.float32)
  initial = {name: zeros for name in ("dscale", "dbias") if name in refs}
  # The last program may own fewer tiles; never visiting a tile past the end lets
  # `row_mask_of` drop the row mask when the rows fill whole tiles.
  row_tiles = pl.cdiv(rows, tiling.block_rows)
  tiles = jnp.minimum(tiles_per_program, row_tiles - program * tiles_per_program)
  if prefetch_next:
    totals, _ = lax.fori_loop(0, tiles, prefetching_body, (initial, prefetch(0)))
  else:
    totals = lax.fori_loop(0, tiles, body, initial)
  _store_partials(refs, program, 0, tiling, width, totals)


def _backward_kernel_looped(*refs, names, spec: NormSpec, tiling: Tiling, rows: int, width: int):
  refs = named_refs(names, refs)
  program = pl.program_id(0)
  r0 = program * tiling.block_rows
  mean, rstd = _row_stats(refs, r0, tiling, rows)
  chunks = pl.cdiv(width, tiling.block_cols)

  # Pass 1: per-lane running sums of g * xhat and g, reduced over lanes at the end.
  def sums_body(i, carry):
    c0 = i * tiling.block_cols
    scale = _scale_columns(refs, c0, tiling, spec, width)
    _, xhat, _, g = _tile_terms(refs, r0, c0, tiling, rows, width, mean, rstd, scale)
    return carry[0] + g * xhat, carry[1] + g

  zeros = jnp.zeros((tiling.block_rows, tiling.block_cols), jnp.float32)
  g_xhat_sum, g_sum = lax.fori_loop(0, chunks, sums_body, (zeros, zeros))
  inv_width = 1.0 / width
  g_xhat_mean = jnp.sum(g_xhat_sum, axis=1) * inv_width
  g_mean = jnp.sum(g_sum, axis=1) * inv_width if spec.subtract_mean else None

  # Pass 2: dh and this row tile's parameter partials, chunk by chunk.
  @pl.loop(0, chunks)
  def _(i):
    c0 = i * tiling.block_cols
    scale = _scale_columns(refs, c0, tiling, spec, width)
    mask, xhat, dy, g = _tile_terms(refs, r0, c0, tiling, rows, width, mean, rstd, scale)
    _store_dh(refs, r0, c0, tiling, mask, xhat, g, rstd, g_xhat_mean, g_mean)
    _store_partials(refs, program, c0, tiling, width, _param_partials(refs, dy, xhat))


@launcher(static_argnames=("spec", "with_bias", "interpret"))
def norm_backward(
  h, dy, dh_in, scale, mean, rstd, *, spec: NormSpec, with_bias: bool, interpret: bool
):
  """Runs the backward kernel.

  Args:
    h: [rows, width] normalised input saved by the forward (x, or x + residual).
    dy: cotangent of the normalised output, like h.
    dh_in: None, or the cotangent of the output h (residual form), like h.
    scale: None, or the [width] scale (without the offset).
    mean: None (RMSNorm) or float32 [rows]; rstd: float32 [rows].
    spec: what the forward computed.
    with_bias: also return dbias.
    interpret: run Pallas in interpret mode.

  Returns:
    (dh, dscale, dbias): dh like h (the gradient of x and of residual); dscale (None without
    scale) and dbias (None unless `with_bias`) in float32 [width].
  """
  rows, width = h.shape
  accumulators = (scale is not None) + with_bias  # dscale, dbias: the tiling depends on them
  tiling = backward_tiling(rows, width, accumulators)
  row_tiles = pl.cdiv(rows, tiling.block_rows)
  if tiling.looped:
    programs = row_tiles
    kernel = _backward_kernel_looped
  else:
    programs = bwd_programs(row_tiles, tiling)
    tiles_per_program = pl.cdiv(row_tiles, programs)
    kernel = functools.partial(
      _backward_kernel_fused,
      tiles_per_program=tiles_per_program,
      prefetch_next=prefetches(tiling, accumulators),
    )
  inputs = {"h": h, "dy": dy, "dh_in": dh_in, "scale": scale, "mean": mean, "rstd": rstd}
  inputs = {name: value for name, value in inputs.items() if value is not None}
  outputs = {"dh": jax.ShapeDtypeStruct(h.shape, h.dtype)}
  partial_shape = jax.ShapeDtypeStruct((programs, width), jnp.float32)
  if scale is not None:
    outputs["dscale"] = partial_shape
  if with_bias:
    outputs["dbias"] = partial_shape
  kernel = functools.partial(
    kernel, names=(*inputs, *outputs), spec=spec, tiling=tiling, rows=rows, width=width
  )
  results = pl.pallas_call(
    kernel,
    out_shape=tuple(outputs.values()),
    grid=(programs,),
    compiler_params=pltriton.CompilerParams(num_warps=tiling.num_warps, num_stages=2),
    interpret=interpret,
    name=f"jfused_{spec.op_name}_bwd",
  )(*inputs.values())
  results = dict(zip(outputs, results))
  # A fixed-order reduction over the partials: deterministic, unlike atomics.
  dscale, dbias = (
    jnp.sum(results[name], axis=0) if name in results else None for name in ("dscale", "dbias")
  )
  return results["dh"], dscale, dbias
