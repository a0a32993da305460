"""The Pallas Mosaic GPU attention ("pallas_mosaic").

Mosaic GPU kernels (wgmma) have no CPU interpreter, so on CPU these tests check what can be
checked there: the kernel lowers for CUDA under an abstract H100 (forward and gradients), and
calls it does not serve raise NotImplementedError so dispatch falls back. The GPU-marked tests
run the shared attention cases natively on a Hopper GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.kernel_setting import kernel_setting
import jfused
from jfused import config
from pallas_kernels.attention.mosaic import common as mosaic
from pallas_kernels.attention.mosaic.bwd import DKV_KERNEL_NAME, DQ_KERNEL_NAME
from pallas_kernels.attention.mosaic.fwd import KERNEL_NAME
from tests.attention import cases
from tests.attention.cases import Case
from tests.cuda_lowering import count_kernel_calls, count_mosaic_calls, export_for_h100

TRITON_DKV, TRITON_DQ = "jfused_attention_bwd_dkv", "jfused_attention_bwd_dq"


def _abstract(*shape, dtype=jnp.bfloat16):
  return jax.ShapeDtypeStruct(shape, dtype)


def _kernel_counts(hlo_text: str) -> dict[str, int]:
  """Launches of each kernel: the Mosaic forward and backward, the Triton backward."""
  counts = {
    "forward": count_mosaic_calls(hlo_text, KERNEL_NAME),
    "mosaic_dkv": count_mosaic_calls(hlo_text, DKV_KERNEL_NAME),
    "mosaic_dq": count_mosaic_calls(hlo_text, DQ_KERNEL_NAME),
    "triton_dkv": count_kernel_calls(hlo_text, TRITON_DKV),
    "triton_dq": count_kernel_calls(hlo_text, TRITON_DQ),
  }
  return {name: count for name, count in counts.items() if count}


def _partial_wait_modules(hlo_text: str) -> int:
  """Kernel modules holding a `wgmma.wait_group 1` (products still in flight while a
  consumer works): each serialised module stores an asm string once."""
  return hlo_text.count("wgmma.wait_group.sync.aligned 1;")


def _named_release_modules(hlo_text: str) -> int:
  """Kernel modules whose consumers release ring slots on named barriers
  (mosaic.SlotRelease): the asm string of the arrival, stored once per module."""
  return hlo_text.count(f"bar.arrive $0, {(mosaic.NUM_CONSUMERS + 1) * 128};")


def _expected(forwards: int = 1) -> dict[str, int]:
  """The Mosaic kernels serve every head dim (d=256 with the split dK/dV kernel): no Triton
  kernel runs."""
  return {"forward": forwards, "mosaic_dkv": 1, "mosaic_dq": 1}


@pytest.fixture
def fused_everywhere(monkeypatch):
  """deterministic_backward=False takes the fused backward on every call it serves, not only
  where it was measured faster (bwd.fused_backward_is_faster): its tests cover every feature."""
  from pallas_kernels.attention.mosaic import bwd

  monkeypatch.setattr(bwd, "fused_backward_is_faster", lambda *args, **kwargs: True)


def _export_grads(t, s, heads, kv_heads, head_dim, dtype, **kwargs):
  """The gradient's program for CUDA; the deterministic pair unless kwargs say otherwise (None
  would take the fused kernel on unmasked d=128 calls)."""
  kwargs.setdefault("deterministic_backward", True)

  def grads(q, k, v):
    def loss(q, k, v):
      out = jfused.dot_product_attention(q, k, v, implementation="pallas_mosaic", **kwargs)
      return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  with config.interpret_mode(False):
    return export_for_h100(
      grads,
      _abstract(2, t, heads, head_dim, dtype=dtype),
      _abstract(2, s, kv_heads, head_dim, dtype=dtype),
      _abstract(2, s, kv_heads, head_dim, dtype=dtype),
    )


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_lowers_for_h100(head_dim, dtype, causal):
  text = _export_grads(256, 384, 8, 2, head_dim, dtype, is_causal=causal)
  assert _kernel_counts(text) == _expected()


@pytest.mark.parametrize(
  "head_dim, masking",
  [
    (64, dict(is_causal=True)),
    (128, dict(is_causal=True, local_window_size=(100, 0))),
    (256, dict(is_causal=False)),
  ],
  ids=["d64_causal", "d128_window", "d256_full"],
)
def test_lowers_with_mask_positions_from_vectors(head_dim, masking):
  """The A/B alternative (mosaic.POSITIONS_FROM_VECTORS, timed on the GPU next) lowers."""
  with kernel_setting(mosaic, "POSITIONS_FROM_VECTORS", True):
    text = _export_grads(256, 384, 8, 2, head_dim, jnp.bfloat16, **masking)
  assert _kernel_counts(text) == _expected()


@pytest.mark.parametrize("t, s", [(1, 1), (100, 130), (130, 100)])
def test_lowers_for_partial_blocks(t, s):
  """Lengths that are not multiples of the tiles go through the padding path."""
  text = _export_grads(t, s, 4, 1, 128, jnp.bfloat16, is_causal=True)
  assert _kernel_counts(text) == _expected()


@pytest.mark.parametrize("head_dim, causal", [(64, False), (128, True), (256, True)])
def test_lowers_with_dropout(head_dim, causal):
  """Dropout is served by the Mosaic kernels (the hash runs inside all three)."""
  text = _export_grads(
    200,
    300,
    4,
    2,
    head_dim,
    jnp.bfloat16,
    is_causal=causal,
    dropout_rate=0.1,
    dropout_rng=jax.random.key(0),
  )
  assert _kernel_counts(text) == _expected()


@pytest.mark.parametrize("head_dim, causal", [(64, True), (128, False), (256, True)])
def test_lowers_with_soft_cap(head_dim, causal):
  """The soft cap's tanh runs in the forward and both backward kernels."""
  text = _export_grads(
    200, 300, 4, 2, head_dim, jnp.bfloat16, is_causal=causal, logits_soft_cap=2.0
  )
  assert _kernel_counts(text) == _expected()


@pytest.mark.parametrize(
  "head_dim, causal, window",
  [(64, True, (100, 0)), (128, False, (37, 50)), (128, True, (0, 0)), (256, False, (64, 64))],
)
def test_lowers_with_local_window(head_dim, causal, window):
  """Windows are served by all three kernels."""
  text = _export_grads(
    200, 300, 4, 2, head_dim, jnp.bfloat16, is_causal=causal, local_window_size=window
  )
  assert _kernel_counts(text) == _expected()


@pytest.mark.parametrize(
  "head_dim, causal, window",
  [(64, True, None), (128, False, None), (128, True, (50, 0)), (256, False, None)],
)
def test_lowers_with_sequence_lengths(head_dim, causal, window):
  """Query and key lengths are served by all three kernels."""
  lengths = jnp.array([150, 0], jnp.int32)
  text = _export_grads(
    200,
    300,
    4,
    2,
    head_dim,
    jnp.bfloat16,
    is_causal=causal,
    local_window_size=window,
    query_seq_lengths=lengths,
    key_value_seq_lengths=lengths + 40,
  )
  assert _kernel_counts(text) == _expected()


@pytest.mark.parametrize("head_dim, causal", [(64, False), (128, True), (256, True)])
def test_lowers_with_segment_ids(head_dim, causal):
  """Segment ids are served by all three kernels."""
  segments = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 50)[None].repeat(2, axis=0)
  text = _export_grads(
    200,
    200,
    4,
    2,
    head_dim,
    jnp.bfloat16,
    is_causal=causal,
    q_segment_ids=segments,
    kv_segment_ids=segments,
    key_value_seq_lengths=jnp.array([180, 200], jnp.int32),
  )
  assert _kernel_counts(text) == _expected()


# At d=256 the unsplit dK/dV kernel does not fit (registers), nor the unsplit dQ kernel with
# 64-key steps (shared memory); the default (split dK/dV, 32-key dQ steps) has its own tests.
@pytest.mark.parametrize(
  "head_dim, split", [(128, "dkv"), (128, "dq"), (128, "both"), (256, "both")]
)
def test_split_backward_kernels_lower_with_every_feature(head_dim, split):
  """The split dK/dV and dQ kernels (consumers sharing one tile, P handed over) under GQA,
  causality with a window, soft cap, dropout, lengths and segment ids at once."""
  from pallas_kernels.attention.mosaic import bwd

  blocks = bwd.MosaicBackwardBlocks(
    dkv_split=split in ("dkv", "both"), dq_split=split in ("dq", "both")
  )
  text = _export_backward_with_every_feature(head_dim, blocks)
  assert _kernel_counts(text) == {"mosaic_dkv": 1, "mosaic_dq": 1}


def _overlapped_dq_blocks(blocks):
  """Backward tiles with the dQ kernel's products overlapped, three stages where shared
  memory allows (a slot is released one step later); d=256's 32-key steps keep two."""
  return dataclasses.replace(blocks, dq_overlap=True, dq_stages=2 if blocks.dq_block_kv < 64 else 3)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_overlapped_dq_kernel_lowers_with_every_feature(head_dim):
  """The dQ kernel with block j's dS computed while block j-1's dS K runs, under every
  feature at once; its partial wgmma wait (S and dP done, dS K in flight) is one of the two
  kernels' (the dK/dV kernel has its own only with dkv_overlap)."""
  from pallas_kernels.attention.mosaic import bwd

  blocks = _overlapped_dq_blocks(bwd.default_backward_blocks(head_dim))
  text = _export_backward_with_every_feature(head_dim, blocks)
  assert _kernel_counts(text) == {"mosaic_dkv": 1, "mosaic_dq": 1}
  assert _partial_wait_modules(text) == 1 + blocks.dkv_overlap


def test_overlapped_dq_rejects_the_split_kernel():
  from pallas_kernels.attention.mosaic import bwd

  with pytest.raises(ValueError, match="dq_split"):
    bwd.MosaicBackwardBlocks(dq_split=True, dq_overlap=True)


@pytest.mark.parametrize("head_dim, overlap", [(64, True), (128, True), (128, False)])
def test_dkv_kernel_lowers_with_every_feature(head_dim, overlap):
  """The dK/dV kernel with and without dS^T computed while dV += P^T dO runs (the default
  at d=128), under every feature at once; the overlapped one's partial wgmma wait (dP^T
  done, dV in flight) is in that kernel alone."""
  from pallas_kernels.attention.mosaic import bwd

  blocks = dataclasses.replace(bwd.default_backward_blocks(head_dim), dkv_overlap=overlap)
  text = _export_backward_with_every_feature(head_dim, blocks)
  assert _kernel_counts(text) == {"mosaic_dkv": 1, "mosaic_dq": 1}
  assert _partial_wait_modules(text) == (1 if overlap else 0)


@pytest.mark.parametrize(
  "head_dim, overlap, split_dq",
  [
    (64, False, False),
    (128, True, False),
    (128, False, False),
    (128, True, True),
    (128, False, True),
  ],
)
def test_fused_backward_lowers_with_every_feature(head_dim, overlap, split_dq):
  """The fused backward (MosaicBackwardBlocks.fused): the dK/dV kernel alone, with dQ's
  TMA reduce-add into float32, under every feature at once, with and without the
  overlapped dK/dV steps, and with dQ's columns divided between the consumers
  (fused_split_dq); it fits in shared memory with the head dim's fused tiles."""
  from pallas_kernels.attention.mosaic import bwd

  blocks = dataclasses.replace(
    bwd.fused_backward_blocks(head_dim), dkv_overlap=overlap, fused_split_dq=split_dq
  )
  text = _export_backward_with_every_feature(head_dim, blocks)
  assert _kernel_counts(text) == {"mosaic_dkv": 1}
  assert text.count("cp.reduce.async.bulk.tensor.") == 1  # The dQ adds' asm, once per module.


@pytest.mark.parametrize("t, s", [(1, 1), (100, 130), (130, 100)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
def test_fused_backward_lowers_for_partial_blocks(t, s, dtype, fused_everywhere):
  """The fused backward on lengths that are not multiples of the tiles: padded keys are
  masked through a length table the launcher makes (see attention_backward)."""
  text = _export_grads(t, s, 4, 1, 128, dtype, is_causal=True, deterministic_backward=False)
  assert _kernel_counts(text) == {"forward": 1, "mosaic_dkv": 1}


def test_fused_backward_blocks():
  """Served where the unsplit dK/dV kernel is (d <= 128); never with the split kernel."""
  from pallas_kernels.attention.mosaic import bwd

  for head_dim in (64, 128):
    blocks = bwd.fused_backward_blocks(head_dim)
    assert blocks.fused and not blocks.dkv_split
  assert bwd.fused_backward_blocks(64).dkv_stages == 2  # Three do not fit with dQ's staging.
  # d=128 divides dQ's columns between the consumers (measured faster); d=64 cannot.
  assert bwd.fused_backward_blocks(128).fused_split_dq
  # FlashAttention-3's register split: the fused kernel's spills (measured faster at d=128).
  assert bwd.fused_backward_blocks(128).consumer_registers == 240
  assert not bwd.fused_backward_blocks(64).fused_split_dq
  assert bwd.fused_backward_blocks(256) is None
  with pytest.raises(ValueError, match="dkv_split"):
    bwd.MosaicBackwardBlocks(dkv_split=True, fused=True)
  with pytest.raises(ValueError, match="fused must be True"):
    bwd.MosaicBackwardBlocks(fused_split_dq=True)


@pytest.mark.parametrize(
  "blocks_of",
  [
    lambda bwd: bwd.fused_backward_blocks(128),
    lambda bwd: bwd.default_backward_blocks(128),
    lambda bwd: dataclasses.replace(
      bwd.default_backward_blocks(128),
      dkv_split=True,
      dq_split=True,
      dkv_overlap=False,
      dq_overlap=False,
    ),
  ],
  ids=["fused", "pair", "split_pair"],
)
def test_backward_kernels_take_the_consumer_registers_asked_for(monkeypatch, blocks_of):
  """MosaicBackwardBlocks.consumer_registers reaches each backward kernel's consumers, and
  its producer gets what the launch's registers leave (FlashAttention-3's 240 / 24)."""
  from pallas_kernels.attention.mosaic import bwd, common

  asked = []
  original = bwd.plgpu.set_max_registers
  monkeypatch.setattr(
    bwd.plgpu,
    "set_max_registers",
    lambda count, *, action: asked.append((count, action)) or original(count, action=action),
  )
  for registers, producer in ((240, 24), (common.CONSUMER_REGISTERS, common.PRODUCER_REGISTERS)):
    asked.clear()
    blocks = dataclasses.replace(blocks_of(bwd), consumer_registers=registers)
    _export_backward_with_every_feature(128, blocks)
    assert asked and set(asked) == {(registers, "increase"), (producer, "decrease")}
  assert common.PRODUCER_REGISTERS == 40
  for wrong in (236, 248, 160):
    with pytest.raises(ValueError, match="consumer_registers"):
      bwd.MosaicBackwardBlocks(consumer_registers=wrong)


def test_fused_split_dq_needs_whole_swizzle_tiles_of_columns():
  """At d=64 half of dQ's columns (32) would cut a K tile's 64-column swizzle tile."""
  from pallas_kernels.attention.mosaic import bwd

  blocks = dataclasses.replace(bwd.fused_backward_blocks(64), fused_split_dq=True)
  with pytest.raises(ValueError, match="fused_split_dq"):
    _export_backward_with_every_feature(64, blocks)


FUSED = {"forward": 1, "mosaic_dkv": 1}
PAIR = {"forward": 1, "mosaic_dkv": 1, "mosaic_dq": 1}


@pytest.mark.parametrize(
  "head_dim, deterministic_backward, options, flag_on, expected",
  [
    # Not asked for repeatable gradients: the fused kernel where it was measured faster,
    (128, False, {}, False, FUSED),
    (128, None, {}, False, FUSED),  # None follows XLA's flag, here off,
    # and the pair everywhere else: under any mask, with dropout, at other head dims.
    (128, False, {"is_causal": True}, False, PAIR),
    (128, None, {"local_window_size": (64, 64)}, False, PAIR),
    (128, False, {"key_value_seq_lengths": True}, False, PAIR),
    (128, False, {"dropout_rate": 0.1}, False, PAIR),
    (64, False, {}, False, PAIR),
    (256, False, {}, False, PAIR),  # (d=256 has no fused kernel.)
    # Repeatable gradients, asked for or through XLA's flag: the pair.
    (128, True, {}, False, PAIR),
    (128, None, {}, True, PAIR),
  ],
)
def test_deterministic_backward_picks_the_kernels(
  monkeypatch, head_dim, deterministic_backward, options, flag_on, expected
):
  """jfused.dot_product_attention's backward: the deterministic dK/dV and dQ pair, or the
  fused kernel (no dQ kernel) only where it is faster (bwd.fused_backward_is_faster) and
  repeatable gradients were not asked for (deterministic_backward=False, or None with XLA's
  --xla_gpu_deterministic_ops off)."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops" if flag_on else "")
  options = dict(options)
  lengths = options.pop("key_value_seq_lengths", False)
  if options.get("dropout_rate"):
    options["dropout_rng"] = jax.random.key(0)

  def loss(q, k, v):
    out = jfused.dot_product_attention(
      q,
      k,
      v,
      key_value_seq_lengths=jnp.array([200, 256], jnp.int32) if lengths else None,
      implementation="pallas_mosaic",
      deterministic_backward=deterministic_backward,
      **options,
    )
    return jnp.sin(out.astype(jnp.float32)).sum()

  with config.interpret_mode(False):
    text = export_for_h100(
      jax.grad(loss, argnums=(0, 1, 2)),
      _abstract(2, 256, 4, head_dim),
      _abstract(2, 256, 2, head_dim),
      _abstract(2, 256, 2, head_dim),
    )
  assert _kernel_counts(text) == expected


def test_overlapped_dkv_rejects_the_split_kernel():
  from pallas_kernels.attention.mosaic import bwd

  with pytest.raises(ValueError, match="dkv_split"):
    bwd.MosaicBackwardBlocks(dkv_split=True, dkv_overlap=True)


# (batch, t, s, heads, kv_heads) of the lowering checks that turn every feature on at once.
EVERY_FEATURE_SHAPE = (2, 200, 300, 4, 2)


def _every_feature_options(shape=EVERY_FEATURE_SHAPE):
  """GQA (by the shape), causality with a window, soft cap, dropout, sequence lengths and
  segment ids, as keyword arguments of the Mosaic forward and backward on inputs of `shape`
  (batch, t, s, heads, kv_heads): documents of 50 tokens, a batch of two rows."""
  batch, t, s, heads, _ = shape
  assert batch == 2 and s >= t
  segments = (jnp.arange(s, dtype=jnp.int32) // 50)[None].repeat(batch, axis=0)
  return dict(
    is_causal=True,
    window=(70, 0),
    soft_cap=20.0,
    dropout_rate=0.1,
    dropout_seeds=jnp.ones((batch, heads), jnp.uint32),
    lengths=mosaic.sequence_lengths_table(
      jnp.array([t * 3 // 4, t]), jnp.array([s - 50, s * 3 // 10]), t, s
    ),
    q_segments=segments[:, :t],
    kv_segments=segments,
  )


def _export_backward_with_every_feature(head_dim, blocks):
  """The backward kernels exported for CUDA under every feature at once."""
  from pallas_kernels.attention.mosaic import bwd

  batch, t, s, heads, kv_heads = EVERY_FEATURE_SHAPE

  def backward(q, k, v, out, lse, dout):
    return bwd.attention_backward(
      q, k, v, out, lse, dout, scale=0.1, blocks=blocks, **_every_feature_options()
    )

  with config.interpret_mode(False):
    text = export_for_h100(
      backward,
      _abstract(batch, t, heads, head_dim),
      _abstract(batch, s, kv_heads, head_dim),
      _abstract(batch, s, kv_heads, head_dim),
      _abstract(batch, t, heads, head_dim),
      _abstract(batch, heads, t, dtype=jnp.float32),
      _abstract(batch, t, heads, head_dim),
    )
  return text


def _overlapped_blocks(blocks):
  """Forward tiles with the softmax overlapped: 64 x 128 at most, as measured (a second
  probability tile beside a wider logit tile would not fit a consumer's registers)."""
  return dataclasses.replace(
    blocks, block_q=64, block_kv=min(blocks.block_kv, 128), overlap_softmax=True
  )


def _export_forward(head_dim, blocks, shape=EVERY_FEATURE_SHAPE, **options):
  """The forward kernel alone, exported for CUDA."""
  from pallas_kernels.attention.mosaic import fwd

  batch, t, s, heads, kv_heads = shape

  def forward(q, k, v):
    return fwd.attention_forward(q, k, v, scale=0.1, blocks=blocks, **options)

  with config.interpret_mode(False):
    return export_for_h100(
      forward,
      _abstract(batch, t, heads, head_dim),
      _abstract(batch, s, kv_heads, head_dim),
      _abstract(batch, s, kv_heads, head_dim),
    )


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("features", ["plain", "all"])
def test_overlapped_softmax_forward_lowers(head_dim, features):
  """The forward with block j's softmax overlapping block j - 1's P V product lowers alone
  and with GQA, causality and a window, soft cap, dropout, lengths and segment ids at once;
  its partial wgmma wait (S done, P V still in flight) is in the kernel."""
  from pallas_kernels.attention.mosaic import fwd

  options = _every_feature_options() if features == "all" else {}
  blocks = _overlapped_blocks(fwd.default_forward_blocks(head_dim))
  text = _export_forward(head_dim, blocks, **{"is_causal": False, **options})
  assert _kernel_counts(text) == {"forward": 1}
  assert _partial_wait_modules(text) == 1


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("features", ["plain", "all", "all_causal", "overlapped"])
def test_persistent_forward_lowers(head_dim, features):
  """The persistent forward (the default without causality, and under it where query heads
  share key heads; never under a window) lowers alone, with GQA, soft cap, dropout, lengths
  and segment ids at once (without and with causality), and with the softmax overlapped;
  with more tiles than SMs, so CTAs walk several."""
  from pallas_kernels.attention.mosaic import fwd

  blocks = dataclasses.replace(fwd.default_forward_blocks(head_dim), persistent=True)
  shape = (2, 1000, 1100, 48, 8)  # 2 x 48 x 8 = 768 query tiles on 132 CTAs.
  options = {"is_causal": False}
  if features.startswith("all"):
    options = {
      **_every_feature_options(shape),
      **options,
      "window": None,
      "is_causal": features == "all_causal",
    }
  if features == "overlapped":
    blocks = _overlapped_blocks(blocks)
  text = _export_forward(head_dim, blocks, shape=shape, **options)
  assert _kernel_counts(text) == {"forward": 1}


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_persistent_launch_defaults(head_dim):
  """As measured: persistent without causal masking; under it only where query heads share
  key heads (dealt longest first; with one key head per query head it lost 1-8 %)."""
  from pallas_kernels.attention.mosaic import fwd

  assert fwd.default_forward_blocks(head_dim).persistent
  assert fwd.default_forward_blocks(head_dim, causal=True, group=4).persistent
  assert not fwd.default_forward_blocks(head_dim, causal=True).persistent


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("option", ["mbarrier_releases", "late_row_sum"])
def test_forward_options_lower_with_every_feature(head_dim, option):
  """The forward with the options its defaults leave off somewhere (mbarrier releases,
  the late row sum), causal with every feature and persistent without causality; named
  releases are in the kernel exactly when asked for."""
  from pallas_kernels.attention.mosaic import fwd

  blocks = fwd.default_forward_blocks(head_dim)
  blocks = dataclasses.replace(
    blocks,
    **({"named_releases": False} if option == "mbarrier_releases" else {"late_row_sum": True}),
  )
  for options in (_every_feature_options(), {"is_causal": False}):
    text = _export_forward(head_dim, blocks, **options)
    assert _kernel_counts(text) == {"forward": 1}
    assert _named_release_modules(text) == int(blocks.named_releases)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("split", ["none", "dq_split", "dkv_split"])
def test_backward_with_named_releases_lowers_with_every_feature(head_dim, split):
  """Both backward kernels (and their split forms) with ring slots released on named
  barriers, the default only at d=256, lower with every feature at once."""
  from pallas_kernels.attention.mosaic import bwd

  extra = {
    "dq_split": {"dq_split": True},
    "dkv_split": {"dkv_split": True, "dkv_overlap": False},
    "none": {},
  }[split]
  blocks = dataclasses.replace(bwd.default_backward_blocks(head_dim), named_releases=True, **extra)
  text = _export_backward_with_every_feature(head_dim, blocks)
  assert _kernel_counts(text) == {"mosaic_dkv": 1, "mosaic_dq": 1}
  assert _named_release_modules(text) == 2


def test_named_releases_need_enough_named_barriers():
  with pytest.raises(ValueError, match="named barriers"):
    mosaic.slot_releases((None, None), 6, named=True)


def _persistent_walk(causal, batch, heads, q_tiles, ctas):
  """{(batch, head, query tile): (cta, turn)} over every CTA of a persistent launch."""
  from pallas_kernels.attention.mosaic import fwd

  dims = fwd._Dims(
    head_dim=64,
    kv_len=100,
    num_q_tiles=q_tiles,
    group=1,
    block_q=64,
    block_kv=64,
    num_stages=2,
    scale=1.0,
    causal=causal,
    persistent=True,
    batch=batch,
    num_heads=heads,
    num_ctas=ctas,
  )
  seen = {}
  for cta in range(ctas):
    count, tile_at = fwd.persistent_tiles(dims, jnp.int32(cta))
    for i in range(int(count)):
      tile = tuple(int(x) for x in tile_at(jnp.int32(i)))
      assert tile not in seen, f"tile {tile} visited twice"
      seen[tile] = (cta, i)
  return seen


def test_persistent_tiles_cover_every_tile_once_in_launch_order():
  """Without causal masking CTA c of a persistent launch walks tiles c, c + num_ctas, ... in
  the order query tiles fastest, then heads, then batch rows: each tile exactly once."""
  batch, heads, q_tiles, ctas = 3, 5, 7, 13
  seen = _persistent_walk(False, batch, heads, q_tiles, ctas)
  expected = {
    (b, h, t): divmod(t + q_tiles * (h + heads * b), ctas)[::-1]
    for b in range(batch)
    for h in range(heads)
    for t in range(q_tiles)
  }
  assert seen == expected


@pytest.mark.parametrize(
  "batch,heads,q_tiles,ctas", [(3, 5, 7, 13), (1, 16, 64, 132), (4, 16, 16, 132), (1, 2, 3, 6)]
)
def test_causal_persistent_tiles_balance_the_work(batch, heads, q_tiles, ctas):
  """Under causal masking every tile runs once, longest first (query tiles slowest, then
  batch rows, then heads) in rounds of `ctas` tiles dealt in alternating directions, and the
  work (keys seen, falling with the launch index) spreads evenly: at T=16384, d=128 on 132
  SMs the non-causal order's fixed stride gives its busiest CTA 1.59 times the mean work;
  the alternating deal 1.003."""
  seen = _persistent_walk(True, batch, heads, q_tiles, ctas)
  order = [(b, h, t) for t in range(q_tiles) for b in range(batch) for h in range(heads)]
  assert sorted(seen) == sorted(order)
  for flat, tile in enumerate(order):
    turn, place = divmod(flat, ctas)
    assert seen[tile] == (place if turn % 2 == 0 else ctas - 1 - place, turn)
  work = np.zeros(ctas)
  for (_, _, t), (cta, _) in seen.items():
    work[cta] += q_tiles - t  # Tile t of the launch order is the (q_tiles - t)-th longest.
  if batch * heads * q_tiles >= 4 * ctas:  # Enough rounds to even out.
    assert work.max() <= 1.05 * work.mean()


def test_segment_block_ranges_intersect_band_ranges():
  """The segment tables narrow the band ranges; blocks left unmasked are uniform ones."""
  segments = jnp.array([[0] * 64 + [1] * 64 + [1] * 64 + [2] * 64])  # Four 64-blocks.
  table = mosaic.segment_block_ranges(segments, segments, block_q=64, block_kv=64)
  np.testing.assert_array_equal(table[0], [[0, 0, 1, 1], [1, 1, 3, 3], [1, 1, 3, 3], [3, 3, 4, 4]])
  # Causal band of query block 2: blocks [0, 3), block 2 on the diagonal needs the mask.
  ranges = mosaic.intersect_ranges((0, 0, 2, 3), tuple(table[0, 2]))
  assert [int(r) for r in ranges] == [1, 1, 2, 3]
  # Disjoint: nothing to visit.
  ranges = mosaic.intersect_ranges((0, 0, 1, 1), tuple(table[0, 3]))
  assert int(ranges[0]) == int(ranges[3])


def test_range_helpers_for_lengths_keep_ranges_inside_the_cta_stream():
  ranges = (2, 3, 5, 7)
  # A warpgroup past the query length visits nothing, at the CTA's first block.
  assert [int(r) for r in mosaic.emptied(ranges, jnp.bool_(False), 1)] == [1, 1, 1, 1]
  assert [int(r) for r in mosaic.emptied(ranges, jnp.bool_(True), 1)] == [2, 3, 5, 7]
  # A key tile cut by the key length masks every block it visits.
  assert [int(r) for r in mosaic.all_masked(ranges, jnp.bool_(True))] == [2, 7, 7, 7]
  assert [int(r) for r in mosaic.all_masked(ranges, jnp.bool_(False))] == [2, 3, 5, 7]
  # An empty range left before the CTA's stream is moved into it.
  assert [int(r) for r in mosaic.within((0, 0, 0, 0), 4, 9)] == [4, 4, 4, 4]
  assert [int(r) for r in mosaic.within(ranges, 0, 6)] == [2, 3, 5, 6]


def _traced_loops(bounds):
  """(sum of masked indices, sum of unmasked ones, the `masked` flags the body was traced
  with) of common.masked_loops over `bounds`."""
  from pallas_kernels.attention import common

  traced = []

  def body(i, carry, masked):
    traced.append(masked)
    return (carry[0] + i, carry[1]) if masked else (carry[0], carry[1] + i)

  sums = common.masked_loops(bounds, body, (jnp.int32(0), jnp.int32(0)))
  return int(sums[0]), int(sums[1]), traced


def test_masked_loops_leave_out_ranges_ruled_out():
  two, three, five, seven = (jnp.int32(n) for n in (2, 3, 5, 7))
  # Distinct bounds: all three loops, even where a range happens to be empty at run time.
  assert _traced_loops((two, three, five, seven)) == (2 + 5 + 6, 3 + 4, [True, False, True])
  assert _traced_loops((two, jnp.int32(2), five, jnp.int32(5))) == (
    0,
    2 + 3 + 4,
    [True, False, True],
  )
  # One value on both sides of a masked range: that loop is not traced at all.
  assert _traced_loops((two, two, five, seven)) == (5 + 6, 2 + 3 + 4, [False, True])
  assert _traced_loops((two, three, seven, seven)) == (2, 3 + 4 + 5 + 6, [True, False])
  assert _traced_loops((0, 0, 4, 4)) == (0, 0 + 1 + 2 + 3, [False])


def test_causal_kernels_leave_out_the_masked_loop_causality_rules_out(monkeypatch):
  """Exported for an H100, the causal forward and backward carry two masked loops a kernel
  instead of three: without the shared bounds the module is over a tenth larger (13 % here,
  28 % at B4 T4096 16x128)."""
  from pallas_kernels.attention import common

  lean = _export_grads(512, 512, 4, 2, 128, jnp.bfloat16, is_causal=True)
  monkeypatch.setattr(common, "same_bound", lambda a, b: False)
  jax.clear_caches()  # The launchers are lowered once per configuration: lower them again.
  full = _export_grads(512, 512, 4, 2, 128, jnp.bfloat16, is_causal=True)
  monkeypatch.undo()
  jax.clear_caches()  # Later tests get the lean launchers again.
  assert _kernel_counts(lean) == _kernel_counts(full) == _expected()
  assert len(full) > 1.1 * len(lean)


def test_range_helpers_keep_bounds_that_are_one_value():
  """within and pipelined_loops keep the bounds block_range returns as one value as one, so
  that the masked loops those rule out stay out of the kernels."""
  start, end = jnp.int32(2), jnp.int32(6)
  clamped = mosaic.within((start, start, end, end), 3, 9)
  assert clamped[1] is clamped[0] and clamped[3] is clamped[2]
  assert [int(b) for b in clamped] == [3, 3, 6, 6]
  traced = []

  def step(i, carry, masked):
    traced.append(masked)
    return carry + 10 * i

  total = mosaic.pipelined_loops(
    (start, start, end, end), lambda i, c: c + 1000 * i, step, lambda i, c: c + 100000 * i, 0
  )
  assert traced == [False]  # Blocks 3, 4 and 5 after the first, none masked.
  assert int(total) == 1000 * 2 + 10 * (3 + 4 + 5) + 100000 * 5


def test_sequence_lengths_table_clips_and_fills():
  table = mosaic.sequence_lengths_table(jnp.array([5, -2, 40]), None, 30, 20)
  np.testing.assert_array_equal(table, [[5, 20], [0, 20], [30, 20]])
  table = mosaic.sequence_lengths_table(None, jnp.array([0, 25, 7]), 30, 20)
  np.testing.assert_array_equal(table, [[30, 0], [30, 20], [30, 7]])
  assert mosaic.sequence_lengths_table(None, None, 30, 20) is None


def test_block_ranges_match_brute_force():
  """block_range (the Mosaic kernels' loop bounds) against every (position, block) pair."""
  rng = np.random.default_rng(0)
  bands = [(None, None), (None, 0), (0, None), (-40, 0), (-3, 70), (0, 0), (-200, 5)]
  for _ in range(300):
    block = int(rng.choice([16, 64, 128]))
    num_blocks = int(rng.integers(1, 9))
    whole = int(rng.integers(0, num_blocks + 1))
    first = int(rng.integers(0, num_blocks * block + 64))
    last = first + int(rng.integers(0, 130))
    low, high = bands[rng.integers(len(bands))]
    bounds = mosaic.block_range(
      jnp.int32(first),
      jnp.int32(last),
      (low, high),
      block=block,
      num_blocks=num_blocks,
      whole_blocks=whole,
    )
    got = [int(x) for x in bounds]
    a = np.arange(first, last + 1)[:, None]
    seen_any, seen_all = [], []
    for j in range(num_blocks):
      offset = np.arange(j * block, (j + 1) * block)[None, :] - a
      ok = np.ones_like(offset, bool)
      if low is not None:
        ok &= offset >= low
      if high is not None:
        ok &= offset <= high
      seen_any.append(ok.any())
      seen_all.append(ok.all() and j < whole)
    # Where no block can need the mask before (after) the full ones, the bounds are one
    # value, which common.masked_loops leaves out of the program.
    assert (bounds[1] is bounds[0]) == (low is None)
    assert (bounds[2] is bounds[3]) == (high is None and whole == num_blocks)
    start, full_start, full_end, end = got
    assert start <= full_start <= full_end <= end, got
    assert [start <= j < end for j in range(num_blocks)] == seen_any, (got, seen_any)
    assert [full_start <= j < full_end for j in range(num_blocks)] == seen_all, (got, seen_all)


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "checkpoint"])
def test_backward_does_not_rerun_forward_kernel(remat):
  value_and_grads = cases.causal_value_and_grads("pallas_mosaic", remat=remat)
  with config.interpret_mode(False):
    text = export_for_h100(
      value_and_grads,
      _abstract(2, 256, 4, 128),
      _abstract(2, 256, 4, 128),
      _abstract(2, 256, 4, 128),
    )
  assert _kernel_counts(text) == _expected(forwards=2 if remat else 1)


UNSERVED = {
  "bias": {"bias": True},
  "mask": {"mask": True},
}


def _unserved_call(name, q, implementation):
  kwargs = dict(UNSERVED[name])
  b, t, n = q.shape[:3]
  if kwargs.pop("bias", False):
    kwargs["bias"] = jax.random.normal(jax.random.key(1), (b, n, t, t), q.dtype)
  if kwargs.pop("mask", False):
    kwargs["mask"] = jax.random.bernoulli(jax.random.key(2), 0.8, (b, n, t, t))
  return jfused.dot_product_attention(q, q, q, implementation=implementation, **kwargs)


@pytest.mark.parametrize("name", list(UNSERVED))
def test_unserved_features_raise_not_implemented(name):
  q = jax.random.normal(jax.random.key(0), (1, 16, 2, 64), jnp.bfloat16)
  with config.interpret_mode(False), pytest.raises(NotImplementedError, match=name):
    _unserved_call(name, q, "pallas_mosaic")


@pytest.mark.parametrize(
  "dtype, head_dim", [(jnp.float32, 64), (jnp.bfloat16, 96), (jnp.bfloat16, 32)]
)
def test_unserved_dtypes_and_head_dims_raise_not_implemented(dtype, head_dim):
  q = jax.random.normal(jax.random.key(0), (1, 16, 2, head_dim), dtype)
  with config.interpret_mode(False), pytest.raises(NotImplementedError, match="pallas_mosaic"):
    jfused.dot_product_attention(q, q, q, implementation="pallas_mosaic")


def test_unserved_call_falls_back_to_triton():
  """Boolean masks are not served: ("pallas_mosaic", "pallas_triton") runs Triton."""
  q = jax.random.normal(jax.random.key(0), (1, 16, 2, 64), jnp.float32)
  with jax.default_matmul_precision("highest"):
    out = _unserved_call("mask", q, ("pallas_mosaic", "pallas_triton"))
    mask = jax.random.bernoulli(jax.random.key(2), 0.8, (1, 2, 16, 16))
    expected = jax.nn.dot_product_attention(q, q, q, mask=mask, implementation="xla")
  assert float(jnp.max(jnp.abs(out - expected))) < 1e-5


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU behaviour")
def test_interpret_mode_is_not_served():
  q = jax.random.normal(jax.random.key(0), (1, 128, 2, 64), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="interpreter"):
    jfused.dot_product_attention(q, q, q, implementation="pallas_mosaic")


GPU_CASES = [
  Case("T1_S1_d64", t=1, s=1, heads=1, kv_heads=1, head_dim=64),
  Case(
    "T100_S130_causal_gqa_d64",
    t=100,
    s=130,
    heads=4,
    kv_heads=2,
    head_dim=64,
    options=(("is_causal", True),),
  ),
  Case(
    "T130_S100_causal_d128",
    t=130,
    s=100,
    heads=2,
    kv_heads=2,
    head_dim=128,
    options=(("is_causal", True),),
  ),
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
    "T777_S300_mqa_d128_scale",
    t=777,
    s=300,
    heads=4,
    kv_heads=1,
    head_dim=128,
    options=(("scale", 0.3),),
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
  Case("T300_S700_d256", t=300, s=700, heads=2, kv_heads=1, head_dim=256),
  Case(
    "T2048_d64_causal",
    batch=(1,),
    t=2048,
    s=2048,
    heads=2,
    kv_heads=2,
    head_dim=64,
    options=(("is_causal", True),),
  ),
  # A cap of 1.5 saturates the tanh for a good share of the logits.
  Case(
    "T300_S400_causal_gqa_d128_softcap",
    t=300,
    s=400,
    heads=4,
    kv_heads=2,
    head_dim=128,
    options=(("is_causal", True), ("logits_soft_cap", 1.5)),
  ),
  Case(
    "T200_S130_d64_softcap_scale",
    t=200,
    s=130,
    heads=2,
    kv_heads=1,
    head_dim=64,
    options=(("logits_soft_cap", 1.5), ("scale", 0.5)),
  ),
  Case(
    "T256_d256_causal_softcap",
    t=256,
    s=256,
    heads=2,
    kv_heads=2,
    head_dim=256,
    options=(("is_causal", True), ("logits_soft_cap", 1.5)),
  ),
  # Windows: bands that cut blocks on both sides, skip whole blocks on both sides, leave
  # rows with no key (T > S + left), and combine with causality, GQA and dropout.
  Case(
    "T700_S600_window_gqa_d128",
    t=700,
    s=600,
    heads=4,
    kv_heads=2,
    head_dim=128,
    options=(("local_window_size", (150, 90)),),
  ),
  Case(
    "T1000_causal_window_d64",
    t=1000,
    s=1000,
    heads=2,
    kv_heads=1,
    head_dim=64,
    options=(("is_causal", True), ("local_window_size", (200, 0))),
  ),
  Case(
    "T600_S200_window_empty_rows_d128",
    t=600,
    s=200,
    heads=2,
    kv_heads=2,
    head_dim=128,
    options=(("local_window_size", (100, 30)),),
  ),
  Case(
    "T513_diagonal_window_d128",
    t=513,
    s=513,
    heads=2,
    kv_heads=2,
    head_dim=128,
    options=(("local_window_size", (0, 0)),),
  ),
  Case(
    "T400_window_softcap_d256",
    t=400,
    s=400,
    heads=2,
    kv_heads=2,
    head_dim=256,
    options=(("local_window_size", (70, 70)), ("logits_soft_cap", 1.5)),
  ),
  # Sequence lengths (one batch row of kv_lengths is 0: every row empty), alone and with
  # causality, windows and GQA.
  Case(
    "T300_S400_lengths_causal_gqa_d128",
    batch=(3,),
    t=300,
    s=400,
    heads=4,
    kv_heads=2,
    head_dim=128,
    q_lengths=True,
    kv_lengths=True,
    options=(("is_causal", True),),
  ),
  Case(
    "T1000_S1100_kv_lengths_d64",
    batch=(3,),
    t=1000,
    s=1100,
    heads=2,
    kv_heads=1,
    head_dim=64,
    kv_lengths=True,
  ),
  Case(
    "T700_q_lengths_window_d128",
    t=700,
    s=700,
    heads=2,
    kv_heads=2,
    head_dim=128,
    q_lengths=True,
    options=(("local_window_size", (100, 60)),),
  ),
  Case(
    "T200_S300_lengths_d256",
    batch=(3,),
    t=200,
    s=300,
    heads=2,
    kv_heads=2,
    head_dim=256,
    q_lengths=True,
    kv_lengths=True,
  ),
  # Segment ids: sorted (packed documents: whole blocks skipped or left unmasked) and
  # scattered (every block masked), with causality, GQA, windows and lengths.
  Case(
    "T1000_packed_causal_gqa_d128",
    t=1000,
    s=1000,
    heads=4,
    kv_heads=2,
    head_dim=128,
    segments="packed",
    options=(("is_causal", True),),
  ),
  Case(
    "T300_S500_scattered_d64", t=300, s=500, heads=2, kv_heads=1, head_dim=64, segments="scattered"
  ),
  Case(
    "T600_packed_lengths_window_d128",
    batch=(3,),
    t=600,
    s=600,
    heads=2,
    kv_heads=2,
    head_dim=128,
    segments="packed",
    kv_lengths=True,
    options=(("local_window_size", (90, 40)),),
  ),
  Case("T400_packed_d256", t=400, s=400, heads=2, kv_heads=2, head_dim=256, segments="packed"),
  # The persistent launch (the default without causality or a window) with more tiles
  # than SMs (each CTA walks two or more), with lengths that leave a CTA's tiles, or one
  # consumer's rows, empty, with a soft cap and with packed segments.
  Case("T4096_S3000_gqa_d64_persistent", t=4096, s=3000, heads=8, kv_heads=2, head_dim=64),
  Case(
    "T2048_lengths_d64_persistent",
    batch=(3,),
    t=2048,
    s=2048,
    heads=16,
    kv_heads=4,
    head_dim=64,
    q_lengths=True,
    kv_lengths=True,
  ),
  Case(
    "T2000_S1500_gqa_softcap_d128_persistent",
    t=2000,
    s=1500,
    heads=8,
    kv_heads=2,
    head_dim=128,
    options=(("logits_soft_cap", 20.0),),
  ),
  Case(
    "T2048_packed_lengths_d256_persistent",
    t=2048,
    s=2048,
    heads=8,
    kv_heads=8,
    head_dim=256,
    q_lengths=True,
    kv_lengths=True,
    segments="packed",
  ),
  # Causal with query heads sharing key heads (persistent there), rounds dealt in
  # alternating directions (persistent_tiles): two to four rounds, the last one partial.
  Case(
    "T4000_lengths_causal_gqa_d128_persistent",
    batch=(2,),
    t=4000,
    s=4000,
    heads=8,
    kv_heads=2,
    head_dim=128,
    q_lengths=True,
    kv_lengths=True,
    options=(("is_causal", True),),
  ),
  Case(
    "T3000_packed_causal_gqa_d64_persistent",
    batch=(2,),
    t=3000,
    s=3000,
    heads=6,
    kv_heads=3,
    head_dim=64,
    segments="packed",
    options=(("is_causal", True),),
  ),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=lambda d: d.__name__)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_reference(case, dtype):
  # The deterministic pair on every case (None may take the fused kernel: tested below).
  cases.check_against_reference(
    case, dtype, implementation="pallas_mosaic", deterministic_backward=True
  )


# Each feature once, at each head dim: a native run of every case costs minutes of device
# time per case, and these options are not yet the default.
OVERLAP_GPU_CASES = [
  {case.name: case for case in GPU_CASES}[name]
  for name in (
    "T1_S1_d64",
    "T1024_d128",
    "T1000_S1100_causal_gqa_d128",
    "T2048_d64_causal",
    "T512_d256_causal",
    "T300_S400_causal_gqa_d128_softcap",
    "T700_S600_window_gqa_d128",
    "T600_S200_window_empty_rows_d128",
    "T300_S400_lengths_causal_gqa_d128",
    "T1000_packed_causal_gqa_d128",
  )
]


@pytest.fixture
def overlapped_products(monkeypatch):
  """Both overlapped options as the defaults: the forward's softmax on its products
  (MosaicForwardBlocks.overlap_softmax) and the dQ kernel's dS on its dS K product
  (MosaicBackwardBlocks.dq_overlap). A wrong output or logsumexp points at the forward; a
  wrong dq with the rest right, at the dQ kernel."""
  from pallas_kernels.attention.mosaic import bwd, fwd

  forward_default, backward_default = fwd.default_forward_blocks, bwd.default_backward_blocks
  monkeypatch.setattr(
    fwd, "default_forward_blocks", lambda *args: _overlapped_blocks(forward_default(*args))
  )
  monkeypatch.setattr(
    bwd, "default_backward_blocks", lambda d: _overlapped_dq_blocks(backward_default(d))
  )


@pytest.mark.gpu
@pytest.mark.parametrize("case", OVERLAP_GPU_CASES, ids=str)
def test_gpu_overlapped_products_match_reference(case, overlapped_products):
  cases.check_against_reference(
    case, jnp.bfloat16, implementation="pallas_mosaic", deterministic_backward=True
  )


@pytest.mark.gpu
def test_gpu_overlapped_products_with_dropout(overlapped_products):
  from tests.attention import test_dropout as dropout_tests

  dropout_tests.check_case(
    cases.DROPOUT_GPU_CASE, jnp.bfloat16, 0.1, implementation="pallas_mosaic"
  )


# The fused backward at each head dim it serves, with each feature once.
FUSED_GPU_CASES = OVERLAP_GPU_CASES[:4] + OVERLAP_GPU_CASES[5:]


@pytest.mark.gpu
@pytest.mark.parametrize("case", FUSED_GPU_CASES, ids=str)
def test_gpu_fused_backward_matches_reference(case, fused_everywhere):
  cases.check_against_reference(
    case, jnp.bfloat16, implementation="pallas_mosaic", deterministic_backward=False
  )


@pytest.fixture
def whole_dq(monkeypatch):
  """The fused backward at d=128 with each consumer adding all of dQ's columns for its keys
  (MosaicBackwardBlocks.fused_split_dq off; the default divides them)."""
  from pallas_kernels.attention.mosaic import bwd

  fused_blocks = bwd.fused_backward_blocks

  def with_whole_dq(head_dim):
    blocks = fused_blocks(head_dim)
    return blocks if blocks is None else dataclasses.replace(blocks, fused_split_dq=False)

  monkeypatch.setattr(bwd, "fused_backward_blocks", with_whole_dq)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in FUSED_GPU_CASES if c.head_dim == 128], ids=str)
def test_gpu_fused_whole_dq_matches_reference(case, whole_dq, fused_everywhere):
  cases.check_against_reference(
    case, jnp.bfloat16, implementation="pallas_mosaic", deterministic_backward=False
  )


@pytest.mark.gpu
def test_gpu_fused_backward_with_dropout(fused_everywhere):
  from tests.attention import test_dropout as dropout_tests

  dropout_tests.check_case(
    cases.DROPOUT_GPU_CASE,
    jnp.bfloat16,
    0.1,
    implementation="pallas_mosaic",
    deterministic_backward=False,
  )


@pytest.mark.gpu
def test_gpu_deterministic_bitwise():
  case = Case(
    "gqa_causal", t=2048, s=2048, heads=8, kv_heads=2, head_dim=128, options=(("is_causal", True),)
  )
  cases.assert_deterministic(case, jnp.bfloat16, implementation="pallas_mosaic")


def test_dropout_tables_compose_the_public_mask():
  """The Mosaic kernels read per-position hash states from tables; combined as the kernels
  combine them, they must give jfused.attention_dropout_mask's mask."""
  from pallas_kernels.attention import dropout as attention_dropout
  from pallas_kernels.attention.mosaic import common as mosaic

  rate, batch, heads, t, s = 0.3, 2, 3, 40, 56
  seeds = attention_dropout.head_seeds(jax.random.key(5), batch, heads)
  rows = mosaic.dropout_row_table(seeds, t)  # [B, N, T]
  columns = mosaic.dropout_column_table(s)  # [S]
  keep = attention_dropout.keep_from_parts(
    rows[..., None], columns[None, None, None, :], attention_dropout.keep_threshold(rate)
  )
  expected = jfused.attention_dropout_mask(
    jax.random.key(5), rate, batch_shape=(batch,), num_heads=heads, q_length=t, kv_length=s
  )
  assert keep.shape == expected.shape == (batch, heads, t, s)
  assert bool((keep == expected).all())
  assert 0.6 < float(keep.mean()) < 0.8
