"""Where the decode call's host time goes (issue #4: host overhead per call <= 20 us).

    python perf/decode_host.py [--rounds 7] [--calls 50 300] [--loop-shapes B,L,HQ,HK ...]

B=1, L=1024, Hq/Hk 32/8, page 64, d128, one new token (the decode_matrix host shape). Each row
is CPU time per call of ``n`` back-to-back calls issued behind a long GPU sleep, so no call waits
on the GPU; rows alternate within a round and the median over rounds is printed. The rows peel
the call apart, from one torch kernel launch (the floor any launcher pays) through the bare DSL
launches with fixed arguments, to ``run_decode_sm90`` and the public ``blasst_cute.decode``.
Two call counts show whether a long backlog of launches (the driver's queue) changes the cost.
Rows marked "fused merge" merge the split partials in the decode launch (one launch per call)
instead of the combine kernel; the API row sets the tuning through a wrapper (a few hundred ns).

The eager-loop table then times back-to-back API calls without a sync between them, per shape:
a loop like that runs at max(host time, device time) per call.
Content checks are off in both (``set_content_checks(False)``: no sync per call).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import blasst_cute  # noqa: E402
from blasst_cute.kernels import launch_decode  # noqa: E402
from decode_matrix import dense_sets  # noqa: E402


def _record(obj, name):
    """Replace obj.name with a wrapper that keeps the last call's arguments."""
    orig = getattr(obj, name)
    seen = {}

    def wrapper(*args):
        seen["args"] = args
        return orig(*args)
    setattr(obj, name, wrapper)
    return orig, seen


def with_tuning(tuning, fn):
    """fn run with the API's launcher tuning set to ``tuning`` (launch_decode.DEFAULT_TUNING)."""
    def run():
        launch_decode.DEFAULT_TUNING = tuning
        try:
            return fn()
        finally:
            launch_decode.DEFAULT_TUNING = None
    return run


FUSED = {"fused_merge": True}  # one launch: the decode kernel merges the split partials
COMBINE = {"fused_merge": False}  # two launches: decode, then the combine kernel


def bare_launches(s, factor):
    """(plan, decode launch, combine launch, raw decode launch) replaying the last arguments of
    an API call with the combine kernel (two launches)."""
    launch_decode._plans.clear()
    call = with_tuning(COMBINE, lambda: blasst_cute.decode(
        s["q"], s["kc"], s["vc"], cache_seqlens=s["lens"], block_table=s["bt"],
        threshold_scale_factor=factor))
    call()
    plan = next(iter(launch_decode._plans.values()))
    if plan.fast is None or plan.cfast is None:
        raise RuntimeError("the plan has no fast path or no combine launch")
    orig_d, seen_d = _record(plan.fast, "launch")
    orig_c, seen_c = _record(plan.cfast, "launch")
    call()
    torch.cuda.synchronize()
    del plan.fast.launch, plan.cfast.launch  # back to the class method
    da, ca = seen_d["args"], seen_c["args"]
    dec = lambda: orig_d(*da)  # noqa: E731
    comb = lambda: orig_c(*ca)  # noqa: E731
    ex = plan.fast.executor if getattr(plan.fast, "packed", None) is not None else None
    raw = (lambda: ex.capi_func(plan.fast.packed)) if ex is not None else None
    return plan, dec, comb, raw


def host_rows(args):
    s = dense_sets(1, 1024, 32, 8)[0][0]
    out = torch.empty_like(s["q"])
    lse = torch.empty(1, 32, 1, device="cuda")
    x = torch.zeros(16, device="cuda")
    plan, dec, comb, raw = bare_launches(s, 100.0)
    print(f"B=1 L=1024 32/8: {plan.splits} splits, PDL {plan.use_pdl}", flush=True)

    def api(factor):
        return lambda: blasst_cute.decode(s["q"], s["kc"], s["vc"], cache_seqlens=s["lens"],
                                          block_table=s["bt"], threshold_scale_factor=factor)

    def run_sm90(tuning):
        return lambda: launch_decode.run_decode_sm90(
            s["q"], s["kc"], s["vc"], out, lse, cache_seqlens=s["lens"], block_table=s["bt"],
            threshold_scale_factor=100.0, tuning=tuning)

    rows = [("torch: x.add_(1) (one launch)", lambda: x.add_(1)),
            ("torch: torch.empty_like(q)", lambda: torch.empty_like(s["q"])),
            ("DSL: decode launch, capi_func only", raw),
            ("DSL: decode launch, _FastCall", dec),
            ("DSL: combine launch, _FastCall", comb),
            ("DSL: decode + combine launches", lambda: (dec(), comb()))]
    rows += [
        ("run_decode_sm90 f=100 (preallocated), combine", run_sm90(COMBINE)),
        ("run_decode_sm90 f=100 (preallocated), fused merge", run_sm90(FUSED)),
        ("blasst_cute.decode dense (default)", api(None)),
        ("blasst_cute.decode f=100 (default)", api(100.0)),
        ("blasst_cute.decode f=100, combine", with_tuning(COMBINE, api(100.0))),
        ("blasst_cute.decode f=100, fused merge", with_tuning(FUSED, api(100.0))),
    ]
    rows = [(n, f) for n, f in rows if f is not None]
    for _, fn in rows:
        for _ in range(20):
            fn()
    torch.cuda.synchronize()
    for n in args.calls:
        times = {name: [] for name, _ in rows}
        for _ in range(args.rounds):
            for name, fn in rows:
                torch.cuda._sleep(int(2e7 + 1e5 * n))  # busy past the timed calls
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                times[name].append((time.perf_counter() - t0) / n * 1e6)
                torch.cuda.synchronize()
        print(f"\n{torch.cuda.get_device_name()}: host us per call, {n} calls behind a GPU sleep, "
              f"median of {args.rounds} rounds [min max]")
        for name, v in times.items():
            v = sorted(v)
            print(f"  {name:50s} {v[len(v) // 2]:6.1f}  [{v[0]:.1f} {v[-1]:.1f}]")


def eager_loop(args):
    """Wall time per call of back-to-back API calls (no sync between them): an eager decode
    loop runs at max(host time, device time) per call. Combine kernel vs fused merge."""
    print(f"\n{torch.cuda.get_device_name()}: eager loop, us per call of {args.loop_calls} "
          f"back-to-back blasst_cute.decode calls (f=100, content checks off), median of "
          f"{args.rounds} rounds; input sets cycled past the L2")
    print("| B | L | Hq/Hk | splits | K+V MiB | combine kernel | fused merge | fused / combine | "
          "default |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.loop_shapes:
        B, L, hq, hk = (int(v) for v in spec.split(","))
        sets = dense_sets(B, L, hq, hk)[0]
        s = sets[0]
        # each call reads the next input set (together past the L2: K/V come from DRAM, as in a
        # model whose layers each have their own cache)
        nxt = itertools.cycle(sets).__next__

        def fn():
            t = nxt()
            return blasst_cute.decode(t["q"], t["kc"], t["vc"], cache_seqlens=t["lens"],
                                      block_table=t["bt"], threshold_scale_factor=100.0)
        variants = [("combine", with_tuning(COMBINE, fn)), ("fused", with_tuning(FUSED, fn)),
                    ("default", fn)]
        outs = {}
        for name, f in variants:
            nxt = itertools.cycle(sets).__next__  # (fn reads it) each variant starts on set 0
            outs[name] = f()
        torch.cuda.synchronize()
        err = (outs["fused"].float() - outs["combine"].float()).abs().max().item()
        times = {name: [] for name, _ in variants}
        for r in range(args.rounds):
            for name, f in (variants if r % 2 == 0 else variants[::-1]):
                for _ in range(10):
                    f()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(args.loop_calls):
                    f()
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / args.loop_calls * 1e6)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        splits = launch_decode.plan_decode_sm90(s["q"], s["kc"], s["bt"])["num_splits"]
        mib = 2 * B * L * hk * 128 * 2 / 2 ** 20
        print(f"| {B} | {L} | {hq}/{hk} | {splits} | {mib:.0f} | {med['combine']:.1f} | "
              f"{med['fused']:.1f} | {med['fused'] / med['combine']:.2f} | {med['default']:.1f} | "
              f"(max abs fused - combine {err:.2e})", flush=True)
        del s, sets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, nargs="+", default=[50, 300])
    ap.add_argument("--loop-calls", type=int, default=200)
    ap.add_argument("--loop-shapes", nargs="*",
                    default=["1,1024,32,8", "1,4096,32,8", "1,8192,32,8", "1,8192,64,4",
                             "8,2048,32,8", "1,32768,32,8"])
    ap.add_argument("--no-host", action="store_true")
    args = ap.parse_args()
    blasst_cute.set_content_checks(False)  # a serving loop's setting: no sync per call
    if not args.no_host:
        host_rows(args)
    if args.loop_shapes:
        eager_loop(args)


if __name__ == "__main__":
    main()
