#!/usr/bin/env bash
# Sets up (if needed) and runs the main job: jfused's fused ops beside XLA on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/jfused demo
