#!/usr/bin/env bash
# One call on a CUDA machine: the test suite natively (GPU-marked tests included) and the
# benchmarks. Logs and JSON results land in $OUT (default ./bench_out).
#   bash scripts/gpu_check.sh [all|tests|bench|sweep]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
what=${1:-all}
status=0
if [[ $what == all || $what == tests ]]; then
  python3 -m pytest tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" \
    | grep -E "passed|failed|error" | tail -5 || status=1
fi
if [[ $what == all || $what == bench ]]; then
  python3 -m benchmarks.bench_attention --out "$OUT/attention.json" 2>&1 \
    | grep -v Warning | tee "$OUT/attention.log" || status=1
  if [[ -f benchmarks/bench_norms.py ]]; then
    python3 -m benchmarks.bench_norms --out "$OUT/norms.json" 2>&1 \
      | grep -v Warning | tee "$OUT/norms.log" || status=1
  fi
fi
if [[ $what == sweep ]]; then
  python3 -m benchmarks.bench_attention --sweep --out "$OUT/sweep.json" 2>&1 \
    | grep -v Warning | tee "$OUT/sweep.log" || status=1
fi
exit $status
