#!/usr/bin/env bash
# Where the skip build's time goes at 0 % skipped (issue #3), in cycles at locked clocks: the
# dense build, the skip build, and the skip build with its pieces taken out one by one, under
# Nsight Compute (perf/diag/prefill_ncu_variants.py). On the GPU host, from the repo root:
#   bash perf/diag/prefill_ncu_skipcost.sh OUTDIR [d128|d128c|d64|d256|ovl|stalls|fab|all]
# REPORT=1 reprints the tables from OUTDIR without running anything.
set -uo pipefail
out=$1; which=${2:-all}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
z=1e-30  # a factor so small that nothing is skipped: the skip build's bits equal dense
common=(--variant "dense:0:{}" --variant "skip:$z:{}")
d128=(--variant "la0:$z:{\"lookahead_after_skips\": 0}"
      --variant "vls0:$z:{\"v_load_skip\": false}"
      --variant "vls0_vw0:$z:{\"v_load_skip\": false, \"v_warp\": false}"
      --variant "nopv:$z:{\"v_load_skip\": false, \"pv_skip\": false}"
      --variant "nopv_novote:$z:{\"v_load_skip\": false, \"pv_skip\": false, \"debug_no_vote\": true}"
      --variant "nopv_novote_la0:$z:{\"v_load_skip\": false, \"pv_skip\": false, \"debug_no_vote\": true, \"lookahead_after_skips\": 0}"
      --variant "vtm1:$z:{\"vote_thread_max\": true}"
      --variant "lvw0:$z:{\"late_v_wait\": false}"
      --variant "dense_vw1:0:{\"v_warp\": true}")
run() { local name=$1; shift; echo "== $name"; timeout 420 python3 perf/diag/prefill_ncu_variants.py "$out/$name" ${REPORT:+--report} "$@"; }
case $which in d128|all) run d128-16k-nc --seqlen 16384 --batch 2 "${common[@]}" "${d128[@]}";; esac
case $which in d128c|all) run d128-16k-c --seqlen 16384 --batch 2 --causal "${common[@]}" \
  --variant "la0:$z:{\"lookahead_after_skips\": 0}" \
  --variant "vls0:$z:{\"v_load_skip\": false}" \
  --variant "nopv_novote:$z:{\"v_load_skip\": false, \"pv_skip\": false, \"debug_no_vote\": true}";; esac
case $which in d64|all) run d64-8k-nc --head-dim 64 --seqlen 8192 --batch 4 "${common[@]}" \
  --variant "nopv:$z:{\"pv_skip\": false}" \
  --variant "nopv_novote:$z:{\"pv_skip\": false, \"debug_no_vote\": true}" \
  --variant "vtm0:$z:{\"vote_thread_max\": false}";; esac
# hdim 256 (no ping-pong): the skip build at 0 % runs fewer cycles than dense; without its PV skip
# (and so without V gating and the warpgroup barrier before each QK), fewer still
for c in "" --causal; do
  case $which in d256|all) run d256-8k${c:+-c} --head-dim 256 --seqlen 8192 --batch 4 $c "${common[@]}" \
    --variant "nopv:$z:{\"v_load_skip\": false, \"pv_skip\": false}";; esac
done
# vote_thread_max="overlap" (the vote on the thread maxima while the row max's shuffles run, both
# before the branch) against each head dim's default, at 0 % and sparse (bits = the default's)
ovl='{"vote_thread_max": "overlap"}'
case $which in ovl|all)
  run ovl-d128-16k-nc --seqlen 16384 --batch 2 "${common[@]}" --variant "ovl:$z:$ovl" \
    --variant "vtm0:$z:{\"vote_thread_max\": false}"
  for f in 4915 15565; do
    run ovl-d128-16k-nc-f$f --seqlen 16384 --batch 2 --stats --variant "skip:$f:{}" --variant "ovl:$f:$ovl"
  done
  run ovl-d128-16k-c --seqlen 16384 --batch 2 --causal "${common[@]}" --variant "ovl:$z:$ovl"
  run ovl-d128-4k-nc --seqlen 4096 --batch 8 "${common[@]}" --variant "ovl:$z:$ovl"
  run ovl-d128-4k-nc-f1229 --seqlen 4096 --batch 8 --stats --variant "skip:1229:{}" --variant "ovl:1229:$ovl"
  for d in 64 256; do
    run ovl-d$d-8k-nc --head-dim $d --seqlen 8192 --batch 4 "${common[@]}" --variant "ovl:$z:$ovl"
    run ovl-d$d-8k-nc-f2458 --head-dim $d --seqlen 8192 --batch 4 --stats --variant "skip:2458:{}" \
      --variant "ovl:2458:$ovl"
  done;;
esac
# The look-ahead switch's cost at 0 %: stall reasons (no_instruction: instruction fetch)
stalls=smsp__warp_issue_stalled_no_instruction_per_warp_active.pct,smsp__warp_issue_stalled_wait_per_warp_active.pct,smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct
case $which in stalls|all)
  run stalls-d128-16k-nc --seqlen 16384 --batch 2 --extra-metrics $stalls "${common[@]}" \
    --variant "la0:$z:{\"lookahead_after_skips\": 0}";;
esac
# flag_addr_before_sync (the hdim-128 default: the PV flag word's address formed before the
# ping-pong barrier) against the flag address after it (fab0, the earlier build; at hdim 64
# fab1 against its default) and the build without the look-ahead switch (la0)
case $which in fab|all)
  for c in "" --causal; do
    run fab-d128-16k${c:+-c} --seqlen 16384 --batch 2 $c "${common[@]}" \
      --variant "fab0:$z:{\"flag_addr_before_sync\": false}" \
      --variant "la0:$z:{\"lookahead_after_skips\": 0}"
  done
  for f in 4915 15565; do
    run fab-d128-16k-nc-f$f --seqlen 16384 --batch 2 --stats --variant "skip:$f:{}" \
      --variant "fab0:$f:{\"flag_addr_before_sync\": false}" \
      --variant "la0:$f:{\"lookahead_after_skips\": 0}"
  done
  run fab-d64-8k-nc --head-dim 64 --seqlen 8192 --batch 4 "${common[@]}" \
    --variant "fab1:$z:{\"flag_addr_before_sync\": true}";;
esac
