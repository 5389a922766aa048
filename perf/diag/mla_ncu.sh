#!/usr/bin/env bash
# MLA decode under Nsight Compute, dense vs sparse (B=64 L=4k H=128): where a tile's time goes
# (tensor pipe, shared-memory and L2/DRAM throughput). From the repo root on the GPU host:
#   bash perf/diag/mla_ncu.sh [factor]      (writes mla_ncu_f<factor>.txt to $OUT or .)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-.}
for f in 0 "${1:-130}"; do
  ncu --profile-from-start off --clock-control none \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      python3 perf/ncu_target.py mla --batch 64 --seqlen 4096 --heads-q 128 --factor "$f" \
      > "$out/mla_ncu_f$f.txt" 2>&1
  echo "== factor $f"
  grep -E "sparsity|Duration|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Cache Throughput|L2 Cache Throughput|DRAM Throughput|Shared|Tensor|Executed Ipc|Issue Slots|Mem Busy|Max Bandwidth" "$out/mla_ncu_f$f.txt" | head -30
done
