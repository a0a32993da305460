"""Compiling for an H100 on a machine without a GPU: XLA's own GPU compiler, run ahead of time
for a GPU it only describes (`h100_target_config.txtpb`).

What comes out is the program the GPU would run, less autotuning: the same HLO passes, buffer
assignment, kernels (Mosaic GPU and Triton through LLVM and ptxas) and memory report. So the
step's temporary memory and XLA's optimized program can be read, and changes to them tried,
between GPU sessions. Checked against the GPU: the GPT block's step (`jfused bench block`)
compiles to 1283.3 MiB of temporaries with jfused and 1347.4 with Flax + cuDNN here and on an
H100 (2026-12-08). Autotuning needs the device, so XLA's matmuls are pinned to cuBLAS (which
the GPU's autotuner chose for the GPT block); where the autotuner picks Triton matmuls instead
(the Llama-style block), memory differs. Times to compile are this machine's CPU's, not the
GPU host's.

Needs the CUDA build of jaxlib (`pip install "jax[cuda12]==0.11.2"`, no GPU or driver needed);
`ENV` must be in the environment before JAX starts (`run_one(..., env=ENV)` does it for a
child process).
"""

from __future__ import annotations

import contextlib
import functools
import os

# JAX must not look for a GPU (there is none) nor check the CUDA driver's version.
ENV = {"JAX_PLATFORMS": "cpu", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}
# Without autotuning XLA would make every matmul a Triton fusion; the GPU's autotuner chose
# cuBLAS on the blocks measured, and memory only matches with cuBLAS.
XLA_FLAGS = "--xla_gpu_enable_triton_gemm=false"
TARGET_CONFIG = os.path.join(os.path.dirname(__file__), "h100_target_config.txtpb")
DEVICE_KIND = "NVIDIA H100 80GB HBM3"
CORES = 132


@functools.cache
def h100():
  """A compile-only H100: a device to place abstract arguments on and compile for."""
  from jax.experimental import topologies

  with open(TARGET_CONFIG) as f:
    target_config = f.read()
  topology = topologies.get_topology_desc(
    platform="cuda", topology="1x1x1", target_config=target_config
  )
  return topology.devices[0]


def on_h100(tree):
  """`tree`'s arrays (or shape-dtype structs) as abstract arguments placed on `h100()`."""
  import jax

  sharding = jax.sharding.SingleDeviceSharding(h100())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def abstract_h100():
  """The H100 as Pallas sees it when lowering under an abstract mesh: kind and SM count (the
  CPU lowering tests' device too, tests/cuda_lowering.py)."""
  import jax

  return jax.sharding.AbstractDevice(device_kind=DEVICE_KIND, num_cores=CORES, platform="gpu")


@contextlib.contextmanager
def compiling_for_h100():
  """Within: jfused picks its Hopper kernels and Pallas lowers them for an H100."""
  import jax

  from jfused import config

  mesh = jax.sharding.AbstractMesh((), (), abstract_device=abstract_h100())
  with config.compiling_for_gpu((9, 0)), jax.sharding.use_abstract_mesh(mesh):
    yield


def compile_for_h100(fn, *args):
  """`jax.jit(fn)` compiled for an H100 at `args`' shapes (arrays or shape-dtype structs)."""
  import jax

  with compiling_for_h100():
    traced = jax.jit(fn).trace(*on_h100(args))
    return traced.lower(lowering_platforms=("cuda",)).compile()
