"""The `jfused` command line: argument handling and quick runs that write table, JSON, PNG."""

import json
import os

import pytest

from jfused.cli import commands as cli


@pytest.mark.parametrize("argv", [
    ["bench"],
    ["bench", "everything"],
    ["bench", "attention", "--implementations", "triton"],
    ["bench", "attention", "--passes", "sideways"],
    ["bench", "norm", "--dtype", "int8"],
    ["bench", "norm", "--norm-param-dtype", "float16"],
    ["bench", "norm", "--attention-shapes", "huge"],
    ["bench", "block", "--block-shapes", "llama"],
    ["train", "--steps", "0"],
    ["train", "--variants", "fused,turbo"],
    ["train", "--size", "huge"],
    ["train", "--learning-rate", "fast"],
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
                               "--implementations", "pallas_triton,xla,cudnn,cudnn_deterministic")
  assert "interpret mode" in printed
  measured = [r for r in result["rows"] if "ms" in r]
  assert {r["implementation"] for r in measured} == {"pallas_triton", "xla"}
  assert {r["pass"] for r in measured} == {"fwd", "fwd+bwd"}
  skipped = [r for r in result["rows"] if "skipped" in r]
  assert {r["implementation"] for r in skipped} == {"cudnn", "cudnn_deterministic"}
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
  printed, result = _run_bench(tmp_path, capsys, "norm", "--passes", "fwd",
                               "--norm-param-dtype", "bfloat16")
  assert {r["param_dtype"] for r in result["rows"]} == {"bfloat16"}
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


def _run_train(tmp_path, capsys, *extra):
  assert cli.main(["train", "--out-dir", str(tmp_path), *extra]) == 0
  printed = capsys.readouterr().out
  with open(tmp_path / "train.json") as f:
    return printed, json.load(f)


@pytest.mark.skipif(cli.config.on_gpu(), reason="checks the CPU notice and tiny model")
def test_train_quick_on_cpu(tmp_path, capsys):
  printed, result = _run_train(tmp_path, capsys, "--steps", "8")
  assert "interpret mode" in printed and "largest loss difference" in printed
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
      max(abs(a - b) for a, b in zip(fused["losses"], plain["losses"])))
  assert os.path.getsize(tmp_path / "train_loss.png") > 1000


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
  assert cli.main(["train", "--batch", str(len(jax.devices()) + 1), "--data-parallel",
                   "--out-dir", str(tmp_path)]) == 2
  assert "does not divide" in capsys.readouterr().err
