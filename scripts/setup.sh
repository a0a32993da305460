#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs jfused (editable) with the pinned test stack.
# Idempotent: a second run only checks that the environment is there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c "import jfused, jax, xdist" 2>/dev/null; then
  python=""
  for candidate in "${PYTHON:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [[ -n $candidate ]] && command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
      python=$candidate
      break
    fi
  done
  if [[ -z $python ]]; then
    echo "Python 3.12 is needed (JAX 0.11 requires it); set PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-test.txt
  .venv/bin/python -m pip install -q --no-deps -e .
fi
