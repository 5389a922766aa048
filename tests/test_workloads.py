"""The synthetic workload has the advertised structure and sparsity range."""

import torch

from blasst_cute.reference import skip_counts
from blasst_cute.workloads import synthetic_qkv, to_paged


def test_shapes_dtype_and_determinism():
    q, k, v = synthetic_qkv(2, 100, 300, 6, 2, 64, 32, dtype=torch.float16, seed=1)
    assert q.shape == (2, 100, 6, 64) and k.shape == (2, 300, 2, 64) and v.shape == (2, 300, 2, 32)
    assert q.dtype == torch.float16 and torch.isfinite(q.float()).all()
    q2, _, _ = synthetic_qkv(2, 100, 300, 6, 2, 64, 32, dtype=torch.float16, seed=1)
    assert torch.equal(q, q2)


def test_attention_has_sinks_and_a_local_window():
    q, k, _ = synthetic_qkv(1, 1024, 1024, 4, 4, 64, dtype=torch.float64, seed=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8.0
    p = torch.softmax(s.masked_fill(torch.ones(1024, 1024).triu(1).bool(), float("-inf")), -1)
    rows = torch.arange(512, 1024)
    sink = p[0, :, rows, :4].sum(-1).mean()
    local = torch.stack([p[0, :, r, r - 63:r + 1].sum(-1) for r in rows]).mean()
    middle = p[0, :, rows, 4:64].sum(-1).mean()  # 60 far keys: little mass
    assert sink > 0.05 and local > 0.2 and middle < 0.1


def test_sparsity_sweeps_with_the_factor():
    q, k, _ = synthetic_qkv(1, 2048, 2048, 4, 1, 64, dtype=torch.float32, seed=3)
    factors = [0.01, 1.0, 30.0, 300.0, 1800.0]
    visited, skipped = skip_counts(q, k, factors=factors)
    s = (skipped.sum((1, 2)).double() / visited.sum((1, 2)).double()).tolist()
    assert s[0] < 0.05 and s[-1] > 0.5
    assert all(a <= b for a, b in zip(s, s[1:]))


def test_to_paged_roundtrip():
    _, k, v = synthetic_qkv(3, 10, 70, 2, 2, 16, dtype=torch.float32, seed=4)
    kc, vc, table = to_paged(k, v, 16, seed=5)
    assert table.dtype == torch.int32 and table.shape == (3, 5)
    assert len(set(table.flatten().tolist())) == 15  # pages are distinct
    for b in range(3):
        got = kc[table[b].long()].reshape(-1, 2, 16)[:70]
        torch.testing.assert_close(got, k[b])
        torch.testing.assert_close(vc[table[b].long()].reshape(-1, 2, 16)[:70], v[b])
