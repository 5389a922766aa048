#!/usr/bin/env bash
# MLA decode: the producer's L2 prefetch distance (launch_mla.L2_PREFETCH) A/B, dense and ~70 %
# skipped, then the B=64 L=4k launch under ncu (dense and ~42 % skipped). From the repo root:
#   bash perf/diag/mla_prefetch_gpu.sh      (logs to $OUT or .)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-.}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "card: $card"
python3 perf/mla_ab.py --variants "pf0:L2_PREFETCH=0" "pf1:L2_PREFETCH=1" "pf2:L2_PREFETCH=2" \
    "pf3:L2_PREFETCH=3" --shapes 64x32768 16x32768 128x4096 --rounds 3 --chain 8 2>&1 \
    | grep -v Warning | tail -30
for f in 0 136; do
  ncu --profile-from-start off --clock-control none --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats \
      python3 perf/ncu_target.py mla --batch 64 --seqlen 4096 --heads-q 128 --factor "$f" \
      > "$out/mla_ncu_stall_f$f.txt" 2>&1
  echo "== ncu factor $f"
  grep -E "sparsity|Duration|DRAM Throughput|L2 Cache Throughput|Stall|Warp Cycles Per Issued" \
      "$out/mla_ncu_stall_f$f.txt" | head -24
done
