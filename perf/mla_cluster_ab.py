"""GPU check + interleaved A/B of the MLA decode kernel's 2-CTA cluster (K multicast) variant
against the one-CTA-per-q-tile variant (launch_mla.CLUSTER_MODE always / never).

    python perf/mla_cluster_ab.py checks   # correctness (cluster on), one line per case
    python perf/mla_cluster_ab.py ab       # A/B table (H=128, page 64, Lq_new=1)

Writes $OUT/mla-cluster-ab.log. Both variants make the same per-q-tile decisions with the same
arithmetic, so the A/B part also checks outputs and counters for bitwise equality.
"""

from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "kernels"))

import gpu_mla_decode_smoke as smoke  # noqa: E402
from blasst_cute.kernels import launch_mla  # noqa: E402
from blasst_cute.testing import capture_graph, tee_log, time_per_call  # noqa: E402

D, DV = 576, 512
OUT = os.environ.get("OUT", ".")
log = tee_log(os.path.join(OUT, "mla-cluster-ab.log"))


def checks():
    launch_mla.CLUSTER_MODE = "always"
    smoke.log = log
    ok = smoke.run_checks()
    extra = [
        ("cluster dense paged16 B2 H128 lq1", lambda: smoke.check_case(2, 1, 128, [3001, 130], 16)),
        ("cluster skip paged16 synth B2 H128 lq1 f=300",
         lambda: smoke.check_case(2, 1, 128, [6000, 2500], 16, factor=300.0, use_synth=True)),
        ("cluster dense contiguous B2 H128 lq2 split2",
         lambda: smoke.check_case(2, 2, 128, [2000, 700], None, num_splits=2)),
        ("cluster skip paged64 synth B2 H256 lq1 f=1000 (2 clusters)",
         lambda: smoke.check_case(2, 1, 256, [8192, 3000], 64, factor=1000.0, use_synth=True)),
        ("no-cluster fallback skip paged64 synth B2 H64 lq2 f=100",
         lambda: smoke.check_case(2, 2, 64, [4096, 999], 64, factor=100.0, use_synth=True)),
        ("cluster skip paged64 synth B4 H128 lq1 f=3000 direct",
         lambda: smoke.check_case(4, 1, 128, [32768, 20000, 64, 0], 64, factor=3000.0,
                                  use_synth=True, num_splits=1)),
    ]
    for name, fn in extra:
        t0 = time.time()
        try:
            good, msg = fn()
        except Exception as e:  # noqa: BLE001
            good, msg = False, f"EXC {type(e).__name__}: {e}"
        ok &= good
        log(f"[{'PASS' if good else 'FAIL'}] {name}: {msg} ({time.time() - t0:.1f}s)")
    log(f"cluster-m of H=128 lq=1: {launch_mla.mla_cluster_m(128, 1)}, H=64 lq=2: "
        f"{launch_mla.mla_cluster_m(64, 2)}, H=192 lq=1: {launch_mla.mla_cluster_m(192, 1)}")
    log(f"checks {'PASS' if ok else 'FAIL'}")
    return ok


def ab(cfgs, rounds=5):
    card = torch.cuda.get_device_name()
    log(f"card: {card}")
    log("| B | L | variant | sparsity | no-cluster us | cluster us | cluster gain | "
        "speedup vs own dense: no-cluster | cluster | ideal | auto picks |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    scale = D ** -0.5
    H = 128
    all_equal = True
    for B, L in cfgs:
        q1, kv1 = smoke.synth(1, 1, L, H, 7)
        q = q1.expand(B, -1, -1, -1).contiguous()
        kv = kv1.expand(B, -1, -1).contiguous()
        del q1, kv1
        _, kvc, bt = smoke.make_mla_cache(B, L, 64, seed=1, kv=kv)
        del kv
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        S = launch_mla.plan_mla_decode_sm90(q, kvc, bt)["num_splits"]
        mode, launch_mla.CLUSTER_MODE = launch_mla.CLUSTER_MODE, "auto"
        auto = launch_mla.mla_cluster_m(H, 1, True, -(-(-(-L // 64)) // S))
        launch_mla.CLUSTER_MODE = mode
        auto = f"{'cluster' if auto == 2 else 'no-cluster'} (splits {S})"
        ws = (torch.empty(S, B, 1, H, DV, device="cuda"), torch.empty(S, B, H, 1, device="cuda"))
        outs = {v: (torch.empty(B, 1, H, DV, dtype=q.dtype, device="cuda"),
                    torch.empty(B, H, 1, device="cuda")) for v in (False, True)}

        def launch(v, factor, cnt=None):
            launch_mla.CLUSTER_MODE = "always" if v else "never"
            o, l_ = outs[v]
            launch_mla.run_mla_decode_sm90(
                q, kvc, o, l_, cache_seqlens=lens, block_table=bt, softmax_scale=scale,
                threshold_scale_factor=factor, workspace=ws,
                visited=None if cnt is None else cnt[0], skipped=None if cnt is None else cnt[1])

        def counted(v, factor):
            cnt = [torch.zeros(B, dtype=torch.int32, device="cuda") for _ in range(2)]
            launch(v, factor, cnt)
            torch.cuda.synchronize()
            return cnt, outs[v][0].clone(), outs[v][1].clone()

        grid = [100, 300, 1000, 3000, 1e4, 3e4, 1e5]
        sp = {}
        for f in grid:
            cnt, _, _ = counted(True, f)
            sp[f] = float(cnt[1].sum()) / max(1.0, float(cnt[0].sum()))
        points = [("dense", None, 0.0)]
        for target in (0.65, 0.9):
            f = min(grid, key=lambda x: abs(sp[x] - target))
            if all(p[1] != f for p in points):
                points.append((f"f={f:g}", f, sp[f]))
        # bitwise agreement of the two variants (same decisions, same arithmetic)
        for name, f, _ in points:
            a = counted(False, f)
            b = counted(True, f)
            same = all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and \
                torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
            fin = bool(torch.isfinite(b[1]).all())
            all_equal &= same and fin
            if not (same and fin):
                log(f"  MISMATCH B={B} L={L} {name}: counters/outputs differ (finite={fin})")
        graphs = {(v, p[0]): capture_graph(lambda v=v, f=p[1]: launch(v, f))
                  for p in points for v in (False, True)}
        iters = max(5, min(50, int(0.05 / (2.0 * B * H * L * 1088 / 5e14 + 1e-5))))
        times = {k: [] for k in graphs}
        for _ in range(rounds):
            for k, g in graphs.items():
                times[k].append(time_per_call(g.replay, iters, warmup=1))
        t = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        for name, f, s_ in points:
            t0, t1 = t[(False, name)], t[(True, name)]
            d0, d1 = t[(False, "dense")], t[(True, "dense")]
            ideal = 1.0 / (1.0 - s_ * DV / (D + DV))
            log(f"| {B} | {L} | {name} | {s_ * 100:.1f}% | {t0 * 1e6:.1f} | {t1 * 1e6:.1f} | "
                f"{t0 / t1:.2f}x | {d0 / t0:.2f}x | {d1 / t1:.2f}x | {ideal:.2f}x | {auto} |")
        graphs = kvc = q = ws = outs = None
        torch.cuda.empty_cache()
    log(f"cluster == no-cluster bitwise (outputs, lse, counters): {all_equal}")
    return all_equal


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "checks"
    log(f"== {what} torch {torch.__version__} {torch.cuda.get_device_name()}")
    if what == "checks":
        sys.exit(0 if checks() else 1)
    cfgs = [(16, 4096), (64, 4096), (128, 4096), (16, 16384), (32, 16384), (1, 32768),
            (16, 32768), (64, 32768), (128, 32768)]
    if len(sys.argv) > 2:
        cfgs = [tuple(int(x) for x in c.split("x")) for c in sys.argv[2:]]
    sys.exit(0 if ab(cfgs) else 1)
