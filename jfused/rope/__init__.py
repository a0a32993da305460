"""Rotary position embeddings (see `api.py`)."""

from jfused.rope.api import rotary_embedding, segment_positions

__all__ = ["rotary_embedding", "segment_positions"]
