#!/usr/bin/env bash
# One GPU call for the 2-CTA K/V multicast prefill (issue #3): smoke, GPU tests with the pair
# forced on (BLASST_PREFILL_CLUSTER=heads), interleaved A/B (non-causal, d128 32/8, B*L=32k).
#   bash perf/diag/prefill_cluster_gpu.sh OUTDIR
set -uo pipefail
out=${1:-.}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,power.limit --format=csv,noheader
timeout 120 python3 perf/diag/prefill_cluster_smoke.py 2>&1 | tee "$out/smoke.log" | grep -v Warning
[ "${PIPESTATUS[0]}" = 0 ] || { echo "SMOKE FAILED: stop"; exit 1; }
timeout ${AB_TIMEOUT:-200} python3 perf/ab/prefill_ab.py --causal both --rounds 7 --iters 10 \
  --lambdas 0.02 0.3 0.95 --variants dense dense_c2 dense_h2 skip0 sparse sparse_c2 sparse_h2 \
  2>&1 | grep -v Warning | tee "$out/ab.log" | grep -v "^ \|compiled"
BLASST_PREFILL_CLUSTER=heads timeout ${TEST_TIMEOUT:-220} python3 -m pytest -q -m "gpu and not slow" \
  tests/kernels/test_prefill_sm90.py -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -15
