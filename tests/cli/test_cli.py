"""The `jfused` command line: argument handling and quick runs that write table, JSON, PNG."""

import dataclasses
import io
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest
from rich.console import Console

from jfused.cli import commands as cli
from jfused.cli.bench import measure, report

# The keys of each kind of row in `jfused bench`'s JSON: scripts and the README's charts read
# them, so they change only on purpose.
ENVIRONMENT_KEYS = {"date", "device", "backend", "jax", "jaxlib"}
BENCH_SETTINGS_KEYS = {
  "suite",
  "dtype",
  "quick",
  "gqa",
  "passes",
  "dropout_rates",
  "norm_param_dtype",
}
MEASURED_KEYS = {"pass", "ms", "compile_s", "temp_mib", "max_error", "vs_xla"}
ROW_KEYS = {
  "attention": {
    "suite",
    "name",
    "batch",
    "seq",
    "heads",
    "kv_heads",
    "head_dim",
    "causal",
    "window",
    "shape",
    "dropout_rate",
    "implementation",
    "dtype",
  },
  "norm": {"suite", "shape", "rows", "width", "dtype", "param_dtype", "op", "implementation"},
  "block": {
    "suite",
    "shape",
    "name",
    "batch",
    "seq",
    "features",
    "heads",
    "kv_heads",
    "norm",
    "activation",
    "use_bias",
    "rope_theta",
    "implementation",
    "dtype",
  },
}
ROW_KEYS["cross_entropy"] = {
  "suite",
  "shape",
  "tokens",
  "width",
  "vocab",
  "weight_layout",
  "dtype",
  "implementation",
}
THROUGHPUT_KEYS = {
  "attention": {"tflops"},
  "norm": {"gbps", "of_copy"},
  "block": {"tokens_per_s"},
  "cross_entropy": {"tflops"},
}
TRAIN_RUN_KEYS = {
  "variant",
  "parameters",
  "losses",
  "step_ms",
  "tokens_per_s",
  "compile_s",
  "program_mib",
  "scratch_mib",
  "validation_loss",
}
# Cursor movement, colours: none may reach a file or pipe.
CONTROL_CODE = re.compile(r"\x1b\[|\r")


def _tables(printed: str) -> dict[str, list[dict[str, str]]]:
  """The rich tables in `printed`, by the first word of their titles: each body row as
  {column header: cell text}. The tables are borderless, two spaces or more between columns
  and a rule under the header; off a terminal every row is one line (nothing wraps)."""
  split = lambda line: re.split(r"\s{2,}", line.strip())
  tables = {}
  lines = printed.splitlines()
  for index, line in enumerate(lines):
    if not line or set(line) != {"─"}:
      continue
    header = split(lines[index - 1])
    body = tables[lines[index - 2].split()[0]] = []
    for row in lines[index + 1 :]:
      if row.strip():
        cells = split(row)
        if len(cells) != len(header):  # The caption or the notes below the table.
          break
        body.append(dict(zip(header, cells)))
  return tables


def _check_numbers(table_rows, columns):
  """Every cell of `columns` is '-' or a number that parses, and none is negative."""
  for row in table_rows:
    for column in columns:
      cell = row[column]
      if cell != "-":
        assert float(cell.removesuffix("x")) >= 0, row


@pytest.mark.parametrize(
  "argv",
  [
    ["bench"],
    ["bench", "everything"],
    ["bench", "attention", "--implementations", "triton"],
    ["bench", "attention", "--passes", "sideways"],
    ["bench", "norm", "--dtype", "int8"],
    ["bench", "norm", "--norm-param-dtype", "float16"],
    ["bench", "norm", "--attention-shapes", "huge"],
    ["bench", "block", "--block-shapes", "enormous"],
    ["train", "--steps", "0"],
    ["train", "--variants", "fused,turbo"],
    ["train", "--size", "huge"],
    ["train", "--learning-rate", "fast"],
    ["train", "--vocab-size", "100"],  # Fewer ids than the bytes of the text.
    ["frobnicate"],
  ],
)
def test_bad_arguments_exit_with_code_2(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  assert "error" in capsys.readouterr().err


def _run_bench(tmp_path, capsys, suite, *extra):
  assert cli.main(["bench", suite, "--out-dir", str(tmp_path), *extra]) == 0
  assert not os.path.exists(tmp_path / f"bench_{suite}.partial.json")  # Replaced by the whole.
  printed = capsys.readouterr().out
  with open(tmp_path / f"bench_{suite}.json") as f:
    result = json.load(f)
  return printed, result


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU notice and quick shapes")
def test_bench_attention_quick_on_cpu(tmp_path, capsys):
  printed, result = _run_bench(
    tmp_path,
    capsys,
    "attention",
    "--passes",
    "fwd,fwd+bwd",
    "--implementations",
    "pallas_triton,xla,cudnn,cudnn_deterministic,fa3,pallas_mosaic_fused",
  )
  assert "interpret mode" in printed
  assert set(result) == ENVIRONMENT_KEYS | {"settings", "rows"}
  assert set(result["settings"]) == BENCH_SETTINGS_KEYS
  measured = [r for r in result["rows"] if "ms" in r]
  assert {r["implementation"] for r in measured} == {"pallas_triton", "xla"}
  assert {r["pass"] for r in measured} == {"fwd", "fwd+bwd"}
  for row in measured:
    assert set(row) == ROW_KEYS["attention"] | MEASURED_KEYS | THROUGHPUT_KEYS["attention"]
  skipped = [r for r in result["rows"] if "skipped" in r]
  assert {r["implementation"] for r in skipped} == {
    "cudnn",
    "cudnn_deterministic",
    "fa3",
    "pallas_mosaic_fused",
  }
  for row in skipped:
    assert set(row) == ROW_KEYS["attention"] | {"pass", "skipped"}
  for row in measured:
    # bf16 against a float32 reference: small but never zero, never NaN.
    assert 0 < row["max_error"] < 0.05
    assert row["ms"] > 0 and row["tflops"] > 0
  assert all(r["vs_xla"] == pytest.approx(1.0) for r in measured if r["implementation"] == "xla")
  assert os.path.getsize(tmp_path / "attention.png") > 1000

  table = _tables(printed)["attention"]
  assert list(table[0]) == [
    "shape",
    "implementation",
    "pass",
    "ms",
    "TFLOP/s",
    "vs xla",
    "temp MiB",
    "compile s",
    "max err",
  ]
  # One table row per measured JSON row, in the same order, with the same numbers.
  assert [(t["shape"], t["implementation"], t["pass"]) for t in table] == [
    (r["shape"], r["implementation"], r["pass"]) for r in measured
  ]
  for cells, row in zip(table, measured):
    assert float(cells["ms"]) == pytest.approx(row["ms"], abs=5e-4)
    assert float(cells["max err"]) == pytest.approx(row["max_error"], rel=0.06)
  _check_numbers(table, ["ms", "TFLOP/s", "vs xla", "temp MiB", "compile s"])
  # Skipped cells are one line per reason below the table, not rows of dashes.
  assert "skipped: cudnn needs a CUDA GPU (all 5 shapes)" in printed


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU quick shapes")
def test_bench_norm_quick_on_cpu(tmp_path, capsys):
  assert (
    cli.main(
      [
        "bench",
        "norm",
        "--out-dir",
        str(tmp_path),
        "--passes",
        "fwd,bwd",
        "--norm-param-dtype",
        "bfloat16",
      ]
    )
    == 0
  )
  captured = capsys.readouterr()
  printed, progress = captured.out, captured.err
  with open(tmp_path / "bench_norm.json") as f:
    result = json.load(f)
  assert {r["param_dtype"] for r in result["rows"]} == {"bfloat16"}
  ops = {(r["op"], r["implementation"]) for r in result["rows"] if "ms" in r}
  assert ("layer_norm", "pallas_triton") in ops and ("residual+rms_norm", "xla") in ops
  assert ("copy", "xla") in ops
  for row in result["rows"]:
    if row["op"] == "copy":
      assert set(row) == ROW_KEYS["norm"] | {"pass", "ms", "gbps"}
    else:
      assert set(row) == ROW_KEYS["norm"] | MEASURED_KEYS | THROUGHPUT_KEYS["norm"]
      assert 0 <= row["max_error"] < 0.05
  # The backward is timed on its own (not fwd+bwd minus fwd): a positive time with its own
  # compile, and only for the ops that have one.
  backward = [r for r in result["rows"] if r["pass"] == "bwd"]
  assert {r["op"] for r in backward} == {"layer_norm", "rms_norm"}
  assert all(r["ms"] > 0 and r["gbps"] > 0 and r["compile_s"] > 0 for r in backward)
  assert os.path.getsize(tmp_path / "norms.png") > 1000
  assert result["settings"]["quick"] is True and result["device"]

  table = _tables(printed)["norm"]
  assert list(table[0]) == [
    "shape",
    "op",
    "implementation",
    "pass",
    "ms",
    "GB/s",
    "of copy",
    "vs xla",
    "temp MiB",
    "compile s",
    "max err",
  ]
  assert len(table) == len(result["rows"])
  assert [t["pass"] for t in table if t["op"] == "layer_norm"].count("bwd") == 4
  _check_numbers(table, ["ms", "GB/s", "of copy", "vs xla", "temp MiB", "compile s"])
  assert "bwd: the backward alone" in printed

  # stderr is not a terminal here: the progress is plain lines, one per cell and a last one.
  assert not CONTROL_CODE.search(progress)
  lines = [line for line in progress.splitlines() if line.startswith("norm ")]
  assert len(lines) == 2 * 4 * 2 + 1
  assert re.search(r" 16/16 .*done$", lines[-1])


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU quick shapes")
def test_bench_block_quick_on_cpu(tmp_path, capsys):
  printed, result = _run_bench(
    tmp_path, capsys, "block", "--passes", "fwd+bwd", "--implementations", "pallas_triton,xla"
  )
  measured = {(r["shape"], r["implementation"]): r for r in result["rows"] if "ms" in r}
  # The GPT-2-style and the LLaMA-style (GQA, RMSNorm, SwiGLU, RoPE, no biases) quick blocks.
  shapes = ["B1_T64_D128_h4", "B1_T64_D128_h4kv2_llama"]
  assert set(measured) == {(s, i) for s in shapes for i in ("pallas_triton", "xla")}
  for row in measured.values():
    assert set(row) == ROW_KEYS["block"] | MEASURED_KEYS | THROUGHPUT_KEYS["block"]
    # bf16 block against the float32 plain-Flax block: small, never zero, never NaN.
    assert 0 < row["max_error"] < 0.1
    assert row["tokens_per_s"] > 0
  assert measured[(shapes[1], "xla")]["rope_theta"] == 500000.0
  table = _tables(printed)["block"]
  assert [(t["shape"], t["implementation"], t["pass"]) for t in table] == [
    (s, i, "fwd+bwd") for s in shapes for i in ("pallas_triton", "xla")
  ]
  for cells in table:
    assert float(cells["ktok/s"]) == pytest.approx(
      measured[(cells["shape"], cells["implementation"])]["tokens_per_s"] / 1e3, abs=0.05
    )


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU quick shapes")
def test_bench_cross_entropy_quick_on_cpu(tmp_path, capsys):
  printed, result = _run_bench(tmp_path, capsys, "cross_entropy")
  measured = [r for r in result["rows"] if "ms" in r]
  implementations = {"pallas_triton", "xla_chunked", "xla", "matmul"}
  assert {r["implementation"] for r in measured} == implementations
  for row in measured:
    assert set(row) == ROW_KEYS["cross_entropy"] | MEASURED_KEYS | THROUGHPUT_KEYS["cross_entropy"]
    assert row["tflops"] > 0
    # bf16 inputs against the float32 loss: small, never NaN. The bare matmuls have no loss.
    if row["implementation"] == "matmul":
      assert row["max_error"] is None
    else:
      assert 0 <= row["max_error"] < 1e-2
  # The chunked implementations' backward is the forward pass's work: measured as fwd+bwd only.
  passes = {(r["implementation"], r["pass"]) for r in measured}
  assert ("xla", "bwd") in passes and ("pallas_triton", "bwd") not in passes
  assert ("pallas_triton", "fwd+bwd") in passes
  assert "pallas_triton makes a mean loss's gradients in its forward pass" in printed
  # The Mosaic kernel has no interpreter: its rows say why they are absent.
  skipped = {r["skipped"] for r in result["rows"] if r["implementation"] == "pallas_mosaic"}
  assert skipped == {"pallas_mosaic needs a Hopper (sm90) GPU"}
  assert "pallas_mosaic needs a Hopper (sm90) GPU" in printed
  table = _tables(printed)["cross_entropy"]
  assert len(table) == len(measured)


def _run_train(tmp_path, capsys, *extra):
  assert cli.main(["train", "--out-dir", str(tmp_path), *extra]) == 0
  printed = capsys.readouterr().out
  with open(tmp_path / "train.json") as f:
    return printed, json.load(f)


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU notice and tiny model")
def test_train_quick_on_cpu(tmp_path, capsys):
  printed, result = _run_train(tmp_path, capsys, "--steps", "8")
  assert "interpret mode" in printed
  assert set(result) == ENVIRONMENT_KEYS | {"settings", "loss_gap", "runs"}
  assert all(set(run) == TRAIN_RUN_KEYS for run in result["runs"])
  fused, plain = result["runs"]
  assert (fused["variant"], plain["variant"]) == ("fused", "plain")
  assert result["settings"]["steps"] == 8 and result["settings"]["dtype"] == "float32"
  assert fused["parameters"] == plain["parameters"] > 0
  for run in (fused, plain):
    assert len(run["losses"]) == 8
    # Bytes start near uniform (ln 256 = 5.55) and the model learns something in 8 steps.
    assert abs(run["losses"][0] - 5.55) < 0.2
    assert run["losses"][-1] < run["losses"][0] - 0.3
    assert run["step_ms"] > 0 and run["tokens_per_s"] > 0 and run["program_mib"] > 0
    assert 0 < run["validation_loss"] < 6
  # Same start, same batches, float32: the fused layers track plain Flax closely but not
  # bitwise (the kernels sum in another order).
  assert result["loss_gap"]["max_abs"] < 1e-4
  assert result["loss_gap"]["max_abs"] == pytest.approx(
    max(abs(a - b) for a, b in zip(fused["losses"], plain["losses"]))
  )
  assert os.path.getsize(tmp_path / "train_loss.png") > 1000

  table = _tables(printed)["training"]
  assert [t["variant"] for t in table] == ["fused", "plain"]
  for cells, run in zip(table, (fused, plain)):
    assert int(cells["params"].replace(",", "")) == run["parameters"]
    assert float(cells["step ms"]) == pytest.approx(run["step_ms"], abs=0.005)
    assert float(cells["last loss"]) == pytest.approx(run["losses"][-1], abs=5e-5)
    assert float(cells["val loss"]) == pytest.approx(run["validation_loss"], abs=5e-5)
  gap = re.search(r"largest loss difference: (\S+) at step (\d+)", printed)
  assert float(gap[1]) == pytest.approx(result["loss_gap"]["max_abs"], rel=0.01)
  assert int(gap[2]) == result["loss_gap"]["step"]
  assert "fused step speed-up over plain:" in printed


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the tiny model")
def test_train_vocabulary_shows_the_fused_loss_memory(tmp_path, capsys):
  vocab, tokens = 8192, 4 * 64  # The tiny preset's batch x seq_len.
  printed, result = _run_train(
    tmp_path, capsys, "--steps", "3", "--vocab-size", str(vocab), "--no-plot"
  )
  assert result["settings"]["vocab_size"] == vocab
  fused, plain = result["runs"]
  for run in (fused, plain):
    # Untrained logits are near uniform over the whole vocabulary, used ids or not.
    assert run["losses"][0] == pytest.approx(math.log(vocab), abs=0.2)
  assert result["loss_gap"]["max_abs"] < 1e-4
  # Plain Flax holds the float32 logits and their gradient; the fused loss holds neither.
  logits_mib = tokens * vocab * 4 / 2**20
  assert plain["scratch_mib"] - fused["scratch_mib"] > 1.5 * logits_mib
  table = _tables(printed)["training"]
  assert [float(t["scratch MiB"]) for t in table] == pytest.approx(
    [fused["scratch_mib"], plain["scratch_mib"]], abs=0.05
  )


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the tiny model")
def test_train_data_parallel_matches_one_device(tmp_path, capsys):
  import jax

  batch = str(2 * len(jax.devices()))
  common = ["--steps", "3", "--batch", batch, "--variants", "fused", "--no-plot"]
  _, single = _run_train(tmp_path / "single", capsys, *common)
  _, parallel = _run_train(tmp_path / "parallel", capsys, *common, "--data-parallel")
  assert parallel["settings"]["devices"] == len(jax.devices())
  assert parallel["runs"][0]["losses"] == pytest.approx(single["runs"][0]["losses"], rel=1e-5)
  assert not (tmp_path / "parallel" / "train_loss.png").exists()


def test_train_rejects_a_batch_the_devices_do_not_divide(tmp_path, capsys):
  import jax

  if len(jax.devices()) == 1:
    pytest.skip("every batch divides over one device")
  assert (
    cli.main(
      [
        "train",
        "--batch",
        str(len(jax.devices()) + 1),
        "--data-parallel",
        "--out-dir",
        str(tmp_path),
      ]
    )
    == 2
  )
  assert "does not divide" in capsys.readouterr().err


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU refusal")
def test_train_cudnn_variant_needs_a_gpu(tmp_path, capsys):
  assert cli.main(["train", "--variants", "fused,cudnn", "--out-dir", str(tmp_path)]) == 2
  assert "the cudnn variant needs a CUDA GPU" in capsys.readouterr().err


def test_train_builds_the_cudnn_baseline_on_flax_norms_and_loss():
  from jfused.cli import train as training

  size = training.SIZES["tiny"]
  model = training.build_model(size, variant="cudnn", dtype="float32", seed=0)
  assert model.fused and model.loss_implementation == "xla"
  block = model.blocks[0]
  assert block.attention.attention_fn.implementation == "cudnn"
  assert block.norm1.implementation == "xla"
  assert training.default_variants() == (
    training.VARIANTS if cli.config.on_gpu() else ("fused", "plain")
  )


def _progress_lines(err: str, variant: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith(variant + " ")]


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the tiny model")
def test_train_progress_in_a_log(tmp_path, capsys):
  """Off a terminal the progress bar is plain lines: the compile, the first step, every tenth
  and the last, each with done/total, rate, elapsed and time left."""
  assert (
    cli.main(
      ["train", "--steps", "20", "--variants", "plain", "--no-plot", "--out-dir", str(tmp_path)]
    )
    == 0
  )
  err = capsys.readouterr().err
  assert not CONTROL_CODE.search(err)
  lines = _progress_lines(err, "plain")
  steps = [int(re.search(r" (\d+)/20 ", line)[1]) for line in lines]
  assert steps == [0, 1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
  assert lines[0].endswith("compiling")
  assert re.search(
    r" 20/20 [\d.]+ (step/s|s/step) \d+:\d\d:\d\d eta 0:00:00 loss \d\.\d{3}$", lines[-1]
  )


def test_measure_backward_times_only_the_backward_and_compiles_once():
  """The forward runs outside the timing, for every argument set in one jitted program; the
  timed backward compiles once for all the sets and never runs the forward rule."""
  traces = {"fwd": 0, "bwd": 0}

  @jax.custom_vjp
  def double(x):
    return 2 * x

  def double_fwd(x):
    traces["fwd"] += 1
    return 2 * x, None

  def double_bwd(_, g):
    traces["bwd"] += 1
    return (2 * g,)

  double.defvjp(double_fwd, double_bwd)

  def pullback(x, dy):
    _, vjp = jax.vjp(lambda x: jnp.sin(double(x)), x)
    return vjp, dy

  keys = jax.random.split(jax.random.key(0), 6)
  argument_sets = [
    (jax.random.normal(keys[i], (64,)), jax.random.normal(keys[i + 3], (64,))) for i in range(3)
  ]
  measured = measure.measure_backward(pullback, argument_sets, quick=True)
  assert measured.seconds > 0 and measured.compile_seconds > 0
  assert traces == {"fwd": 1, "bwd": 1}


def test_tables_fit_a_narrow_terminal():
  """On a terminal the table fits its width: long cells wrap, and every number survives."""
  rows = [
    {
      "suite": "attention",
      "shape": "B4_T4096_h16_d128_causal_dropout0.1",
      "implementation": implementation,
      "pass": "bwd",
      "ms": ms,
      "tflops": 312.5,
      "compile_s": 1.25,
      "temp_mib": 64.0,
      "max_error": 1.5e-3,
      "dtype": "bfloat16",
    }
    for implementation, ms in (("pallas_triton", 1.234), ("xla", 4.321))
  ]
  report.add_speedups(rows)
  out = io.StringIO()
  console = Console(file=out, width=72, force_terminal=True, color_system=None)
  for renderable in report.tables(rows, width=console.width):
    console.print(renderable)
  printed = out.getvalue()
  assert max(len(line) for line in printed.splitlines()) <= 72
  # The least needed columns go first, and the table says so.
  assert "left out to fit the terminal: compile s, temp MiB" in printed
  assert "1.25" not in printed and "64.0" not in printed
  for number in ("1.234", "4.321", "312.5", "3.50x", "1.00x", "1.5e-03"):
    assert number in printed
  # The long shape folds rather than losing its end.
  assert "dropout0.1" in printed.replace("\n", "").replace(" ", "")


def test_fa3_rows_say_why_they_are_not_measured(monkeypatch):
  """FlashAttention-3 is measured only where its package imports, on Hopper, at the wheel's
  head dim 128, in bf16 or f16, without dropout; otherwise its rows carry the reason."""
  import types

  from jfused.cli.bench import attention

  shape = attention.AttentionShape("B1_T64_h4_d128", 1, 64, 4, 4, 128, True)
  installed = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: object()))
  missing = types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: None))
  monkeypatch.setattr(attention, "importlib", missing)
  assert attention.unavailable("fa3", shape) == "flash_attn3_jax is not installed"
  monkeypatch.setattr(attention, "importlib", installed)
  monkeypatch.setattr(attention.config, "on_hopper", lambda: False)
  assert attention.unavailable("fa3", shape) == "fa3 needs a Hopper (sm90) GPU"
  monkeypatch.setattr(attention.config, "on_hopper", lambda: True)
  assert attention.unavailable("fa3", shape) is None
  assert attention.unavailable("fa3", shape, dtype=jnp.float16) is None
  assert "head dim 128" in attention.unavailable("fa3", dataclasses.replace(shape, head_dim=64))
  assert "bfloat16" in attention.unavailable("fa3", shape, dtype=jnp.float32)
  assert "dropout" in attention.unavailable("fa3", shape, dropout_rate=0.1)


def test_window_rows_count_visible_pairs_and_pass_the_window_to_every_library(monkeypatch):
  """A window row's FLOPs are its visible (query, key) pairs, counted here one by one, and
  every implementation is called with the same (window, 0) window; the quick preset's window
  row agrees with the windowed float32 reference (it would not if the window were dropped)."""
  import sys
  import types

  from jfused.cli.bench import attention

  shape = attention._shape(2, 300, 4, 2, 64, True, window=37)
  assert shape.name == "B2_T300_h4kv2_d64_causal_window37"
  pairs = sum(1 for t in range(300) for s in range(300) if t - 37 <= s <= t)
  assert shape.forward_flops() == pytest.approx(4.0 * 2 * 4 * pairs * 64)
  wide = attention._shape(1, 16, 1, 1, 8, True, window=100)  # Wider than the sequence.
  assert wide.forward_flops() == pytest.approx(
    attention._shape(1, 16, 1, 1, 8, True).forward_flops() + 4.0 * 16 * 8 / 2
  )

  calls = []
  fake_fa3 = types.ModuleType("flash_attn3_jax")
  fake_fa3.flash_mha = lambda q, k, v, **kw: calls.append(("fa3", kw))
  fake_tokamax = types.ModuleType("tokamax")
  fake_tokamax.dot_product_attention = lambda q, k, v, **kw: calls.append(("tokamax", kw))
  monkeypatch.setitem(sys.modules, "flash_attn3_jax", fake_fa3)
  monkeypatch.setitem(sys.modules, "tokamax", fake_tokamax)
  for window in (37, None):
    attention._attend("fa3", True, window=window)(None, None, None)
    attention._attend("tokamax", True, window=window)(None, None, None)
  assert calls == [
    ("fa3", {"is_causal": True, "window_size": (37, 0)}),
    ("tokamax", {"is_causal": True, "local_window_size": (37, 0)}),
    ("fa3", {"is_causal": True, "window_size": (-1, -1)}),  # FA3's "no window".
    ("tokamax", {"is_causal": True, "local_window_size": None}),
  ]

  (window_row,) = [s for s in attention.PRESETS["quick"](False) if s.window is not None]
  q, k, v, _ = attention.make_inputs(window_row, jnp.bfloat16, 1)[0]
  kernel = attention._attend("pallas_triton", True, window=window_row.window)
  assert attention._max_error(kernel, window_row, q, k, v, 0.0) < 0.05
  unwindowed = attention._attend("pallas_triton", True)
  assert attention._max_error(unwindowed, window_row, q, k, v, 0.0) > 0.05
  # With dropout the window stays (the reference goes through _attend too, so ask jfused).
  seen = []
  monkeypatch.setattr(
    attention.jfused, "dot_product_attention", lambda q, k, v, **kw: seen.append(kw)
  )
  attention._attend("pallas_mosaic_fused", True, 0.1, window=37)(None, None, None)
  assert seen[0]["local_window_size"] == (37, 0) and seen[0]["dropout_rate"] == 0.1
  assert seen[0]["deterministic_backward"] is False
  attention._attend("pallas_mosaic", True)(None, None, None)
  assert seen[1]["deterministic_backward"] is True  # The pair: the like-for-like row.


def test_bench_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
  """A run stopped after its cells (here: failing where the tables would print) leaves
  bench_<suite>.partial.json with every cell but the last, as measured."""

  def cut(rows):
    raise RuntimeError("cut")

  monkeypatch.setattr(report, "add_speedups", cut)
  with pytest.raises(RuntimeError, match="cut"):
    cli.main(
      [
        "bench",
        "norm",
        "--quick",
        "--implementations",
        "xla",
        "--passes",
        "fwd",
        "--out-dir",
        str(tmp_path),
      ]
    )
  assert not os.path.exists(tmp_path / "bench_norm.json")
  with open(tmp_path / "bench_norm.partial.json") as f:
    partial = json.load(f)
  measured = [r for r in partial["rows"] if "ms" in r]
  assert measured and all(r["ms"] > 0 and r["implementation"] == "xla" for r in measured)


@pytest.mark.parametrize(
  "variant, deterministic_backward, recompute",
  [
    ("pallas_mosaic", None, False),
    ("pallas_mosaic_fused_bwd", False, False),
    ("pallas_mosaic_recompute", None, True),
  ],
)
def test_bench_block_option_variants_build_the_mosaic_block(
  variant, deterministic_backward, recompute
):
  """The block bench's option rows are the pallas_mosaic block with one option changed."""
  from jfused.cli.bench import block as block_bench

  shape = block_bench.PRESETS["quick"][0]
  block = block_bench._block(shape, variant, "bfloat16")
  attention_fn = block.attention.attention_fn
  assert attention_fn.implementation == "pallas_mosaic"
  assert attention_fn.deterministic_backward is deterministic_backward
  assert block.mlp.recompute_activation is recompute
  assert block.norm1.implementation == "pallas_triton"
