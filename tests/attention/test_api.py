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
    ({"deterministic_backward": 1}, TypeError, "deterministic_backward"),
    ({"deterministic_backward": "yes"}, TypeError, "deterministic_backward"),
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


@pytest.mark.parametrize(
  "xla_flags, expected",
  [
    ("", False),
    ("--xla_gpu_deterministic_ops", True),
    ("--xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops=true", True),
    ("--xla_gpu_deterministic_ops=1", True),
    ("--xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false", False),
    ("--xla_gpu_deterministic_ops_extra=true", False),
  ],
)
def test_xla_deterministic_ops_flag_is_read_from_xla_flags(monkeypatch, xla_flags, expected):
  from jfused import config

  monkeypatch.setenv("XLA_FLAGS", xla_flags)
  assert config.xla_deterministic_ops() is expected


@pytest.mark.parametrize("flag_on", [False, True])
def test_deterministic_backward_none_follows_xla_flag(monkeypatch, flag_on):
  """None is deterministic when XLA's flag is on and takes the fastest backward when it is off
  (which kernels that means is tests/attention/test_mosaic.py's). An explicit bool wins."""
  from jfused.attention import args

  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops" if flag_on else "")
  assert args.deterministic_backward_value(None) is flag_on
  assert args.deterministic_backward_value(True) is True
  assert args.deterministic_backward_value(False) is False


@pytest.mark.parametrize("deterministic_backward", [None, True, False])
def test_deterministic_backward_leaves_deterministic_paths_alone(deterministic_backward):
  """XLA and Pallas-Triton serve every setting with their one (deterministic) backward."""
  q = jax.random.normal(jax.random.key(0), (1, 24, 2, 32))

  def grads(implementation, **options):
    def loss(q):
      out = jfused.dot_product_attention(
        q, q, q, is_causal=True, implementation=implementation, **options
      )
      return jnp.sum(out**2)

    return jax.grad(loss)(q)

  for implementation in ("xla", "pallas_triton"):
    plain = grads(implementation)
    chosen = grads(implementation, deterministic_backward=deterministic_backward)
    np.testing.assert_array_equal(np.asarray(chosen), np.asarray(plain))


@pytest.mark.parametrize("flag_on", [False, True])
def test_cudnn_declines_deterministic_backward_without_xla_flag(monkeypatch, flag_on):
  """cuDNN's backward repeats bit for bit only under XLA's flag: an explicit True without it
  is declined (not silently broken); with the flag, or with None, cuDNN is tried."""
  from jfused import config

  monkeypatch.setattr(config, "on_gpu", lambda: True)  # Reach the check on any machine.
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops" if flag_on else "")
  for setting in (True, None):
    with pytest.raises(NotImplementedError) as declined:
      attend(implementation="cudnn", deterministic_backward=setting)
    # Off a GPU the calls that pass the check fail later, inside jax.nn.
    assert ("atomics" in str(declined.value)) == (setting is True and not flag_on)
