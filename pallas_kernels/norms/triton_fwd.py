"""LayerNorm and RMSNorm forward kernels (Pallas, Triton lowering), residual add fused in.

Every input is a 2-D `[rows, width]` array normalised over its last axis. The rows are cut
into tiles of `block_rows` rows; statistics are always float32.

* Fused variant (width rounded up to a power of two <= `MAX_FUSED_WIDTH`): the tile holds whole
  rows, so the kernel reads every input element once and writes every output element once.
  Narrow rows are stacked several to a tile so each tile still moves a few KiB. With scale or
  bias wider than x's dtype and more tiles than `PERSISTENT_PROGRAMS`, the launch is
  persistent: that many programs each load the parameters once, then walk tiles pid,
  pid + programs, ... Otherwise each tile loads them again: with one-row tiles and float32
  parameters, 8 bytes of parameters per column beside the 2 bytes of a bf16 input.
* Looped variant (wider rows): one program per row. A row no longer fits in registers, so the
  kernel walks it in column chunks twice: pass 1 gathers the statistics (per-lane Welford,
  stable without a second read), pass 2 normalises. Pass 2 re-reads the inputs, which are
  mostly still in L2.

Out-of-range columns and rows are masked on every load (loaded as 0) and store. That keeps
the real GPU in bounds, and interpret mode, which fills out-of-bounds reads with NaN, clean.
Masks that are statically all true (rows a multiple of the tile, width of the chunk) are left
out, so Triton emits plain vectorised accesses for the common power-of-two shapes.

The backward kernels live in `triton_bwd.py`; helpers shared with it are here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
import jax.numpy as jnp

from pallas_kernels.indexing import positions
from pallas_kernels.launcher import launcher

# A row this wide (after rounding up to a power of two) is the largest one program keeps in
# registers: 16384 float32 values over 16 warps is 32 per thread per live tensor.
MAX_FUSED_WIDTH = 16384
# Elements per forward program in the fused variant: 8 KiB of bf16 per input, enough bytes in
# flight per program while leaving room for several programs per SM.
FWD_TILE_ELEMENTS = 4096
# A launch of one program per tile stacks at least this many rows in a tile (up to
# MAX_FUSED_WIDTH elements): on an H100 two 8192-wide rows a program ran 5-6 % faster than
# one, two 4096-wide rows 3 %. The persistent launch keeps FWD_TILE_ELEMENTS: its registers
# also hold the parameters.
PER_TILE_MIN_ROWS = 2
# Column chunk of the looped variants.
LOOP_CHUNK = 4096
# Streaming multiprocessors of an H100 SXM, which the launch sizes below are tuned for.
H100_SMS = 132
# Programs of the persistent fused forward: four per H100 SM, enough resident warps
# to keep loads in flight while each program loads scale and bias only once. None launches one
# program per tile everywhere (what benchmarks compare against).
PERSISTENT_PROGRAMS: int | None = H100_SMS * 4
# The fused backward's choice of loading the next row tile's inputs before working on the
# current one (`triton_bwd.prefetches`); True or False overrides it (A/B runs).
PREFETCH_NEXT_TILE: bool | None = None


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """What to compute; static, hashable.

  Attributes:
    subtract_mean: True for LayerNorm, False for RMSNorm.
    epsilon: added to the variance (mean square for RMSNorm) before the rsqrt.
    scale_offset: added to the scale before it multiplies (Gemma's `1 + scale`).
    fast_variance: LayerNorm only: var = E[x^2] - E[x]^2 (Flax's `use_fast_variance`).
  """

  subtract_mean: bool
  epsilon: float
  scale_offset: float = 0.0
  fast_variance: bool = False

  @property
  def op_name(self) -> str:
    return "layer_norm" if self.subtract_mean else "rms_norm"


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How a `[rows, width]` array is cut into program tiles (both sizes powers of two).

  Attributes:
    block_rows, block_cols: the tile.
    looped: walk each row in column chunks (rows wider than one tile).
    num_warps: warps per program.
    programs: None: one program per row tile. Otherwise a persistent launch of this many
      programs, each walking every `programs`-th row tile (fused forward only).
  """

  block_rows: int
  block_cols: int
  looped: bool
  num_warps: int
  programs: int | None = None


def next_power_of_2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def num_warps_for(tile_elements: int, cols: int | None = None) -> int:
  """About 16 float32 values per thread per live tensor (Triton's usual LayerNorm choice).

  Given the tile's width `cols` <= 1024, at most a warp per row: a row then fits in 32 values
  a thread and its sums need no shared memory (65536x1024 on an H100: 3-4 % faster).
  """
  warps = min(max(tile_elements // 512, 1), 16)
  if cols is not None and cols <= 1024:
    warps = min(warps, max(tile_elements // cols, 1))
  return warps


def forward_tiling(rows: int, width: int, persistent: bool = True) -> Tiling:
  """Tile and launch of the forward kernel (see the module docstring).

  Args:
    rows, width: the 2-D input's shape.
    persistent: allow the persistent launch of `PERSISTENT_PROGRAMS` programs. It is taken
      only for the fused variant with more row tiles than programs; with fewer, each program
      would own one tile anyway.
  """
  # Triton blocks are powers of two; below 16 lanes a warp would idle anyway.
  cols = max(next_power_of_2(width), 16)
  if cols > MAX_FUSED_WIDTH:
    return Tiling(1, LOOP_CHUNK, True, num_warps_for(LOOP_CHUNK))
  block_rows = max(1, min(FWD_TILE_ELEMENTS // cols, next_power_of_2(rows)))
  if persistent and PERSISTENT_PROGRAMS and pl.cdiv(rows, block_rows) > PERSISTENT_PROGRAMS:
    return Tiling(block_rows, cols, False, num_warps_for(block_rows * cols), PERSISTENT_PROGRAMS)
  stacked = min(PER_TILE_MIN_ROWS, MAX_FUSED_WIDTH // cols)
  block_rows = min(max(block_rows, stacked), next_power_of_2(rows))
  return Tiling(block_rows, cols, False, num_warps_for(block_rows * cols, cols))


# --- helpers shared by the forward and backward kernels --------------------------------------


def named_refs(names, refs) -> dict:
  """Kernels take a variable set of refs; launchers pass their names alongside."""
  assert len(names) == len(refs), (names, len(refs))
  return dict(zip(names, refs))


def row_mask_of(r0, tiling: Tiling, rows: int):
  """[R] mask of the rows in range, or None when every tile is full.

  Callers only visit tiles that start inside the array, so `rows % R == 0` means all true.
  """
  if rows % tiling.block_rows == 0:
    return None
  return r0 + jnp.arange(tiling.block_rows) < rows


def col_mask_of(c0, tiling: Tiling, width: int):
  """[C] mask of the columns in range, or None when every chunk is full."""
  if width % tiling.block_cols == 0:
    return None
  return c0 + jnp.arange(tiling.block_cols) < width


def tile_masks(r0, c0, tiling: Tiling, rows: int, width: int):
  """(row mask [R], column mask [C], element mask [R, C]) of the tile at (r0, c0); None
  stands for all true."""
  row_mask, col_mask = row_mask_of(r0, tiling, rows), col_mask_of(c0, tiling, width)
  shape = (tiling.block_rows, tiling.block_cols)
  if row_mask is None:
    mask = None if col_mask is None else jnp.broadcast_to(col_mask[None, :], shape)
  elif col_mask is None:
    mask = jnp.broadcast_to(row_mask[:, None], shape)
  else:
    mask = row_mask[:, None] & col_mask[None, :]
  return row_mask, col_mask, mask


def where_columns(col_mask, value, other):
  """`value` in the columns in range, `other` elsewhere."""
  return value if col_mask is None else jnp.where(col_mask[None, :], value, other)


def tile_view(ref, r0, c0, tiling: Tiling):
  """The [R, C] window of a 2-D ref at (r0, c0)."""
  rows = positions(r0, tiling.block_rows)[:, None]
  return ref.at[rows, positions(c0, tiling.block_cols)[None, :]]


def masked_load(view, mask):
  """Loads `view`, zero where `mask` is false (no mask: a plain load)."""
  if mask is None:
    return pltriton.load(view)
  return pltriton.load(view, mask=mask, other=0)


def load_tile(ref, r0, c0, tiling: Tiling, mask):
  """The [R, C] tile at (r0, c0) in float32, zero where masked."""
  return masked_load(tile_view(ref, r0, c0, tiling), mask).astype(jnp.float32)


def store_tile(ref, r0, c0, tiling: Tiling, mask, value):
  pltriton.store(tile_view(ref, r0, c0, tiling), value.astype(ref.dtype), mask=mask)


def load_row_stat(ref, r0, tiling: Tiling, row_mask):
  return masked_load(ref.at[positions(r0, tiling.block_rows)], row_mask)


def store_row_stat(ref, r0, tiling: Tiling, row_mask, value):
  pltriton.store(ref.at[positions(r0, tiling.block_rows)], value, mask=row_mask)


def load_columns(ref, c0, tiling: Tiling, col_mask, offset: float = 0.0):
  """[1, C] float32 slice of a per-feature parameter (scale or bias), `offset` added."""
  value = masked_load(ref.at[positions(c0, tiling.block_cols)], col_mask).astype(jnp.float32)
  return (value + offset if offset else value)[None, :]


def load_input(refs: dict, r0, c0, tiling: Tiling, mask, store_sum: bool = False):
  """The normalised input tile: x, or h = x + residual rounded to x's dtype.

  h is rounded before it is normalised so the result equals the unfused `norm(x + residual)`
  computed in x's dtype; `store_sum` also writes that h (the op's second output).
  """
  x = load_tile(refs["x"], r0, c0, tiling, mask)
  if "residual" not in refs:
    return x
  h = (x + load_tile(refs["residual"], r0, c0, tiling, mask)).astype(refs["x"].dtype)
  if store_sum:
    store_tile(refs["h"], r0, c0, tiling, mask, h)
  return h.astype(jnp.float32)


# --- forward ---------------------------------------------------------------------------------


def _row_statistics_fused(h, col_mask, spec: NormSpec, width: int):
  """(mean or None, rstd) of whole rows held in registers; masked lanes hold 0."""
  inv_width = 1.0 / width
  if not spec.subtract_mean:
    return None, lax.rsqrt(jnp.sum(h * h, axis=1) * inv_width + spec.epsilon)
  mean = jnp.sum(h, axis=1) * inv_width
  if spec.fast_variance:
    var = jnp.maximum(jnp.sum(h * h, axis=1) * inv_width - mean * mean, 0.0)
  else:
    centred = where_columns(col_mask, h - mean[:, None], 0.0)
    var = jnp.sum(centred * centred, axis=1) * inv_width
  return mean, lax.rsqrt(var + spec.epsilon)


def _row_statistics_looped(refs, r0, tiling: Tiling, spec: NormSpec, rows: int, width: int):
  """Pass 1 of the looped forward: (mean or None, rstd) of rows walked chunk by chunk.

  Each lane keeps a Welford running (mean, M2) over the chunks it sees; lanes are merged at
  the end with Chan et al.'s pairwise formula. Lane j sees chunks 0..n_j-1, so in chunk i
  every valid lane has count i + 1.
  """
  chunks = pl.cdiv(width, tiling.block_cols)
  zeros = jnp.zeros((tiling.block_rows, tiling.block_cols), jnp.float32)
  exact_variance = spec.subtract_mean and not spec.fast_variance

  def body(i, carry):
    c0 = i * tiling.block_cols
    _, col_mask, mask = tile_masks(r0, c0, tiling, rows, width)
    h = load_input(refs, r0, c0, tiling, mask, store_sum=True)
    if not exact_variance:  # plain sums: (sum, sum of squares)
      return carry[0] + h, carry[1] + h * h
    lane_mean, lane_m2 = carry
    delta = h - lane_mean
    new_mean = lane_mean + delta / (i + 1).astype(jnp.float32)
    new_m2 = lane_m2 + delta * (h - new_mean)
    return (where_columns(col_mask, new_mean, lane_mean), where_columns(col_mask, new_m2, lane_m2))

  first, second = lax.fori_loop(0, chunks, body, (zeros, zeros))
  inv_width = 1.0 / width
  if not spec.subtract_mean:
    return None, lax.rsqrt(jnp.sum(second, axis=1) * inv_width + spec.epsilon)
  if spec.fast_variance:
    mean = jnp.sum(first, axis=1) * inv_width
    var = jnp.maximum(jnp.sum(second, axis=1) * inv_width - mean * mean, 0.0)
    return mean, lax.rsqrt(var + spec.epsilon)
  lane = jnp.arange(tiling.block_cols)
  lane_count = ((width - lane + tiling.block_cols - 1) // tiling.block_cols).astype(jnp.float32)
  mean = jnp.sum(first * lane_count[None, :], axis=1) * inv_width
  spread = first - mean[:, None]
  m2 = jnp.sum(second + lane_count[None, :] * spread * spread, axis=1)
  return mean, lax.rsqrt(m2 * inv_width + spec.epsilon)


def _parameters(refs, c0, tiling: Tiling, col_mask, spec: NormSpec):
  """([1, C] scale + offset, [1, C] bias) in float32 from column c0; None where absent."""
  scale = (
    load_columns(refs["scale"], c0, tiling, col_mask, spec.scale_offset)
    if "scale" in refs
    else None
  )
  bias = load_columns(refs["bias"], c0, tiling, col_mask) if "bias" in refs else None
  return scale, bias


def _normalise(h, mean, rstd, scale, bias):
  y = (h - mean[:, None]) if mean is not None else h
  y = y * rstd[:, None]
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


def _store_row_statistics(refs, r0, tiling: Tiling, rows: int, mean, rstd):
  row_mask = row_mask_of(r0, tiling, rows)
  if mean is not None:
    store_row_stat(refs["mean"], r0, tiling, row_mask, mean)
  store_row_stat(refs["rstd"], r0, tiling, row_mask, rstd)


def _forward_looped(refs, r0, tiling: Tiling, spec: NormSpec, rows: int, width: int):
  """The row tile at r0, walked in column chunks: statistics, then normalisation."""
  mean, rstd = _row_statistics_looped(refs, r0, tiling, spec, rows, width)

  @pl.loop(0, pl.cdiv(width, tiling.block_cols))
  def _(i):
    c0 = i * tiling.block_cols
    _, col_mask, mask = tile_masks(r0, c0, tiling, rows, width)
    h = load_input(refs, r0, c0, tiling, mask)  # recomputed: h is written in pass 1 only
    scale, bias = _parameters(refs, c0, tiling, col_mask, spec)
    store_tile(refs["y"], r0, c0, tiling, mask, _normalise(h, mean, rstd, scale, bias))

  _store_row_statistics(refs, r0, tiling, rows, mean, rstd)


def _forward_fused_tile(
  refs, r0, tiling: Tiling, spec: NormSpec, rows: int, width: int, scale, bias
):
  """The row tile at r0, whole rows in registers; scale and bias come loaded."""
  _, col_mask, mask = tile_masks(r0, 0, tiling, rows, width)
  h = load_input(refs, r0, 0, tiling, mask, store_sum=True)
  mean, rstd = _row_statistics_fused(h, col_mask, spec, width)
  store_tile(refs["y"], r0, 0, tiling, mask, _normalise(h, mean, rstd, scale, bias))
  _store_row_statistics(refs, r0, tiling, rows, mean, rstd)


def _forward_kernel(*refs, names, spec: NormSpec, tiling: Tiling, rows: int, width: int):
  refs = named_refs(names, refs)
  program = pl.program_id(0)
  if tiling.looped:
    _forward_looped(refs, program * tiling.block_rows, tiling, spec, rows, width)
    return
  # Loaded once per program, before any tile: a persistent program reuses them for every tile
  # it visits instead of reloading them from L2.
  scale, bias = _parameters(refs, 0, tiling, col_mask_of(0, tiling, width), spec)
  fused_tile = functools.partial(
    _forward_fused_tile,
    refs,
    tiling=tiling,
    spec=spec,
    rows=rows,
    width=width,
    scale=scale,
    bias=bias,
  )
  if tiling.programs is None:
    fused_tile(program * tiling.block_rows)
    return

  # Strided tiles: trip counts differ by at most one, and the programs running at any moment
  # stream neighbouring rows. Only tiles that start inside the array are visited, which the
  # row masks rely on. (Loading the next tile ahead, as the backward does, measured slower
  # here: norms_prefetch_h100_2026-11-25.log.)
  @pl.loop(program, pl.cdiv(rows, tiling.block_rows), step=tiling.programs)
  def _(tile):
    fused_tile(tile * tiling.block_rows)


def _parameters_outweigh_input(x, scale, bias) -> bool:
  """Whether reloading scale and bias per tile would cost more than the persistent launch.

  Measured on an H100 (bf16 x, benchmarks/results/norms_persistent_h100_2026-11-25.log): with
  float32 parameters the persistent launch gained 13-22 % at widths 4096 and 8192 (one-row
  tiles), and about nothing at width 1024; with bfloat16 parameters it lost up to 22 %. So it
  is taken only where each column's parameters are wider than its input element. Without
  parameters a persistent program would have nothing to keep between its tiles.
  """
  itemsizes = [p.dtype.itemsize for p in (scale, bias) if p is not None]
  return bool(itemsizes) and max(itemsizes) > x.dtype.itemsize


@launcher(static_argnames=("spec", "interpret"))
def norm_forward(x, residual, scale, bias, *, spec: NormSpec, interpret: bool):
  """Runs the forward kernel on 2-D `x` (and `residual`, same shape and dtype).

  Args:
    x: [rows, width] input; rows and width must be positive.
    residual: None, or an array like `x` added to it first.
    scale, bias: None, or [width] per-feature parameters.
    spec: what to compute.
    interpret: run Pallas in interpret mode.

  Returns:
    (y, h, mean, rstd): y like x; h = x + residual like x, or None without a residual;
    mean (None for RMSNorm) and rstd, float32 [rows].
  """
  rows, width = x.shape
  tiling = forward_tiling(rows, width, persistent=_parameters_outweigh_input(x, scale, bias))
  inputs = {"x": x, "residual": residual, "scale": scale, "bias": bias}
  inputs = {name: value for name, value in inputs.items() if value is not None}
  outputs = {"y": jax.ShapeDtypeStruct(x.shape, x.dtype)}
  if residual is not None:
    outputs["h"] = jax.ShapeDtypeStruct(x.shape, x.dtype)
  if spec.subtract_mean:
    outputs["mean"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
  outputs["rstd"] = jax.ShapeDtypeStruct((rows,), jnp.float32)
  kernel = functools.partial(
    _forward_kernel, names=(*inputs, *outputs), spec=spec, tiling=tiling, rows=rows, width=width
  )
  results = pl.pallas_call(
    kernel,
    out_shape=tuple(outputs.values()),
    grid=(tiling.programs or pl.cdiv(rows, tiling.block_rows),),
    compiler_params=pltriton.CompilerParams(
      num_warps=tiling.num_warps, num_stages=2 if tiling.looped else 1
    ),
    interpret=interpret,
    name=f"jfused_{spec.op_name}_fwd",
  )(*inputs.values())
  results = dict(zip(outputs, results))
  return results["y"], results.get("h"), results.get("mean"), results["rstd"]
