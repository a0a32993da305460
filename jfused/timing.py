"""Timing and environment helpers shared by the benchmarks and the command line."""

from __future__ import annotations

import datetime
import statistics
import time

import jax
import jaxlib


def median_seconds(fn, argument_sets, *, warmup: int = 3, calls: int = 10,
                   repeats: int = 5) -> float:
  """Median per-call time of fn(*args), rotating through argument sets.

  Each repeat enqueues `calls` calls back to back and waits once at the end, so the host's
  dispatch and synchronisation overlap the device work instead of adding to it. Rotating among
  distinct inputs keeps caches from flattering small cases.
  """
  for i in range(warmup):
    jax.block_until_ready(fn(*argument_sets[i % len(argument_sets)]))
  per_call = []
  for _ in range(repeats):
    start = time.perf_counter()
    results = [fn(*argument_sets[i % len(argument_sets)]) for i in range(calls)]
    jax.block_until_ready(results)
    per_call.append((time.perf_counter() - start) / calls)
  return statistics.median(per_call)


def environment() -> dict:
  device = jax.devices()[0]
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": device.device_kind,
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
  }
