"""PTX fingerprints of the sm90 kernels, on a CPU host: is a refactor a no-op for the GPU?

    python perf/diag/ptx_fingerprint.py --save /tmp/before.json [--kernels mla,decode,prefill]
    (edit the kernels)
    python perf/diag/ptx_fingerprint.py --against /tmp/before.json

Compiles each configuration of the chosen kernels for sm_90a (CUTE_DSL_ARCH) with the PTX kept
(compile options --keep-ptx --dump-dir) and records a SHA-256 of the PTX per configuration. The PTX of one source
is byte-identical from run to run and carries no line numbers, so moving code or renaming
Python helpers leaves it unchanged, while any change to the emitted instructions does not.
Identical PTX means identical cubins, so no GPU run is needed to show the change is a no-op.
--against exits 1 if any configuration's PTX differs (and names them). Takes ~2 s per MLA or
decode configuration and ~10-20 s per prefill configuration on a CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from blasst_cute.kernels import launch, launch_decode, launch_mla  # noqa: E402


def _cfg_id(kind: str, cfg: dict) -> str:
    parts = [f"{k}={str(v).replace('torch.', '')}" for k, v in sorted(cfg.items())]
    return f"{kind}:" + ",".join(parts)


def mla_configs():
    cfgs = launch_mla.supported_configs() + launch_mla.supported_cluster_configs()
    for schedule in ("alternate", "split_keys"):
        for has_skip in (False, True):
            cfgs.append(dict(dtype=torch.bfloat16, page_size=64, has_skip=has_skip,
                             has_stats=has_skip, cluster_m=2, interleave_splits=True,
                             use_pdl=True, schedule=schedule))
    for has_skip in (False, True):  # the late K-stage release (BLASST_MLA_EARLY_RELEASE=0)
        cfgs.append(dict(dtype=torch.bfloat16, page_size=64, has_skip=has_skip,
                         has_stats=has_skip, interleave_splits=True, use_pdl=True,
                         early_release=False))
    return [("mla", c, launch_mla.compile_mla_decode_sm90) for c in cfgs]


def decode_configs():
    return [("decode", c, launch_decode.compile_decode_sm90)
            for c in launch_decode.supported_configs()]


def prefill_configs():
    out = []
    for d, dv in ((64, 64), (128, 128), (256, 256), (192, 128)):
        for causal in (False, True):
            for has_skip in (False, True):
                out.append(("prefill", dict(dtype=torch.bfloat16, head_dim=d, head_dim_v=dv,
                                            causal=causal, varlen=False, has_skip=has_skip,
                                            has_stats=has_skip, factor_per_batch=False),
                            launch.compile_prefill_sm90))
    # the hdim-128 skip builds as benchmarks and users launch them: no stats, with and without
    # the look-ahead switch (launch.prefill_lookahead turns it off for keys under 16k)
    for causal in (False, True):
        for las in ({}, dict(lookahead_after_skips=0)):
            out.append(("prefill", dict(dtype=torch.bfloat16, head_dim=128, head_dim_v=128,
                                        causal=causal, varlen=False, has_skip=True,
                                        has_stats=False, factor_per_batch=False, **las),
                        launch.compile_prefill_sm90))
    return out


SETS = {"mla": mla_configs, "decode": decode_configs, "prefill": prefill_configs}


def ptx_digest(compile_fn, cfg: dict) -> str:
    """SHA-256 over the PTX files this compilation wrote (sorted, so their names do not matter)."""
    with tempfile.TemporaryDirectory(prefix="blasst-ptx-") as d:
        compile_fn(cfg, options=f"--dump-dir={d} --keep-ptx")
        blobs = []
        for f in sorted(os.listdir(d)):
            if f.endswith(".ptx"):
                with open(os.path.join(d, f), "rb") as fh:
                    blobs.append(fh.read())
    if not blobs:
        raise RuntimeError(f"no PTX written for {cfg} (--keep-ptx not honoured by this DSL?)")
    h = hashlib.sha256()
    for b in sorted(blobs):
        h.update(hashlib.sha256(b).digest())
    return h.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default=None,
                   help="comma-separated subset of mla,decode,prefill (default: all, or those "
                        "in --against)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", metavar="FILE", help="write the fingerprints as JSON")
    g.add_argument("--against", metavar="FILE",
                   help="compare with a saved JSON; exit 1 on a difference")
    a = p.parse_args(argv)
    ref = None
    if a.against:
        with open(a.against) as fh:
            ref = json.load(fh)
    if a.kernels:
        kinds = a.kernels.split(",")
    elif ref is not None:
        kinds = sorted({k.split(":", 1)[0] for k in ref})
    else:
        kinds = list(SETS)
    bad = [k for k in kinds if k not in SETS]
    if bad:
        p.error(f"--kernels: unknown {bad}; expected a subset of {sorted(SETS)}")
    prints, differ, unsaved = {}, [], []
    for kind in kinds:
        for k, cfg, fn in SETS[kind]():
            cid = _cfg_id(k, cfg)
            prints[cid] = ptx_digest(fn, cfg)
            status = ""
            if ref is not None:
                if cid not in ref:
                    status = "  (not in the saved set)"
                    unsaved.append(cid)
                elif ref[cid] != prints[cid]:
                    status = "  DIFFERS"
                    differ.append(cid)
                else:
                    status = "  same"
            print(f"{prints[cid][:16]}  {cid}{status}", flush=True)
    if a.save:
        with open(a.save, "w") as fh:
            json.dump(prints, fh, indent=1, sort_keys=True)
        print(f"{len(prints)} fingerprints -> {a.save}")
        return 0
    missing = [c for c in ref if c.split(":", 1)[0] in kinds and c not in prints]
    compared = len(prints) - len(unsaved)
    print(f"{compared - len(differ)} of {compared} saved configurations byte-identical"
          + (f"; {len(unsaved)} new ones not compared" if unsaved else "")
          + (f"; {len(missing)} saved ones not compiled now" if missing else ""))
    for c in differ:
        print(f"DIFFERS: {c}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
