"""jfused.linear_cross_entropy: the reference against numpy, every implementation against the
reference (loss and gradients, every option, awkward sizes, every dtype), chunking,
ignored tokens, determinism, transformations and argument checks. CPU runs the Triton kernel
in interpret mode."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfused
from jfused.cross_entropy import api, chunked, vocab_chunks
from tests.cross_entropy.cases import Case, check_against_reference, loss_and_grads, make_inputs

CHUNKED = ("xla_chunked", "pallas_triton")

CASES = [
  Case("V1", (5,), 8, 1),
  Case(
    "V7_vd_bias_smoothing_sum",
    (2, 3),
    16,
    7,
    "vd",
    True,
    (("label_smoothing", 0.1), ("reduction", "sum")),
  ),
  Case(
    "V1000_rank3_all_options",
    (3, 5, 4),
    40,
    1000,
    "dv",
    True,
    (("z_loss", 1e-3), ("logits_soft_cap", 3.0), ("ignore_index", 3), ("label_smoothing", 0.05)),
  ),
  Case("V50257_vd_none", (6,), 16, 50257, "vd", False, (("reduction", "none"),)),
  Case("rank1_V130", (), 32, 130, "dv", True, (("reduction", "none"),), ignored_fraction=0.0),
]


def _numpy_loss(case: Case, args: dict) -> np.ndarray:
  """The loss from its definition, in float64 numpy."""
  x, w = np.asarray(args["x"], np.float64), np.asarray(args["weight"], np.float64)
  logits = x @ (w if case.layout == "dv" else w.T)
  if "bias" in args:
    logits = logits + np.asarray(args["bias"], np.float64)
  options = case.kwargs
  cap = options.get("logits_soft_cap")
  if cap is not None:
    logits = cap * np.tanh(logits / cap)
  lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  labels = np.asarray(args["labels"])
  eps = options.get("label_smoothing", 0.0)
  picked = np.take_along_axis(logits, np.clip(labels, 0, None)[..., None], -1)[..., 0]
  losses = (1 - eps) * (lse - picked) + eps * (lse - logits.mean(-1))
  losses += options.get("z_loss", 0.0) * lse**2
  counted = labels >= 0
  if options.get("ignore_index") is not None:
    counted &= labels != options["ignore_index"]
  losses = np.where(counted, losses, 0.0)
  reduction = options.get("reduction", "mean")
  if reduction == "none":
    return losses
  return losses.sum() / (max(counted.sum(), 1) if reduction == "mean" else 1)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_its_definition(case):
  args = make_inputs(case, jnp.float32)
  with jax.default_matmul_precision("highest"):
    value = jfused.linear_cross_entropy(
      args["x"],
      args["weight"],
      args["labels"],
      bias=args.get("bias"),
      weight_layout=case.layout,
      implementation="xla",
      **case.kwargs,
    )
  np.testing.assert_allclose(value, _numpy_loss(case, args), rtol=2e-5, atol=2e-5)


def test_reference_is_optax_without_options():
  optax = pytest.importorskip("optax")
  case = Case("plain", (4, 9), 24, 50)
  args = make_inputs(case, jnp.float32)
  logits = jnp.dot(args["x"], args["weight"], precision="highest")
  labels = args["labels"]
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  expected = jnp.sum(jnp.where(labels >= 0, per_token, 0.0)) / jnp.sum(labels >= 0)
  with jax.default_matmul_precision("highest"):
    value = jfused.linear_cross_entropy(args["x"], args["weight"], labels, implementation="xla")
  np.testing.assert_allclose(value, expected, rtol=1e-6)


@pytest.mark.parametrize("implementation", CHUNKED)
@pytest.mark.parametrize(
  "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name
)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, dtype, implementation):
  check_against_reference(case, dtype, implementation)


@pytest.mark.parametrize("implementation", CHUNKED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_many_chunks_match_one(monkeypatch, implementation, reduction):
  # 16 tokens a chunk: 50 tokens make three full chunks and a padded one.
  monkeypatch.setattr(api, "LOGITS_CHUNK_BYTES", 16 * 4 * 300)
  case = Case("chunks", (50,), 24, 300, "vd", True, (("reduction", reduction), ("z_loss", 1e-3)))
  assert chunked.chunk_rows_for(50, 300, api.LOGITS_CHUNK_BYTES) == 16
  check_against_reference(case, jnp.float32, implementation)


@pytest.mark.parametrize("implementation", CHUNKED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_vocabulary_walk_matches_reference(monkeypatch, implementation, reduction, layout):
  # Every head walks the vocabulary; 128 columns a chunk: 300 = two whole chunks and 44.
  monkeypatch.setattr(api, "FLOAT32_DWEIGHT_LIMIT_BYTES", 0)
  monkeypatch.setattr(api, "LOGITS_CHUNK_BYTES", 4 * 37 * 128)
  assert vocab_chunks.chunk_columns_for(37, 300, api.LOGITS_CHUNK_BYTES) == 128
  options = (
    ("reduction", reduction),
    ("z_loss", 1e-3),
    ("label_smoothing", 0.1),
    ("logits_soft_cap", 4.0),
    ("ignore_index", 2),
  )
  case = Case("vocabulary_walk", (37,), 24, 300, layout, True, options)
  check_against_reference(case, jnp.float32, implementation)


@pytest.mark.parametrize("implementation", CHUNKED)
def test_vocabulary_walk_in_bfloat16_and_one_chunk(monkeypatch, implementation):
  monkeypatch.setattr(api, "FLOAT32_DWEIGHT_LIMIT_BYTES", 0)
  check_against_reference(CASES[2], jnp.bfloat16, implementation)  # V = 1000 in one chunk


@pytest.mark.parametrize("implementation", ("xla", *CHUNKED))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_tokens_ignored(implementation, reduction):
  case = Case(
    "ignored", (3, 4), 16, 33, bias=True, options=(("reduction", reduction), ("ignore_index", 5))
  )
  args = make_inputs(case, jnp.float32)
  args["labels"] = jnp.array([[-1, 5, -100, 5]] * 3)
  value, grads = loss_and_grads(case, args, implementation)
  assert np.all(np.asarray(value) == 0.0)
  for name, grad in grads.items():
    assert np.all(np.asarray(grad) == 0.0), name


@pytest.mark.parametrize("implementation", ("xla", *CHUNKED))
def test_label_outside_vocabulary(implementation):
  case = Case("outside", (4,), 8, 10, options=(("reduction", "none"),))
  args = make_inputs(case, jnp.float32)
  labels = jnp.array([1, 10, 2, 3])
  with pytest.raises(ValueError, match="labels must be < the vocabulary size 10"):
    jfused.linear_cross_entropy(args["x"], args["weight"], labels, implementation=implementation)
  # Traced labels cannot be checked: that token's loss is NaN, the others are right.
  run = jax.jit(
    lambda labels: jfused.linear_cross_entropy(
      args["x"], args["weight"], labels, reduction="none", implementation=implementation
    )
  )
  losses = np.asarray(run(labels))
  assert np.isnan(losses[1]) and np.all(np.isfinite(losses[[0, 2, 3]]))
  expected = np.asarray(run(jnp.array([1, -1, 2, 3])))
  np.testing.assert_array_equal(losses[[0, 2, 3]], expected[[0, 2, 3]])


@pytest.mark.parametrize("implementation", CHUNKED)
def test_deterministic(monkeypatch, implementation):
  monkeypatch.setattr(api, "LOGITS_CHUNK_BYTES", 16 * 4 * 257)
  case = Case("determinism", (70,), 32, 257, bias=True)
  args = make_inputs(case, jnp.bfloat16)
  first, second = (loss_and_grads(case, args, implementation) for _ in range(2))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("implementation", CHUNKED)
def test_jit_vmap_and_remat(implementation):
  case = Case("transforms", (3, 10), 16, 45, "vd", True)
  args = make_inputs(case, jnp.float32)

  def loss(x, weight, bias, labels):
    return jfused.linear_cross_entropy(
      x, weight, labels, bias=bias, weight_layout="vd", implementation=implementation
    )

  grad = jax.grad(loss, argnums=(0, 1, 2))
  direct = grad(args["x"], args["weight"], args["bias"], args["labels"])
  jitted = jax.jit(grad)(args["x"], args["weight"], args["bias"], args["labels"])
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(
    args["x"], args["weight"], args["bias"], args["labels"]
  )
  for a, b, c in zip(direct, jitted, remat):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
  # vmap over the leading axis: one loss per row, as a loop would give.
  batched = jax.vmap(loss, in_axes=(0, None, None, 0))(
    args["x"], args["weight"], args["bias"], args["labels"]
  )
  looped = [loss(args["x"][i], args["weight"], args["bias"], args["labels"][i]) for i in range(3)]
  np.testing.assert_allclose(batched, np.stack(looped), rtol=1e-5)


def test_default_on_cpu_is_xla():
  assert api._default_order(jnp.zeros((8, 20))) == ("xla",)


@pytest.mark.parametrize("hopper", [False, True])
def test_default_on_gpu_takes_mosaic_on_hopper_for_heads_that_walk_the_vocabulary(
  monkeypatch, hopper
):
  """The Triton row kernel's chunked loss on GPUs; on Hopper the Mosaic walk first where a
  head walks the vocabulary anyway (a float32 dweight sum past the limit), [D, V] or a tied
  [V, D] table alike, not on narrower heads, whose token chunks skip a matmul."""
  from jfused import config

  monkeypatch.setattr(config, "on_gpu", lambda: True)
  monkeypatch.setattr(config, "on_hopper", lambda: hopper)
  narrow = jax.ShapeDtypeStruct((2048, 32768), jnp.bfloat16)  # 256 MiB of float32 dweight.
  wide = jax.ShapeDtypeStruct((2048, 131072), jnp.bfloat16)  # 1 GiB.
  tied = jax.ShapeDtypeStruct((131072, 2048), jnp.bfloat16)
  assert not api.walks_vocabulary(narrow) and api.walks_vocabulary(wide)
  triton_first = ("pallas_triton", "xla_chunked")
  assert api._default_order(narrow) == triton_first
  assert api._default_order(wide) == ("pallas_mosaic",) * hopper + triton_first
  assert api._default_order(tied) == ("pallas_mosaic",) * hopper + triton_first


def test_mixed_dtypes_are_promoted():
  case = Case("mixed", (6,), 8, 20)
  args = make_inputs(case, jnp.float32)
  x16 = args["x"].astype(jnp.bfloat16)
  for implementation in ("xla", *CHUNKED):
    value = jfused.linear_cross_entropy(
      x16, args["weight"], args["labels"], implementation=implementation
    )
    expected = jfused.linear_cross_entropy(
      x16.astype(jnp.float32), args["weight"], args["labels"], implementation="xla"
    )
    np.testing.assert_allclose(value, expected, rtol=1e-5)


# --- argument checks -------------------------------------------------------------------------


def _good():
  return dict(
    x=jnp.ones((4, 8), jnp.float32),
    weight=jnp.ones((8, 10), jnp.float32),
    labels=jnp.zeros((4,), jnp.int32),
  )


@pytest.mark.parametrize(
  "change, error, match",
  [
    (dict(labels=jnp.zeros((4,), jnp.float32)), TypeError, "labels must have an integer dtype"),
    (dict(x=jnp.ones((4, 8), jnp.int32)), TypeError, "x must have a floating dtype"),
    (dict(weight=[[1.0]]), TypeError, "weight must be an array"),
    (
      dict(labels=jnp.zeros((5,), jnp.int32)),
      ValueError,
      r"labels must have x's leading shape \(4,\)",
    ),
    (dict(weight=jnp.ones((9, 10))), ValueError, r"weight must be \[D, V\] or \[V, D\] with D = 8"),
    (dict(weight=jnp.ones((8, 8))), ValueError, "square, so its layout is ambiguous"),
    (dict(weight=jnp.ones((8,))), ValueError, "weight must be 2-D"),
    (dict(weight_layout="vd"), ValueError, "has D = 10, but x's last axis is 8"),
    (dict(weight_layout="kn"), ValueError, "weight_layout must be one of"),
    (dict(bias=jnp.ones((8,))), ValueError, r"bias must have shape \(10,\)"),
    (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0.0, 1.0\)"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
    (dict(z_loss=-1.0), ValueError, "z_loss must be in"),
    (dict(z_loss=float("nan")), ValueError, "z_loss must be finite"),
    (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap must be in"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(labels=jnp.full((4,), 10)), ValueError, "labels must be < the vocabulary size 10"),
    (dict(implementation="cudnn"), ValueError, "unknown implementation 'cudnn'"),
  ],
)
def test_bad_arguments_raise_clear_errors(change, error, match):
  args = {**_good(), **change}
  x, weight, labels = args.pop("x"), args.pop("weight"), args.pop("labels")
  with pytest.raises(error, match=match):
    jfused.linear_cross_entropy(x, weight, labels, **args)


def _loss_of(args: dict, implementation):
  return jfused.linear_cross_entropy(
    args["x"], args["weight"], args["labels"], implementation=implementation
  )


def _declined_then_served(args: dict, declining: str, serving: str, match: str):
  """`declining` alone raises NotImplementedError (matching `match`); the sequence
  (declining, serving) falls through: its loss."""
  with pytest.raises(NotImplementedError, match=match):
    _loss_of(args, declining)
  return _loss_of(args, (declining, serving))


def test_pallas_triton_declines_float64_and_xla_chunked_serves_it():
  with jax.enable_x64(True):
    case = Case("f64", (5,), 8, 12)
    args = make_inputs(case, jnp.float64)
    value = _declined_then_served(args, "pallas_triton", "xla_chunked", "pallas_triton supports")
    expected = _loss_of(args, "xla")
    assert value.dtype == jnp.float64
    np.testing.assert_allclose(value, expected, rtol=1e-12)


# --- natively on a GPU -----------------------------------------------------------------------

GPU_CASES = [
  Case("N2048_D512_V32000_all_options", (2, 1024), 512, 32000, "dv", True,
       (("z_loss", 1e-4), ("label_smoothing", 0.1), ("logits_soft_cap", 30.0))),
  Case("N3000_D256_V50257_tied_none", (3000,), 256, 50257, "vd", False, (("reduction", "none"),)),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", CHUNKED)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_reference(monkeypatch, case, dtype, implementation):
  # Several chunks, the last one partial.
  monkeypatch.setattr(api, "LOGITS_CHUNK_BYTES", 700 * 4 * case.vocab)
  check_against_reference(case, dtype, implementation)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", CHUNKED)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_vocabulary_walk_matches_reference(monkeypatch, case, implementation):
  """The path the large heads take (a float32 dweight sum past the limit): chunks of about
  4096 columns, the last one partial."""
  monkeypatch.setattr(api, "FLOAT32_DWEIGHT_LIMIT_BYTES", 0)
  tokens = math.prod(case.lead)
  monkeypatch.setattr(api, "LOGITS_CHUNK_BYTES", 4 * tokens * 4096)
  assert vocab_chunks.chunk_columns_for(tokens, case.vocab, api.LOGITS_CHUNK_BYTES) < case.vocab
  check_against_reference(case, jnp.bfloat16, implementation)


def test_pallas_mosaic_declines_off_hopper_and_unserved_operands():
  """Mosaic GPU has no interpreter: on CPU the Mosaic implementation says so and a sequence
  falls through to the next; bias and float32 operands are declined by name before any
  kernel runs."""
  from pallas_kernels.cross_entropy import mosaic

  case = Case("mosaic_declines", (6,), 64, 9)
  args = make_inputs(case, jnp.bfloat16)
  value = _declined_then_served(args, "pallas_mosaic", "pallas_triton", "no interpreter")
  assert value == _loss_of(args, "pallas_triton")
  x, weight = args["x"], args["weight"]
  assert "bias" in mosaic.unsupported_reason(x, weight, jnp.zeros((9,), x.dtype))
  assert "bfloat16" in mosaic.unsupported_reason(x.astype(jnp.float32), weight, None)
  assert "multiples of 64" in mosaic.unsupported_reason(x[:, :40], weight[:40], None)
  assert mosaic.unsupported_reason(x, weight, None) is None
  with pytest.raises(ValueError, match="block_cols"):
    mosaic.MosaicStatisticsBlocks(block_cols=96)
  with pytest.raises(ValueError, match="cluster_tiles"):
    mosaic.MosaicStatisticsBlocks(cluster_tiles=4)
  with pytest.raises(ValueError, match="splits"):
    mosaic.MosaicStatisticsBlocks(splits=0)


MOSAIC_GPU_CASES = [
  Case("N2048_D512_V32000_options", (2, 1024), 512, 32000, "dv", False,
       (("z_loss", 1e-4), ("label_smoothing", 0.1), ("logits_soft_cap", 30.0))),
  Case("N3000_D256_V50257_tied_none", (3000,), 256, 50257, "vd", False, (("reduction", "none"),)),
  Case("N300_D192_V1000_tied", (3, 100), 192, 1000, "vd", False, (("ignore_index", 5),)),
  Case("N7_D64_V7", (7,), 64, 7, "dv", False, (("reduction", "sum"),)),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("chunks", ["one_chunk", "chunks_of_896"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", MOSAIC_GPU_CASES, ids=str)
def test_gpu_mosaic_kernels_match_reference(monkeypatch, case, dtype, chunks):
  """The Mosaic statistics (forward) and gradient (backward, per vocabulary chunk) kernels:
  tokens, vocabularies and last chunks that are not whole blocks, both weight layouts, D a
  multiple of 64 only; the whole vocabulary in one chunk, or 896-column chunks."""
  if chunks == "chunks_of_896":
    monkeypatch.setattr(api, "LOGITS_CHUNK_BYTES", 4 * math.prod(case.lead) * 1000)
  check_against_reference(case, dtype, "pallas_mosaic")


@pytest.mark.gpu
@pytest.mark.parametrize("blocks", ["256x64x3c2", "256x64x3s4", "256x64x3c2s4"])
@pytest.mark.parametrize("case", MOSAIC_GPU_CASES, ids=str)
def test_gpu_mosaic_clustered_kernels_match_reference(monkeypatch, case, blocks):
  """Both Mosaic kernels with each weight tile multicast to a cluster of two CTAs (c2)
  and/or the statistics kernel's vocabulary in four splits (s4), over 896-column chunks:
  the reference's numbers, with tokens padded to whole clusters (7, 300 and 3000 tokens),
  both weight layouts and vocabularies of fewer column blocks than splits (7, 1000)."""
  from benchmarks.kernel_setting import kernel_setting
  from benchmarks.time_cross_entropy_mosaic import blocks_of
  from pallas_kernels.cross_entropy import mosaic

  monkeypatch.setattr(api, "LOGITS_CHUNK_BYTES", 4 * math.prod(case.lead) * 1000)
  with kernel_setting(mosaic, "DEFAULT_BLOCKS", blocks_of(blocks)):
    check_against_reference(case, jnp.bfloat16, "pallas_mosaic")
