"""Flax modules on jfused: drop-in replacements for Flax's own, and a fused transformer block.

Change one import and keep your parameters, checkpoints and training loop:

  >>> from flax_layers import LayerNorm, MultiHeadAttention      # instead of nnx's
  >>> mha = nnx.MultiHeadAttention(8, 512, attention_fn=flax_layers.attention_fn,
  ...                              decode=False, rngs=nnx.Rngs(0))

NNX modules live here; their Linen twins in `flax_layers.linen`.
"""

from flax_layers import linen
from flax_layers.attention import JfusedAttention, MultiHeadAttention, attention_fn
from flax_layers.norms import LayerNorm, RMSNorm
from flax_layers.transformer import (
  GPT,
  MLP,
  TransformerBlock,
  next_token_loss,
  stack_blocks,
  unstack_blocks,
)

__all__ = [
  "GPT",
  "JfusedAttention",
  "LayerNorm",
  "MLP",
  "MultiHeadAttention",
  "RMSNorm",
  "TransformerBlock",
  "attention_fn",
  "linen",
  "next_token_loss",
  "stack_blocks",
  "unstack_blocks",
]
