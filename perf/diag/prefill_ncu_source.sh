#!/usr/bin/env bash
# Nsight Compute stall sampling per SASS instruction of one prefill launch (issue #3: where does a
# skipped tile's time go?), on the GPU host from the repo root:
#   bash perf/diag/prefill_ncu_source.sh OUTDIR NAME ncu_target.py-args...
# Writes OUTDIR/NAME.ncu-rep, OUTDIR/NAME-source.csv (per-instruction samples) and prints the
# headline sections and the instructions with the most stall samples.
set -uo pipefail
out=$1; name=$2; shift 2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
ncu --profile-from-start off --clock-control none --import-source no \
  --section SpeedOfLight --section WarpStateStats --section SourceCounters \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
  -o "$out/$name" -f python3 perf/ncu_target.py "$@" > "$out/$name-run.log" 2>&1
tail -3 "$out/$name-run.log"
ncu --import "$out/$name.ncu-rep" --page details > "$out/$name-details.txt" 2>&1
grep -E "Duration|Throughput|Stall|Warp Cycles|Issued|Eligible|Active Warps|L2|DRAM" \
  "$out/$name-details.txt" | head -60
ncu --import "$out/$name.ncu-rep" --page source --csv --print-source sass \
  > "$out/$name-source.csv" 2>&1
python3 - "$out/$name-source.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
h = next((i for i, r in enumerate(rows) if any("Sampling" in c for c in r)), None)
if h is None:
    print("\n".join(",".join(r) for r in rows[:20])); sys.exit(0)
hdr = rows[h]
print(" | ".join(hdr))
src = next(i for i, c in enumerate(hdr) if c.strip() in ("Source", "# Source") or "Source" == c)
tot = next(i for i, c in enumerate(hdr) if "Sampling (All" in c)
def num(x):
    try: return float(x.replace(",", ""))
    except ValueError: return 0.0
body = [r for r in rows[h + 1:] if len(r) == len(hdr)]
total = sum(num(r[tot]) for r in body) or 1.0
stall_cols = [i for i, c in enumerate(hdr) if c.startswith("stall_") or "Stall" in c and "Sampling" not in c]
print(f"instructions {len(body)}, samples {total:.0f}")
for r in sorted(body, key=lambda r: -num(r[tot]))[:45]:
    tops = sorted(((num(r[i]), hdr[i]) for i in stall_cols), reverse=True)[:3]
    print(f"{num(r[tot]) / total * 100:5.1f}%  {r[0]:>6s}  {r[src][:60]:60s}  " +
          ", ".join(f"{n}={v:.0f}" for v, n in tops if v))
PY
