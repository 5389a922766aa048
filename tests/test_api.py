"""The public API: results on the CPU path, return forms, and clear errors for bad input."""

import math

import pytest
import torch

import blasst_cute
from blasst_cute import BlasstStats
from blasst_cute.dispatch import decode_geometry, prefill_geometry
from blasst_cute.reference import blasst_attention, blasst_attention_paged
from blasst_cute.workloads import random_qkv, synthetic_qkv, to_paged


def qkv(b=2, lq=40, lk=70, hq=4, hk=2, d=32, dv=None, dtype=torch.float32):
    return random_qkv(b, lq, lk, hq, hk, d, dv, dtype=dtype, seed=lq + lk)


def test_prefill_cpu_runs_reference_with_kernel_geometry():
    q, k, v = synthetic_qkv(1, 1024, 1024, 4, 2, 64, dtype=torch.float32, seed=5)
    out, lse, st = blasst_cute.prefill(q, k, v, causal=True, threshold_scale_factor=500.0,
                                       return_lse=True, return_stats=True)
    geom = prefill_geometry(64, 64, True, torch.float32)
    ref_out, ref_lse, ref_st = blasst_attention(q, k, v, causal=True, threshold_scale_factor=500.0,
                                                **geom.kwargs())
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert isinstance(st, BlasstStats) and st.skipped.tolist() == ref_st.skipped.tolist()
    assert st.visited.shape == (1, 4) and st.skipped.sum() > 0
    # P·V counts per 64-row warpgroup, as the kernel reports them
    assert geom.rows_per_pv == 64 and st.pv_visited.shape == (1, 4)
    assert st.pv_skipped.tolist() == ref_st.pv_skipped.tolist() and st.pv_skipped.sum() > 0
    assert st.pv_sparsity <= st.sparsity


def test_return_forms():
    q, k, v = qkv()
    out = blasst_cute.prefill(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 40, 4, 32) and out.dtype == q.dtype
    out, lse = blasst_cute.prefill(q, k, v, return_lse=True)
    assert lse.shape == (2, 4, 40) and lse.dtype == torch.float32
    out, st = blasst_cute.prefill(q, k, v, return_stats=True)
    assert isinstance(st, BlasstStats) and st.sparsity == 0.0


def test_dq_differs_from_dv():
    q, k, v = qkv(d=48, dv=24)
    assert blasst_cute.prefill(q, k, v, causal=True).shape == (2, 40, 4, 24)


def test_factor_tensor_per_sequence():
    q, k, v = synthetic_qkv(2, 1024, 1024, 2, 1, 32, dtype=torch.float32, seed=6)
    f = torch.tensor([0.0, 500.0])
    _, st = blasst_cute.prefill(q, k, v, threshold_scale_factor=f, return_stats=True)
    assert st.skipped[0].sum() == 0 and st.skipped[1].sum() > 0


def test_varlen_prefill():
    lens = [17, 64, 3]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    q, k, v = random_qkv(1, sum(lens), sum(lens), 4, 4, 16, seed=9)
    out, lse = blasst_cute.prefill(q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                   return_lse=True)
    assert out.shape == (sum(lens), 4, 16) and lse.shape == (4, sum(lens))
    s = 17
    o1 = blasst_cute.prefill(q[:, s:s + 64], k[:, s:s + 64], v[:, s:s + 64], causal=True)
    torch.testing.assert_close(out[s:s + 64], o1[0])


def test_decode_paged_cpu():
    B, L = 2, 150
    q, k, v = synthetic_qkv(B, L, L, 8, 2, 32, dtype=torch.float32, seed=7)
    q = q[:, -3:]
    lens = torch.tensor([150, 77], dtype=torch.int32)
    k_cache, v_cache, table = to_paged(k, v, 16)
    out, lse, st = blasst_cute.decode(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                      threshold_scale_factor=2.0, return_lse=True, return_stats=True)
    geom = decode_geometry(q.shape, k_cache.shape, table.shape)
    ref, ref_lse, ref_st = blasst_attention_paged(q, k, v, cache_seqlens=lens,
                                                  threshold_scale_factor=2.0, **geom.kwargs())
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    assert st.visited.shape == (2, 2) and st.skipped.tolist() == ref_st.skipped.tolist()
    # The contiguous-cache form gives the same answer.
    out2 = blasst_cute.decode(q, k, v, cache_seqlens=lens, threshold_scale_factor=2.0)
    torch.testing.assert_close(out, out2)


def test_backend_cute_on_cpu_is_loud():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="CUDA"):
        blasst_cute.prefill(q, k, v, backend="cute")
    with pytest.raises(NotImplementedError, match="CUDA"):
        blasst_cute.decode(q[:, :1], k, v, cache_seqlens=torch.full((2,), 70, dtype=torch.int32),
                           backend="cute")


def test_reference_backend_explicit():
    q, k, v = qkv()
    torch.testing.assert_close(blasst_cute.prefill(q, k, v, backend="reference"),
                               blasst_cute.prefill(q, k, v))


# ----------------------------------------------------------------------------------------------
# Bad inputs: each raises a clear error naming the argument.
# ----------------------------------------------------------------------------------------------

Q, K, V = qkv()
CU = torch.tensor([0, 40, 80], dtype=torch.int32)
Q3, K3, V3 = Q.reshape(80, 4, 32), K[:, :40].reshape(80, 2, 32), V[:, :40].reshape(80, 2, 32)

PREFILL_BAD = [
    ("q not a tensor", dict(q=Q.numpy()), TypeError, "q must be a torch.Tensor"),
    ("q wrong rank", dict(q=Q[0]), ValueError, "q must have 4 dims"),
    ("k wrong rank", dict(k=K[0]), ValueError, "k must have 4 dims"),
    ("integer dtype", dict(q=Q.to(torch.int32)), TypeError, "q must be float16"),
    ("k dtype differs", dict(k=K.double()), TypeError, "k must have the dtype of q"),
    ("v dtype differs", dict(v=V.half()), TypeError, "v must have the dtype of q"),
    ("batch mismatch", dict(k=K[:1], v=V[:1]), ValueError, "same batch size"),
    ("k/v length mismatch", dict(v=V[:, :60]), ValueError, "k and v must have the same shape"),
    ("heads not divisible", dict(q=torch.randn(2, 40, 3, 32)), ValueError, "multiple of kv heads"),
    ("k/v heads mismatch", dict(v=torch.randn(2, 70, 1, 32)), ValueError, "k and v must have the same shape"),
    ("head dim mismatch", dict(k=torch.randn(2, 70, 2, 16), v=torch.randn(2, 70, 2, 16)), ValueError,
     "same head dim"),
    ("q not contiguous in last dim", dict(q=torch.randn(2, 40, 4, 64)[..., ::2]), ValueError,
     "q must be contiguous in its last"),
    ("v not contiguous in last dim", dict(v=torch.randn(2, 70, 2, 64)[..., ::2]), ValueError,
     "v must be contiguous in its last"),
    ("negative factor", dict(threshold_scale_factor=-1.0), ValueError, "threshold_scale_factor must be finite"),
    ("nan factor", dict(threshold_scale_factor=float("nan")), ValueError, "threshold_scale_factor must be finite"),
    ("inf factor", dict(threshold_scale_factor=math.inf), ValueError, "threshold_scale_factor must be finite"),
    ("string factor", dict(threshold_scale_factor="1e3"), TypeError, "threshold_scale_factor must be None"),
    ("factor tensor wrong shape", dict(threshold_scale_factor=torch.ones(3)), ValueError, "shape \\[2\\]"),
    ("factor tensor int", dict(threshold_scale_factor=torch.ones(2, dtype=torch.int32)), TypeError,
     "must be float32"),
    ("factor tensor negative", dict(threshold_scale_factor=torch.tensor([1.0, -2.0])), ValueError,
     "finite and >= 0"),
    ("zero scale", dict(softmax_scale=0.0), ValueError, "softmax_scale must be finite and > 0"),
    ("nan scale", dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be finite"),
    ("causal not bool", dict(causal=1), TypeError, "causal must be a bool"),
    ("unknown backend", dict(backend="triton"), ValueError, "backend must be one of"),
    ("max_seqlen without cu_seqlens", dict(max_seqlen_q=40), ValueError, "only meaningful with cu_seqlens"),
    ("return_lse not bool", dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
]

VARLEN_BAD = [
    ("cu_seqlens_q alone", dict(cu_seqlens_q=CU, cu_seqlens_k=None), ValueError, "given together"),
    ("cu_seqlens int64", dict(cu_seqlens_q=CU.long()), TypeError, "cu_seqlens_q must be int32"),
    ("cu_seqlens not monotone", dict(cu_seqlens_q=torch.tensor([0, 50, 40, 80], dtype=torch.int32),
                                     cu_seqlens_k=torch.tensor([0, 10, 20, 80], dtype=torch.int32)),
     ValueError, "non-decreasing"),
    ("cu_seqlens wrong total", dict(cu_seqlens_k=torch.tensor([0, 40, 70], dtype=torch.int32)),
     ValueError, "must equal the total number of tokens \\(80\\)"),
    ("cu_seqlens first not 0", dict(cu_seqlens_q=torch.tensor([5, 40, 80], dtype=torch.int32)),
     ValueError, "cu_seqlens_q\\[0\\] must be 0"),
    ("cu_seqlens batch mismatch", dict(cu_seqlens_k=torch.tensor([0, 20, 40, 80], dtype=torch.int32)),
     ValueError, "cu_seqlens_k must have 3 entries"),
    ("cu_seqlens 2-D", dict(cu_seqlens_q=CU[None]), ValueError, "cu_seqlens_q must have 1 dims"),
    ("max_seqlen_q too small", dict(max_seqlen_q=10), ValueError, "max_seqlen_q must be an int >= the longest"),
    ("varlen q rank", dict(q=Q), ValueError, "q must have 3 dims"),
]


@pytest.mark.parametrize("what,kwargs,exc,msg", PREFILL_BAD, ids=[c[0] for c in PREFILL_BAD])
def test_prefill_rejects(what, kwargs, exc, msg):
    args = dict(q=Q, k=K, v=V)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        blasst_cute.prefill(**args)


@pytest.mark.parametrize("what,kwargs,exc,msg", VARLEN_BAD, ids=[c[0] for c in VARLEN_BAD])
def test_varlen_rejects(what, kwargs, exc, msg):
    args = dict(q=Q3, k=K3, v=V3, cu_seqlens_q=CU, cu_seqlens_k=CU)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        blasst_cute.prefill(**args)


KC, VC, BT = to_paged(K, V, 16)
LENS = torch.tensor([70, 33], dtype=torch.int32)

DECODE_BAD = [
    ("no new token", dict(q=Q[:, :0]), ValueError, "at least one new token"),
    ("cache_seqlens int64", dict(cache_seqlens=LENS.long()), TypeError, "cache_seqlens must be int32"),
    ("cache_seqlens wrong shape", dict(cache_seqlens=LENS[:1]), ValueError, "cache_seqlens must have shape \\[2\\]"),
    ("cache_seqlens over capacity", dict(cache_seqlens=torch.tensor([70, 81], dtype=torch.int32)),
     ValueError, "cache capacity"),
    ("cache_seqlens negative", dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError,
     "must lie in"),
    ("block_table int64", dict(block_table=BT.long()), TypeError, "block_table must be int32"),
    ("block_table rows", dict(block_table=BT[:1]), ValueError, "block_table must have 2 rows"),
    ("block_table out of range", dict(block_table=torch.where(BT == BT[1, 0], 999, BT)), ValueError,
     "out of range"),
    ("block_table negative", dict(block_table=torch.where(BT == BT[0, 2], -1, BT)), ValueError, "out of range"),
    ("k_cache dtype", dict(k_cache=KC.double()), TypeError, "k_cache must have the dtype of q"),
    ("k_cache rank", dict(k_cache=KC[0]), ValueError, "k_cache must have 4 dims"),
    ("decode factor negative", dict(threshold_scale_factor=-3), ValueError, "threshold_scale_factor"),
]


@pytest.mark.parametrize("what,kwargs,exc,msg", DECODE_BAD, ids=[c[0] for c in DECODE_BAD])
def test_decode_rejects(what, kwargs, exc, msg):
    args = dict(q=Q[:, -2:], k_cache=KC, v_cache=VC, cache_seqlens=LENS, block_table=BT)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        blasst_cute.decode(**args)


def test_contiguous_cache_batch_mismatch():
    with pytest.raises(ValueError, match="without block_table"):
        blasst_cute.decode(Q[:, -1:], K[:1], V[:1], cache_seqlens=LENS)


def test_decode_mla_reference_matches_expanded_dense():
    B, L, H, lq = 2, 300, 16, 2
    gen = torch.Generator().manual_seed(12)
    kv = torch.randn(B, L, 576, generator=gen, dtype=torch.float64)
    q = torch.randn(B, lq, H, 576, generator=gen, dtype=torch.float64)
    lens = torch.tensor([300, 129], dtype=torch.int32)
    scale = 1 / math.sqrt(192)
    kc, _, table = to_paged(kv.unsqueeze(2), kv[..., :1].unsqueeze(2), 64)
    out, lse, st = blasst_cute.decode_mla(q, kc[:, :, 0], cache_seqlens=lens, block_table=table,
                                         softmax_scale=scale, return_lse=True, return_stats=True)
    assert out.shape == (B, lq, H, 512) and lse.shape == (B, H, lq) and st.visited.shape == (B, 1)
    for b in range(B):
        n = int(lens[b])
        k = kv[b, :n]
        s = torch.einsum("qhd,kd->hqk", q[b], k) * scale
        mask = torch.arange(n)[None, :] <= torch.arange(lq)[:, None] + (n - lq)
        p = torch.softmax(s.masked_fill(~mask, -math.inf), -1)
        ref = torch.einsum("hqk,kd->qhd", p, k[:, :512])
        torch.testing.assert_close(out[b], ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="softmax_scale is required"):
        blasst_cute.decode_mla(q, kc[:, :, 0], cache_seqlens=lens, block_table=table, softmax_scale=None)
    with pytest.raises(ValueError, match="kv_cache must have 3 dims"):
        blasst_cute.decode_mla(q, kc, cache_seqlens=lens, block_table=table, softmax_scale=scale)
