"""Measuring one jitted function: compile time, scratch memory, median run time."""

from __future__ import annotations

import dataclasses
import time

import jax

from jfused import timing


@dataclasses.dataclass
class Measurement:
  seconds: float
  compile_seconds: float
  temp_bytes: int | None


def measure(fn, argument_sets, *, quick: bool) -> Measurement:
  """Compiles `jax.jit(fn)` once, then times it over the rotating argument sets."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*argument_sets[0]).compile()
  compile_seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  temp = None if analysis is None else int(analysis.temp_size_in_bytes)
  seconds = timing.median_seconds(
      compiled, argument_sets, warmup=1 if quick else 3, calls=2 if quick else 10,
      repeats=2 if quick else 5)
  return Measurement(seconds, compile_seconds, temp)
