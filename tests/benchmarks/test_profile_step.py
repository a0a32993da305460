"""benchmarks/profile_step.py: the trace reading and the kernel kinds (the GPU run itself is
a benchmark, made on the device)."""

from __future__ import annotations

import gzip
import json
import os
import re

import pytest

from benchmarks import profile_step


@pytest.mark.parametrize(
  "kernel, kind",
  [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
    ("cutlass3x_sm90_tensorop_gemm", "matmul"),
    ("nvjet_sm90_tst_176x128_64x5_1x2_h_bz_TNN", "matmul"),  # cuBLAS on Hopper.
    ("jfused_attention_fwd", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
    ("jfused_rms_norm_bwd", "norm"),
    ("jfused_cross_entropy_fwd", "cross-entropy"),
    ("transpose_16", "transpose/copy"),
    ("convert_fusion_3", "cast"),
    ("loop_multiply_fusion_2", "other fusion"),
    ("ncclDevKernel_AllReduce_Sum_bf16", "collective"),
    ("some_custom_kernel", "other"),
  ],
)
def test_kinds(kernel, kind):
  assert profile_step.kind_of(kernel) == kind


def test_gpu_trace_counts_stream_kernels_once(tmp_path):
  metadata = [
    {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
    {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "XLA Ops"}},
    {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
  ]
  kernels = [
    {"ph": "X", "pid": 1, "tid": 7, "name": "sm90_xmma_gemm", "ts": 0, "dur": 30.0},
    {"ph": "X", "pid": 1, "tid": 7, "name": "sm90_xmma_gemm", "ts": 40, "dur": 10.0},
    {"ph": "X", "pid": 1, "tid": 7, "name": "jfused_attention_fwd", "ts": 60, "dur": 5.0},
    # The same time again on the per-op track, and host work: neither counts.
    {"ph": "X", "pid": 1, "tid": 8, "name": "dot.3", "ts": 0, "dur": 40.0},
    {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction", "ts": 0, "dur": 99.0},
  ]
  folder = tmp_path / "plugins" / "profile" / "run"
  os.makedirs(folder)
  with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": metadata + kernels}, f)
  times = profile_step.device_kernel_times(str(tmp_path))
  assert times == {"sm90_xmma_gemm": 40.0, "jfused_attention_fwd": 5.0}
  assert profile_step.by_kind(times) == {"matmul": 40.0, "attention": 5.0}


def test_quick_profile_on_any_machine():
  shape = profile_step.block_bench.PRESETS["quick"][1]  # the LLaMA-style block
  times = profile_step.profile(shape, "xla", "float32", steps=1)
  kinds = profile_step.by_kind(times)
  assert kinds["matmul"] > 0 and sum(kinds.values()) > 0


def test_from_json_reprints_a_saved_profile(tmp_path, capsys, monkeypatch):
  saved = {
    "device": "cuda:0",
    "jax": "0.11.2",
    "runs": [
      {
        "shape": "B1",
        "implementation": "cudnn",
        "kernel_us": {"nvjet_sm90_tst_128x256": 300.0, "loop_convert_fusion": 100.0},
      }
    ],
  }
  path = tmp_path / "profile.json"
  path.write_text(json.dumps(saved))
  monkeypatch.setattr("sys.argv", ["profile_step", "--from-json", str(path)])
  profile_step.main()
  printed = capsys.readouterr().out
  assert "B1 cudnn: 0.400 ms of kernels per step" in printed
  assert re.search(r"matmul\s+0\.300 ms\s+75\.0 %", printed)
  assert re.search(r"cast\s+0\.100 ms\s+25\.0 %", printed)
