"""Pieces shared by the attention kernels: the problem description, padding, tile math.

The kernels work in base 2: logits are multiplied by log2(e) once, so the softmax uses exp2,
which is a single hardware instruction (FlashAttention-2 does the same). Statistics stay in
float32 whatever the input dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax import lax
import jax.numpy as jnp

from pallas_kernels.attention import dropout as attention_dropout
from pallas_kernels.attention import mask as attention_mask

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
# Finite stand-ins for infinities. Every intermediate of the interpreted kernels and every kernel
# output stays finite, so a user's jax.debug_infs / debug_nans (which checks each value in
# interpret mode, and each kernel output on a GPU) never trips on a masked key or an empty row.
# MASKED_LOGIT is the base-2 logit of a masked key: far below any real logit, yet far enough
# above -float32 max that subtracting any row statistic below stays finite; exp2 of it minus
# a row's max is 0. A row whose max is still MASKED_LOGIT has seen no visible key.
MASKED_LOGIT = -(2.0**126)
# The natural-log logsumexp reported for a row with no visible key (and given to padded query
# rows in the backward): exp2(logit - lse2) is 0 for every logit at or above MASKED_LOGIT.
EMPTY_ROW_LSE = 2.0**100


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Static description of one attention call, shared by forward and backward kernels."""

  scale: float
  rules: attention_mask.MaskRules
  soft_cap: float | None = None
  has_bias: bool = False
  has_q_length: bool = False
  interpret: bool = False
  # Attention dropout (dropout.py): 0 is none; otherwise the kernels take
  # `dropout_seeds` and drop each probability with this probability.
  dropout_rate: float = 0.0
  # Tile sizes (ForwardBlocks / BackwardBlocks); None picks the heuristic default.
  forward_blocks: object | None = None
  backward_blocks: object | None = None
  # False lets a backward trade bitwise repeatability for speed (the fused Mosaic kernel).
  deterministic_backward: bool = True


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionOperands:
  """Normalised operands: q [B, T, N, D], k [B, S, K, D], v [B, S, K, Dv].

  bias and mask, when present, are [Bb, Nb, T, S] with Bb in (1, B) and Nb in (1, N);
  q_length and kv_length are int32 [B] or None; segments are int32 [B, T] / [B, S] or None.
  dropout_seeds is uint32 [B, N] (see attention_dropout.head_seeds), or None without dropout.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  bias: jax.Array | None = None
  mask: jax.Array | None = None
  q_length: jax.Array | None = None
  kv_length: jax.Array | None = None
  q_segments: jax.Array | None = None
  kv_segments: jax.Array | None = None
  dropout_seeds: jax.Array | None = None


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def padded_head_dim(d: int) -> int:
  # Triton tiles need power-of-two extents and dots need at least 16 along the contraction.
  return max(16, 1 << (d - 1).bit_length())


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
  """Pads `x` with `value` at the end of `axis` up to `size`."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def pad_edge(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Pads by repeating the last entry, so per-block min/max of segment ids stay tight."""
  extra = size - x.shape[axis]
  if extra == 0 or x.shape[axis] == 0:
    return pad_axis(x, axis, size)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode="edge")


@dataclasses.dataclass
class PaddedOperands:
  """Operands padded to whole tiles: T to t_pad, S to s_pad, head dims to powers of two."""

  q: jax.Array
  k: jax.Array
  v: jax.Array
  bias: jax.Array | None
  mask: jax.Array | None  # int8, 1 where visible
  limits: jax.Array  # int32 [B, 2]: (key bound, query length); see `pad_operands`.
  q_segments: jax.Array | None
  kv_segments: jax.Array | None
  t_pad: int
  s_pad: int
  dropout_seeds: jax.Array | None = None  # uint32 [B, N, 1]: one-element blocks per head.


def check_dropout_operands(config: AttentionConfig, ops: AttentionOperands) -> None:
  """A dropout rate needs seeds and seeds need a rate: one without the other is a bug."""
  if (config.dropout_rate > 0.0) != (ops.dropout_seeds is not None):
    raise ValueError(
      f"dropout_rate {config.dropout_rate} and dropout_seeds "
      f"{'present' if ops.dropout_seeds is not None else 'absent'} disagree"
    )


def backward_row_statistics(out, dout, lse, t_pad: int, dropout_rate: float = 0.0):
  """(lse2, delta), float32 [B, N, t_pad]: the per-query rows both backward paths read.

  lse2 is the base-2 logsumexp, EMPTY_ROW_LSE on padded queries so their P is 0 without a
  mask.
  delta is D = rowsum(dO * O), memory-bound, so XLA computes it.

  With dropout, dV = (P * Z)^T dO and dS = P * (dP * Z - D) for Z = keep / (1 - rate). The
  rows fold the 1 / (1 - rate) in, so the kernels spend nothing on it per element:
  lse2 + log2(1 - rate) makes the recomputed P' = P / (1 - rate), and D' = D * (1 - rate)
  gives dV = (P' * keep)^T dO and dS = P' * (dP * keep - D').
  """
  # The row sums reduce the contiguous head dim into [B, T, N]; the barrier keeps XLA from
  # fusing the reduction with the transpose to [B, N, T], whose fused form wrote its output
  # strided and read dO and O at a tenth of an H200's bandwidth (280 us at B=4, T=4096,
  # 16 x 128; benchmarks/results/attention_row_statistics_h200_2026-12-01.log).
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = lax.optimization_barrier(delta).transpose(0, 2, 1)
  lse2 = lse * LOG2_E
  if dropout_rate > 0.0:
    lse2 = lse2 + math.log2(1.0 - dropout_rate)
    delta = delta * (1.0 - dropout_rate)
  return pad_axis(lse2, 2, t_pad, value=EMPTY_ROW_LSE), pad_axis(delta, 2, t_pad)


def pad_operands(ops: AttentionOperands, t_multiple: int, s_multiple: int) -> PaddedOperands:
  """Pads every operand to whole tiles. Padded keys are masked through the key bound."""
  batch, t, _, d = ops.q.shape
  s, dv = ops.k.shape[1], ops.v.shape[-1]
  t_pad, s_pad = round_up(max(t, 1), t_multiple), round_up(max(s, 1), s_multiple)
  d_pad, dv_pad = padded_head_dim(d), padded_head_dim(dv)
  q = pad_axis(pad_axis(ops.q, 1, t_pad), 3, d_pad)
  k = pad_axis(pad_axis(ops.k, 1, s_pad), 3, d_pad)
  v = pad_axis(pad_axis(ops.v, 1, s_pad), 3, dv_pad)
  bias = mask = q_segments = kv_segments = None
  if ops.bias is not None:
    bias = pad_axis(pad_axis(ops.bias, 2, t_pad), 3, s_pad)
  if ops.mask is not None:
    mask = pad_axis(pad_axis(ops.mask.astype(jnp.int8), 2, t_pad), 3, s_pad)
  if ops.q_segments is not None:
    q_segments = pad_edge(ops.q_segments, 1, t_pad)
    kv_segments = pad_edge(ops.kv_segments, 1, s_pad)
  kv_bound = jnp.full((batch,), s, jnp.int32)
  if ops.kv_length is not None:
    kv_bound = jnp.minimum(ops.kv_length.astype(jnp.int32), s)
  q_length = jnp.full((batch,), t_pad, jnp.int32)
  if ops.q_length is not None:
    q_length = ops.q_length.astype(jnp.int32)
  limits = jnp.stack([kv_bound, q_length], axis=1)
  dropout_seeds = None
  if ops.dropout_seeds is not None:
    dropout_seeds = ops.dropout_seeds.astype(jnp.uint32)[:, :, None]
  return PaddedOperands(
    q, k, v, bias, mask, limits, q_segments, kv_segments, t_pad, s_pad, dropout_seeds
  )


def loop_bounds(
  config: AttentionConfig,
  padded: PaddedOperands,
  block_q: int,
  block_kv: int,
  *,
  over_queries: bool = False,
) -> jax.Array:
  """Per-program block loop bounds, int32 [B, Hm, n_rows, 4] (see attention_mask).

  By default a program owns one query block and walks key blocks; with over_queries=True it
  owns one key block and walks query blocks (the dK/dV kernel).
  """
  batch = padded.q.shape[0]
  mask = None if padded.mask is None else padded.mask != 0
  any_visible, all_visible = attention_mask.block_visibility(
    config.rules,
    batch=batch,
    num_q_blocks=padded.t_pad // block_q,
    num_kv_blocks=padded.s_pad // block_kv,
    block_q=block_q,
    block_kv=block_kv,
    kv_bound=padded.limits[:, 0],
    q_length=padded.limits[:, 1] if config.has_q_length else None,
    q_segments=padded.q_segments,
    kv_segments=padded.kv_segments,
    mask=mask,
  )
  if over_queries:
    any_visible, all_visible = (jnp.swapaxes(a, -1, -2) for a in (any_visible, all_visible))
  return attention_mask.block_loop_bounds(any_visible, all_visible)


def matmul(a: jax.Array, b: jax.Array, *, contract_a: int = 1, contract_b: int = 0):
  """2-D product with float32 accumulation; the contracted axes pick any transposes."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(
    a,
    b,
    (((contract_a,), (contract_b,)), ((), ())),
    precision=precision,
    preferred_element_type=jnp.float32,
  )


def tile_logits(config: AttentionConfig, q, k, bias_tile):
  """Logits of a (query, key) tile in base-2 units, before masking.

  Returns (logits2, tanh_of_capped) where the second is None without a soft cap; the backward
  needs it for d(cap * tanh(z / cap)) / dz = 1 - tanh^2.
  """
  s = matmul(q, k, contract_b=1)
  if bias_tile is None and config.soft_cap is None:
    return s * (config.scale * LOG2_E), None
  s = s * config.scale
  if bias_tile is not None:
    s = s + bias_tile.astype(jnp.float32)
  capped_tanh = None
  if config.soft_cap is not None:
    capped_tanh = jnp.tanh(s * (1.0 / config.soft_cap))
    s = capped_tanh * config.soft_cap
  return s * LOG2_E, capped_tanh


def tile_visible(
  config: AttentionConfig,
  q_start,
  k_start,
  block_q,
  block_kv,
  *,
  limits_ref,
  q_segments,
  kv_segments,
  mask_tile,
):
  """The element predicate of attention_mask on one tile, from values loaded in a kernel."""
  q_positions = (q_start + jnp.arange(block_q, dtype=jnp.int32))[:, None]
  k_positions = (k_start + jnp.arange(block_kv, dtype=jnp.int32))[None, :]
  return attention_mask.element_visible(
    config.rules,
    q_positions,
    k_positions,
    kv_length=limits_ref[0],
    q_length=limits_ref[1] if config.has_q_length else None,
    q_segments=None if q_segments is None else q_segments[:, None],
    kv_segments=None if kv_segments is None else kv_segments[None, :],
    mask=None if mask_tile is None else mask_tile != 0,
  )


def dropout_rows(seed, q_start, block_q):
  """Dropout hash state of the rows of one query block, uint32 [block_q, 1]."""
  q_positions = q_start + jnp.arange(block_q, dtype=jnp.int32)
  return attention_dropout.row_hashes(seed, q_positions)[:, None]


def dropout_keep(config: AttentionConfig, rows, k_start, block_kv):
  """Which elements of a tile survive dropout (rows from `dropout_rows`), bool [bq, bkv]."""
  k_positions = k_start + jnp.arange(block_kv, dtype=jnp.int32)
  columns = attention_dropout.column_hashes(k_positions)[None, :]
  return attention_dropout.keep_from_parts(
    rows, columns, attention_dropout.keep_threshold(config.dropout_rate)
  )


def same_bound(a, b) -> bool:
  """Whether two block bounds are one value: the same traced value, or equal Python ints.
  A range between them is empty whatever the inputs."""
  return a is b or (type(a) is int and type(b) is int and a == b)


def masked_loops(bounds, body, carry):
  """Runs `body(index, carry, masked)` over the three ranges of `block_loop_bounds`.

  A masked range whose bounds are `same_bound` is left out of the program: the range helpers
  return one value for both where the configuration rules those blocks out (no masked blocks
  before the full ones without a window, none after them with neither causality nor padding),
  and the body of a loop that never runs would still be traced, lowered and compiled. For a
  causal Mosaic attention's forward and backward that was 28 % of the lowered module (1.15
  against 0.83 MB exported for an H100, B4 T4096 16x128)."""
  start, full_start, full_end, end = bounds
  if not same_bound(start, full_start):
    carry = lax.fori_loop(start, full_start, lambda i, c: body(i, c, True), carry)
  carry = lax.fori_loop(full_start, full_end, lambda i, c: body(i, c, False), carry)
  if same_bound(full_end, end):
    return carry
  return lax.fori_loop(full_end, end, lambda i, c: body(i, c, True), carry)
