"""The cross-entropy kernels lower for CUDA (an abstract H100, on any machine), run where they
should, and the chunked implementations' programs hold no [tokens, vocab] array."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from benchmarks import time_cross_entropy_mosaic
import jfused
from jfused import config
from jfused.cross_entropy import api, vocab_chunks
from tests.cuda_lowering import count_kernel_calls, export_for_h100

FORWARD, BACKWARD = "jfused_cross_entropy_fwd", "jfused_cross_entropy_bwd"
STATISTICS = "jfused_cross_entropy_stats"


def _abstract(tokens, width, vocab, layout, dtype, bias):
  weight_shape = (width, vocab) if layout == "dv" else (vocab, width)
  return (
    jax.ShapeDtypeStruct((tokens, width), dtype),
    jax.ShapeDtypeStruct(weight_shape, dtype),
    jax.ShapeDtypeStruct((tokens,), jnp.int32),
    jax.ShapeDtypeStruct((vocab,), dtype) if bias else None,
  )


@pytest.mark.parametrize(
  "tokens, width, vocab, layout, dtype, bias, options",
  [
    # A Llama-3-sized head: 16 chunks of 512 tokens.
    (8192, 4096, 128256, "vd", jnp.bfloat16, False, {}),
    (1000, 768, 50257, "dv", jnp.float16, True, {"label_smoothing": 0.1, "z_loss": 1e-4}),
    (7, 64, 7, "dv", jnp.float32, True, {"logits_soft_cap": 30.0, "ignore_index": 0}),
  ],
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lowers_for_cuda(tokens, width, vocab, layout, dtype, bias, options, reduction):
  abstract = _abstract(tokens, width, vocab, layout, dtype, bias)

  def loss(x, weight, labels, bias):
    value = jfused.linear_cross_entropy(
      x,
      weight,
      labels,
      bias=bias,
      weight_layout=layout,
      reduction=reduction,
      implementation="pallas_triton",
      **options,
    )
    return jnp.sum(value)

  argnums = (0, 1, 3) if bias else (0, 1)
  with config.interpret_mode(False):  # what a GPU would run
    forward = export_for_h100(loss, *abstract)
    backward = export_for_h100(jax.grad(loss, argnums=argnums), *abstract)
  if 4 * width * vocab > api.FLOAT32_DWEIGHT_LIMIT_BYTES:
    # The vocabulary walk: statistics forward, the logits computed again in the backward;
    # one launch in the loop over whole column chunks, one for the narrower last chunk.
    chunks = 1 + (vocab % vocab_chunks.chunk_columns_for(tokens, vocab, api.LOGITS_CHUNK_BYTES) > 0)
    assert count_kernel_calls(forward, STATISTICS) == chunks
    assert count_kernel_calls(forward, BACKWARD) == 0
    assert count_kernel_calls(backward, STATISTICS) == count_kernel_calls(backward, BACKWARD)
    assert count_kernel_calls(backward, BACKWARD) == chunks
    return
  assert count_kernel_calls(forward, FORWARD) == 1
  assert count_kernel_calls(forward, BACKWARD) == 0
  # A mean's gradients are made in the forward pass: no second look at the logits. Per-token
  # losses get their cotangents later: the backward computes the logits again.
  assert count_kernel_calls(backward, FORWARD) == 1
  assert count_kernel_calls(backward, BACKWARD) == (1 if reduction == "none" else 0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_gradient_holds_one_chunk_of_logits(monkeypatch, reduction):
  # 4096 tokens x 32000 classes: 500 MiB of float32 logits; chunks of 8 MiB (64 tokens).
  monkeypatch.setattr(api, "LOGITS_CHUNK_BYTES", 8 * 2**20)
  tokens, width, vocab = 4096, 64, 32000
  abstract = _abstract(tokens, width, vocab, "dv", jnp.float32, False)[:3]
  logits_bytes = tokens * vocab * 4

  def temp_bytes(implementation):
    def loss(x, weight, labels):
      value = jfused.linear_cross_entropy(
        x, weight, labels, reduction=reduction, implementation=implementation
      )
      return jnp.sum(value)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*abstract).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes("xla") >= logits_bytes
  # A chunk's logits and gradient, the float32 dweight sum and small per-token vectors.
  assert temp_bytes("xla_chunked") < logits_bytes / 8


@pytest.mark.parametrize(
  "tokens, width, vocab, layout, options",
  [
    (8192, 4096, 128256, "vd", {}),
    (1000, 192, 50257, "dv", {"label_smoothing": 0.1, "logits_soft_cap": 30.0}),
  ],
)
@pytest.mark.parametrize("cluster_tiles", [1, 2])
def test_mosaic_statistics_lower_for_cuda(tokens, width, vocab, layout, options, cluster_tiles):
  """implementation="pallas_mosaic": the forward is one Mosaic kernel over the whole
  vocabulary; the backward walks the vocabulary with the Mosaic gradient kernel (one launch
  in the loop over whole chunks, one for the narrower last), and no Triton kernel runs; with
  the weight's tiles multicast to clusters of two CTAs too (tokens padded to whole clusters)."""
  from benchmarks.kernel_setting import kernel_setting
  from pallas_kernels.cross_entropy import mosaic, mosaic_gradient
  from tests.cuda_lowering import count_mosaic_calls

  abstract = _abstract(tokens, width, vocab, layout, jnp.bfloat16, False)[:3]

  def loss(x, weight, labels):
    return jfused.linear_cross_entropy(
      x, weight, labels, weight_layout=layout, implementation="pallas_mosaic", **options
    )

  blocks = mosaic.MosaicStatisticsBlocks(cluster_tiles=cluster_tiles)
  with config.interpret_mode(False), kernel_setting(mosaic, "DEFAULT_BLOCKS", blocks):
    forward = export_for_h100(loss, *abstract)
    backward = export_for_h100(jax.grad(loss, argnums=(0, 1)), *abstract)
  # A clustered kernel reads its place in the cluster (its token tile); a single CTA does not.
  assert ("cluster_block_id" in forward) == (cluster_tiles > 1)
  assert count_mosaic_calls(forward, mosaic.KERNEL_NAME) == 1
  assert count_kernel_calls(forward, STATISTICS) == 0
  assert count_mosaic_calls(backward, mosaic.KERNEL_NAME) == 1
  chunks = 1 + (vocab % vocab_chunks.chunk_columns_for(tokens, vocab, api.LOGITS_CHUNK_BYTES) > 0)
  assert count_mosaic_calls(backward, mosaic_gradient.KERNEL_NAME) == chunks
  assert count_mosaic_calls(forward, mosaic_gradient.KERNEL_NAME) == 0
  assert count_kernel_calls(backward, BACKWARD) == 0


def test_vocabulary_splits_fill_the_sms_with_equal_splits():
  from pallas_kernels.cross_entropy.mosaic import vocabulary_splits

  assert vocabulary_splits(128, 1024, 132) == 1  # 16k tokens: one wave already.
  # 300 tiles take 3 waves (the last a quarter full); halves take 5 waves of half the walk.
  assert vocabulary_splits(300, 1024, 132) == 2
  assert vocabulary_splits(16, 250, 132) == 5  # 80 CTAs of a fifth of the walk each.
  assert vocabulary_splits(24, 393, 132) == 3  # 393 = 3 x 131.
  assert vocabulary_splits(100, 1024, 132) == 1  # Two splits would take two waves of half.
  assert vocabulary_splits(1, 1, 132) == 1
  assert vocabulary_splits(2, 7, 132) == 7
  # Asked for (MosaicStatisticsBlocks.splits): the most up to that number that divide evenly.
  assert vocabulary_splits(128, 512, 132, asked=4) == 4
  assert vocabulary_splits(128, 393, 132, asked=4) == 3
  assert vocabulary_splits(1, 1, 132, asked=4) == 1


def _tile_choice_kernels(blocks):
  """Both Mosaic kernels at `blocks` on small operands, as (name, function, operands)."""
  from pallas_kernels.cross_entropy import mosaic, mosaic_gradient
  from pallas_kernels.cross_entropy.triton import LossSpec

  x, weight = (
    jax.ShapeDtypeStruct((256, 512), jnp.bfloat16),
    jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16),
  )
  labels, vector = (
    jax.ShapeDtypeStruct((256,), jnp.int32),
    jax.ShapeDtypeStruct((256,), jnp.float32),
  )

  def statistics(x, w, y):
    return mosaic.logits_statistics(x, w, y, weight_layout="dv", spec=LossSpec(), blocks=blocks)

  def gradient(x, w, y, lse, scale):
    return mosaic_gradient.logits_gradient(
      x, w, y, lse, scale, weight_layout="dv", spec=LossSpec(), grad_dtype=x.dtype, blocks=blocks
    )

  return {
    "statistics": (mosaic.KERNEL_NAME, statistics, (x, weight, labels)),
    "gradient": (mosaic_gradient.KERNEL_NAME, gradient, (x, weight, labels, vector, vector)),
  }


@pytest.mark.parametrize(
  "kernel, choice",
  [(kernel, "default") for kernel in ("statistics", "gradient")]
  + [("statistics", choice) for choice in time_cross_entropy_mosaic.STATISTICS_CHOICES]
  + [("gradient", choice) for choice in time_cross_entropy_mosaic.GRADIENT_CHOICES],
)
def test_mosaic_tile_choices_fit_shared_memory(kernel, choice):
  """The tiles the GPU tuning script tries (benchmarks/time_cross_entropy_mosaic.py) lower for
  an H100, each for its kernel: shared memory is checked in the lowering, so a choice that
  would not fit fails here rather than on the GPU."""
  from pallas_kernels.cross_entropy import mosaic

  if choice == "default":
    blocks = mosaic.MosaicStatisticsBlocks()
  else:
    blocks = time_cross_entropy_mosaic.blocks_of(choice)
  name, function, operands = _tile_choice_kernels(blocks)[kernel]
  assert name in export_for_h100(function, *operands)


def test_mosaic_tile_choice_past_shared_memory_fails_to_lower():
  """The check above can fail: four 256 x 64 stages (192 KiB) and the gradient kernel's
  output tile (64 KiB) are more than an H100's 227 KiB a block."""
  _, function, operands = _tile_choice_kernels(time_cross_entropy_mosaic.blocks_of("256x64x4"))[
    "gradient"
  ]
  with pytest.raises(Exception, match="(?i)shared memory|smem"):
    export_for_h100(function, *operands)
