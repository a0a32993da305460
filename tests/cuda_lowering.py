"""Lowering checks: export jitted functions for CUDA under an abstract H100, on any machine.

Exporting runs the Pallas-to-Triton (and Mosaic GPU) lowering, so kernel code that would fail
to compile its IR fails here, in CPU-only CI, without a GPU.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractMesh

H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")

# Our kernels are custom calls with no serialisation guarantees; for a lowering check that is
# exactly what we want to see, so the safety check is turned off for those targets only.
_KERNEL_CALL_TARGETS = (pltriton.CUSTOM_CALL_TARGET_NAME, "mosaic_gpu_v2", "mosaic_gpu")


def export_for_h100(fn, *abstract_args) -> str:
  """Exports `jax.jit(fn)` for CUDA under an abstract H100; returns the StableHLO text."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _KERNEL_CALL_TARGETS]
  with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100)):
    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*abstract_args)
  return exported.mlir_module()


def count_kernel_calls(hlo_text: str, kernel_name: str) -> int:
  """How many Pallas kernel launches named `kernel_name` the lowered module holds."""
  return hlo_text.count(f'name = "{kernel_name}"')
