"""The reference gives the same outputs and decisions on CUDA as on the CPU."""

import pytest
import torch

from blasst_cute.reference import blasst_attention
from blasst_cute.workloads import synthetic_qkv


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu():
    q, k, v = synthetic_qkv(2, 700, 900, 8, 2, 64, dtype=torch.float32, seed=11)
    kw = dict(causal=True, threshold_scale_factor=300.0, block_m=128, block_n=128, rows_per_decision=64,
              order="reverse")
    out, lse, st = blasst_attention(q, k, v, **kw)
    out_g, lse_g, st_g = blasst_attention(q.cuda(), k.cuda(), v.cuda(), **kw)
    torch.testing.assert_close(out_g.cpu(), out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse_g.cpu(), lse, rtol=1e-4, atol=1e-4)
    flips = (st_g.skipped.cpu() - st.skipped).abs().sum().item()
    assert flips <= 0.005 * st.visited.sum().item() and st.skipped.sum() > 0
