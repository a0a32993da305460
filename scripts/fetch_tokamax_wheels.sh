#!/usr/bin/env bash
# Downloads tokamax 0.0.17 and the packages it imports that a CUDA image with JAX, Flax and
# the usual scientific stack lacks, as Linux x86-64 CPython 3.12 wheels, into .whl/tokamax/
# (where scripts/gpu_check.sh installs them from, for an offline GPU machine). Versions as
# used for benchmarks/results/attention_bench_tokamax_h200_2026-12-01.json.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/tokamax
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl/tokamax \
  tokamax==0.0.17 einshape==1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 typing-extensions qwix==0.1.8 immutabledict==4.3.1 \
  tensorboardx==2.6.5 xprof==2.24.2 fire termcolor gviz-api
ls .whl/tokamax
