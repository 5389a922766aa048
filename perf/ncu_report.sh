#!/usr/bin/env bash
# Nsight Compute headline metrics of one BLASST kernel launch, on the GPU host, from the repo root:
#   bash perf/ncu_report.sh prefill --seqlen 16384 --factor 1000 --causal
#   bash perf/ncu_report.sh decode --seqlen 32768 --batch 64 --factor 100
# Prints duration, SM and tensor-pipe utilisation, achieved DRAM bandwidth and bytes read, for the
# profiled region of perf/ncu_target.py (the warm-up launches are outside it). Compare a dense run
# (--factor 0) with a sparse one: in decode the DRAM bytes read must drop with sparsity.
set -euo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
metrics=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,\
lts__t_bytes.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread
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
