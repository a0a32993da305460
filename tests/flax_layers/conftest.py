"""Fixtures shared by the flax_layers tests."""

import pytest

import jfused


@pytest.fixture
def count_calls(monkeypatch):
  """Counts calls of jfused's public ops, to tell the fused path from Flax's fallback."""
  counts = {}
  for name in ("layer_norm", "rms_norm", "dot_product_attention"):
    original = getattr(jfused, name)

    def counted(*args, _original=original, _name=name, **kwargs):
      counts[_name] = counts.get(_name, 0) + 1
      return _original(*args, **kwargs)

    monkeypatch.setattr(jfused, name, counted)
  return counts
