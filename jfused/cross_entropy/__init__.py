"""Fused linear + softmax cross-entropy (see `api.py`)."""

from jfused.cross_entropy.api import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
