"""One BLASST call to profile under Nsight Compute (see perf/ncu_report.sh).

    python perf/ncu_target.py prefill --seqlen 16384 --factor 1000 --causal
    python perf/ncu_target.py prefill --seqlen 16384 --factor 1e-30 --tuning '{"qk_lookahead": true}'
    python perf/ncu_target.py decode --seqlen 32768 --batch 64 --factor 100
    python perf/ncu_target.py mla --seqlen 4096 --batch 64 --heads-q 128 --factor 130

--tuning (prefill): kernel knobs as JSON, launched through launch.run_prefill_sm90.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import blasst_cute  # noqa: E402
from blasst_cute.workloads import synthetic_qkv, to_paged  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=("prefill", "decode", "mla"))
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads-q", type=int, default=32)
    p.add_argument("--heads-kv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--factor", type=float, default=0.0)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--tuning", default=None,
                   help="prefill only: kernel knobs as JSON (launch.run_prefill_sm90's tuning)")
    a = p.parse_args()
    f = a.factor or None
    if a.phase == "prefill" and a.tuning:
        import json
        from blasst_cute.kernels import launch
        q, k, v = synthetic_qkv(a.batch, a.seqlen, a.seqlen, a.heads_q, a.heads_kv, a.head_dim, device="cuda")
        out, lse = torch.empty_like(q), torch.empty(a.batch, a.heads_q, a.seqlen, device="cuda")
        kw = dict(causal=a.causal, softmax_scale=a.head_dim ** -0.5, threshold_scale_factor=f,
                  tuning=json.loads(a.tuning))
        run = lambda: launch.run_prefill_sm90(q, k, v, out, lse, **kw)  # noqa: E731
        vis = torch.zeros(a.batch, a.heads_q, dtype=torch.int32, device="cuda")
        skp = torch.zeros_like(vis)
        launch.run_prefill_sm90(q, k, v, out, lse, visited=vis, skipped=skp, **kw)
        st = argparse.Namespace(sparsity=float(skp.sum()) / max(1.0, float(vis.sum())))
    elif a.phase == "prefill":
        q, k, v = synthetic_qkv(a.batch, a.seqlen, a.seqlen, a.heads_q, a.heads_kv, a.head_dim, device="cuda")
        run = lambda: blasst_cute.prefill(q, k, v, causal=a.causal, threshold_scale_factor=f)  # noqa: E731
        _, st = blasst_cute.prefill(q, k, v, causal=a.causal, threshold_scale_factor=f, return_stats=True)
    elif a.phase == "mla":  # absorbed MLA decode: one 576-wide latent row per token (K; V = 512)
        q, k, _ = synthetic_qkv(a.batch, 1, a.seqlen, a.heads_q, 1, 576, device="cuda")
        kv = k[:, :, 0].contiguous()
        lens = torch.full((a.batch,), a.seqlen, dtype=torch.int32, device="cuda")
        kw = dict(cache_seqlens=lens, softmax_scale=576 ** -0.5, threshold_scale_factor=f)
        run = lambda: blasst_cute.decode_mla(q, kv, **kw)  # noqa: E731
        _, st = blasst_cute.decode_mla(q, kv, return_stats=True, **kw)
    else:
        q, k, v = synthetic_qkv(a.batch, 1, a.seqlen, a.heads_q, a.heads_kv, a.head_dim, device="cuda")
        kc, vc, bt = to_paged(k, v, a.page_size)
        lens = torch.full((a.batch,), a.seqlen, dtype=torch.int32, device="cuda")
        run = lambda: blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt,  # noqa: E731
                                         threshold_scale_factor=f)
        _, st = blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt, threshold_scale_factor=f,
                                   return_stats=True)
    print(f"sparsity {st.sparsity:.4f}", flush=True)
    for _ in range(3):  # warm-up; ncu profiles the last launches (see --launch-skip there)
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
