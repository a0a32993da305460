"""jfused: fused GPU operations for JAX, written in Pallas."""

from jfused import config
from jfused.attention import dot_product_attention
from jfused.norms import layer_norm, rms_norm

__all__ = ["config", "dot_product_attention", "layer_norm", "rms_norm"]
__version__ = "0.1.0"
