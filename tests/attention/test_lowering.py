"""The attention kernels lower for CUDA (Triton IR) under an abstract H100, on any machine."""

import jax
import jax.numpy as jnp
import pytest

import jfused
from jfused import config
from tests.attention import cases as attention_cases
from tests.cuda_lowering import count_kernel_calls, export_for_h100

B, T, S, N, K, D = 2, 256, 384, 8, 2, 128
FORWARD, DKV, DQ = "jfused_attention_fwd", "jfused_attention_bwd_dkv", "jfused_attention_bwd_dq"


def _abstract(*shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


FEATURES = {
  "plain": {},
  "causal_window_soft_cap": {
    "is_causal": True,
    "local_window_size": (64, 0),
    "logits_soft_cap": 30.0,
  },
  "bias": {"bias": True},
  "mask_lengths": {"mask": True, "key_value_seq_lengths": True, "query_seq_lengths": True},
  "segments": {"q_segment_ids": True},
}


@pytest.fixture(autouse=True)
def compile_for_gpu():
  with config.interpret_mode(False):
    yield


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: d.__name__)
@pytest.mark.parametrize("head_dim", [64, 80, 256])
def test_plain_lowers_for_dtypes_and_head_dims(dtype, head_dim):
  def grads(q, k, v):
    def loss(q, k, v):
      out = jfused.dot_product_attention(q, k, v, is_causal=True, implementation="pallas_triton")
      return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  text = export_for_h100(
    grads,
    _abstract(B, T, N, head_dim, dtype=dtype),
    _abstract(B, S, K, head_dim, dtype=dtype),
    _abstract(B, S, K, head_dim, dtype=dtype),
  )
  assert [count_kernel_calls(text, n) for n in (FORWARD, DKV, DQ)] == [1, 1, 1]


@pytest.mark.parametrize("name", list(FEATURES))
def test_features_lower_forward_and_backward(name):
  features = FEATURES[name]

  def grads(q, k, v, bias, mask, segments, lengths):
    def loss(q, k, v, bias):
      kwargs = {key: value for key, value in features.items() if not isinstance(value, bool)}
      kwargs.update(
        {
          "bias": bias if features.get("bias") else None,
          "mask": mask if features.get("mask") else None,
          "q_segment_ids": segments if features.get("q_segment_ids") else None,
          "kv_segment_ids": segments if features.get("q_segment_ids") else None,
          "query_seq_lengths": lengths if features.get("query_seq_lengths") else None,
          "key_value_seq_lengths": lengths if features.get("key_value_seq_lengths") else None,
        }
      )
      out = jfused.dot_product_attention(q, k, v, implementation="pallas_triton", **kwargs)
      return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)

  text = export_for_h100(
    grads,
    _abstract(B, S, N, D),
    _abstract(B, S, K, D),
    _abstract(B, S, K, D),
    _abstract(B, N, S, S),
    _abstract(1, 1, S, S, dtype=jnp.bool_),
    _abstract(B, S, dtype=jnp.int32),
    _abstract(B, dtype=jnp.int32),
  )
  assert [count_kernel_calls(text, n) for n in (FORWARD, DKV, DQ)] == [1, 1, 1]


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "checkpoint"])
def test_backward_does_not_rerun_forward_kernel(remat):
  """The backward uses the saved (output, logsumexp): one forward launch for value_and_grad.

  Under jax.checkpoint the user asked for recomputation: the forward kernel then runs once
  for the value and once to rebuild the residuals, never more (optimize_remat=True keeps the
  residual-producing forward from running twice).
  """
  value_and_grads = attention_cases.causal_value_and_grads("pallas_triton", remat=remat)
  text = export_for_h100(
    value_and_grads, _abstract(B, T, N, D), _abstract(B, S, K, D), _abstract(B, S, K, D)
  )
  assert count_kernel_calls(text, FORWARD) == (2 if remat else 1)
  assert count_kernel_calls(text, DKV) == 1 and count_kernel_calls(text, DQ) == 1
