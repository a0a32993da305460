"""The `jfused` command line: argument handling and quick runs that write table, JSON, PNG."""

import json
import os

import pytest

from jfused import cli


@pytest.mark.parametrize("argv", [
    ["bench"],
    ["bench", "everything"],
    ["bench", "attention", "--implementations", "triton"],
    ["bench", "attention", "--passes", "sideways"],
    ["bench", "norm", "--dtype", "int8"],
    ["bench", "norm", "--attention-shapes", "huge"],
    ["bench", "block", "--block-shapes", "llama"],
    ["frobnicate"],
])
def test_bad_arguments_exit_with_code_2(argv, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  assert "error" in capsys.readouterr().err


def _run_bench(tmp_path, capsys, suite, *extra):
  assert cli.main(["bench", suite, "--out-dir", str(tmp_path), *extra]) == 0
  printed = capsys.readouterr().out
  with open(tmp_path / f"bench_{suite}.json") as f:
    result = json.load(f)
  return printed, result


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU notice and quick shapes")
def test_bench_attention_quick_on_cpu(tmp_path, capsys):
  printed, result = _run_bench(tmp_path, capsys, "attention", "--passes", "fwd,fwd+bwd",
                               "--implementations", "pallas_triton,xla,cudnn")
  assert "interpret mode" in printed
  measured = [r for r in result["rows"] if "ms" in r]
  assert {r["implementation"] for r in measured} == {"pallas_triton", "xla"}
  assert {r["pass"] for r in measured} == {"fwd", "fwd+bwd"}
  skipped = [r for r in result["rows"] if "skipped" in r]
  assert skipped and all(r["implementation"] == "cudnn" for r in skipped)
  for row in measured:
    # bf16 against a float32 reference: small but never zero, never NaN.
    assert 0 < row["max_error"] < 0.05
    assert row["ms"] > 0 and row["tflops"] > 0
  assert all(r["vs_xla"] == pytest.approx(1.0) for r in measured
             if r["implementation"] == "xla")
  assert os.path.getsize(tmp_path / "attention.png") > 1000
  assert "pallas_triton" in printed and "TFLOP/s" in printed


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU quick shapes")
def test_bench_norm_quick_on_cpu(tmp_path, capsys):
  printed, result = _run_bench(tmp_path, capsys, "norm", "--passes", "fwd")
  ops = {(r["op"], r["implementation"]) for r in result["rows"] if "ms" in r}
  assert ("layer_norm", "pallas_triton") in ops and ("residual+rms_norm", "xla") in ops
  assert ("copy", "xla") in ops
  for row in result["rows"]:
    if row["op"] != "copy":
      assert 0 <= row["max_error"] < 0.05
  assert os.path.getsize(tmp_path / "norms.png") > 1000
  assert "GB/s" in printed
  assert result["settings"]["quick"] is True and result["device"]


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU quick shapes")
def test_bench_block_quick_on_cpu(tmp_path, capsys):
  printed, result = _run_bench(tmp_path, capsys, "block", "--passes", "fwd+bwd",
                               "--implementations", "pallas_triton,xla")
  measured = {r["implementation"]: r for r in result["rows"] if "ms" in r}
  assert set(measured) == {"pallas_triton", "xla"}
  for row in measured.values():
    # bf16 block against the float32 plain-Flax block: small, never zero, never NaN.
    assert 0 < row["max_error"] < 0.1
    assert row["tokens_per_s"] > 0
  assert "ktok/s" in printed
