"""dot_product_attention's argument checking and implementation dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jfused
from jfused.attention import api as attention

Q = jnp.zeros((2, 8, 4, 32))
KV = jnp.zeros((2, 8, 2, 32))


def attend(**overrides):
  args = {"query": Q, "key": KV, "value": KV, "implementation": "pallas_triton"}
  args.update(overrides)
  return jfused.dot_product_attention(**args)


@pytest.mark.parametrize(
  "overrides, error, words",
  [
    ({"query": jnp.zeros((8, 4))}, ValueError, "query"),
    ({"key": jnp.zeros((2, 8, 2, 16))}, ValueError, "key head dim"),
    ({"value": jnp.zeros((2, 9, 2, 32))}, ValueError, "value"),
    ({"key": jnp.zeros((3, 8, 2, 32)), "value": jnp.zeros((3, 8, 2, 32))}, ValueError, "batch"),
    ({"key": jnp.zeros((2, 8, 3, 32)), "value": jnp.zeros((2, 8, 3, 32))}, ValueError, "multiple"),
    ({"query": Q.astype(jnp.int32)}, TypeError, "query"),
    ({"value": KV.astype(jnp.bfloat16)}, TypeError, "share a dtype"),
    ({"bias": jnp.zeros((2, 4, 8, 7))}, ValueError, "bias"),
    ({"bias": jnp.zeros((2, 4, 8, 8), jnp.int32)}, TypeError, "bias"),
    ({"mask": jnp.zeros((2, 4, 8, 8))}, TypeError, "mask"),
    ({"mask": jnp.zeros((2, 4, 8, 8, 1), bool)}, ValueError, "mask"),
    (
      {"query_seq_lengths": jnp.zeros((2,), jnp.int64 if jax.config.x64_enabled else jnp.float32)},
      TypeError,
      "query_seq_lengths",
    ),
    ({"key_value_seq_lengths": jnp.zeros((3,), jnp.int32)}, ValueError, "key_value_seq_lengths"),
    ({"q_segment_ids": jnp.zeros((2, 8), jnp.float32)}, TypeError, "q_segment_ids"),
    ({"q_segment_ids": jnp.zeros((2, 7), jnp.int32)}, ValueError, "q_segment_ids"),
    ({"kv_segment_ids": jnp.zeros((2, 8), jnp.int32)}, ValueError, "q_segment_ids"),
    ({"local_window_size": -1}, ValueError, "local_window_size"),
    ({"local_window_size": (1, 2, 3)}, ValueError, "local_window_size"),
    ({"local_window_size": 1.5}, ValueError, "local_window_size"),
    ({"scale": 0.0}, ValueError, "scale"),
    ({"scale": -1.0}, ValueError, "scale"),
    ({"scale": float("nan")}, ValueError, "scale"),
    ({"logits_soft_cap": 0.0}, ValueError, "logits_soft_cap"),
    ({"logits_soft_cap": "big"}, TypeError, "logits_soft_cap"),
    ({"is_causal": "yes"}, TypeError, "is_causal"),
    ({"return_residual": 1}, TypeError, "return_residual"),
    ({"implementation": "triton"}, ValueError, "unknown implementation"),
    ({"implementation": []}, ValueError, "empty"),
    ({"implementation": ["xla", 3]}, TypeError, "implementation"),
  ],
)
def test_bad_arguments_raise_before_any_kernel(overrides, error, words):
  with pytest.raises(error, match=words):
    attend(**overrides)


def test_segment_ids_need_kv_ids_when_lengths_differ():
  with pytest.raises(ValueError, match="kv_segment_ids"):
    attend(
      key=jnp.zeros((2, 9, 2, 32)),
      value=jnp.zeros((2, 9, 2, 32)),
      q_segment_ids=jnp.zeros((2, 8), jnp.int32),
    )


def test_traced_scale_is_rejected():
  with pytest.raises(TypeError, match="scale"):
    jax.jit(lambda s: attend(scale=s))(0.5)


def test_default_implementation_on_cpu_is_xla():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU default")
  assert attention.default_order() == ("xla",)


def test_implementation_sequence_falls_back():
  """An implementation that cannot serve a call hands over to the next one in the list."""
  q = jax.random.normal(jax.random.key(0), (1, 8, 2, 32))
  with jax.default_matmul_precision("highest"):
    out = jfused.dot_product_attention(q, q, q, implementation=("pallas_mosaic", "xla"))
    expected = jax.nn.dot_product_attention(q, q, q, implementation="xla")
  np.testing.assert_allclose(out, expected, atol=1e-6)
  with pytest.raises(NotImplementedError, match="pallas_mosaic"):
    jfused.dot_product_attention(q, q, q, implementation="pallas_mosaic")


def test_head_dim_over_256_is_not_served_by_triton():
  q = jnp.zeros((1, 4, 1, 300))
  with pytest.raises(NotImplementedError, match="head dims"):
    jfused.dot_product_attention(q, q, q, implementation="pallas_triton")
  out = jfused.dot_product_attention(q, q, q, implementation=("pallas_triton", "xla"))
  assert out.shape == q.shape


@pytest.mark.parametrize(
  "overrides, words",
  [
    ({"key": jnp.zeros((8, 2, 32))}, "same rank"),
    ({"key": jnp.zeros((3, 8, 2, 32)), "value": jnp.zeros((3, 8, 2, 32))}, "batch dims must match"),
    ({"value": jnp.zeros((2, 9, 2, 32))}, "lengths must match"),
    ({"value": jnp.zeros((2, 8, 1, 32))}, "num_heads must match"),
    ({"key": jnp.zeros((2, 8, 2, 16))}, "depths must match"),
    (
      {"key": jnp.zeros((2, 8, 3, 32)), "value": jnp.zeros((2, 8, 3, 32))},
      "must be multiple of Key heads",
    ),
  ],
)
def test_shape_errors_carry_flax_words(overrides, words):
  # Code written against Flax's attention matches these words in its errors.
  with pytest.raises(ValueError, match=words):
    attend(**overrides)
