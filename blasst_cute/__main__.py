"""``python -m blasst_cute``: the demo (default) and the command-line tools.

The demo runs BLASST prefill and decode on a synthetic long-context workload and prints the tile
sparsity, the error against dense attention and, on a GPU, the time against a dense peer.
On a CPU it runs the pure-torch reference at a size that finishes well under a minute.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _time_ms(fn, iters):
    """Median milliseconds of ``fn`` (CUDA events on the GPU, wall clock on the CPU)."""
    fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def demo(args) -> int:
    import blasst_cute
    from blasst_cute.testing import dense_attention, rel_err
    from blasst_cute.workloads import synthetic_qkv, to_paged

    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda" if on_gpu else "cpu"
    L = args.seqlen or (16384 if on_gpu else 4096)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    print(f"blasst_cute {blasst_cute.__version__} demo on {device}"
          + (f" ({torch.cuda.get_device_name()})" if on_gpu else
             " (no GPU: running the pure-torch reference path at a reduced size)"))
    print(f"workload: synthetic long-context attention, batch {args.batch}, {L} tokens, "
          f"{args.heads_q} q heads / {args.heads_kv} kv heads, head dim {args.head_dim}, {dtype}")
    q, k, v = synthetic_qkv(args.batch, L, L, args.heads_q, args.heads_kv, args.head_dim,
                            dtype=dtype, device=device, seed=args.seed)

    # Prefill (causal).
    print(f"\nprefill (causal), threshold_scale_factor = {args.prefill_factor:g} "
          f"(λ = factor / {L} = {args.prefill_factor / L:.3g})")
    backend = "auto"
    try:
        out, st = blasst_cute.prefill(q, k, v, causal=True, threshold_scale_factor=args.prefill_factor,
                                      return_stats=True, backend=backend)
    except NotImplementedError as exc:
        print(f"  GPU kernel unavailable: {exc}\n  falling back to backend='reference' for the demo")
        backend = "reference"
        out, st = blasst_cute.prefill(q, k, v, causal=True, threshold_scale_factor=args.prefill_factor,
                                      return_stats=True, backend=backend)
    dense, _ = dense_attention(q, k, v, causal=True)
    print(f"  tile sparsity {st.sparsity:6.1%}  ({int(st.skipped.sum())} of {int(st.visited.sum())} "
          f"(16-row group, key tile) softmaxes skipped)")
    if st.pv_sparsity is not None:  # the ideal gain counts the skipped P·V MMAs (64-row groups)
        print(f"  P·V sparsity {st.pv_sparsity:6.1%}  ({int(st.pv_skipped.sum())} of "
              f"{int(st.pv_visited.sum())} P·V products skipped; ideal kernel speedup "
              f"1/(1-s/2) = {1 / (1 - st.pv_sparsity / 2):.2f}x)")
    print(f"  relative error vs dense float64 attention: {rel_err(out, dense):.2e}")
    if on_gpu and backend == "auto":
        t_b = _time_ms(lambda: blasst_cute.prefill(q, k, v, causal=True,
                                                   threshold_scale_factor=args.prefill_factor), 10)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        t_d = _time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            qt, kt, vt, is_causal=True, enable_gqa=True), 10)
        print(f"  time {t_b:.3f} ms vs dense torch SDPA {t_d:.3f} ms: {t_d / t_b:.2f}x")

    # Decode: the last few tokens against a paged cache.
    n_new = args.decode_tokens
    k_cache, v_cache, table = to_paged(k, v, args.page_size, seed=args.seed)
    lens = torch.full((args.batch,), L, dtype=torch.int32, device=device)
    qd = q[:, -n_new:].contiguous()
    print(f"\ndecode ({n_new} new token(s), paged KV cache, page size {args.page_size}), "
          f"threshold_scale_factor = {args.decode_factor:g}")
    try:
        out_d, st_d = blasst_cute.decode(qd, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                         threshold_scale_factor=args.decode_factor, return_stats=True)
        dec_backend = "auto"
    except NotImplementedError as exc:
        print(f"  GPU kernel unavailable: {exc}\n  falling back to backend='reference' for the demo")
        dec_backend = "reference"
        out_d, st_d = blasst_cute.decode(qd, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                         threshold_scale_factor=args.decode_factor, return_stats=True,
                                         backend="reference")
    dense_d, _ = dense_attention(qd, k, v, causal=True)
    print(f"  tile sparsity {st_d.sparsity:6.1%}  ({int(st_d.skipped.sum())} of "
          f"{int(st_d.visited.sum())} tiles skipped)")
    print(f"  relative error vs dense float64 attention: {rel_err(out_d, dense_d):.2e}")
    if on_gpu and dec_backend == "auto":
        t_b = _time_ms(lambda: blasst_cute.decode(qd, k_cache, v_cache, cache_seqlens=lens,
                                                  block_table=table,
                                                  threshold_scale_factor=args.decode_factor), 20)
        print(f"  time {t_b:.3f} ms")
    print("\ndone.")
    return 0


# Subcommands: ``python -m blasst_cute NAME ...`` (no subcommand runs the demo).
SUBCOMMANDS = {
    "calibrate": ("blasst_cute.calibrate", "fit threshold_scale_factor = a*exp(b*target) per phase on a model"),
    "eval": ("blasst_cute.eval", "accuracy harness: perplexity and RULER-style NIAH, dense vs BLASST"),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m blasst_cute",
        description="BLASST (dynamic block-sparse attention by softmax thresholding) demo. "
                    "Runs prefill and decode on a synthetic long-context workload and reports tile "
                    "sparsity, error against dense attention and (on a GPU) time against dense.",
        epilog="subcommands: " + "; ".join(f"'{n}': {d}" for n, (_, d) in SUBCOMMANDS.items())
               + " (python -m blasst_cute NAME --help).")
    parser.add_argument("--seqlen", type=int, default=None,
                        help="context length (default: 16384 on a GPU, 4096 on the CPU)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--heads-q", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--heads-kv", type=int, default=2, help="kv heads (default 2)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default 128)")
    parser.add_argument("--prefill-factor", type=float, default=200.0,
                        help="threshold_scale_factor for prefill: λ = factor / L (default 200)")
    parser.add_argument("--decode-factor", type=float, default=1000.0,
                        help="threshold_scale_factor for decode (default 1000)")
    parser.add_argument("--decode-tokens", type=int, default=1, help="new tokens per decode step (default 1)")
    parser.add_argument("--page-size", type=int, default=64, help="KV-cache page size (default 64)")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="'cpu' forces the reference path even when a GPU is present")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    args = parser.parse_args(argv)
    if args.heads_q % args.heads_kv:
        parser.error("--heads-q must be a multiple of --heads-kv")
    return demo(args)


if __name__ == "__main__":
    sys.exit(main())
