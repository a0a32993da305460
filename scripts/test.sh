#!/usr/bin/env bash
# Sets up (if needed) and runs the test suite on two processes. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n 2 -q "${@:-tests}"
