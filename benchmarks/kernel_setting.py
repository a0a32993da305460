"""A/B runs of a kernel module's tuning constant."""

from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def kernel_setting(module, name: str, value):
  """Sets `module.name` to `value` for what is traced inside, and back afterwards."""
  previous = getattr(module, name)
  setattr(module, name, value)
  jax.clear_caches()  # nothing traced under the other setting may be reused (launcher.py)
  try:
    yield
  finally:
    setattr(module, name, previous)
    jax.clear_caches()
