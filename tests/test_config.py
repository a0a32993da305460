"""jfused.config: compiling for a GPU that is not attached chooses the GPU's kernels, and
leaves the process's own choice as it was afterwards."""

from __future__ import annotations

from jfused import config


def test_compiling_for_gpu_chooses_that_gpus_kernels_and_restores():
  before = (config.on_gpu(), config.gpu_compute_capability(), config.use_interpret())
  with config.compiling_for_gpu((9, 0)):
    assert config.on_gpu() and config.on_hopper()
    assert config.gpu_compute_capability() == (9, 0)
    assert not config.use_interpret()
    assert config.mosaic_unavailable_reason() is None
    with config.compiling_for_gpu((8, 0)):  # An A100: no Mosaic GPU kernels.
      assert config.on_gpu() and not config.on_hopper()
      assert "sm90" in config.mosaic_unavailable_reason()
    assert config.gpu_compute_capability() == (9, 0)
  assert (config.on_gpu(), config.gpu_compute_capability(), config.use_interpret()) == before


def test_forced_interpret_wins_over_a_compile_target():
  with config.compiling_for_gpu((9, 0)), config.interpret_mode(True):
    assert config.use_interpret()
    assert "interpreter" in config.mosaic_unavailable_reason()
