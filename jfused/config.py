"""Runtime switches: where kernels run and whether Pallas runs in interpret mode.

Pallas kernels compile for CUDA GPUs. On any other backend (CPU in CI, say) they run in
Pallas' interpreter, which executes the kernel body as ordinary JAX code: slow, but it checks
the same arithmetic. `JFUSED_INTERPRET=1` (or `set_interpret(True)`) forces the interpreter on
a GPU too, which helps when debugging a kernel.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax

_forced_interpret: bool | None = None
# The compute capability of a GPU this process compiles for without having one (deviceless
# ahead-of-time compilation, `compiling_for_gpu`), or None.
_target_capability: tuple[int, int] | None = None


def _env_flag(name: str) -> bool | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  return value.strip().lower() in ("1", "true", "yes", "on")


def set_interpret(value: bool | None) -> None:
  """Forces (True), forbids (False) or resets to automatic (None) Pallas interpret mode."""
  global _forced_interpret
  _forced_interpret = value


@contextlib.contextmanager
def interpret_mode(value: bool | None = True):
  """Context manager form of `set_interpret`."""
  previous = _forced_interpret
  set_interpret(value)
  try:
    yield
  finally:
    set_interpret(previous)


@contextlib.contextmanager
def compiling_for_gpu(capability: tuple[int, int] = (9, 0)):
  """Chooses kernels as on a CUDA GPU of `capability` while no GPU is attached: for compiling
  a program ahead of time for a GPU XLA only describes (`benchmarks/deviceless.py`)."""
  global _target_capability
  previous = _target_capability
  _target_capability = capability
  try:
    yield
  finally:
    _target_capability = previous


def on_gpu() -> bool:
  """True when JAX's default backend is a CUDA GPU (or one is compiled for, above)."""
  return _target_capability is not None or jax.default_backend() == "gpu"


def gpu_compute_capability() -> tuple[int, int] | None:
  """(major, minor) of the first GPU, or None without one."""
  if _target_capability is not None:
    return _target_capability
  return _attached_compute_capability()


@functools.cache
def _attached_compute_capability() -> tuple[int, int] | None:
  if jax.default_backend() != "gpu":
    return None
  capability = getattr(jax.devices()[0], "compute_capability", None)
  if capability is None:
    return None
  major, minor = str(capability).split(".")
  return int(major), int(minor)


def on_hopper() -> bool:
  """True on an sm90 GPU (H100, H200): what the Mosaic GPU kernels are written for."""
  capability = gpu_compute_capability()
  return capability is not None and capability[0] == 9


def mosaic_unavailable_reason() -> str | None:
  """Why Mosaic GPU kernels cannot run here, or None. Not `on_hopper()`: with no GPU
  reported (exporting for an abstract H100 on a CPU machine, as the lowering tests do) the
  kernels must still lower."""
  if use_interpret():
    return "Mosaic GPU kernels (wgmma) have no interpreter; they need a Hopper GPU"
  capability = gpu_compute_capability()
  if capability is not None and capability[0] != 9:
    return f"Mosaic GPU kernels need an sm90 (Hopper) GPU, found {capability}"
  return None


def xla_deterministic_ops() -> bool:
  """Whether XLA was asked for deterministic GPU ops (`--xla_gpu_deterministic_ops` in
  XLA_FLAGS, bare or `=true`/`=1`): JAX's own switch for bitwise-repeatable runs. Read at
  trace time; a compiler option given to one `jit(...).compile()` is not seen here."""
  value = None
  for token in os.environ.get("XLA_FLAGS", "").split():
    name, _, setting = token.partition("=")
    if name.lstrip("-") == "xla_gpu_deterministic_ops":
      value = setting.strip().lower() in ("", "1", "true", "yes", "on")  # The last one wins.
  return bool(value)


def use_interpret() -> bool:
  """Whether Pallas kernels should run in interpret mode now."""
  if _forced_interpret is not None:
    return _forced_interpret
  env = _env_flag("JFUSED_INTERPRET")
  if env is not None:
    return env
  return not on_gpu()
