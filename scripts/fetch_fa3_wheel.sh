#!/usr/bin/env bash
# Downloads flash-attn3-jax 0.2.3 (FlashAttention-3 through XLA FFI; its wheel is built for
# Hopper at head dim 128), a Linux x86-64 CPython 3.12 wheel, into .whl/, where
# scripts/gpu_check.sh installs it from on an offline GPU machine. `jfused bench attention`
# then adds an "fa3" row beside cuDNN and tokamax.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d .whl flash-attn3-jax==0.2.3
ls .whl
