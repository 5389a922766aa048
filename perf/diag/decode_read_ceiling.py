"""How fast can any kernel merely READ a decode launch's K+V bytes? (issue #4, GPU host)

    python perf/diag/decode_read_ceiling.py [--shapes 1,8192,64,4 1,8192,32,8 ...]

Issue #4 asks the dense decode kernel for >= 85 % of the card's copy bandwidth (a 2 GiB device
copy, read + write: decode_matrix.copy_bandwidth) at every shape, the smallest launches
included. A decode kernel must read every K and V byte at least once, so the fastest plain read
of those bytes shows how close any decode kernel can get at that size (a bound only as tight as
the reads tried here). Per shape (bf16, d128, B x L keys x Hk heads, K and V):

- copy: a device copy moving the same DRAM bytes (read half, write half): decode_small.copy_us;
- read: a Triton kernel that reads every 32-bit word once (an XOR per program, one word written
  per program), the fastest of CONFIGS (words per load, loads per program, warps); the XOR of
  the programs' words is checked against the input's;
- torch sum: ``x.sum()`` over the same int32 words (torch's own reduction).

Timing as decode_small.py does it: CALLS_PER_GRAPH calls cycling through enough input sets to
overflow the L2, captured in one CUDA graph and replayed (launch gaps amortized; each kernel's
ramp-up and tail are not). Prints one table: microseconds and the share of the card's copy
bandwidth (bytes / time / copy bandwidth).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: only the helpers are used there
    triton = tl = None

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "perf"))

from blasst_cute.testing import time_graph_cycle  # noqa: E402
from bench import n_rotations  # noqa: E402
from decode_matrix import copy_bandwidth  # noqa: E402
from decode_small import CALLS_PER_GRAPH, copy_us  # noqa: E402

SHAPES = ["1,8192,64,4", "1,8192,32,8", "1,32768,64,4", "8,8192,64,4", "1,131072,32,8"]
# (int32 words per load, loads per program, warps)
CONFIGS = [(b, it, w) for b in (512, 1024, 2048, 4096, 8192) for it in (1, 2, 4, 8, 16)
           for w in (2, 4, 8)]


def kv_bytes(B: int, L: int, hk: int, head_dim: int = 128) -> int:
    """K+V bytes of a decode launch over a bf16 cache (decode_matrix's count)."""
    return 2 * B * L * hk * head_dim * 2


def share(nbytes: int, seconds: float, copy_bw: float) -> float:
    """Bytes per second as a fraction of the card's copy bandwidth."""
    return nbytes / seconds / copy_bw


def xor_all(words: np.ndarray) -> int:
    """XOR of all words: the read kernel's per-program words XOR to the input's (every word read
    exactly once), which is how the script checks that the read really read everything."""
    return int(np.bitwise_xor.reduce(words.astype(np.int32, copy=False)))


if triton is not None:  # the helpers above load without Triton (CPU tests)
    @triton.jit
    def _xor(a, b):
        return a ^ b

    @triton.jit
    def _read_xor(x_ptr, out_ptr, n_words, BLOCK: tl.constexpr, LOADS: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        base = pid.to(tl.int64) * (BLOCK * LOADS)
        for i in tl.static_range(LOADS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc ^= tl.load(x_ptr + offs, mask=offs < n_words, other=0)
        tl.store(out_ptr + pid, tl.reduce(acc, 0, _xor))


def _programs(n_words: int, cfg) -> int:
    return -(-n_words // (cfg[0] * cfg[1]))


def read_fns(bufs, outs, cfg):
    block, loads, warps = cfg
    n = bufs[0].numel()
    grid = (_programs(n, cfg),)
    return [lambda x=x, o=o: _read_xor[grid](x, o, n, BLOCK=block, LOADS=loads, num_warps=warps)
            for x, o in zip(bufs, outs)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="B,L,Hq,Hk (d128, bf16)")
    a = p.parse_args()
    if triton is None or not torch.cuda.is_available():
        sys.exit("decode_read_ceiling.py needs a CUDA GPU and Triton")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: card copy bandwidth {bw / 1e9:.0f} GB/s "
          "(2 GiB, read + write)")
    print("| B | L | Hq/Hk | K+V MB | sets | copy us | copy % | read us | read % | read config "
          "(words, loads, warps) | torch sum us | sum % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in a.shapes:
        B, L, hq, hk = (int(x) for x in spec.split(","))
        nbytes = kv_bytes(B, L, hk)
        sets = n_rotations(nbytes)
        bufs = [torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device="cuda")
                for _ in range(sets)]
        copy_s = copy_us(nbytes, sets) * 1e-6
        best = None
        for cfg in CONFIGS:
            outs = [torch.empty(_programs(bufs[0].numel(), cfg), dtype=torch.int32, device="cuda")
                    for _ in bufs]
            fns = read_fns(bufs, outs, cfg)
            fns[0]()  # compile outside the capture
            s = time_graph_cycle(fns, CALLS_PER_GRAPH)
            if best is None or s < best[0]:
                best = (s, cfg, outs)
        # the read really read every word: XOR of the per-program words = XOR of all words
        if xor_all(best[2][0].cpu().numpy()) != xor_all(bufs[0].cpu().numpy()):
            sys.exit(f"read kernel result wrong at {spec} {best[1]}")
        sum_s = time_graph_cycle([lambda x=x: x.sum() for x in bufs], CALLS_PER_GRAPH)
        mb = nbytes / 1e6

        def pct(t):
            return f"{100 * share(nbytes, t, bw):.0f} %"
        print(f"| {B} | {L} | {hq}/{hk} | {mb:.1f} | {sets} | {copy_s * 1e6:.1f} | {pct(copy_s)} "
              f"| {best[0] * 1e6:.1f} | {pct(best[0])} | {best[1]} | {sum_s * 1e6:.1f} "
              f"| {pct(sum_s)} |", flush=True)
        del bufs


if __name__ == "__main__":
    main()
