"""The MLP's down projection with its activation, recomputed in the backward."""

from jfused.mlp.api import ACTIVATIONS, mlp_down_projection

__all__ = ["ACTIVATIONS", "mlp_down_projection"]
