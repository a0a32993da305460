"""Native GPU runs at sizes interpret mode cannot afford (skipped without a CUDA GPU).

The CPU suite (test_attention.py) also runs natively on a GPU; these add realistic shapes
where several key blocks, several programs per head and the real tile sizes all take part.
"""

import jax.numpy as jnp
import pytest

from tests import attention_cases as cases
from tests.attention_cases import Case

pytestmark = pytest.mark.gpu

GPU_CASES = [
    Case("T1024_d128", t=1024, s=1024, heads=4, kv_heads=4, head_dim=128),
    Case("T1000_S1100_causal_gqa_d128", t=1000, s=1100, heads=8, kv_heads=2, head_dim=128,
         options=(("is_causal", True),)),
    Case("T777_d64_window", t=777, s=777, heads=4, kv_heads=4, head_dim=64,
         options=(("local_window_size", (100, 20)),)),
    Case("T512_d256_causal", t=512, s=512, heads=2, kv_heads=2, head_dim=256,
         options=(("is_causal", True),)),
    Case("T600_d96_segments_lengths", t=600, s=600, heads=4, kv_heads=2, head_dim=96,
         segments="packed", q_lengths=True, kv_lengths=True),
    Case("T384_d128_bias_mask_cap", t=384, s=448, heads=4, kv_heads=1, head_dim=128,
         bias_shape="full", mask=True, options=(("logits_soft_cap", 20.0),)),
]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_reference(case, dtype):
  cases.check_against_reference(case, dtype)


def test_gpu_deterministic_bitwise():
  case = Case("gqa_causal", t=2048, s=2048, heads=8, kv_heads=2, head_dim=128,
              options=(("is_causal", True),))
  cases.assert_deterministic(case, jnp.bfloat16)
