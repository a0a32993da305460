"""Each kernel configuration is lowered once per program, not once per call site
(pallas_kernels/launcher.py): the gradient of a stack of transformer blocks, called in a plain
Python loop and exported for CUDA under an abstract H100, holds one copy of each kernel."""

import collections
import re

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

import flax_layers
from jfused import config
from tests.cuda_lowering import export_for_h100

# A kernel is a custom call into Triton or Mosaic GPU; its module text is an attribute of the
# call, so identical launches at two sites would appear as two calls.
_KERNEL_CALL = re.compile(r"stablehlo\.custom_call @(__gpu\$xla\.gpu\.triton|mosaic_gpu\w*)")


@pytest.fixture(autouse=True)
def compile_for_gpu():
  with config.interpret_mode(False):
    yield


def _stack_gradient_module(num_blocks: int, attention: str) -> str:
  blocks = [
    flax_layers.TransformerBlock(
      128,
      2,
      norm="rms_norm",
      activation="swiglu",
      dtype=jnp.bfloat16,
      attention_implementation=attention,
      norm_implementation="pallas_triton",
      rngs=nnx.Rngs(i),
    )
    for i in range(num_blocks)
  ]
  graph, params = nnx.split(blocks)

  def loss(params, x):
    model = nnx.merge(graph, params)
    # The exported input's type carries a mesh without the abstract H100; everything computed
    # inside carries it. One op first, so the first block sees the type the others see (on a
    # GPU, with no abstract mesh, the two are the same).
    x = x * jnp.ones((), x.dtype)
    for block in model:
      x = block(x)
    return x.astype(jnp.float32).sum()

  abstract_params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  x = jax.ShapeDtypeStruct((2, 256, 128), jnp.bfloat16)
  return export_for_h100(jax.grad(loss), abstract_params, x)


@pytest.mark.parametrize("attention", ["pallas_triton", "pallas_mosaic"])
def test_every_kernel_is_lowered_once_for_a_stack_of_blocks(attention):
  one = _stack_gradient_module(1, attention)
  eight = _stack_gradient_module(8, attention)
  kernels_one = collections.Counter(_KERNEL_CALL.findall(one))
  kernels_eight = collections.Counter(_KERNEL_CALL.findall(eight))
  # Attention forward, dK/dV and dQ (Triton) or forward and backward (Mosaic); the norm's
  # forward (with and without the residual add) and backward.
  assert sum(kernels_one.values()) >= 4, kernels_one
  assert kernels_eight == kernels_one, (kernels_one, kernels_eight)
  assert len(eight) <= 3 * len(one), (len(one), len(eight))
