#!/usr/bin/env bash
# Creates a virtual environment with Python 3.12, jfused (editable) and the test stack on one
# supported JAX version, and prints its path (the only line on stdout).
#
#   bash scripts/setup.sh            # JAX 0.12.0.1 (the newest supported) in .venv
#   bash scripts/setup.sh 0.11.2     # JAX 0.11.2 (what the GPU numbers use) in .venv-jax0.11.2
#
# The versions are pinned by constraints/jax-<version>.txt. Idempotent: a second run only
# checks that the environment is there.
set -euo pipefail
cd "$(dirname "$0")/.."
newest=0.12.0.1
version=${1:-$newest}
constraints=constraints/jax-$version.txt
if [[ ! -f $constraints ]]; then
  echo "no $constraints; supported JAX versions: $(ls constraints | sed 's/^jax-//; s/\.txt$//' | tr '\n' ' ')" >&2
  exit 1
fi
venv=.venv
[[ $version == "$newest" ]] || venv=.venv-jax$version
if [[ ! -x $venv/bin/python ]] || ! $venv/bin/python -c "
import jax, jfused, rich, xdist
assert jax.__version__ == '$version', jax.__version__" 2>/dev/null; then
  python=""
  for candidate in "${PYTHON:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if [[ -n $candidate ]] && command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
      python=$candidate
      break
    fi
  done
  if [[ -z $python ]]; then
    echo "Python 3.12 is needed (JAX 0.11 and 0.12 require it); set PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  echo "setting up $venv with JAX $version" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv"/bin/python -m pip install -q --upgrade pip >&2
  "$venv"/bin/python -m pip install -q -r requirements-test.txt -c "$constraints" >&2
  "$venv"/bin/python -m pip install -q --no-deps -e . >&2
fi
echo "$venv"
