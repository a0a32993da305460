"""`layer_norm` and `rms_norm`: the public functions and their custom_vjp wiring (`api`), the
pure-JAX references (`reference`) and the kernels' sharding plan (`sharding`)."""

from jfused.norms.api import layer_norm, rms_norm
from jfused.norms.reference import layer_norm_reference, rms_norm_reference

__all__ = ["layer_norm", "layer_norm_reference", "rms_norm", "rms_norm_reference"]
