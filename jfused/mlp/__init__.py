"""The MLP's down projection with its activation, recomputed in the backward."""

from jfused.mlp.api import ACTIVATIONS, mlp_down_projection
from jfused.mlp.feed_forward import feed_forward

__all__ = ["ACTIVATIONS", "feed_forward", "mlp_down_projection"]
