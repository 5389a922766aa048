#!/usr/bin/env bash
# The whole GPU test suite and the benchmarks in one call on the GPU host, from the repo root:
#   bash perf/run_gpu_suite.sh [quick]
# Needs .gpu/part1 (the CuTe DSL) installed on the host; .gpu/part2 (FA4 and peers) is used when
# present. Logs and results go to $OUT (the device tool's return folder) or perf/results.
set -uo pipefail
OUT=${OUT:-perf/results}
mkdir -p "$OUT"
source .gpu/part1/setup.sh || { echo "CuTe DSL missing: carry .gpu/part1"; exit 1; }
[ -d .gpu/part2 ] && source .gpu/part2/setup.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
if [ "${1:-}" = quick ]; then
  python3 perf/bench.py prefill --seqlens 8192 --tokens 32768 --factors 0 1000 --iters 10 --out "$OUT" --tag prefill
else
  python3 perf/bench.py prefill --out "$OUT" --tag prefill 2>&1 | tail -40
  python3 perf/decode_matrix.py --out "$OUT" 2>&1 | tail -30
  python3 perf/decode_host.py 2>&1 | tee "$OUT/decode-host.log" | tail -30
  python3 tests/kernels/gpu_mla_decode_smoke.py --out "$OUT" 2>&1 | tail -40
fi
