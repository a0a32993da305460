"""`dot_product_attention`: argument checks (`args`), the pure-JAX reference (`reference`), the
Pallas-Triton and Mosaic GPU kernels joined by custom_vjp (`triton`, `mosaic`) and their
sharding plan (`sharding`)."""

from jfused.attention.api import attention_dropout_mask, dot_product_attention

__all__ = ["attention_dropout_mask", "dot_product_attention"]
