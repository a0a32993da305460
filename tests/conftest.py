import jax
import pytest


def pytest_collection_modifyitems(config, items):
  """GPU-marked tests run natively on a CUDA GPU; elsewhere they are reported as skipped."""
  if jax.default_backend() == "gpu":
    return
  skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip_gpu)
