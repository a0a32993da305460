"""dot_product_attention's kernels against the float32 reference, feature by feature.

On CPU the Pallas kernels run in interpret mode; on a GPU the same tests run them natively.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfused
from tests.attention import cases
from tests.attention.cases import Case

FEATURE_CASES = [
  Case("plain_T7", t=7, s=7),
  Case("T1_S1", t=1, s=1, heads=1, kv_heads=1),
  Case(
    "T100_S130_causal_gqa_d40",
    t=100,
    s=130,
    heads=4,
    kv_heads=2,
    head_dim=40,
    options=(("is_causal", True),),
  ),
  Case("T130_S100_causal", t=130, s=100, options=(("is_causal", True),)),
  Case("window_int", t=100, s=100, options=(("local_window_size", 9),)),
  Case("window_left_right_T130_S40", t=130, s=40, options=(("local_window_size", (20, 3)),)),
  Case(
    "causal_window", t=100, s=100, options=(("is_causal", True), ("local_window_size", (17, 0)))
  ),
  Case("lengths", t=100, s=70, q_lengths=True, kv_lengths=True),
  Case("bias_full", t=30, s=50, bias_shape="full"),
  Case("bias_shared", t=30, s=50, bias_shape="shared"),
  Case("bias_per_batch_row_gqa", t=30, s=50, heads=4, kv_heads=1, bias_shape="per_batch_row"),
  Case("mask", t=40, s=70, mask=True),
  Case("soft_cap", t=50, s=50, options=(("logits_soft_cap", 2.0), ("scale", 0.9))),
  Case("segments_packed", t=100, s=100, segments="packed"),
  Case("segments_scattered_T40_S90", t=40, s=90, segments="scattered"),
  Case("value_dim_96", t=30, s=20, head_dim=40, value_dim=96),
  Case("head_dim_80", t=20, s=20, head_dim=80),
  Case("head_dim_256", t=20, s=33, head_dim=256, heads=1, kv_heads=1),
  Case("mqa_extra_batch_dims", batch=(2, 3), t=20, s=24, heads=4, kv_heads=1),
  Case("no_batch_dim", batch=(), t=20, s=20),
  Case(
    "combo_causal_gqa_window_segments_cap_bias",
    t=100,
    s=100,
    heads=4,
    kv_heads=2,
    head_dim=40,
    segments="packed",
    bias_shape="full",
    options=(("is_causal", True), ("local_window_size", (40, 0)), ("logits_soft_cap", 5.0)),
  ),
  Case(
    "combo_lengths_mask_window",
    t=64,
    s=80,
    heads=2,
    kv_heads=1,
    mask=True,
    q_lengths=True,
    kv_lengths=True,
    options=(("local_window_size", (30, 10)),),
  ),
]

LOW_PRECISION_CASES = [
  Case(
    "T100_S130_causal_gqa_d40",
    t=100,
    s=130,
    heads=4,
    kv_heads=2,
    head_dim=40,
    options=(("is_causal", True),),
  ),
  Case(
    "combo",
    t=70,
    s=70,
    heads=4,
    kv_heads=2,
    head_dim=64,
    segments="packed",
    bias_shape="shared",
    options=(("is_causal", True), ("logits_soft_cap", 5.0)),
  ),
]


@pytest.mark.parametrize("case", FEATURE_CASES, ids=str)
def test_float32_matches_reference(case):
  cases.check_against_reference(case, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=str)
def test_low_precision_matches_reference(case, dtype):
  cases.check_against_reference(case, dtype)


@pytest.mark.parametrize(
  "case",
  [
    Case("causal_gqa", t=40, s=40, heads=4, kv_heads=2, options=(("is_causal", True),)),
    Case(
      "window_lengths_mask",
      t=40,
      s=50,
      mask=True,
      q_lengths=True,
      kv_lengths=True,
      options=(("local_window_size", (5, 5)),),
    ),
    Case("segments", t=40, s=40, segments="scattered"),
  ],
  ids=str,
)
def test_reference_matches_jax_nn(case):
  """Our reference is jax.nn's XLA attention wherever jax.nn has the feature."""
  args = cases.make_inputs(case, jnp.float32)
  nn_args = dict(args)
  if "q_segment_ids" in nn_args:
    q_ids, kv_ids = nn_args.pop("q_segment_ids"), nn_args.pop("kv_segment_ids")
    nn_args["mask"] = q_ids[:, None, :, None] == kv_ids[:, None, None, :]
  with jax.default_matmul_precision("highest"):
    ours, our_lse = cases.reference(args)
    theirs, their_lse = jax.nn.dot_product_attention(
      **nn_args, implementation="xla", return_residual=True
    )
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(our_lse, their_lse, atol=1e-4, rtol=1e-5)


def test_fully_masked_rows_match_jax_nn():
  """Rows with nothing to attend to give the mean of all values, exactly as jax.nn does."""
  case = Case("all_masked", t=16, s=24, kv_lengths=True)
  args = cases.make_inputs(case, jnp.float32)
  args["key_value_seq_lengths"] = jnp.zeros((2,), jnp.int32)
  out, lse = jfused.dot_product_attention(
    **args, implementation="pallas_triton", return_residual=True
  )
  expected = jnp.broadcast_to(args["value"].mean(axis=1, keepdims=True), out.shape)
  np.testing.assert_allclose(out, expected, atol=1e-6)
  with jax.default_matmul_precision("highest"):
    theirs, their_lse = jax.nn.dot_product_attention(
      **args, implementation="xla", return_residual=True
    )
  np.testing.assert_allclose(out, theirs, atol=1e-6)
  np.testing.assert_allclose(lse, their_lse, rtol=1e-6)


def test_deterministic_bitwise():
  case = Case(
    "gqa_causal",
    t=70,
    s=70,
    heads=4,
    kv_heads=1,
    bias_shape="shared",
    options=(("is_causal", True),),
  )
  cases.assert_deterministic(case, jnp.bfloat16)


def test_zero_size_inputs():
  for t, s, batch in ((0, 5, 2), (5, 0, 2), (5, 5, 0)):
    q = jnp.ones((batch, t, 2, 32))
    k = jnp.ones((batch, s, 2, 32))
    out, lse = jfused.dot_product_attention(
      q, k, k, implementation="pallas_triton", return_residual=True
    )
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert not bool(jnp.isnan(out).any())
    np.testing.assert_array_equal(out, jax.nn.dot_product_attention(q, k, k))
    grad = jax.grad(lambda q, k=k: jfused.dot_product_attention(q, k, k).sum())(q)
    assert grad.shape == q.shape


def test_jit_and_vmap_compose():
  case = Case("vmap", t=20, s=20, heads=2, options=(("is_causal", True),))
  args = cases.make_inputs(case, jnp.float32)

  def attend(q, k, v):
    return jfused.dot_product_attention(q, k, v, is_causal=True, implementation="pallas_triton")

  direct = attend(args["query"], args["key"], args["value"])
  jitted = jax.jit(attend)(args["query"], args["key"], args["value"])
  # vmap over a new leading axis must equal running each slice on its own.
  mapped = jax.vmap(attend)(args["query"][:, None], args["key"][:, None], args["value"][:, None])[
    :, 0
  ]
  np.testing.assert_allclose(jitted, direct, atol=1e-6)
  np.testing.assert_allclose(mapped, direct, atol=1e-6)


def test_remat_gradient_matches():
  case = Case("remat", t=30, s=30, options=(("is_causal", True),))
  args = cases.make_inputs(case, jnp.float32)

  def loss(q, k, v):
    return jnp.sum(
      jnp.sin(jfused.dot_product_attention(q, k, v, is_causal=True, implementation="pallas_triton"))
    )

  plain = jax.grad(loss, argnums=(0, 1, 2))(args["query"], args["key"], args["value"])
  remat = jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2))(
    args["query"], args["key"], args["value"]
  )
  for a, b in zip(plain, remat):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dropout_rate", [0.0, 0.25])
def test_backward_row_statistics(dropout_rate):
  """The (lse2, D) rows both backward kernels read: base-2 logsumexp and rowsum(dO * O) per
  (batch, head, query), padded queries with the finite lse2 EMPTY_ROW_LSE and D = 0,
  1 / (1 - rate) folded in."""
  from pallas_kernels.attention import common

  keys = jax.random.split(jax.random.key(0), 3)
  out, dout = (jax.random.normal(key, (2, 5, 3, 16), jnp.bfloat16) for key in keys[:2])
  lse = jax.random.normal(keys[2], (2, 3, 5), jnp.float32)
  lse2, delta = common.backward_row_statistics(out, dout, lse, 8, dropout_rate)
  product = np.asarray(out, np.float64) * np.asarray(dout, np.float64)
  expected_delta = product.sum(-1).transpose(0, 2, 1) * (1 - dropout_rate)
  expected_lse2 = np.asarray(lse, np.float64) / np.log(2) + np.log2(1 - dropout_rate)
  np.testing.assert_allclose(delta[..., :5], expected_delta, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse2[..., :5], expected_lse2, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(delta[..., 5:], 0.0)
  np.testing.assert_array_equal(lse2[..., 5:], np.float32(common.EMPTY_ROW_LSE))
