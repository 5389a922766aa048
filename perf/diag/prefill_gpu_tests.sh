#!/usr/bin/env bash
# The prefill GPU tests in 8 pytest processes side by side (about 8 minutes on an H100), on the
# GPU host from the repo root: bash perf/diag/prefill_gpu_tests.sh OUTDIR
set -uo pipefail
out=${1:-.}
export PYTHONUNBUFFERED=1
t=tests/kernels/test_prefill_sm90.py
run() { timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -p no:cacheprovider "$@"; }
run -m gpu $t -k dense_vs_float64 > "$out/pt-dense.log" 2>&1 &
run -m gpu $t -k "skip_matches_reference or varlen or mla_public or factor_tensor or bit_identical or flag_addr or keep_first or rule_vote or warpgroup_decision or hdim64" > "$out/pt-skip.log" 2>&1 &
(run -m gpu $t -k "cluster_pair or v_load_skip or v_warp"; run -m gpu tests/test_api_gpu.py -k prefill) > "$out/pt-cluster.log" 2>&1 &
run -m "gpu or slow" $t -k "schedule_variants or random_sweep" > "$out/pt-sched.log" 2>&1 &
run -m gpu $t -k "qk_lookahead and False or lookahead_long_keys or rescale_o_before_pv" > "$out/pt-lookahead.log" 2>&1 &
run -m gpu $t -k "qk_lookahead and True" > "$out/pt-lookahead-causal.log" 2>&1 &
run -m gpu $t -k "vote_thread_max" > "$out/pt-vote.log" 2>&1 &
run -m gpu $t -k "thr_add_only_bitwise" > "$out/pt-thr.log" 2>&1 &
wait
for f in "$out"/pt-*.log; do echo "== $f:"; grep -E "passed|failed" "$f"; grep -E "^FAILED|Error" "$f" | head -5; done
