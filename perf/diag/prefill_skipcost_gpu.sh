#!/usr/bin/env bash
# One GPU call for the prefill skip-overhead work (issue #3): the prefill GPU tests (pytest
# processes side by side, the compiles being CPU-bound; TEST_PARTS='expr|expr' picks the -k
# expressions), then the interleaved A/B of the dense build, the skip build at ~0 % (factor
# 1e-30) and at lambda 0.3 / 0.95, and variants (perf/ab/prefill_ab.py PRESETS).
#   bash perf/diag/prefill_skipcost_gpu.sh OUTDIR [A/B variants...]
set -uo pipefail
out=${1:-.}
shift || true
variants=${*:-dense skip0_rule skip0_fv skip0 sparse_rule sparse_fvlvw sparse}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv,noheader | tee "$out/gpu.txt"
if [ -z "${NO_TESTS:-}" ]; then
  t0=$(date +%s)
  parts=("dense_vs_float64" "skip_matches_reference"
         "varlen or mla_public or factor_tensor or bit_identical or rule_vote or warpgroup_decision"
         "cluster_pair" "schedule_variants")
  if [ -n "${TEST_PARTS:-}" ]; then IFS='|' read -r -a parts <<< "$TEST_PARTS"; fi
  pids=()
  for i in "${!parts[@]}"; do
    timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider \
      tests/kernels/test_prefill_sm90.py -k "${parts[$i]}" > "$out/pytest$i.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; echo "pytest part $i (${parts[$i]}): rc $? -- $(tail -1 "$out/pytest$i.log")"
  done
  echo "tests took $(( $(date +%s) - t0 )) s"
  cat "$out"/pytest*.log | grep -E "^(FAILED|ERROR)|Error" | head -20
fi
timeout ${AB_TIMEOUT:-240} python3 perf/ab/prefill_ab.py --causal both --rounds ${ROUNDS:-7} \
  --iters 10 --lambdas 0.3 0.95 --variants $variants \
  2>&1 | grep -v Warning | tee "$out/ab.log" | grep -v "^ \|compiled"
