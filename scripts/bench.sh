#!/usr/bin/env bash
# Sets up (if needed) and runs the main job: `jfused bench all --quick`, the fused ops beside
# XLA (and cuDNN/tokamax where present) on this machine. Extra arguments go to jfused bench.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(bash scripts/setup.sh)
"$venv"/bin/jfused bench all --quick "$@"
