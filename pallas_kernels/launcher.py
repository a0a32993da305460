"""One rule for every kernel launcher: lowered once per configuration per program.

`pallas_call` and `plgpu.kernel` trace and lower their kernel body afresh at every call site,
so a model of eight transformer blocks lowers each attention and norm kernel eight times, and
XLA then compiles each copy again (LLVM, ptxas). A launcher under `jax.jit` is traced once per
configuration (its static arguments, shapes and dtypes: jit's cache), and JAX lowers a traced
jit once per program: one function, called from every site. Sharding and vmap see an ordinary
jit.

Module-level tuning constants that a launcher reads while tracing are part of what it traces:
code that changes one (A/B runs, tests) must clear JAX's caches around the change
(`jax.clear_caches()`), or a trace made under the other value is reused.
"""

from __future__ import annotations

import jax


def launcher(*, static_argnums=(), static_argnames=()):
  """Decorates a kernel launcher: its configuration arguments (hashable) are static; arrays,
  pytrees of arrays and None are traced."""

  def decorate(launch):
    return jax.jit(launch, static_argnums=static_argnums, static_argnames=static_argnames)

  return decorate
