#!/usr/bin/env bash
# The tests, on two processes; what CI (.ci/run) runs.
#
#   bash scripts/test.sh             # lint and format check, the whole suite on JAX 0.12.0.1,
#                                    # then the kernels, their lowering and the CLI on 0.11.2
#   bash scripts/test.sh ARGS...     # pytest ARGS on JAX 0.12.0.1 only
#
# Each JAX version gets its own environment (scripts/setup.sh); the first run sets them up.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh)
if [[ $# -gt 0 ]]; then
  exec "$venv"/bin/python -m pytest -n 2 -q "$@"
fi
"$venv"/bin/ruff check .
"$venv"/bin/ruff format --check .
echo "== the whole suite on JAX $("$venv"/bin/python -c 'import jax; print(jax.__version__)')"
"$venv"/bin/python -m pytest -n 2 -q tests
old_venv=$(bash scripts/setup.sh 0.11.2)
echo "== kernels, lowering and CLI on JAX 0.11.2"
"$old_venv"/bin/python -m pytest -n 2 -q tests/attention/test_kernels.py \
  tests/attention/test_lowering.py tests/attention/test_mosaic.py tests/test_lowered_once.py \
  tests/norms tests/cli
