import os

# test_sharding.py partitions the kernels over 8 devices. On CPU, XLA simulates them when this
# flag is set before JAX creates its CPU client, so it is set here, before jax is imported by
# anything. Computations on one array stay on one device, so the other tests are unaffected;
# on a GPU machine the flag only adds simulated CPU devices beside the GPU.
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_COUNT_FLAG}=8".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# JAX's own test suite, and many codebases, forbid implicit rank promotion; the library must work
# there, so every test runs with it forbidden and a broadcast that relies on it fails here.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_collection_modifyitems(config, items):
  """GPU-marked tests run natively on a CUDA GPU; elsewhere they are reported as skipped."""
  if jax.default_backend() == "gpu":
    return
  skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_kernel_traces(request):
  """Kernel launchers are jitted (pallas_kernels/launcher.py), so a trace made while a test had
  a tuning constant monkeypatched would be reused after it, and the other way round: tests that
  monkeypatch start and end with JAX's caches cleared."""
  if "monkeypatch" not in request.fixturenames:
    yield
    return
  jax.clear_caches()
  yield
  jax.clear_caches()
