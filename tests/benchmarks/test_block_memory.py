"""benchmarks/block_memory.py on tiny blocks (plain XLA, any machine): each step compiles in
a child process whose XLA dump keeps only the memory report, the live ranges and the
optimized program, and the printed temporary size is the compiled program's."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from benchmarks import block_memory
from jfused.cli.bench import block as block_bench


def test_quick_run_reports_each_block_from_its_dump(tmp_path):
  done = subprocess.run(
    [sys.executable, "-m", "benchmarks.block_memory", "--quick", "--out-dir", str(tmp_path)],
    capture_output=True,
    text=True,
    cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
  )
  assert done.returncode == 0, done.stderr[-2000:]
  for shape in block_bench.PRESETS["quick"]:
    found = re.search(rf"{shape.name} xla: ([0-9.]+) MiB temporary", done.stdout)
    assert found, done.stdout
    # The same number as compiling the step here.
    compiled = block_memory.compile_step(shape.name, "xla", quick=True, deviceless=False)
    expected = compiled["temp_mib"]
    assert float(found.group(1)) == expected > 0
    kept = sorted(os.listdir(tmp_path / f"{shape.name}_xla"))
    assert len(kept) == 3 and all(name.endswith(block_memory.KEPT) for name in kept), kept
    report_rows = block_memory.largest_allocations(str(tmp_path / f"{shape.name}_xla"))
    assert report_rows and all(re.search(r"(MiB|KiB)\(", row) for row in report_rows)
    # Allocations are listed largest first.
    sizes = [_kib(row.split(";")[1]) for row in report_rows]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0
    # What is alive at the peak: largest first, each named with the operation that made it,
    # the parameters among them (arguments, alive from the first instruction to the last).
    head, *peak = block_memory.peak_values(str(tmp_path / f"{shape.name}_xla"))
    assert re.fullmatch(r"alive at instruction \d+, the peak:", head), head
    peak_mib = [float(row.split()[0]) for row in peak]
    assert peak and peak_mib == sorted(peak_mib, reverse=True) and peak_mib[0] > 0
    assert any(row.split()[-1] == "params['mlp']['up']['kernel'].value" for row in peak), peak
    assert f"{shape.name} xla: " in done.stdout and head in done.stdout


def _kib(text: str) -> float:
  number, unit = re.fullmatch(r"\s*([0-9.]+)(KiB|MiB|B)\s*", text).groups()
  return float(number) * {"B": 1 / 1024, "KiB": 1.0, "MiB": 1024.0}[unit]


def test_deviceless_rows_take_a_gpu_runs_autotuner_choices_where_there_are_some(tmp_path):
  from benchmarks import deviceless

  row = tmp_path / "gpu_run" / "B8_T2048_D2048_h16_cudnn"
  row.mkdir(parents=True)
  (row / "module_0007.jit_step.autotune_results.pbtxt").write_text("version: 3\n")
  gpu_run = str(tmp_path / "gpu_run")
  dump = str(tmp_path / "out" / "B8_T2048_D2048_h16_cudnn")
  with_choices = block_memory.xla_flags(dump, deviceless=True, autotune_from=gpu_run)
  assert f"--xla_gpu_load_autotune_results_from={row}/module_0007" in with_choices
  assert deviceless.XLA_FLAGS not in with_choices
  other = str(tmp_path / "out" / "B8_T2048_D2048_h16_pallas_mosaic")
  assert deviceless.XLA_FLAGS in block_memory.xla_flags(other, True, gpu_run)
  assert block_memory.xla_flags(dump, False, gpu_run) == (
    f"--xla_dump_to={dump} --xla_dump_hlo_module_re=jit_step"
  )
