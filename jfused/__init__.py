"""jfused: fused GPU operations for JAX, written in Pallas."""

from jfused import config
from jfused.attention import dot_product_attention

__all__ = ["config", "dot_product_attention"]
__version__ = "0.1.0"
