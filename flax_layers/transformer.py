"""A pre-norm transformer block on jfused, and a small decoder-only GPT built from it.

Block (pre-norm, as GPT-2/LLaMA):

  y      = norm1(x)                     # or norm1(x + r): the previous block's deferred add
  a      = attention(y)                 # causal, GQA, sliding window, segment ids
  y, h   = norm2(a, residual=x)         # h = x + a, fused into the norm's pass
  out    = h + mlp(y)                   # GELU or SwiGLU

Every residual add but the last happens inside a norm. With `return_residual=True` the block
returns the last one unperformed, `(mlp(y), h)`, and the next block's first norm (or the GPT's
final norm) fuses it. `fused=False` runs the same modules with Flax's own norm and attention
math: the parameter tree does not change, so one checkpoint serves both.
"""

from __future__ import annotations

import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from flax_layers.attention import MultiHeadAttention
from flax_layers.norms import LayerNorm, RMSNorm, residual_add
import jfused

__all__ = ["MLP", "TransformerBlock", "GPT", "next_token_loss"]

NORMS = {"layer_norm": LayerNorm, "rms_norm": RMSNorm}
ACTIVATIONS = ("gelu", "swiglu")


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def recomputing_mlp(x, up, down, gate, dtype):
  """The MLP with `recompute_activation`, for the NNX and Linen layers alike: `up`, `down`
  and (SwiGLU) `gate` are (kernel, bias) pairs as the parameters hold them, and `dtype` the
  layers' (None: promoted from x and the parameters, as `nnx.Linear` does). The parameters
  go in as they are: each op casts them to the compute dtype, and casts them again in the
  backward instead of keeping a copy."""
  leaves = [p for pair in (up, down, gate) if pair is not None for p in pair if p is not None]
  x = x.astype(dtype or jnp.result_type(x, *leaves))
  hidden = jfused.mlp.linear(x, *up)
  gate_out = None if gate is None else jfused.mlp.linear(x, *gate)
  activation = "gelu" if gate is None else "silu"
  return jfused.mlp_down_projection(hidden, *down, activation=activation, gate=gate_out)


class MLP(nnx.Module):
  """The block's feed-forward layer: `down(gelu(up(x)))` or `down(silu(gate(x)) * up(x))`.

  Args:
    num_features: input and output width.
    hidden_features: the inner width.
    activation: "gelu" (tanh approximation, as GPT-2) or "swiglu" (LLaMA).
    use_bias: whether the projections have biases.
    dtype, param_dtype: as in `nnx.Linear`.
    recompute_activation: run the activation and the down projection as
      `jfused.mlp_down_projection`, which keeps only the projections' outputs for the
      backward (2 [tokens, hidden] arrays for SwiGLU, 1 for GELU, where JAX's autodiff of
      Flax's layers keeps 6 and 5) and recomputes the activation there; the projections
      (`jfused.mlp.linear` for up and gate) take the parameters as they are and cast them to
      the compute dtype again in the backward instead of keeping the forward's casts. Off
      by default: on an H200 (2026-12-03) a block's training step ran 0.3-1.5 % slower
      with it. On an H100 (2026-12-08, before the casts moved) the Llama-style block held
      617 MiB with it against 702 at the same time, but the GPT block held more. Same
      parameters either way.
    rngs: the parameter rngs.

  Example:
    >>> mlp = MLP(256, 1024, activation="swiglu", rngs=nnx.Rngs(0))
  """

  def __init__(
    self,
    num_features: int,
    hidden_features: int,
    *,
    activation: str = "gelu",
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
    recompute_activation: bool = False,
    rngs: nnx.Rngs,
  ):
    _check_choice("activation", activation, ACTIVATIONS)
    linear = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.activation = activation
    self.recompute_activation = recompute_activation
    self.up = nnx.Linear(num_features, hidden_features, **linear)
    self.gate = (
      nnx.Linear(num_features, hidden_features, **linear)
      if activation == "swiglu"
      else nnx.data(None)
    )
    self.down = nnx.Linear(hidden_features, num_features, **linear)

  def __call__(self, x):
    gated = self.activation == "swiglu"
    if not self.recompute_activation:
      if gated:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
      return self.down(jax.nn.gelu(self.up(x), approximate=True))

    def parameters(linear):
      return linear.kernel[...], None if linear.bias is None else linear.bias[...]

    gate = parameters(self.gate) if gated else None
    return recomputing_mlp(x, parameters(self.up), parameters(self.down), gate, self.down.dtype)


class TransformerBlock(nnx.Module):
  """Pre-norm transformer block: norm, attention, fused residual + norm, MLP.

  Args:
    num_features: the model width D.
    num_heads: query heads; D must be a multiple of it (head dim D / num_heads).
    num_kv_heads: key/value heads (GQA); defaults to num_heads.
    mlp_features: the MLP's inner width; defaults to 4 D (8/3 D rounded up to 8 for SwiGLU,
      which keeps its parameter count that of a 4 D GELU MLP).
    norm: "layer_norm" or "rms_norm".
    activation: "gelu" or "swiglu".
    is_causal: causal self-attention (a decoder).
    local_window_size: sliding window, int or inclusive (left, right); None for none.
    epsilon: the norms' epsilon.
    use_bias: biases in the attention and MLP projections (norms keep Flax's defaults).
    dtype: computation dtype (None: inferred from inputs and parameters, as Flax does).
    param_dtype: parameter dtype.
    fused: True runs jfused (fused norms with the residual add, fused attention); False runs
      Flax's own math with the same parameters.
    attention_implementation, norm_implementation: passed to jfused (e.g. "pallas_triton",
      "cudnn" for attention); None picks the fastest on this device.
    rope_theta: None, or rotary position embeddings of this base on the attention's query
      and key (LLaMA: 10000 or 500000), at the call's `positions`.
    deterministic_backward: passed to `jfused.dot_product_attention` (bitwise-repeatable
      attention gradients; None follows XLA's `--xla_gpu_deterministic_ops`).
    recompute_mlp_activation: with `fused`, the MLP's `recompute_activation` (its backward
      recomputes the activation instead of keeping it; see `MLP`).
    rngs: the parameter rngs.

  Example:
    >>> block = TransformerBlock(256, 4, num_kv_heads=2, norm="rms_norm",
    ...                          activation="swiglu", rngs=nnx.Rngs(0))
    >>> y = block(x, segment_ids=segments)            # x: [B, T, 256]
  """

  def __init__(
    self,
    num_features: int,
    num_heads: int,
    *,
    num_kv_heads: int | None = None,
    mlp_features: int | None = None,
    norm: str = "layer_norm",
    activation: str = "gelu",
    is_causal: bool = True,
    local_window_size: int | tuple[int, int] | None = None,
    epsilon: float = 1e-6,
    use_bias: bool = True,
    dtype=None,
    param_dtype=jnp.float32,
    fused: bool = True,
    attention_implementation=None,
    norm_implementation=None,
    rope_theta: float | None = None,
    deterministic_backward: bool | None = None,
    recompute_mlp_activation: bool = False,
    rngs: nnx.Rngs,
  ):
    _check_choice("norm", norm, NORMS)
    if num_features % num_heads:
      raise ValueError(
        f"num_features ({num_features}) must be a multiple of num_heads ({num_heads})"
      )
    if mlp_features is None:
      mlp_features = 4 * num_features
      if activation == "swiglu":
        mlp_features = 8 * math.ceil(8 * num_features / 3 / 8)
    norm_kwargs = dict(
      epsilon=epsilon,
      dtype=dtype,
      param_dtype=param_dtype,
      fused=fused,
      implementation=norm_implementation,
      rngs=rngs,
    )
    self.is_causal = is_causal
    self.local_window_size = (
      tuple(local_window_size)
      if isinstance(local_window_size, (list, tuple))
      else local_window_size
    )
    self.norm1 = NORMS[norm](num_features, **norm_kwargs)
    self.attention = MultiHeadAttention(
      num_heads,
      num_features,
      num_kv_heads=num_kv_heads,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      decode=False,
      fused=fused,
      implementation=attention_implementation,
      rope_theta=rope_theta,
      deterministic_backward=deterministic_backward,
      rngs=rngs,
    )
    self.rope = rope_theta is not None
    self.norm2 = NORMS[norm](num_features, **norm_kwargs)
    self.mlp = MLP(
      num_features,
      mlp_features,
      activation=activation,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      recompute_activation=fused and recompute_mlp_activation,
      rngs=rngs,
    )

  def __call__(
    self, x, *, residual=None, segment_ids=None, positions=None, return_residual: bool = False
  ):
    """Applies the block to x (or to x + residual).

    Args:
      x: [batch..., T, D].
      residual: optional [batch..., T, D]; the block's input is then x + residual, added
        inside the first norm (the previous block's deferred add).
      segment_ids: optional int32 [batch..., T]: packed sequences attend within their segment.
      positions: optional int [batch..., T], the rotary embeddings' positions (0..T-1 when
        not given; packed sequences pass `jfused.segment_positions(segment_ids)`); ignored
        without `rope_theta`.
      return_residual: return `(delta, stream)` with the output `delta + stream` not yet added,
        for the next block's first norm to fuse.

    Returns:
      [batch..., T, D], or the pair `(delta, stream)` with return_residual.
    """
    if residual is None:
      y, stream = self.norm1(x), x
    else:
      y, stream = self.norm1(x, residual=residual)
    rope = {"input_positions": positions} if self.rope else {}
    attended = self.attention(
      y,
      is_causal=self.is_causal,
      local_window_size=self.local_window_size,
      q_segment_ids=segment_ids,
      **rope,
    )
    y, stream = self.norm2(attended, residual=stream)
    delta = self.mlp(y)
    if return_residual:
      return delta, stream
    return residual_add(delta, stream)


class GPT(nnx.Module):
  """A small decoder-only language model: embeddings, TransformerBlocks, final norm, tied head.

  Args:
    vocab_size: number of tokens.
    num_layers: number of blocks.
    num_features: model width D.
    num_heads: attention heads.
    max_length: the longest sequence (learned position embeddings; none with `rope_theta`
      in block_kwargs, where the blocks rotate query and key instead, as LLaMA).
    fused: jfused (True) or Flax's own math (False); same parameters either way.
    scan_blocks: keep the blocks' parameters stacked (a leading axis of num_layers) and run
      them under `nnx.scan`: one block is traced, lowered and compiled whatever the depth,
      where a Python loop unrolls every block into the program. The loop leaves XLA free to
      overlap one block's tail with the next block's head, and its parameters are a list of
      per-block trees; `stack_blocks` and `unstack_blocks` convert between the two layouts.
      Under scan every array the backward keeps becomes a stack over the blocks, zero-filled
      and written a slice a block: `recompute_mlp_activation=True` keeps one [tokens,
      hidden] array per block instead of five, and compiling the step with
      `compiler_options={"xla_gpu_enable_dynamic_slice_fusion": False}` stops XLA running
      the attention forward twice to write its stack (docs/performance.md, 2026-12-08).
    loss_implementation: the `implementation` of `jfused.linear_cross_entropy`, which
      `next_token_loss` uses when `fused` (None: the fastest on this device).
    **block_kwargs: the other TransformerBlock arguments (num_kv_heads, mlp_features, norm,
      activation, local_window_size, epsilon, use_bias, dtype, param_dtype,
      attention_implementation, norm_implementation, rope_theta, deterministic_backward,
      recompute_mlp_activation).

  Example:
    >>> model = GPT(vocab_size=256, num_layers=2, num_features=64, num_heads=4,
    ...             max_length=128, rngs=nnx.Rngs(0))
    >>> logits = model(tokens)                        # [B, T, 256]
  """

  def __init__(
    self,
    vocab_size: int,
    num_layers: int,
    num_features: int,
    num_heads: int,
    *,
    max_length: int = 1024,
    fused: bool = True,
    scan_blocks: bool = False,
    loss_implementation: str | None = None,
    rngs: nnx.Rngs,
    **block_kwargs: Any,
  ):
    self.fused = fused
    self.loss_implementation = loss_implementation
    dtype = block_kwargs.get("dtype")
    param_dtype = block_kwargs.get("param_dtype", jnp.float32)
    embed_init = nnx.initializers.normal(0.02)
    self.token_embed = nnx.Embed(
      vocab_size,
      num_features,
      dtype=dtype,
      param_dtype=param_dtype,
      embedding_init=embed_init,
      rngs=rngs,
    )
    self.rope = block_kwargs.get("rope_theta") is not None
    self.position_embed = (
      nnx.data(None)
      if self.rope
      else nnx.Embed(
        max_length,
        num_features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=embed_init,
        rngs=rngs,
      )
    )
    self.scan_blocks = scan_blocks
    if scan_blocks:

      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stacked_blocks(rngs):
        return TransformerBlock(num_features, num_heads, fused=fused, rngs=rngs, **block_kwargs)

      self.blocks = stacked_blocks(rngs)
    else:
      self.blocks = nnx.List(
        [
          TransformerBlock(num_features, num_heads, fused=fused, rngs=rngs, **block_kwargs)
          for _ in range(num_layers)
        ]
      )
    norm = NORMS[block_kwargs.get("norm", "layer_norm")]
    self.final_norm = norm(
      num_features,
      epsilon=block_kwargs.get("epsilon", 1e-6),
      dtype=dtype,
      param_dtype=param_dtype,
      fused=fused,
      implementation=block_kwargs.get("norm_implementation"),
      rngs=rngs,
    )

  def __call__(self, tokens, *, segment_ids=None, positions=None):
    """Next-token logits.

    Args:
      tokens: int [batch, T].
      segment_ids: optional int32 [batch, T] for packed sequences.
      positions: optional int [batch, T]; defaults to 0..T-1 (pass per-segment positions
        with packed sequences: `jfused.segment_positions(segment_ids)`). They index the
        learned position embeddings, or with `rope_theta` the rotary embeddings.

    Returns:
      Logits [batch, T, vocab_size] in the computation dtype.
    """
    return self.token_embed.attend(
      self.hidden_states(tokens, segment_ids=segment_ids, positions=positions)
    )

  def hidden_states(self, tokens, *, segment_ids=None, positions=None):
    """The final norm's output [batch, T, num_features]: what the tied head multiplies."""
    if positions is None:
      # The batch axes explicit ([1, T] for [batch, T] tokens): implicit rank promotion may
      # be disabled.
      positions = jnp.arange(tokens.shape[-1]).reshape(
        (1,) * (tokens.ndim - 1) + (tokens.shape[-1],)
      )
    x = self.token_embed(tokens)
    if not self.rope:
      x = x + self.position_embed(positions)
    if self.scan_blocks:
      # The carry keeps one structure through the scan, so the first block's residual is zeros
      # (x + 0 is x exactly).
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run_blocks(carry, block):
        delta, stream = carry
        return block(
          delta,
          residual=stream,
          segment_ids=segment_ids,
          positions=positions,
          return_residual=True,
        )

      delta, stream = run_blocks((x, jnp.zeros_like(x)), self.blocks)
    else:
      delta, stream = x, None
      for block in self.blocks:
        delta, stream = block(
          delta,
          residual=stream,
          segment_ids=segment_ids,
          positions=positions,
          return_residual=True,
        )
    y, _ = self.final_norm(delta, residual=stream)
    return y


def stack_blocks(parameters: dict) -> dict:
  """A `GPT`'s parameter tree (`nnx.to_pure_dict` of its state) with per-block entries
  {"blocks": {0: ..., 1: ...}}, in the `scan_blocks=True` layout: one tree whose arrays carry
  a leading axis of blocks."""
  blocks = parameters["blocks"]
  per_block = [blocks[i] for i in range(len(blocks))]
  return {**parameters, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *per_block)}


def unstack_blocks(parameters: dict) -> dict:
  """The inverse of `stack_blocks`: a `scan_blocks=True` GPT's tree in the per-block layout."""
  stacked = parameters["blocks"]
  count = jax.tree.leaves(stacked)[0].shape[0]
  return {
    **parameters,
    "blocks": {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(count)},
  }


def next_token_loss(model: GPT, tokens, *, segment_ids=None, positions=None):
  """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1], in float32.

  With `model.fused`, `jfused.linear_cross_entropy` computes it from the hidden states and
  the tied embedding table, so the [batch, T, vocab] logits are never materialised; otherwise
  Flax's head and `log_softmax`. Predictions across a packing boundary do not count.

  Example:
    >>> loss, grads = nnx.value_and_grad(next_token_loss)(model, tokens)
  """
  inputs = dict(
    segment_ids=None if segment_ids is None else segment_ids[:, :-1],
    positions=None if positions is None else positions[:, :-1],
  )
  targets = tokens[:, 1:]
  if segment_ids is not None:
    # Do not predict across a packing boundary: such targets do not count.
    targets = jnp.where(segment_ids[:, 1:] == segment_ids[:, :-1], targets, -1)
  if model.fused:
    hidden = model.hidden_states(tokens[:, :-1], **inputs)
    table = model.token_embed.embedding[...].astype(hidden.dtype)
    return jfused.linear_cross_entropy(
      hidden, table, targets, weight_layout="vd", implementation=model.loss_implementation
    )
  logits = model(tokens[:, :-1], **inputs)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  counted = (targets >= 0).astype(jnp.float32)
  return -jnp.sum(picked * counted) / jnp.maximum(jnp.sum(counted), 1.0)
