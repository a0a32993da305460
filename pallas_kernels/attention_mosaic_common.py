"""Pieces shared by the Mosaic GPU attention kernels (forward, dK/dV, dQ).

Tiles live in wgmma's accumulator layout (`plgpu.Layout.WGMMA`); per-row and per-column
vectors of a tile live in its reductions (`.reduce(1)` indexes rows, `.reduce(0)` columns),
so broadcasting them back onto the tile moves no data between threads.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import attention_dropout

NUM_CONSUMERS = 2  # Consumer warpgroups per CTA; the producer is warpgroup NUM_CONSUMERS.
# Registers per thread: consumers hold the accumulators; the producer only issues copies.
# 2 * 232 + 40 (times 128 threads) stays within the 64K registers of an SM.
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40
# 128-byte swizzled (8, 64) tiles: the shared-memory layout wgmma reads without bank
# conflicts. The minor dimension (the head dim) must be a multiple of 64 elements.
TILED = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def kv_steps(dims, last_query):
  """Number of leading key blocks holding a key visible to a query at `last_query` or before.

  `dims` has `causal`, `num_kv_blocks`, `block_kv` (and `kv_len` for `full_kv_steps`).
  """
  if not dims.causal:
    return dims.num_kv_blocks
  # Top-left causal: key s is visible to query t when s <= t.
  return jnp.minimum(lax.div(last_query, dims.block_kv) + 1, dims.num_kv_blocks)


def full_kv_steps(dims, first_query):
  """Number of leading key blocks where every key is visible to every query of the block."""
  unpadded = dims.kv_len // dims.block_kv
  if not dims.causal:
    return unpadded
  # Block j's last key is (j + 1) * block_kv - 1; it must be <= first_query.
  return jnp.minimum(lax.div(first_query + 1, dims.block_kv), unpadded)


def copy_key_block(index, slot, sources, ring, loaded, *, batch, kv_head, block_kv: int):
  """Starts the TMA copies of key block `index` into ring slot `slot` (the producers of the
  forward and dQ kernels).

  Args:
    sources: (k, v, dropout key states or None) in GMEM: [B, S, K, D], [B, S, K, D], [S].
    ring, loaded: their shared-memory rings and "loaded" barriers, in the same order.
  """
  keys = pl.ds(index * block_kv, block_kv)
  k_ref, v_ref, columns_ref = sources
  blocks = [k_ref.at[batch, keys, kv_head], v_ref.at[batch, keys, kv_head]]
  if columns_ref is not None:
    blocks.append(columns_ref.at[keys])
  for block, smem, barrier in zip(blocks, ring, loaded):
    plgpu.copy_gmem_to_smem(block, smem.at[slot], barrier.at[slot])


def broadcast(vector, shape, dim: int):
  """A row or column vector laid along tile axis `dim`, broadcast over the other axis."""
  return lax.broadcast_in_dim(vector, shape, [dim])


def tile_positions(start, shape, dim: int):
  """start + the index along axis `dim` of every element of a tile, int32."""
  return start + plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)


def vector_positions(start, shape, dim: int):
  """start + index of a vector along tile axis `dim` (laid out to broadcast onto the tile)."""
  layout = plgpu.Layout.WGMMA.reduce(1 - dim)
  return start + plgpu.broadcasted_iota(jnp.int32, (shape[dim],), 0, layout=layout)


def dropout_rows(seed, q_start, shape, query_dim: int):
  """Dropout hash states of a tile's queries (attention_dropout.row_hashes), a vector.

  Computed in the kernel where a warpgroup's queries stay fixed (forward, dQ): each thread
  holds two of them.
  """
  return attention_dropout.row_hashes(seed, vector_positions(q_start, shape, query_dim))


def dropout_columns(k_start, shape, query_dim: int):
  """Dropout hash states of a tile's keys (attention_dropout.column_hashes), a vector.

  Computed in the kernel where a warpgroup's keys stay fixed (dK/dV).
  """
  return attention_dropout.column_hashes(vector_positions(k_start, shape, 1 - query_dim))


# Where the vector changes every step, the kernels load it from a table computed beforehand:
# along a tile's minor axis each thread holds a quarter of the vector, and hashing it there
# cost more integer work than the per-element keep decisions themselves.


def dropout_row_table(seeds, length: int):
  """uint32 [B, N, length]: the row states of every query position, per (batch, head)."""
  positions = jnp.arange(length, dtype=jnp.int32)[None, None, :]
  return attention_dropout.row_hashes(seeds.astype(jnp.uint32)[:, :, None], positions)


def dropout_column_table(length: int):
  """uint32 [length]: the column states of every key position."""
  return attention_dropout.column_hashes(jnp.arange(length, dtype=jnp.int32))


def dropout_keep(rows, columns, shape, query_dim: int, rate: float):
  """Which elements of a tile survive dropout, from its query and key hash vectors."""
  return attention_dropout.keep_from_parts(
      broadcast(rows, shape, query_dim), broadcast(columns, shape, 1 - query_dim),
      attention_dropout.keep_threshold(rate))


def with_absent_inputs(kernel, inputs):
  """`kernel` taking a ref (or None) for each of `inputs`, which may hold None: `plgpu.kernel`
  passes refs only for the arrays it is given. Call the result on the present inputs."""
  present = [x is not None for x in inputs]
  count = sum(present)

  def wrapped(*refs, **kwargs):
    given = iter(refs[:count])
    return kernel(*(next(given) if p else None for p in present), *refs[count:], **kwargs)

  return wrapped
