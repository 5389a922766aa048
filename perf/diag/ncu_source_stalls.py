"""Per-instruction warp-stall samples of a kernel's main loop, from an ncu source-page CSV.

On the GPU host, profile one launch with the source counters and export the SASS page, e.g.

    ncu --profile-from-start off --clock-control base --section SourceCounters -f -o OUT/skip \\
        python perf/diag/prefill_ncu_variants.py OUT --seqlen 16384 --batch 2 \\
        --variant 'skip:1e-30:{}' --target
    ncu -i OUT/skip.ncu-rep --page source --csv --print-source sass > OUT/skip.csv

then, anywhere: ``python perf/diag/ncu_source_stalls.py OUT/dense.csv OUT/skip.csv``. For each
CSV it finds the loop whose back edge closes the most executed body holding >= 16 wgmmas (the
consumer main loop of the dense build and of skip builds without the look-ahead switch; give
``--range 0xLO:0xHI``, offsets from the kernel's first instruction, for other layouts), and
prints the loop's share of all samples, its samples by opcode and by stall reason, and its
instructions that drew more than --min-share of the loop's samples. The PC
sampler takes one warp per interval, so builds with more warps (a second producer warp) give
each warp fewer samples: compare shares within a loop, not raw counts across builds. The CSV's
stall columns do not cover every reason (the first wgmma of a group draws most of its samples
under none of them), so an instruction's top stall is a hint.
"""

import argparse
import collections
import csv
import re


def load(path: str) -> list:
    rows = list(csv.reader(open(path)))
    head = next(i for i, r in enumerate(rows) if "Address" in r and "Source" in r)
    col = {h: i for i, h in enumerate(rows[head])}
    out = []
    for r in rows[head + 1:]:
        if len(r) < len(col):
            continue
        stalls = {h[6:]: int(r[i] or 0) for h, i in col.items()
                  if h.startswith("stall_") and "Not Issued" not in h}
        out.append(dict(addr=int(r[col["Address"]], 16), src=r[col["Source"]].strip(),
                        samples=int(r[col["Warp Stall Sampling (All Samples)"]] or 0),
                        executed=int(r[col["Instructions Executed"]] or 0), stalls=stalls))
    base = out[0]["addr"]
    for o in out:
        o["off"] = o["addr"] - base
    return out


def main_loop(ins: list) -> list:
    best = None
    for i, o in enumerate(ins):
        m = re.search(r"BRA (0x[0-9a-f]+)", o["src"])
        if not m:
            continue
        target = int(m.group(1), 16) - ins[0]["addr"]
        body = [x for x in ins if target <= x["off"] <= o["off"]]
        if target < o["off"] and sum("HGMMA" in x["src"] for x in body) >= 16:
            if best is None or o["executed"] > best[0]:
                best = (o["executed"], body)
    if best is None:
        raise SystemExit("no loop with >= 16 wgmmas found")
    return best[1]


def opcode(src: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", src).split()[0].split(".")[0]


def report(path: str, min_share: float, span=None):
    ins = load(path)
    loop = main_loop(ins) if span is None else [o for o in ins if span[0] <= o["off"] <= span[1]]
    total = sum(o["samples"] for o in ins)
    n = sum(o["samples"] for o in loop) or 1
    print(f"== {path}: loop {loop[0]['off']:#x}-{loop[-1]['off']:#x} ({len(loop)} instructions), "
          f"{100 * n / total:.1f} % of {total} samples")
    by_op, by_stall = collections.Counter(), collections.Counter()
    for o in loop:
        by_op[opcode(o["src"])] += o["samples"]
        by_stall.update(o["stalls"])
    print("   by opcode: " + ", ".join(f"{k} {100 * v / n:.1f}" for k, v in by_op.most_common(12)))
    print("   by stall:  " + ", ".join(f"{k} {100 * v / n:.1f}" for k, v in by_stall.most_common(10)))
    cum = 0
    for o in loop:
        cum += o["samples"]
        if o["samples"] > min_share * n:
            top = max(o["stalls"].items(), key=lambda kv: kv[1], default=("-", 0))
            print(f"   {o['off']:#7x} {100 * o['samples'] / n:5.2f} % (cum {100 * cum / n:5.1f}) "
                  f"{top[0]:>14s} {o['src'][:64]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+")
    p.add_argument("--min-share", type=float, default=0.008)
    p.add_argument("--range", help="0xLO:0xHI: the loop's first and last instruction offsets")
    a = p.parse_args()
    span = None if a.range is None else tuple(int(x, 16) for x in a.range.split(":"))
    for path in a.csv:
        report(path, a.min_share, span)


if __name__ == "__main__":
    main()
