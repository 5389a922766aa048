#!/usr/bin/env bash
# Nsight Compute headline metrics of one BLASST kernel launch, on the GPU host, from the repo root:
#   bash perf/ncu_report.sh prefill --seqlen 16384 --factor 1000 --causal
#   bash perf/ncu_report.sh decode --seqlen 32768 --batch 64 --factor 100
# Prints duration, SM and tensor-pipe utilisation, achieved DRAM bandwidth and bytes read, for the
# profiled region of perf/ncu_target.py (the warm-up launches are outside it). Compare a dense run
# (--factor 0) with a sparse one: in decode the DRAM bytes read must drop with sparsity.
# NCU_L2=1 adds L2 throughput / L2->SM bytes / MUFU / smem metrics; NCU_EXTRA=a,b adds any.
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
metrics=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,\
lts__t_bytes.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread
# L2 -> SM traffic (is the kernel bound by L2 bandwidth?): NCU_L2=1 adds these.
if [ "${NCU_L2:-0}" = 1 ]; then
  metrics=$metrics,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_ltcfabric.sum,\
lts__t_sector_hit_rate.pct,l1tex__m_xbar2l1tex_read_bytes.sum,\
sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,\
l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,sm__cycles_elapsed.avg.per_second
fi
# Extra metrics (e.g. breakdown:lts__throughput.avg.pct_of_peak_sustained_elapsed).
metrics=$metrics${NCU_EXTRA:+,$NCU_EXTRA}
ncu --profile-from-start off --clock-control none --metrics "$metrics" --csv \
  python3 perf/ncu_target.py "$@" 2>&1 | grep -v '^==PROF==' | python3 -c '
import csv, sys
rows = [r for r in csv.reader(line for line in sys.stdin if line.startswith("\"") or "," in line)]
head = next((i for i, r in enumerate(rows) if "Metric Name" in r), None)
if head is None:
    print("\n".join(",".join(r) for r in rows)); sys.exit(0)
h = rows[head]
k, n, u, v = (h.index(c) for c in ("Kernel Name", "Metric Name", "Metric Unit", "Metric Value"))
for r in rows[head + 1:]:
    if len(r) > v:
        print(f"{r[k][:60]:60s} {r[n]:70s} {r[v]:>16s} {r[u]}")
'
