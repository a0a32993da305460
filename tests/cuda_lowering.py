"""Lowering checks: export jitted functions for CUDA under an abstract H100, on any machine.

Exporting runs the Pallas-to-Triton (and Mosaic GPU) lowering, so kernel code that would fail
to compile its IR fails here, in CPU-only CI, without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import re

import jax
from jax.experimental.pallas import triton as pltriton
from jax.sharding import AbstractMesh

from benchmarks import deviceless

H100 = deviceless.abstract_h100()

# Our kernels are custom calls with no serialisation guarantees; for a lowering check that is
# exactly what we want to see, so the safety check is turned off for those targets only.
_KERNEL_CALL_TARGETS = (pltriton.CUSTOM_CALL_TARGET_NAME, "mosaic_gpu_v2", "mosaic_gpu")


def export_for_h100(fn, *abstract_args) -> str:
  """Exports `jax.jit(fn)` for CUDA under an abstract H100; returns the StableHLO text."""
  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _KERNEL_CALL_TARGETS]
  with jax.sharding.use_abstract_mesh(AbstractMesh((), (), abstract_device=H100)):
    exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(
      *abstract_args
    )
  return exported.mlir_module()


def _launches(hlo_text: str, count_in: Callable[[str], int]) -> int:
  """How many times a run of the lowered module reaches a kernel call `count_in` counts.

  Kernel launchers are jitted (pallas_kernels/launcher.py), so a kernel's custom call sits in
  a function of its own, emitted once and called from every site: the launches are counted
  along the calls from `main`.
  """
  bodies = dict(
    re.findall(r"func\.func (?:public |private )?@([\w.$-]+)\((.*?)\n  }", hlo_text, re.DOTALL)
  )

  @functools.cache
  def launches(function: str) -> int:
    body = bodies[function]
    calls = re.findall(r"(?:func\.)?call @([\w.$-]+)\(", body)
    return count_in(body) + sum(launches(c) for c in calls if c in bodies)

  return launches("main")


def count_kernel_calls(hlo_text: str, kernel_name: str) -> int:
  """Launches of the Pallas-Triton kernel `kernel_name` in a run of the lowered module."""
  return _launches(hlo_text, lambda body: body.count(f'name = "{kernel_name}"'))


def count_mosaic_calls(hlo_text: str, kernel_name: str) -> int:
  """Launches of the Mosaic GPU kernel `kernel_name` (named in its serialised module)."""
  return _launches(
    hlo_text,
    lambda body: sum(
      1 for line in body.splitlines() if "@mosaic_gpu_v2(" in line and kernel_name in line
    ),
  )
