#!/usr/bin/env bash
# One GPU call for a prefill kernel change (issue #3): GPU tests selected by -k expressions, each
# expression in its own pytest process side by side, then an interleaved A/B of the variants.
#   TEST_PARTS='expr1|expr2' bash perf/diag/prefill_gpu_round.sh OUTDIR AB_ARGS...
# (TEST_PARTS empty: no tests; AB_ARGS empty: no A/B.) Logs go to OUTDIR.
set -uo pipefail
out=${1:-.}; shift
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv,noheader
if [ -n "${TEST_PARTS:-}" ]; then
  IFS='|' read -ra parts <<< "$TEST_PARTS"
  i=0
  for k in "${parts[@]}"; do
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu tests/kernels/test_prefill_sm90.py \
      -k "$k" -p no:cacheprovider > "$out/pytest$i.log" 2>&1 &
    i=$((i + 1))
  done
  wait
  for f in "$out"/pytest*.log; do echo "== $f"; tail -4 "$f"; done
fi
if [ $# -gt 0 ]; then
  timeout "${AB_TIMEOUT:-400}" python3 perf/ab/prefill_ab.py "$@" 2>&1 | grep -v Warning \
    | tee "$out/ab.log" | grep -v "^   \|compiled"
fi
