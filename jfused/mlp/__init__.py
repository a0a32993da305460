"""The MLP's down projection with its activation, recomputed in the backward, and the
projections whose backward casts their float32 weights again instead of keeping a copy."""

from jfused.mlp.api import ACTIVATIONS, linear, mlp_down_projection

__all__ = ["ACTIVATIONS", "linear", "mlp_down_projection"]
