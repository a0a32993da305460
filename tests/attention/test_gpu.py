"""Native GPU runs at sizes interpret mode cannot afford (skipped without a CUDA GPU).

The CPU suite (tests/attention/test_kernels.py) also runs natively on a GPU; these add realistic
shapes where several key blocks, several programs per head and the real tile sizes all take part.
"""

import jax.numpy as jnp
import pytest

from tests.attention import cases
from tests.attention.cases import Case

pytestmark = pytest.mark.gpu

GPU_CASES = [
  Case("T1024_d128", t=1024, s=1024, heads=4, kv_heads=4, head_dim=128),
  Case(
    "T1000_S1100_causal_gqa_d128",
    t=1000,
    s=1100,
    heads=8,
    kv_heads=2,
    head_dim=128,
    options=(("is_causal", True),),
  ),
  Case(
    "T777_d64_window",
    t=777,
    s=777,
    heads=4,
    kv_heads=4,
    head_dim=64,
    options=(("local_window_size", (100, 20)),),
  ),
  Case(
    "T512_d256_causal",
    t=512,
    s=512,
    heads=2,
    kv_heads=2,
    head_dim=256,
    options=(("is_causal", True),),
  ),
  Case(
    "T600_d96_segments_lengths",
    t=600,
    s=600,
    heads=4,
    kv_heads=2,
    head_dim=96,
    segments="packed",
    q_lengths=True,
    kv_lengths=True,
  ),
  Case(
    "T384_d128_bias_mask_cap",
    t=384,
    s=448,
    heads=4,
    kv_heads=1,
    head_dim=128,
    bias_shape="full",
    mask=True,
    options=(("logits_soft_cap", 20.0),),
  ),
]


@pytest.mark.parametrize(
  "dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: d.__name__
)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_reference(case, dtype):
  cases.check_against_reference(case, dtype)


def test_gpu_deterministic_bitwise():
  case = Case(
    "gqa_causal", t=2048, s=2048, heads=8, kv_heads=2, head_dim=128, options=(("is_causal", True),)
  )
  cases.assert_deterministic(case, jnp.bfloat16)


# --- Attention dropout, natively (tests/attention/test_dropout.py has the CPU suite) ---------

import math  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jfused import config  # noqa: E402
from tests.attention import test_dropout as dropout_tests  # noqa: E402

DROPOUT_GPU_CASES = [
  (cases.DROPOUT_GPU_CASE, jnp.bfloat16, 0.1),
  (
    Case(
      "T777_d64_window_lengths",
      t=777,
      s=777,
      heads=4,
      kv_heads=4,
      head_dim=64,
      kv_lengths=True,
      options=(("local_window_size", (100, 20)),),
    ),
    jnp.float16,
    0.2,
  ),
  (
    Case(
      "T384_d128_bias_mask",
      t=384,
      s=448,
      heads=4,
      kv_heads=1,
      head_dim=128,
      bias_shape="full",
      mask=True,
    ),
    jnp.float32,
    0.5,
  ),
]


@pytest.mark.parametrize(
  "case,dtype,rate",
  DROPOUT_GPU_CASES,
  ids=[f"{c}-{jnp.dtype(d).name}" for c, d, _ in DROPOUT_GPU_CASES],
)
def test_gpu_dropout_matches_reference(case, dtype, rate):
  dropout_tests.check_case(case, dtype, rate)


# The Mosaic kernels (Hopper): bf16/f16, causal or windowed, d=256 included.
MOSAIC_DROPOUT_GPU_CASES = [
  (
    Case(
      "T700_S600_window_gqa_d128",
      t=700,
      s=600,
      heads=4,
      kv_heads=2,
      head_dim=128,
      options=(("local_window_size", (150, 90)),),
    ),
    jnp.bfloat16,
    0.1,
  ),
  (cases.DROPOUT_GPU_CASE, jnp.bfloat16, 0.1),
  (Case("T777_S300_mqa_d64", t=777, s=300, heads=4, kv_heads=1, head_dim=64), jnp.float16, 0.3),
  (
    Case(
      "T300_S512_causal_d256",
      t=300,
      s=512,
      heads=2,
      kv_heads=2,
      head_dim=256,
      options=(("is_causal", True),),
    ),
    jnp.bfloat16,
    0.2,
  ),
  (
    Case(
      "T500_S600_kv_lengths_causal_d128",
      batch=(3,),
      t=500,
      s=600,
      heads=2,
      kv_heads=1,
      head_dim=128,
      kv_lengths=True,
      options=(("is_causal", True),),
    ),
    jnp.bfloat16,
    0.1,
  ),
  # The persistent forward (without causality) at d=128 and d=256.
  (
    Case("T1000_S900_gqa_d128", t=1000, s=900, heads=8, kv_heads=2, head_dim=128),
    jnp.bfloat16,
    0.1,
  ),
  (Case("T600_S700_d256", t=600, s=700, heads=4, kv_heads=4, head_dim=256), jnp.bfloat16, 0.1),
]


@pytest.mark.skipif(not config.on_hopper(), reason="the Mosaic kernels need a Hopper GPU")
@pytest.mark.parametrize(
  "case,dtype,rate",
  MOSAIC_DROPOUT_GPU_CASES,
  ids=[f"{c}-{jnp.dtype(d).name}" for c, d, _ in MOSAIC_DROPOUT_GPU_CASES],
)
def test_gpu_mosaic_dropout_matches_reference(case, dtype, rate):
  dropout_tests.check_case(case, dtype, rate, implementation="pallas_mosaic")


def test_gpu_dropout_masks_are_the_public_mask_at_real_tile_sizes():
  keep = dropout_tests.check_kernel_masks(0.1, 256)  # Default tiles: several per row.
  sigma = math.sqrt(0.9 * 0.1 / keep.size)
  assert abs(keep.mean() - 0.9) <= 3 * sigma


@pytest.mark.parametrize("implementation", ["pallas_triton", "pallas_mosaic"])
def test_gpu_dropout_deterministic_bitwise(implementation):
  if implementation == "pallas_mosaic" and not config.on_hopper():
    pytest.skip("the Mosaic kernels need a Hopper GPU")
  case = Case(
    "gqa_causal", t=2048, s=2048, heads=8, kv_heads=2, head_dim=128, options=(("is_causal", True),)
  )
  args = {
    **cases.make_inputs(case, jnp.bfloat16),
    "dropout_rate": 0.1,
    "dropout_rng": dropout_tests.RNG,
  }
  run = dropout_tests.attend(implementation)
  first, second = cases.outputs_and_grads(run, args), cases.outputs_and_grads(run, args)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


# --- The benchmark's deterministic cuDNN baseline --------------------------------------------

from jfused.cli.bench import attention as attention_bench  # noqa: E402


def test_gpu_bench_cudnn_deterministic_backward_is_bitwise():
  """`jfused bench`'s cudnn_deterministic row times a backward that repeats bit for bit, at a
  size where atomic dQ accumulation would show (many key blocks per query row)."""
  shape = attention_bench.AttentionShape("B2_T4096_h8_d128", 2, 4096, 8, 8, 128, False)
  q, k, v, dout = attention_bench.make_inputs(shape, jnp.bfloat16, 1)[0]
  attend = attention_bench._attend("cudnn_deterministic", causal=False)
  grads = jax.jit(
    lambda q, k, v, dout: jax.vjp(attend, q, k, v)[1](dout),
    compiler_options=attention_bench.COMPILER_OPTIONS["cudnn_deterministic"],
  )
  first = grads(q, k, v, dout)
  for _ in range(3):
    for a, b in zip(first, grads(q, k, v, dout)):
      assert np.array_equal(np.asarray(a), np.asarray(b))
