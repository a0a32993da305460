"""Timing and environment helpers shared by the benchmarks and the command line."""

from __future__ import annotations

import datetime
import math
import statistics
import time

import jax
import jaxlib


def median_seconds(
  fn,
  argument_sets,
  *,
  warmup: int = 3,
  calls: int = 10,
  repeats: int = 5,
  min_repeat_seconds: float = 0.0,
) -> float:
  """Median per-call time of fn(*args), rotating through argument sets.

  Each repeat enqueues calls back to back and waits once, for the last: the device runs them
  in order, and the host's dispatch overlaps the device work instead of adding to it. The
  wait's own cost (tens of microseconds from the first launch to the host seeing the end) is
  paid once per repeat, so a repeat makes at least `calls` calls and, with
  `min_repeat_seconds`, enough more to last that long: at 20 calls of a 0.1 ms kernel the wait
  alone read as 8 % of the time. Only the last result is kept, so long repeats hold no more
  memory than one call. Rotating among distinct inputs keeps caches from flattering small
  cases.
  """

  def run(count: int) -> float:
    start = time.perf_counter()
    result = None
    for i in range(count):
      result = fn(*argument_sets[i % len(argument_sets)])
    jax.block_until_ready(result)
    return time.perf_counter() - start

  for i in range(warmup):
    jax.block_until_ready(fn(*argument_sets[i % len(argument_sets)]))
  if min_repeat_seconds > 0.0:
    estimate = run(calls) / calls
    calls = max(calls, math.ceil(min_repeat_seconds / max(estimate, 1e-9)))
  return statistics.median(run(calls) / calls for _ in range(repeats))


def environment() -> dict:
  device = jax.devices()[0]
  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "device": device.device_kind,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
  }
