"""Measuring one jitted function: compile time, scratch memory, median run time; the bench
table's row of such a measurement."""

from __future__ import annotations

import dataclasses
import time

import jax

from jfused.cli import timing

# Each timed repeat lasts at least this long (timing.median_seconds says why).
MIN_REPEAT_SECONDS = 0.03


@dataclasses.dataclass
class Measurement:
  seconds: float
  compile_seconds: float
  temp_bytes: int | None


def measure(fn, argument_sets, *, quick: bool, compiler_options: dict | None = None) -> Measurement:
  """Times `jax.jit(fn)` (with XLA's `compiler_options`, if any) over the rotating argument
  sets; compiles it once more to report the compile time and scratch memory.

  The timing calls the jitted function, not the compiled executable: jit's C++ dispatch path
  costs a few microseconds a call, the executable's Python call path tens, which would cap
  the throughput of a kernel that runs for 0.1 ms.
  """
  jitted = jax.jit(fn, compiler_options=compiler_options)
  start = time.perf_counter()
  compiled = jitted.lower(*argument_sets[0]).compile()
  compile_seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  temp = None if analysis is None else int(analysis.temp_size_in_bytes)
  seconds = timing.median_seconds(
    jitted,
    argument_sets,
    warmup=1 if quick else 3,
    calls=2 if quick else 20,
    repeats=2 if quick else 7,
    min_repeat_seconds=0.0 if quick else MIN_REPEAT_SECONDS,
  )
  return Measurement(seconds, compile_seconds, temp)


def measure_backward(
  forward, argument_sets, *, quick: bool, compiler_options: dict | None = None
) -> Measurement:
  """Times the backward pass on its own, as `measure` times a function.

  `forward(*arguments)` runs `jax.vjp` and returns `(pullback, cotangent)`. It runs once per
  argument set, outside the timing, and inside one `jax.jit`: every pullback then has the
  same tree structure (its leaves are the residuals the forward saved), so the timed
  `jax.jit(pullback(cotangent))` compiles once and rotates through the sets like any other
  function. This is the backward a training step runs after its forward, and how
  FlashAttention's benchmarks time it. Subtracting the forward's time from forward+backward's
  instead reads as a negative time wherever the two lie within noise of each other.

  The residuals of every argument set stay in memory while the backward is timed.
  """
  forward = jax.jit(forward, compiler_options=compiler_options)
  backward_sets = [forward(*arguments) for arguments in argument_sets]
  return measure(
    lambda pullback, cotangent: pullback(cotangent),
    backward_sets,
    quick=quick,
    compiler_options=compiler_options,
  )


def measured_row(
  cell: dict, pass_name: str, measured: Measurement, *, per_second: dict, max_error
) -> dict:
  """A table row of one measured pass: the cell's columns, its time, compile time, scratch
  memory and error; `per_second` maps a rate's column to the work one run does (tokens,
  TFLOP), divided here by the median time (None where that time is 0)."""
  seconds = measured.seconds
  return {
    **cell,
    "pass": pass_name,
    "ms": seconds * 1e3,
    **{column: work / seconds if seconds > 0 else None for column, work in per_second.items()},
    "compile_s": measured.compile_seconds,
    "temp_mib": None if measured.temp_bytes is None else measured.temp_bytes / 2**20,
    "max_error": max_error,
  }


def describe_failure(failure: Exception) -> str:
  """One line for a table cell whose measurement raised: type and first line of the message."""
  lines = str(failure).splitlines()
  return f"{type(failure).__name__}: {lines[0][:200] if lines else ''}"
