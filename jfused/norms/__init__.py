"""`layer_norm` and `rms_norm`: the public functions and their custom_vjp wiring (`api`), the
pure-JAX references (`reference`) and the kernels' sharding plan (`sharding`)."""

from jfused.norms.api import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]
