"""FlashAttention forward kernel in Pallas Mosaic GPU, for Hopper (sm90): TMA, wgmma, warpgroups.

One CUDA block (a "CTA") owns 2 * block_q queries of one (batch, head) (under the persistent
launch, one such query tile after another) and runs three warpgroups (FlashAttention-3,
section 3.1):

- a producer warpgroup that only issues TMA copies of key and value blocks into a ring of
  `num_stages` shared-memory slots, waiting for a slot to be released before refilling it;
- two consumer warpgroups, each owning block_q of the queries, that walk the same key blocks:
  S = Q K^T (wgmma), an online softmax in float32 registers, O += P V (wgmma).

The consumers take turns on the tensor cores (FlashAttention-3's "ping-pong" schedule): two
hardware named barriers make one warpgroup's softmax overlap the other's matrix products. Logits
are kept in base 2 (scale * log2(e) is folded into one multiply) so the softmax is exp2 (one
instruction), and the 1 / rowsum normalisation is deferred to the end (FlashAttention-2,
section 3.1.1).

Masking: causality and a local window (the band rules of attention_mask), per-row sequence
lengths, segment ids and the key padding the kernel adds itself; each consumer walks only the
key blocks its band, lengths and segments reach and masks elements only in blocks they cut.
A logit soft cap and dropout are served too. Bias and boolean masks are declined by the
caller (jfused/attention/mosaic.py), so dispatch falls back to the Triton kernel for them.

The kernel body's steps (the key-block step, the online softmax, the epilogue, the producer's
stream) are in fwd_steps.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels.attention import common
from pallas_kernels.attention.mosaic import common as mosaic
from pallas_kernels.attention.mosaic import fwd_steps as steps
from pallas_kernels.attention.mosaic.common import NUM_CONSUMERS
from pallas_kernels.launcher import launcher

KERNEL_NAME = "jfused_attention_mosaic_fwd"
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The persistent launch stores a tile's output OUTPUT_COLUMNS head-dim columns (one swizzled
# tile wide) at a time through OUTPUT_SLOTS shared-memory slots per consumer: 32 KB in all,
# which d=256 has room for beside Q and two stages of keys and values.
OUTPUT_COLUMNS = 64
OUTPUT_SLOTS = 2


@dataclasses.dataclass(frozen=True)
class MosaicForwardBlocks:
  """Tile sizes: block_q query rows per consumer warpgroup (a multiple of 64, wgmma's M),
  block_kv keys per step, num_stages key/value blocks in flight."""

  block_q: int = 64
  block_kv: int = 128
  num_stages: int = 2
  # Issue the next block's S = Q K^T with this block's O += P V and run the softmax while
  # the latter is in flight (FlashAttention-3, section 3.2); holds one more tile of
  # probabilities in registers. Correct but slower on every benchmark row on an H200 (-1 %
  # non-causal, -27 % causal, where ptxas serialises its wgmmas: docs/attention_mosaic.md), hence
  # off.
  overlap_softmax: bool = False
  # Launch one CTA per SM, each walking query tiles in turn, so the producer streams the
  # next tile's keys, and the next queries load, while a tile's output is written (through
  # OUTPUT_SLOTS slots of its own). Not under a local window. Under causal masking tiles
  # cost unequal amounts and are dealt out longest first (persistent_tiles); the default
  # there only where query heads share key heads (default_forward_blocks says why).
  persistent: bool = False
  # Consumers release key and value slots on hardware named barriers instead of mbarriers
  # (mosaic.SlotRelease): 0-2 % faster on an H200 except at causal d=64.
  named_releases: bool = True
  # The row sum of a block's probabilities is taken while its O += P V product runs
  # instead of before it is issued: 1 % faster at d=256, 1 % slower at d=128.
  late_row_sum: bool = False


def default_forward_blocks(
  head_dim: int, causal: bool = False, group: int = 1
) -> MosaicForwardBlocks:
  """The measured best blocks for a head dim, causal masking or not, and `group` query heads
  per key head."""
  # Measured on H100 and H200 (bf16; benchmarks/results/attention_mosaic_fwd_schedule_h100_
  # 2026-11-25.log, attention_mosaic_fwd_persistent_h200_2026-12-01.log,
  # attention_mosaic_fwd_releases_h200_2026-12-01.log). Shared memory (227 KB per CTA)
  # bounds the tiles: Q for both consumers, num_stages key and value blocks and, persistent,
  # the output's slots. d=128: 64 x 128 tiles with two stages lead ((128, 64) lost 16-21 %,
  # 192-key blocks 1 % and spill under causal masking; a third stage fits only without the
  # persistent launch and lost up to 12 %). d=256 halves the key block to keep two stages.
  # d=64: 64 x 256 tiles won 9 % over 128 x 128 (443 against 407 TFLOP/s on the H200): a
  # step's fixed cost (barriers, row reductions, the turns) is spread over more work.
  # Causal (not persistent), 64 x 128 tiles lead: 331 TFLOP/s against 314 for 64 x 256,
  # whose diagonal blocks mask more, and 275 for 128 x 128
  # (attention_mosaic_fwd_d64_causal_tiles_h200_2026-12-01.log); named releases lost 1 %
  # there. Without causal masking the persistent launch, since its query tiles lead the
  # order and its turns restart at every tile, took d=128 from 576 to 588-595 TFLOP/s
  # (tokamax: 586-595 in the same runs), d=256 from 576 to 583 with the late row sum, and
  # d=64 from 442 to 451. Causal, with the tiles dealt longest first, the persistent launch
  # won where query heads share key heads (h32kv8 and h16kv4, T=1024-16384: +2 to +14 % at
  # d=128, +7 % at d=64, +3 % at d=256) and lost where they do not (B4 T4096: -7 % at d=128,
  # -8 % at d=64, -5 % at d=256; B1 T16384 d=128: -1 %)
  # (attention_mosaic_fwd_causal_persistent_h200_2026-12-02.log).
  persistent = not causal or group > 1
  if head_dim > 128:
    return MosaicForwardBlocks(
      block_q=64, block_kv=64, num_stages=2, persistent=persistent, late_row_sum=True
    )
  if head_dim <= 64:
    if causal:
      return MosaicForwardBlocks(
        block_q=64, block_kv=128, num_stages=2, persistent=persistent, named_releases=False
      )
    return MosaicForwardBlocks(block_q=64, block_kv=256, num_stages=2, persistent=True)
  return MosaicForwardBlocks(block_q=64, block_kv=128, num_stages=2, persistent=persistent)


def check_supported(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
  """Raises NotImplementedError for calls this kernel does not serve."""
  if q.dtype not in SUPPORTED_DTYPES:
    raise NotImplementedError(f"pallas_mosaic serves bfloat16 and float16, got {q.dtype}")
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS or v.shape[-1] != q.shape[-1]:
    raise NotImplementedError(
      f"pallas_mosaic serves head dims {SUPPORTED_HEAD_DIMS} with equal value head dim, got "
      f"{q.shape[-1]} (query/key) and {v.shape[-1]} (value)"
    )


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Static sizes the kernel body needs."""

  head_dim: int
  kv_len: int  # Real (unpadded) number of keys.
  num_q_tiles: int  # CTAs along the queries; each owns NUM_CONSUMERS * block_q rows.
  group: int  # Query heads per key/value head.
  block_q: int
  block_kv: int
  num_stages: int
  scale: float
  causal: bool
  dropout_rate: float = 0.0
  soft_cap: float | None = None
  window: tuple[int, int] | None = None  # Inclusive (left, right), as attention_mask.
  # Rows may have no visible key (a window, sequence lengths, segments): they need the
  # guards below.
  empty_rows: bool = False
  # A warpgroup's key range may start after the CTA's (a window, segments): it then
  # releases the blocks before its own.
  late_starts: bool = False
  overlap_softmax: bool = False  # MosaicForwardBlocks.overlap_softmax.
  # Persistent launch (MosaicForwardBlocks.persistent, where the call allows it): num_ctas
  # CTAs walk the batch * num_heads * num_q_tiles query tiles in persistent_tiles' order.
  persistent: bool = False
  batch: int = 1
  num_heads: int = 1
  num_ctas: int = 1
  named_releases: bool = False  # MosaicForwardBlocks.named_releases.
  late_row_sum: bool = False  # MosaicForwardBlocks.late_row_sum.


class _Tile(NamedTuple):
  """One query tile: the work of a CTA (or of one turn of a persistent CTA's loop)."""

  batch: jax.Array
  head: jax.Array
  index: jax.Array  # Along the queries, in launch order (see `_tile_queries`).


def _tiles(dims: _Dims):
  """(count, tile_at): how many query tiles this CTA runs, and the i-th of them."""
  if not dims.persistent:
    tile = _Tile(lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles"))
    return 1, lambda i: tile
  return persistent_tiles(dims, lax.axis_index("ctas"))


def persistent_tiles(dims: _Dims, cta):
  """_tiles of CTA `cta` under the persistent launch, which deals the tiles out in rounds of
  num_ctas.

  Without causal masking the tiles go query tiles fastest, then heads, then batch rows: the
  CTAs in flight together walk few heads' keys (unlike the non-persistent grid, which leads
  with the heads), and CTA c runs tiles c, c + num_ctas, .... Under causal masking a tile's
  work falls with its index (`query_tile_start` starts the longest first), and a fixed
  stride would hand the same CTAs the heavy end of every round: there the tiles go longest
  first (query tiles slowest, then batch rows, then heads) and the rounds are dealt in
  alternating directions, so a CTA that drew a round's heaviest tile draws the next round's
  lightest; the busiest CTA then has within a few percent of the mean's work."""
  total = dims.batch * dims.num_heads * dims.num_q_tiles
  if not dims.causal:

    def tile_at(i):
      flat = cta + i * dims.num_ctas
      rest = lax.div(flat, dims.num_q_tiles)
      return _Tile(
        lax.div(rest, dims.num_heads),
        lax.rem(rest, dims.num_heads),
        lax.rem(flat, dims.num_q_tiles),
      )

    return lax.div(total - cta + dims.num_ctas - 1, dims.num_ctas), tile_at

  def place(i):  # CTA cta's place in round i.
    return jnp.where(lax.rem(i, 2) == 0, cta, dims.num_ctas - 1 - cta)

  full_rounds, last_round = divmod(total, dims.num_ctas)
  count = full_rounds + (place(full_rounds) < last_round).astype(jnp.int32)

  def causal_tile_at(i):
    flat = i * dims.num_ctas + place(i)
    rest = lax.div(flat, dims.num_heads)
    return _Tile(
      lax.rem(rest, dims.batch), lax.rem(flat, dims.num_heads), lax.div(rest, dims.batch)
    )

  return count, causal_tile_at


def _tile_queries(dims: _Dims, tile: _Tile):
  """The first query of a tile (2 * block_q rows)."""
  return mosaic.query_tile_start(
    tile.index, dims.num_q_tiles, NUM_CONSUMERS * dims.block_q, dims.causal
  )


def _tile_stream(dims: _Dims, tile: _Tile, lengths_ref, cta_segment_table_ref):
  """A tile's first query, (query length, key length) and the key blocks [begin, end) its CTA
  streams."""
  cta_q_start = _tile_queries(dims, tile)
  lengths = mosaic.sequence_lengths(lengths_ref, tile.batch, dims)
  return (
    cta_q_start,
    lengths,
    mosaic.cta_key_range(dims, cta_q_start, lengths, cta_segment_table_ref, tile.batch),
  )


def _for_each_tile(dims: _Dims, count, run_tile) -> None:
  """run_tile(i, stream) -> stream over a CTA's `count` tiles. `stream` counts the key blocks
  streamed before tile i: ring slots are taken in turn over all of them."""
  if dims.persistent:
    lax.fori_loop(0, count, run_tile, jnp.int32(0))
  else:
    run_tile(0, 0)


def _forward_kernel(
  lengths_ref,
  q_ref,
  k_ref,
  v_ref,
  seeds_ref,
  columns_ref,
  q_segments_ref,
  kv_segments_ref,
  segment_table_ref,
  cta_segment_table_ref,
  out_ref,
  lse_ref,
  q_smem2,
  o_smem2,
  k_smem,
  v_smem,
  columns_smem,
  lse_smem2,
  q_loaded,
  k_loaded,
  v_loaded,
  columns_loaded,
  k_consumed,
  v_consumed,
  *,
  dims: _Dims,
):
  """One CTA: per query tile, each consumer walks its key blocks (steps.walk_key_blocks) and
  writes its rows (steps.normalise, steps.write_tile) while the producer streams the blocks
  (steps.stream_key_blocks)."""
  block_q = dims.block_q
  count, tile_at = _tiles(dims)
  warpgroup = lax.axis_index("wg")
  k_release, v_release = mosaic.slot_releases(
    (k_consumed, v_consumed), dims.num_stages, dims.named_releases
  )
  dropout = columns_ref is not None
  ring = steps.KeyRing(
    k_smem,
    v_smem,
    columns_smem if dropout else None,
    k_loaded,
    v_loaded,
    columns_loaded if dropout else None,
    k_release,
    v_release,
  )
  tile_stream = functools.partial(
    _tile_stream, dims, lengths_ref=lengths_ref, cta_segment_table_ref=cta_segment_table_ref
  )

  @pl.when(warpgroup < NUM_CONSUMERS)
  def _consumer():
    plgpu.set_max_registers(mosaic.CONSUMER_REGISTERS, action="increase")
    q_smem, lse_smem = q_smem2.at[warpgroup], lse_smem2.at[warpgroup]
    # Without a persistent launch the output reuses Q's buffer (every byte counts at d=256);
    # with it, the output leaves through slots of its own (steps.store_output).
    o_smem = o_smem2.at[warpgroup] if dims.persistent else q_smem

    def load_queries(tile):
      rows = pl.ds(_tile_queries(dims, tile) + warpgroup * block_q, block_q)
      plgpu.copy_gmem_to_smem(q_ref.at[tile.batch, rows, tile.head], q_smem, q_loaded.at[warpgroup])

    load_queries(tile_at(0))
    # Turns (FlashAttention-3's ping-pong): a consumer passes the turn once its S = Q K^T is
    # issued and awaits it before its O += P V (with the softmax overlapped: before the pair
    # of products, passing once both are issued), so one consumer's softmax runs while the
    # other's products use the tensor cores. Consumer 1 waits for consumer 0's first product
    # of every tile; consumer 0 passes it its last turn of the tile at the end.

    def run_tile(i, stream):
      pl.when(warpgroup == 1)(mosaic.await_turn)
      tile = tile_at(i)
      batch, head = tile.batch, tile.head
      cta_q_start, lengths, cta_blocks = tile_stream(tile)
      q_len, kv_len = lengths
      q_start = cta_q_start + warpgroup * block_q
      blocks = mosaic.warpgroup_key_range(
        dims, q_start, lengths, segment_table_ref, batch, cta_blocks
      )
      segments = None
      if q_segments_ref is not None:
        segments = mosaic.segment_ids(q_segments_ref, batch, q_start, block_q, 0)
      plgpu.barrier_wait(q_loaded.at[warpgroup])
      state = steps.empty_softmax(dims)
      # The consumer's queries are fixed for the tile: their dropout states are computed once.
      dropout_rows = None
      if seeds_ref is not None:
        dropout_rows = mosaic.dropout_rows(
          seeds_ref[batch, head], q_start, (block_q, dims.block_kv), query_dim=0
        )
      walk = steps.KeyWalk(
        dims=dims,
        ring=ring,
        q_smem=q_smem,
        batch=batch,
        q_start=q_start,
        kv_len=kv_len,
        segments=segments,
        kv_segments_ref=kv_segments_ref,
        dropout_rows=dropout_rows,
        blocks=blocks,
        cta_blocks=cta_blocks,
        stream=stream,
      )
      state = steps.walk_key_blocks(walk, state)
      if dims.persistent:
        # Q is no longer needed: the next queries load during the epilogue.
        pl.when(i + 1 < count)(lambda: load_queries(tile_at(i + 1)))
        # Consumer 1's last await of the tile. Consumer 0 waits for it to be taken: its pass
        # after the next tile's first product must not join this one.
        pl.when(warpgroup == 0)(mosaic.hand_over_turn)
      else:
        pl.when(warpgroup == 0)(mosaic.pass_turn)  # Consumer 1's last await.
      state, empty = steps.normalise(dims, state, q_start, q_len)
      rows = pl.ds(q_start, block_q)
      steps.write_tile(
        dims,
        state,
        empty,
        (o_smem, lse_smem),
        out_ref.at[batch, rows, head],
        lse_ref.at[batch, head, rows],
      )
      return stream + (cta_blocks[1] - cta_blocks[0])

    _for_each_tile(dims, count, run_tile)
    plgpu.wait_smem_to_gmem(0)

  @pl.when(warpgroup == NUM_CONSUMERS)
  def _producer():
    plgpu.set_max_registers(mosaic.PRODUCER_REGISTERS, action="decrease")

    def run_tile(i, stream):
      tile = tile_at(i)
      _, _, cta_blocks = tile_stream(tile)
      steps.stream_key_blocks(
        dims,
        ring,
        (k_ref, v_ref, columns_ref),
        batch=tile.batch,
        head=tile.head,
        cta_blocks=cta_blocks,
        stream=stream,
      )
      return stream + (cta_blocks[1] - cta_blocks[0])

    _for_each_tile(dims, count, run_tile)


@launcher(static_argnames=("scale", "is_causal", "dropout_rate", "soft_cap", "window", "blocks"))
def attention_forward(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float,
  is_causal: bool,
  dropout_rate: float = 0.0,
  dropout_seeds=None,
  soft_cap: float | None = None,
  window: tuple[int, int] | None = None,
  lengths=None,
  q_segments=None,
  kv_segments=None,
  blocks: MosaicForwardBlocks | None = None,
):
  """Runs the forward kernel on q [B, T, N, D], k and v [B, S, K, D].

  With dropout_rate > 0, dropout_seeds (uint32 [B, N], attention_dropout.head_seeds) picks
  the keep mask. soft_cap: logits become cap * tanh(logits / cap) after the scale. window:
  inclusive (left, right) band of keys around each query (attention_mask). lengths: int32
  [B, 2], each row's (query length, key length) (`sequence_lengths_table`), or None.
  q_segments, kv_segments: int32 [B, T] and [B, S] segment ids (both or neither).

  Returns:
    out [B, T, N, D] in q's dtype and the natural-log logsumexp [B, N, T] in float32, the
    convention of the Triton kernels (so their backward can consume it).
  """
  check_supported(q, k, v)
  batch, t, num_heads, head_dim = q.shape
  s, num_kv_heads = k.shape[1:3]
  blocks = blocks or default_forward_blocks(head_dim, is_causal, num_heads // num_kv_heads)
  block_q, block_kv = blocks.block_q, blocks.block_kv
  t_pad = common.round_up(t, NUM_CONSUMERS * block_q)
  s_pad = common.round_up(s, block_kv)
  # Padded keys are masked in the kernel; padded queries compute rows that are cut off below.
  q = common.pad_axis(q, 1, t_pad)
  k, v = common.pad_axis(k, 1, s_pad), common.pad_axis(v, 1, s_pad)
  dims = _Dims(
    head_dim=head_dim,
    kv_len=s,
    num_q_tiles=t_pad // (NUM_CONSUMERS * block_q),
    group=num_heads // num_kv_heads,
    block_q=block_q,
    block_kv=block_kv,
    num_stages=min(blocks.num_stages, s_pad // block_kv),
    scale=scale,
    causal=is_causal,
    dropout_rate=dropout_rate,
    soft_cap=soft_cap,
    window=window,
    empty_rows=window is not None or lengths is not None or q_segments is not None,
    late_starts=window is not None or q_segments is not None,
    overlap_softmax=blocks.overlap_softmax,
    named_releases=blocks.named_releases,
    late_row_sum=blocks.late_row_sum,
  )
  num_tiles = batch * num_heads * dims.num_q_tiles
  if blocks.persistent and window is None:
    dims = dataclasses.replace(
      dims,
      persistent=True,
      batch=batch,
      num_heads=num_heads,
      num_ctas=min(num_tiles, mosaic.num_sms()),
    )
  seeds = columns = None
  if dropout_seeds is not None:
    seeds = dropout_seeds.astype(jnp.uint32)
    columns = mosaic.dropout_column_table(s_pad)
  tables = (None, None)
  if q_segments is not None:
    q_segments = common.pad_edge(q_segments.astype(jnp.int32), 1, t_pad)
    kv_segments = common.pad_edge(kv_segments.astype(jnp.int32), 1, s_pad)
    # Per warpgroup and per CTA: which key blocks the segment ids allow.
    tables = tuple(
      mosaic.segment_block_ranges(q_segments, kv_segments, block_q=rows, block_kv=block_kv)
      for rows in (block_q, NUM_CONSUMERS * block_q)
    )
  inputs = (lengths, q, k, v, seeds, columns, q_segments, kv_segments, *tables)
  tiled = mosaic.TILED
  scratch = [
    plgpu.SMEM((NUM_CONSUMERS, block_q, head_dim), q.dtype, transforms=tiled),
    # The output's slots; without a persistent launch it reuses Q's buffer, and this is
    # a token.
    plgpu.SMEM(
      (NUM_CONSUMERS, min(OUTPUT_SLOTS, head_dim // OUTPUT_COLUMNS), block_q, OUTPUT_COLUMNS),
      q.dtype,
      transforms=tiled,
    )
    if dims.persistent
    else plgpu.SMEM((1, 64), jnp.uint32),
    plgpu.SMEM((dims.num_stages, block_kv, head_dim), k.dtype, transforms=tiled),
    plgpu.SMEM((dims.num_stages, block_kv, head_dim), v.dtype, transforms=tiled),
    # Dropout key states; without dropout a token buffer, as every byte counts at d=128.
    plgpu.SMEM((dims.num_stages, block_kv) if seeds is not None else (1, 64), jnp.uint32),
    plgpu.SMEM((NUM_CONSUMERS, block_q), jnp.float32),
    plgpu.Barrier(num_barriers=NUM_CONSUMERS),  # Q loaded, one per consumer.
    plgpu.Barrier(num_barriers=dims.num_stages),  # K block loaded, one per slot.
    plgpu.Barrier(num_barriers=dims.num_stages),  # V block loaded.
    plgpu.Barrier(num_barriers=dims.num_stages),  # Dropout key states loaded.
    plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=dims.num_stages),  # K released.
    plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=dims.num_stages),  # V released.
  ]
  out, lse = plgpu.kernel(
    mosaic.with_absent_inputs(functools.partial(_forward_kernel, dims=dims), inputs),
    out_type=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, num_heads, t_pad), jnp.float32),
    ],
    scratch_types=scratch,
    # Mosaic GPU launches a grid's last axis fastest (it becomes CUDA's x): batch rows, then
    # query tiles, then heads. The CTAs in flight together are the query tiles of one or two
    # heads, which share those heads' keys and values in L2; with the query tiles slowest
    # (the former (tile, head, batch) grid) they spanned every head and read K and V from
    # memory (12-15 % slower at d=128 on H100,
    # benchmarks/results/attention_mosaic_fwd_schedule_h100_2026-11-25.log).
    grid=(dims.num_ctas,) if dims.persistent else (num_heads, dims.num_q_tiles, batch),
    grid_names=("ctas",) if dims.persistent else ("heads", "q_tiles", "batch"),
    num_threads=NUM_CONSUMERS + 1,
    thread_name="wg",
    # Rows are reduced within a warp (a wgmma tile's row lives in four lanes): no
    # cross-warp reduction scratch, whose 2 KB the persistent launch at d=256 lacks.
    compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
    kernel_name=KERNEL_NAME,
  )(*(x for x in inputs if x is not None))
  return out[:, :t], lse[:, :, :t]
