"""Shared pieces of the `*_ncu_variants.py` scripts: NAME:FACTOR:TUNING variant specs, re-running
the calling script under Nsight Compute with clocks locked to base, and reading its CSV back."""

import argparse
import csv
import json
import os
import subprocess
import sys


def add_common_args(p: argparse.ArgumentParser):
    """OUTDIR, --variant, --report and the hidden --target (the profiled child) of every
    ``*_ncu_variants.py`` script."""
    p.add_argument("outdir")
    p.add_argument("--variant", action="append", required=True, metavar="NAME:FACTOR:TUNING")
    p.add_argument("--report", action="store_true",
                   help="only print the table from OUTDIR's saved CSV and log")
    p.add_argument("--target", action="store_true", help=argparse.SUPPRESS)


def parse(p: argparse.ArgumentParser, argv=None):
    """Parsed arguments, with ``variants`` = the --variant specs as (name, factor, tuning)."""
    a = p.parse_args(argv)
    a.variants = parse_variant_specs(a.variant)
    return a


def run(a, script: str, stem: str, metrics, run_target, report):
    """As the profiled child (--target): ``run_target(a)``. Otherwise re-run ``script`` under ncu
    (unless --report) into OUTDIR/STEM.csv and .log, then ``report(a, csv path, log text)``."""
    if a.target:
        run_target(a)
        return
    os.makedirs(a.outdir, exist_ok=True)
    raw = os.path.join(a.outdir, stem + ".csv")
    logf = os.path.join(a.outdir, stem + ".log")
    if not a.report:
        profile_self(script, metrics, raw, logf)
    report(a, raw, open(logf).read())


def parse_variant_specs(specs) -> list:
    """[(name, factor, tuning dict)] from "NAME:FACTOR:TUNING" strings (TUNING is JSON)."""
    out = []
    for spec in specs:
        name, factor, tuning = spec.split(":", 2)
        out.append((name, float(factor), json.loads(tuning)))
    return out


def profile_self(script: str, metrics, raw: str, logf: str):
    """Re-run ``script`` with this process's arguments plus ``--target`` under ncu (profiled
    region: cudaProfilerStart/Stop); the CSV goes to ``raw``, the child's output to ``logf``."""
    cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "base", "--csv",
           "--print-units", "base", "--metrics", ",".join(metrics), "--log-file", raw,
           sys.executable, os.path.abspath(script), *sys.argv[1:], "--target"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    open(logf, "w").write(res.stdout + res.stderr)
    if res.returncode != 0:
        print((res.stdout + res.stderr)[-4000:])
        sys.exit(f"ncu run failed (rc {res.returncode}); see {os.path.dirname(raw)}")


def read_metrics(raw: str, metrics):
    """{launch id: {metric: value}} and {launch id: kernel name} from ncu's CSV."""
    rows = [r for r in csv.reader(open(raw)) if len(r) > 5]
    col = {h: i for i, h in enumerate(rows[0])}
    values, names = {}, {}
    for r in rows[1:]:
        if r[col["Metric Name"]] in metrics:
            i = int(r[col["ID"]])
            names[i] = r[col["Kernel Name"]]
            values.setdefault(i, {})[r[col["Metric Name"]]] = float(
                r[col["Metric Value"]].replace(",", ""))
    return values, names


def variant_lines(log: str) -> list:
    """The target's "VARIANT name key=value ..." lines, as dicts of their key=value fields."""
    return [dict(kv.split("=") for kv in line.split()[2:])
            for line in log.splitlines() if line.startswith("VARIANT ")]
