"""Tests of jfused.layer_norm / jfused.rms_norm.

On CPU the Pallas kernels run in interpret mode (small row counts keep that fast); the
lowering tests export them for CUDA under an abstract H100; `gpu`-marked tests run the same
cases natively. Tolerances follow the guide: float32 tight, half precision within twice the
error of XLA in the same dtype (both measured against a float32 reference) plus a floor.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jfused import config
from jfused.norms import api as norms
from jfused.norms import reference as norm_reference
from pallas_kernels.norms import triton_bwd as layer_norm_triton_bwd
from pallas_kernels.norms import triton_fwd as layer_norm_triton
from tests.cuda_lowering import count_kernel_calls, export_for_h100

PALLAS = "pallas_triton"
# Error floor relative to max(1, max|reference|), per dtype.
FLOORS = {"float32": 5e-6, "bfloat16": 2e-3, "float16": 5e-4}


@pytest.fixture(autouse=True)
def strict_promotion():
  # Mixed-dtype arithmetic must be explicit in the op, as in Equinox's test suites.
  with jax.numpy_dtype_promotion("strict"):
    yield


@dataclasses.dataclass(frozen=True)
class Case:
  op: str  # "layer_norm" or "rms_norm"
  lead: tuple[int, ...]
  width: int
  dtype: str = "float32"
  scale: bool = True
  bias: bool = True  # layer_norm only
  residual: bool = False
  scale_offset: float = 0.0
  fast_variance: bool = False
  param_dtype: str | None = None  # dtype of scale/bias; None: x's dtype

  def __str__(self):
    flags = "".join(
      c
      for c, on in (
        ("s", self.scale),
        ("b", self.has_bias),
        ("r", self.residual),
        ("o", self.scale_offset),
        ("f", self.fast_variance),
      )
      if on
    )
    params = f"-p{self.param_dtype}" if self.param_dtype else ""
    shape = "x".join(map(str, (*self.lead, self.width)))
    return f"{self.op}-{shape}-{self.dtype}{params}-{flags or 'plain'}"

  @property
  def has_bias(self):
    return self.bias and self.op == "layer_norm"


def _sweep():
  """Every width x dtype x op, with leading ranks 1-4 and the options cycled (co-prime
  periods, so the combinations vary across widths and dtypes)."""
  leads = ((3,), (2, 3), (2, 1, 3), (1, 2, 1, 2))
  wide_leads = ((2,), (2, 1), (1, 2, 1), (1, 1, 1, 3))  # interpret mode is slow on wide rows
  cases = []
  widths, dtypes, ops = (
    (1, 7, 128, 1000, 4096, 65536),
    ("float32", "bfloat16", "float16"),
    ("layer_norm", "rms_norm"),
  )
  for i, (width, dtype, op) in enumerate(itertools.product(widths, dtypes, ops)):
    cases.append(
      Case(
        op,
        (wide_leads if width > 4096 else leads)[i % 4],
        width,
        dtype,
        scale=i % 3 != 2,
        bias=i % 4 < 2,
        residual=i % 2 == 0,
        scale_offset=1.0 if i % 5 == 0 else 0.0,
        param_dtype="float32" if dtype != "float32" and i % 7 < 3 else None,
      )
    )
  # Rows wider than one block that are not powers of two, and a lone vector.
  cases += [
    Case("layer_norm", (3,), 20000, "bfloat16", residual=True, scale_offset=0.5),
    Case("rms_norm", (2,), 70000, "float32", residual=True),
    Case("layer_norm", (), 300, "bfloat16"),
    Case("rms_norm", (), 4096, "float32", residual=True),
  ]
  return cases


SWEEP = _sweep()
FLAG_CASES = [
  Case("layer_norm", (2, 5), 96, "float32", s, b, r, o)
  for s, b, r, o in itertools.product((False, True), (False, True), (False, True), (0.0, 0.5))
] + [
  Case("rms_norm", (2, 5), 96, "bfloat16", s, False, r, o)
  for s, r, o in itertools.product((False, True), (False, True), (0.0, 0.5))
]
FAST_VARIANCE_CASES = [
  Case("layer_norm", (4,), w, d, fast_variance=True, residual=r)
  for w, d, r in ((1000, "float32", False), (65536, "float32", True), (4096, "bfloat16", True))
]


def _inputs(case: Case, seed=0):
  """(x, residual, scale, bias, cotangents) as arrays, all random and non-trivial."""
  keys = jax.random.split(jax.random.key(seed), 6)
  shape = (*case.lead, case.width)
  dtype, param_dtype = jnp.dtype(case.dtype), jnp.dtype(case.param_dtype or case.dtype)
  # An offset mean and a non-unit spread, so subtracting the mean and scaling both matter, and
  # a column pattern, so partial statistics of column chunks differ (the looped kernels).
  pattern = 2.0 * jnp.sin(jnp.arange(case.width, dtype=jnp.float32) * (2 * np.pi / 64))
  pattern = pattern.reshape((1,) * len(case.lead) + (-1,))  # No implicit rank promotion.
  x = (1.5 * jax.random.normal(keys[0], shape) + 0.7 + pattern).astype(dtype)
  residual = jax.random.normal(keys[1], shape).astype(dtype) if case.residual else None
  scale = jax.random.normal(keys[2], (case.width,)).astype(param_dtype) if case.scale else None
  bias = jax.random.normal(keys[3], (case.width,)).astype(param_dtype) if case.has_bias else None
  cotangent = jax.random.normal(keys[4], shape).astype(dtype)
  if case.residual:
    cotangent = (cotangent, jax.random.normal(keys[5], shape).astype(dtype))
  return x, residual, scale, bias, cotangent


def _function(case: Case, implementation, reference=False):
  """The op as f(x, residual, scale, bias), or its float32 reference."""
  kwargs = dict(epsilon=1e-5, scale_offset=case.scale_offset)

  def f(x, residual, scale, bias):
    if case.op == "layer_norm":
      if reference:
        return norm_reference.layer_norm_reference(
          x, scale, bias, residual=residual, use_fast_variance=case.fast_variance, **kwargs
        )
      return norms.layer_norm(
        x,
        scale,
        bias,
        residual=residual,
        implementation=implementation,
        use_fast_variance=case.fast_variance,
        **kwargs,
      )
    if reference:
      return norm_reference.rms_norm_reference(x, scale, residual=residual, **kwargs)
    return norms.rms_norm(x, scale, residual=residual, implementation=implementation, **kwargs)

  return f


def _value_and_grads(f, args, cotangent):
  out, vjp = jax.vjp(f, *args)
  return out, vjp(cotangent)


def _to_f32(tree):
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _max_error(a, b):
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)), initial=0.0))


def check_against_reference(case: Case, implementation=PALLAS, seed=0):
  """Forward and every gradient of `implementation` against the float32 reference."""
  x, residual, scale, bias, cotangent = _inputs(case, seed)
  args = (x, residual, scale, bias)
  got = _value_and_grads(_function(case, implementation), args, cotangent)
  xla = _value_and_grads(_function(case, "xla"), args, cotangent)
  ref = _value_and_grads(_function(case, None, reference=True), _to_f32(args), _to_f32(cotangent))
  floor = FLOORS[case.dtype]
  if case.op == "layer_norm" and case.width == 1:
    floor *= 20  # x - mean is rounding noise there, amplified by rsqrt(epsilon)
  names = ["y", "h"][: 1 + case.residual] + [
    name for name, arg in zip(("dx", "dresidual", "dscale", "dbias"), args) if arg is not None
  ]
  got_leaves, xla_leaves, ref_leaves = (jax.tree.leaves(t) for t in (got, xla, ref))
  assert len(got_leaves) == len(ref_leaves) == len(names), (names, len(got_leaves))
  for name, g, a, r in zip(names, got_leaves, xla_leaves, ref_leaves, strict=True):
    # Outputs in x's dtype, gradients in their primal's dtype: whatever XLA gives.
    assert g.shape == r.shape and g.dtype == a.dtype, (name, g.shape, g.dtype, a.dtype)
    assert not jnp.any(jnp.isnan(g.astype(jnp.float32))), f"{case}: NaN in {name}"
    tolerance = 2 * _max_error(a, r) + floor * max(1.0, float(jnp.max(jnp.abs(r), initial=0.0)))
    error = _max_error(g, r)
    assert error <= tolerance, f"{case}: {name} error {error:.3g} > {tolerance:.3g}"
  assert got_leaves[0].dtype == x.dtype


# --- correctness (interpret mode on CPU) ------------------------------------------------------


@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_matches_reference(case):
  check_against_reference(case)


@pytest.mark.parametrize("case", FLAG_CASES, ids=str)
def test_every_option_combination(case):
  check_against_reference(case)


@pytest.mark.parametrize("case", FAST_VARIANCE_CASES, ids=str)
def test_fast_variance(case):
  check_against_reference(case)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no_prefetch"])
def test_backward_with_several_row_tiles_per_program(monkeypatch, prefetch):
  # On a GPU each backward program walks many row tiles; force that on a small array (and a
  # last program with a partial tile) so the accumulation across tiles is exercised here,
  # with and without loading the next tile ahead (the last one's lookahead reads nothing).
  monkeypatch.setattr(layer_norm_triton_bwd, "H100_SMS", 3)
  monkeypatch.setattr(layer_norm_triton_bwd, "BWD_RESIDENT_ELEMENTS", 0)
  monkeypatch.setattr(layer_norm_triton, "PREFETCH_NEXT_TILE", prefetch)
  check_against_reference(Case("layer_norm", (2, 75), 128, "float32", residual=True))
  check_against_reference(Case("rms_norm", (37,), 1000, "bfloat16", scale_offset=1.0))
  check_against_reference(Case("layer_norm", (5,), 2048, "bfloat16", param_dtype="float32"))
  check_against_reference(Case("layer_norm", (5,), 8192, "bfloat16", param_dtype="float32"))


def test_backward_prefetches_where_registers_allow():
  tiling = layer_norm_triton_bwd.backward_tiling
  prefetches = layer_norm_triton_bwd.prefetches
  # LayerNorm with both parameters (2 accumulators) prefetches up to 1024 columns and, on
  # half the warps, at 8192; not at 4096, whose tiles already have 8 warps.
  assert prefetches(tiling(65536, 1024, 2), accumulators=2)
  assert not prefetches(tiling(16384, 4096, 2), accumulators=2)
  assert prefetches(tiling(8192, 8192, 2), accumulators=2)
  assert tiling(8192, 8192, 2).num_warps == 8
  # RMSNorm's dscale alone: always, with the usual warps.
  assert prefetches(tiling(8192, 8192, 1), accumulators=1)
  assert tiling(8192, 8192, 1).num_warps == 16


def test_backward_launch_at_the_benchmark_shapes():
  # Two 4096-element tiles per SM, all programs walking the same number of tiles; a warp per
  # row where rows have at most 1024 columns.
  launches = {}
  for rows, width in ((16384, 4096), (65536, 1024), (8192, 8192), (512, 16384), (100, 7)):
    tiling = layer_norm_triton_bwd.backward_tiling(rows, width, accumulators=1)
    row_tiles = -(-rows // tiling.block_rows)
    launches[rows, width] = (
      tiling.block_rows,
      tiling.block_cols,
      tiling.num_warps,
      layer_norm_triton_bwd.bwd_programs(row_tiles, tiling),
    )
  assert launches == {
    (16384, 4096): (1, 4096, 8, 261),
    (65536, 1024): (4, 1024, 4, 261),
    (8192, 8192): (1, 8192, 16, 131),
    (512, 16384): (1, 16384, 16, 128),
    (100, 7): (128, 16, 4, 1),
  }


# Small arrays of several row tiles each (the last one partial unless noted) for a persistent
# forward of 3 programs: the parameters are loaded once and kept across a program's tiles.
# The launch is persistent where scale/bias are wider than x (float32 beside 16-bit x).
PERSISTENT_CASES = [
  Case(
    "layer_norm", (2, 75), 128, "bfloat16", residual=True, param_dtype="float32"
  ),  # 5 tiles of 32 rows
  Case(
    "layer_norm", (37,), 1000, "bfloat16", bias=False, scale_offset=1.0, param_dtype="float32"
  ),  # 10 tiles of 4 rows, masked columns
  Case(
    "layer_norm", (60,), 512, "float16", scale=False, residual=True, param_dtype="float32"
  ),  # bias only
  Case("layer_norm", (50,), 200, "float16", fast_variance=True, param_dtype="float32"),
  Case("layer_norm", (7,), 4096, "bfloat16", residual=True, param_dtype="float32"),  # 1-row tiles
  Case("rms_norm", (6, 16), 256, "bfloat16", residual=True, param_dtype="float32"),  # full tiles
  Case("rms_norm", (3, 45), 96, "float16", scale_offset=0.5, param_dtype="float32"),
  # One program per tile: no parameters to keep, or parameters no wider than x.
  Case("layer_norm", (2, 75), 128, "bfloat16", scale=False, bias=False, residual=True),
  Case("rms_norm", (37,), 1000, "float16", scale=False),
  Case("layer_norm", (2, 75), 128, "float32", residual=True),
  Case("rms_norm", (3, 45), 96, "bfloat16", scale_offset=0.5),
]


def _forward_grid(hlo_text: str, op: str) -> int:
  """Programs launched by the one forward kernel call in lowered StableHLO."""
  calls = [line for line in hlo_text.splitlines() if f'name = "jfused_{op}_fwd"' in line]
  assert len(calls) == 1, len(calls)
  return int(re.search(r"grid_x = (\d+)", calls[0]).group(1))


@pytest.mark.parametrize("case", PERSISTENT_CASES, ids=str)
def test_persistent_forward_with_several_tiles_per_program(monkeypatch, case):
  monkeypatch.setattr(layer_norm_triton, "PERSISTENT_PROGRAMS", 3)
  rows, width = int(np.prod(case.lead)), case.width
  tiles = layer_norm_triton.forward_tiling(rows, width, persistent=False)
  tile_count = -(-rows // tiles.block_rows)
  assert tile_count > 3
  persistent = (
    (case.scale or case.has_bias) and case.param_dtype == "float32" and (case.dtype != "float32")
  )
  grid = _forward_grid(_lowered(_function(case, PALLAS), *_abstract(case)), case.op)
  assert grid == (3 if persistent else tile_count)
  check_against_reference(case)


def test_forward_tiling_chooses_the_persistent_launch():
  programs = layer_norm_triton.PERSISTENT_PROGRAMS
  assert programs is not None and programs > 0
  wide = layer_norm_triton.forward_tiling(16384, 4096)
  assert (wide.block_rows, wide.looped, wide.programs) == (1, False, programs)
  assert layer_norm_triton.forward_tiling(16384, 4096, persistent=False).programs is None
  # One program per tile: two rows to a tile where they fit, a warp per row up to 1024 columns.
  per_tile = {
    w: layer_norm_triton.forward_tiling(8192, w, persistent=False)
    for w in (1024, 4096, 8192, 16384)
  }
  assert {w: (t.block_rows, t.num_warps) for w, t in per_tile.items()} == {
    1024: (4, 4),
    4096: (2, 16),
    8192: (2, 16),
    16384: (1, 16),
  }
  # No more tiles than programs: a program per tile is the same launch.
  assert layer_norm_triton.forward_tiling(programs, 4096).programs is None
  assert layer_norm_triton.forward_tiling(programs + 1, 4096).programs == programs
  # Looped rows keep one program per row.
  assert layer_norm_triton.forward_tiling(16384, 65536).programs is None


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_default_implementation_on_cpu_is_the_reference(op):
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU default; on a GPU the default is the kernel")
  case = Case(op, (4,), 64)
  x, residual, scale, bias, _ = _inputs(case)
  default = _function(case, None)(x, residual, scale, bias)
  reference = _function(case, None, reference=True)(x, residual, scale, bias)
  np.testing.assert_array_equal(default, reference)


@pytest.mark.parametrize("use_fast_variance", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_layer_norm_matches_flax(use_fast_variance, dtype):
  layer = nnx.LayerNorm(
    300, epsilon=1e-5, use_fast_variance=use_fast_variance, dtype=dtype, rngs=nnx.Rngs(0)
  )
  keys = jax.random.split(jax.random.key(3), 3)
  layer.scale[...] = jax.random.normal(keys[0], (300,))
  layer.bias[...] = jax.random.normal(keys[1], (300,))
  x = (2 * jax.random.normal(keys[2], (4, 6, 300)) + 1).astype(dtype)
  with jax.numpy_dtype_promotion("standard"):  # Flax promotes implicitly
    expected = layer(x)
  got = norms.layer_norm(
    x,
    layer.scale[...],
    layer.bias[...],
    epsilon=1e-5,
    use_fast_variance=use_fast_variance,
    implementation=PALLAS,
  )
  assert got.dtype == expected.dtype
  tolerance = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(_to_f32(got), _to_f32(expected), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rms_norm_matches_flax(dtype):
  layer = nnx.RMSNorm(200, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(4), 2)
  layer.scale[...] = jax.random.normal(keys[0], (200,))
  x = (2 * jax.random.normal(keys[1], (3, 200)) + 1).astype(dtype)
  with jax.numpy_dtype_promotion("standard"):
    expected = layer(x)
  got = norms.rms_norm(x, layer.scale[...], epsilon=1e-6, implementation=PALLAS)
  tolerance = 1e-5 if dtype == "float32" else 2e-2
  np.testing.assert_allclose(_to_f32(got), _to_f32(expected), atol=tolerance, rtol=tolerance)


def test_deterministic():
  case = Case("layer_norm", (3, 50), 1000, "bfloat16", residual=True, param_dtype="float32")
  x, residual, scale, bias, cotangent = _inputs(case)
  run = jax.jit(lambda *args: _value_and_grads(_function(case, PALLAS), args, cotangent))
  first, second = run(x, residual, scale, bias), run(x, residual, scale, bias)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_no_nan_on_constant_and_large_rows(op):
  # A constant row has zero variance; huge float16 values overflow unless squared in float32.
  x = jnp.concatenate([jnp.full((2, 64), 3.0), 1e4 * jax.random.normal(jax.random.key(5), (2, 64))])
  x = x.astype(jnp.float16)
  assert bool(jnp.all(jnp.isfinite(x)))
  scale = jnp.ones((64,), jnp.float16)
  f = (
    (lambda x, s: norms.layer_norm(x, s, s, implementation=PALLAS))
    if op == "layer_norm"
    else (lambda x, s: norms.rms_norm(x, s, implementation=PALLAS))
  )
  y, grads = _value_and_grads(f, (x, scale), jnp.ones_like(x))
  for leaf in (y, *grads):
    assert bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32))))


@pytest.mark.parametrize("implementation", [PALLAS, "xla"])
@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 32), (3, 0)])
@pytest.mark.parametrize("residual", [False, True])
def test_zero_size(shape, residual, implementation):
  x = jnp.zeros(shape, jnp.bfloat16)
  scale = jnp.ones(shape[-1:], jnp.float32)
  kwargs = dict(residual=x if residual else None, implementation=implementation)
  out = norms.layer_norm(x, scale, scale, **kwargs)
  for leaf in jax.tree.leaves(out):
    assert leaf.shape == shape and leaf.dtype == jnp.bfloat16
  grads = jax.grad(
    lambda x, s: jnp.sum(jax.tree.leaves(norms.rms_norm(x, s, **kwargs))[0].astype(jnp.float32)),
    argnums=(0, 1),
  )(x, scale)
  assert grads[0].shape == shape and grads[1].shape == scale.shape
  assert not bool(jnp.any(grads[1]))


# --- transformations --------------------------------------------------------------------------


def test_jit_matches_eager():
  case = Case("layer_norm", (4, 3), 130, "bfloat16", residual=True, scale_offset=0.5)
  x, residual, scale, bias, _ = _inputs(case)
  f = _function(case, PALLAS)
  for a, b in zip(jax.jit(f)(x, residual, scale, bias), f(x, residual, scale, bias)):
    np.testing.assert_array_equal(a, b)


def test_vmap():
  case = Case("layer_norm", (5,), 100, "float32", residual=True)
  keys = jax.random.split(jax.random.key(6), 4)
  x, residual = (jax.random.normal(k, (3, 5, 100)) for k in keys[:2])
  scale = jax.random.normal(keys[2], (3, 100))  # batched parameters too
  bias = jax.random.normal(keys[3], (100,))
  f = _function(case, PALLAS)
  loss = lambda x, r, s: sum(jnp.sum(jnp.sin(o)) for o in f(x, r, s, bias))
  batched = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, residual, scale)
  for i in range(3):
    single = jax.value_and_grad(loss, argnums=(0, 1, 2))(x[i], residual[i], scale[i])
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single), strict=True):
      np.testing.assert_allclose(a[i], b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm"])
def test_remat_gradients(op):
  case = Case(op, (8,), 256, "float32", residual=True)
  x, residual, scale, bias, _ = _inputs(case)
  f = _function(case, PALLAS)
  loss = lambda g: lambda *args: sum(jnp.sum(o * o) for o in g(*args))
  expected = jax.grad(loss(f), argnums=(0, 1, 2, 3))(x, residual, scale, bias)
  got = jax.grad(loss(jax.remat(f)), argnums=(0, 1, 2, 3))(x, residual, scale, bias)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


# --- lowering for CUDA (no GPU needed) --------------------------------------------------------


def _lowered(fn, *args):
  with config.interpret_mode(False):  # what a GPU would run
    return export_for_h100(fn, *args)


def _abstract(case: Case):
  x, residual, scale, bias, _ = jax.eval_shape(lambda: _inputs(case))
  return x, residual, scale, bias


@pytest.mark.parametrize(
  "case",
  [
    Case("layer_norm", (16384,), 4096, "bfloat16", residual=True, param_dtype="float32"),
    Case("layer_norm", (8, 8192), 1024, "bfloat16", scale_offset=1.0),
    Case("layer_norm", (4,), 70000, "float32", residual=True, fast_variance=True),
    Case("layer_norm", (3,), 7, "float16", bias=False),
    Case("rms_norm", (8192,), 8192, "bfloat16", residual=True),
    Case("layer_norm", (8192,), 8192, "bfloat16", param_dtype="float32"),  # 8 warps, prefetch
    Case("rms_norm", (2,), 65536, "bfloat16", scale_offset=1.0),
    # Persistent forward with a partial last tile and masked columns; and many tiles without
    # parameters (one program per tile).
    Case("layer_norm", (3001,), 1000, "bfloat16", param_dtype="float32"),
    Case("rms_norm", (4096,), 2048, "bfloat16", scale=False),
  ],
  ids=str,
)
def test_lowers_for_cuda(case):
  x, residual, scale, bias = _abstract(case)
  f = _function(case, PALLAS)
  loss = lambda *args: sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(f(*args)))
  fwd_name, bwd_name = f"jfused_{case.op}_fwd", f"jfused_{case.op}_bwd"
  forward = _lowered(f, x, residual, scale, bias)
  assert count_kernel_calls(forward, fwd_name) == 1
  assert count_kernel_calls(forward, bwd_name) == 0
  argnums = tuple(i for i, a in enumerate((x, residual, scale, bias)) if a is not None)
  backward = _lowered(jax.grad(loss, argnums=argnums), x, residual, scale, bias)
  assert count_kernel_calls(backward, fwd_name) == 1
  assert count_kernel_calls(backward, bwd_name) == 1


@pytest.mark.parametrize("params", [True, False])
def test_wide_forward_is_persistent_with_parameters_for_cuda(params):
  case = Case(
    "layer_norm", (16384,), 4096, "bfloat16", scale=params, bias=params, param_dtype="float32"
  )
  grid = _forward_grid(_lowered(_function(case, PALLAS), *_abstract(case)), case.op)
  # Without parameters, one program per tile of two rows (PER_TILE_MIN_ROWS).
  assert grid == (layer_norm_triton.PERSISTENT_PROGRAMS if params else 16384 // 2)


def test_remat_runs_the_forward_kernel_only_where_needed():
  case = Case("layer_norm", (256,), 1024, "bfloat16")
  x, _, scale, bias = _abstract(case)
  norm = jax.remat(lambda x, s, b: norms.layer_norm(x, s, b, implementation=PALLAS))
  linear = lambda *args: jnp.sum(norm(*args).astype(jnp.float32))
  square = lambda *args: jnp.sum(jnp.square(norm(*args).astype(jnp.float32)))
  # The loss gradient does not need y itself: the kernel runs once, inside the backward pass.
  hlo = _lowered(jax.grad(linear, argnums=(0, 1, 2)), x, scale, bias)
  assert count_kernel_calls(hlo, "jfused_layer_norm_fwd") == 1
  assert count_kernel_calls(hlo, "jfused_layer_norm_bwd") == 1
  # It needs y: once for y, once rematerialised for (mean, rstd), as remat asks.
  hlo = _lowered(jax.grad(square, argnums=(0, 1, 2)), x, scale, bias)
  assert count_kernel_calls(hlo, "jfused_layer_norm_fwd") == 2
  assert count_kernel_calls(hlo, "jfused_layer_norm_bwd") == 1


# --- bad input --------------------------------------------------------------------------------


@pytest.fixture
def no_kernels(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("a kernel was launched")

  monkeypatch.setattr(norms, "norm_forward", refuse)
  monkeypatch.setattr(norms, "norm_backward", refuse)


_X = jnp.ones((4, 8), jnp.float32)


@pytest.mark.parametrize(
  "call, error, words",
  [
    (lambda: norms.layer_norm(_X, jnp.ones((7,))), ValueError, "scale"),
    (lambda: norms.layer_norm(_X, jnp.ones((1, 8))), ValueError, "scale"),
    (lambda: norms.layer_norm(_X, None, jnp.ones((9,))), ValueError, "bias"),
    (lambda: norms.rms_norm(_X, residual=jnp.ones((4, 7))), ValueError, "residual"),
    (lambda: norms.layer_norm(_X, residual=jnp.ones((8, 4))), ValueError, "residual"),
    (lambda: norms.rms_norm(_X, residual=_X.astype(jnp.bfloat16)), TypeError, "residual"),
    (lambda: norms.layer_norm(jnp.ones((4, 8), jnp.int32)), TypeError, "x"),
    (lambda: norms.rms_norm(_X, jnp.ones((8,), jnp.int32)), TypeError, "scale"),
    (lambda: norms.layer_norm(_X, epsilon=0.0), ValueError, "epsilon"),
    (lambda: norms.rms_norm(_X, epsilon=-1e-6), ValueError, "epsilon"),
    (lambda: norms.layer_norm(_X, epsilon=float("nan")), ValueError, "epsilon"),
    (lambda: norms.layer_norm(_X, epsilon=jnp.float32(1e-5)), TypeError, "epsilon"),
    (lambda: norms.layer_norm(jnp.float32(1.0)), ValueError, "x"),
    (lambda: norms.rms_norm(_X, implementation="cuda"), ValueError, "implementation"),
  ],
)
def test_bad_input_raises_before_any_kernel(no_kernels, call, error, words):
  with pytest.raises(error, match=words):
    call()


def test_unsupported_call_falls_back_to_the_next_implementation(monkeypatch):
  # A call the kernels cannot serve (here: "too many elements") raises NotImplementedError
  # inside the Pallas implementation, and dispatch moves on to the next one named.
  monkeypatch.setattr(norms, "_MAX_KERNEL_ELEMENTS", 8)
  monkeypatch.setattr(norms, "norm_forward", None)  # would fail if called
  x = jax.random.normal(jax.random.key(7), (2, 8))
  with pytest.raises(NotImplementedError, match="int32"):
    norms.rms_norm(x, implementation=PALLAS)
  y = norms.rms_norm(x, implementation=(PALLAS, "xla"))
  np.testing.assert_allclose(y, norm_reference.rms_norm_reference(x), atol=1e-6)


def test_public_names():
  assert norms.__all__ == ["layer_norm", "rms_norm"]


# --- native GPU runs --------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("case", SWEEP + FLAG_CASES + FAST_VARIANCE_CASES, ids=str)
def test_matches_reference_on_gpu(case):
  assert not config.use_interpret()
  check_against_reference(case)


@pytest.mark.gpu
@pytest.mark.parametrize(
  "case",
  [
    Case("layer_norm", (16384,), 4096, "bfloat16", residual=True),
    Case("layer_norm", (65536,), 1024, "bfloat16", param_dtype="float32"),
    Case("rms_norm", (8192,), 8192, "bfloat16", residual=True, scale_offset=1.0),
    Case("layer_norm", (8192,), 8192, "bfloat16", param_dtype="float32"),
    Case("layer_norm", (1000,), 8192, "float16", residual=True),
    Case("layer_norm", (300,), 65536, "bfloat16", residual=True),
    Case("rms_norm", (1000,), 20000, "float32"),
  ],
  ids=str,
)
def test_benchmark_shapes_on_gpu(case):
  check_against_reference(case)


@pytest.mark.gpu
def test_deterministic_on_gpu():
  # Many programs run concurrently here, unlike the interpreter: the backward must still be
  # bitwise reproducible (no atomics).
  case = Case("layer_norm", (8192,), 2048, "bfloat16", residual=True, param_dtype="float32")
  x, residual, scale, bias, cotangent = _inputs(case)
  run = jax.jit(lambda *args: _value_and_grads(_function(case, PALLAS), args, cotangent))
  first = run(x, residual, scale, bias)
  for _ in range(3):
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(run(x, residual, scale, bias))):
      np.testing.assert_array_equal(a, b)
