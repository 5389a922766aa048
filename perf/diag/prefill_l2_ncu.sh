#!/usr/bin/env bash
# Is the sm90 prefill kernel bound by L2 -> SM bandwidth at high sparsity? (issue #3)
# GPU host, repo root:  bash perf/diag/prefill_l2_ncu.sh [OUTDIR]
# ncu with L2 metrics (perf/ncu_report.sh, NCU_L2=1) at d128 32/8 L=16k B=2: non-causal dense,
# ~70 % and the highest non-causal sparsity (factor just under L), causal ~94 %; then the
# breakdown of L2 throughput for the sparse non-causal point.
set -uo pipefail
out=${1:-.}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv | tee "$out/gpu.txt"
# keep only metrics this ncu knows (base names)
known=$(ncu --query-metrics 2>/dev/null | awk '{print $1}')
for m in lts__t_sectors_srcunit_ltcfabric l1tex__m_xbar2l1tex_read_bytes sm__inst_executed_pipe_xu \
         l1tex__data_pipe_lsu_wavefronts_mem_shared lts__t_sector_hit_rate; do
  echo "$known" | grep -qx "$m" || echo "metric $m unknown to this ncu"
done
run() {  # tag, args...
  local tag=$1; shift
  echo "=== $tag: $*"
  NCU_L2=1 timeout 120 bash perf/ncu_report.sh prefill --seqlen 16384 --batch 2 "$@" 2>&1 | tee "$out/ncu_$tag.txt" | \
    grep -v "^\s*$" | cut -c62-200
}
run dense --factor 0
run s70 --factor 5000
run s_hi --factor 15000
run causal94 --factor 5000 --causal
echo "=== breakdown s_hi"
NCU_EXTRA=breakdown:lts__throughput.avg.pct_of_peak_sustained_elapsed,breakdown:sm__throughput.avg.pct_of_peak_sustained_elapsed \
  timeout 120 bash perf/ncu_report.sh prefill --seqlen 16384 --batch 2 --factor 15000 2>&1 | tee "$out/ncu_breakdown.txt" | cut -c1-160
