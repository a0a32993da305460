"""jfused: fused GPU operations for JAX, written in Pallas."""

from jfused import config
from jfused.attention import attention_dropout_mask, dot_product_attention
from jfused.cross_entropy import linear_cross_entropy
from jfused.mlp import mlp_down_projection
from jfused.norms import layer_norm, rms_norm
from jfused.rope import rotary_embedding, segment_positions

__all__ = [
  "attention_dropout_mask",
  "config",
  "dot_product_attention",
  "layer_norm",
  "linear_cross_entropy",
  "mlp_down_projection",
  "rms_norm",
  "rotary_embedding",
  "segment_positions",
]
__version__ = "0.1.0"
