"""API behaviour that needs CUDA tensors: kernels through the public functions, graph capture."""

import pytest
import torch

import blasst_cute
from blasst_cute.dispatch import decode_geometry, prefill_geometry
from blasst_cute.reference import blasst_attention, blasst_attention_paged
from blasst_cute.workloads import synthetic_qkv, to_paged

pytestmark = pytest.mark.gpu


def _flips(a, b):
    return (a.cpu() - b.cpu()).abs().sum().item()


def test_prefill_api_matches_reference_decisions():
    q, k, v = synthetic_qkv(2, 1000, 1500, 8, 2, 128, device="cuda", seed=21)
    out, lse, st = blasst_cute.prefill(q, k, v, causal=True, threshold_scale_factor=500.0,
                                       return_lse=True, return_stats=True)
    geom = prefill_geometry(128, 128, True, q.dtype)
    ref, ref_lse, ref_st = blasst_attention(q.float(), k.float(), v.float(), causal=True,
                                            threshold_scale_factor=500.0, **geom.kwargs())
    assert st.visited.tolist() == ref_st.visited.tolist()
    assert _flips(st.skipped, ref_st.skipped) <= 0.005 * ref_st.visited.sum().item()
    assert ref_st.skipped.sum() > 0
    assert st.pv_visited.tolist() == ref_st.pv_visited.tolist()  # per 64-row warpgroup
    assert _flips(st.pv_skipped, ref_st.pv_skipped) <= 0.005 * ref_st.pv_visited.sum().item()
    assert ref_st.pv_skipped.sum() > 0
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_decode_api_matches_reference_and_counts_v_loads():
    B, L = 4, 5000
    q, k, v = synthetic_qkv(B, 2, L, 32, 8, 128, device="cuda", seed=22)
    k_cache, v_cache, table = to_paged(k, v, 64, seed=3)
    lens = torch.tensor([5000, 1, 4096, 777], dtype=torch.int32, device="cuda")
    out, lse, st = blasst_cute.decode(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                      threshold_scale_factor=50.0, return_lse=True, return_stats=True)
    geom = decode_geometry(q.shape, k_cache.shape, table.shape,
                           torch.cuda.get_device_properties(0).multi_processor_count)
    ref, _, ref_st = blasst_attention_paged(q.float(), k.float(), v.float(), cache_seqlens=lens,
                                            threshold_scale_factor=50.0, **geom.kwargs())
    assert st.visited.tolist() == ref_st.visited.tolist()
    assert _flips(st.skipped, ref_st.skipped) <= 0.005 * ref_st.visited.sum().item()
    assert (st.v_loaded == st.visited - st.skipped).all()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_decode_under_cuda_graph_with_new_factor():
    B, L = 2, 3000
    q, k, v = synthetic_qkv(B, 1, L, 16, 4, 128, device="cuda", seed=23)
    k_cache, v_cache, table = to_paged(k, v, 64, seed=4)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    factor = torch.tensor([0.0, 0.0], device="cuda")
    run = lambda: blasst_cute.decode(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,  # noqa
                                     threshold_scale_factor=factor)
    eager_dense = run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    g.replay()
    torch.testing.assert_close(out, eager_dense, rtol=0, atol=0)
    factor.fill_(200.0)
    g.replay()
    eager_sparse = run()
    torch.testing.assert_close(out, eager_sparse, rtol=0, atol=0)
    assert not torch.equal(eager_sparse, eager_dense)


def test_content_checks_switch():
    q, k, v = synthetic_qkv(1, 1, 100, 4, 4, 64, device="cuda", seed=24)
    bad = torch.tensor([101], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="cache capacity"):
        blasst_cute.decode(q, k, v, cache_seqlens=bad)
    blasst_cute.set_content_checks(False)
    try:
        ok = torch.tensor([100], dtype=torch.int32, device="cuda")
        blasst_cute.decode(q, k, v, cache_seqlens=ok)
    finally:
        blasst_cute.set_content_checks(True)


@pytest.fixture(params=[False, True], ids=["combine-kernel", "fused-merge"])
def decode_merge(request, monkeypatch):
    """Both split merges: the combine kernel (default) and the fused in-launch merge."""
    from blasst_cute import dispatch
    from blasst_cute.kernels import launch_decode

    def fresh_plans():
        launch_decode._plans.clear()
        dispatch._decode_direct.clear()

    monkeypatch.setattr(launch_decode, "FUSED_MERGE", request.param)
    fresh_plans()
    yield request.param
    fresh_plans()


def test_decode_reused_plan_across_streams_and_lengths(decode_merge):
    """One launch plan (same shapes) on two streams with different cache_seqlens, interleaved,
    then back-to-back eager calls: each result equals a fresh single call (the per-stream
    scratch and the fused merge's arrival counters are reused, never shared across streams)."""
    B, L = 2, 9000  # several splits per kv head: the split merge runs
    q, k, v = synthetic_qkv(B, 1, L, 32, 8, 128, device="cuda", seed=23)
    k_cache, v_cache, table = to_paged(k, v, 64, seed=4)
    lens_a = torch.tensor([9000, 3001], dtype=torch.int32, device="cuda")
    lens_b = torch.tensor([129, 8192], dtype=torch.int32, device="cuda")

    def call(lens):
        return blasst_cute.decode(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                  threshold_scale_factor=30.0, return_lse=True)

    want_a, want_b = call(lens_a), call(lens_b)
    torch.cuda.synchronize()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    got = []
    for _ in range(3):
        with torch.cuda.stream(s1):
            ra = call(lens_a)
        with torch.cuda.stream(s2):
            rb = call(lens_b)
        got += [(ra, want_a), (rb, want_b)]
    got += [(call(lens_b), want_b), (call(lens_a), want_a)]
    torch.cuda.synchronize()
    for (out, lse), (w_out, w_lse) in got:
        assert torch.equal(out, w_out) and torch.equal(lse, w_lse)


def test_decode_direct_launch_path_matches_dispatch():
    """A decode signature that ran the kernel once goes straight to the launcher afterwards
    (no stats, no fix-ups): same output and lse as the dispatched call; a q that needs a copy
    (non-contiguous) keeps taking the dispatcher and gives the same result."""
    from blasst_cute import dispatch
    q, k, v = synthetic_qkv(2, 1, 5000, 32, 8, 128, device="cuda", seed=31)
    k_cache, v_cache, table = to_paged(k, v, 64, seed=5)
    lens = torch.tensor([5000, 777], dtype=torch.int32, device="cuda")
    kw = dict(cache_seqlens=lens, block_table=table, threshold_scale_factor=20.0)
    n_direct = len(dispatch._decode_direct)
    out0, lse0, stats = blasst_cute.decode(q, k_cache, v_cache, return_lse=True, return_stats=True, **kw)
    out1, lse1 = blasst_cute.decode(q, k_cache, v_cache, return_lse=True, **kw)  # registers
    assert len(dispatch._decode_direct) == n_direct + 1
    out2 = blasst_cute.decode(q, k_cache, v_cache, **kw)  # direct
    out3, lse3 = blasst_cute.decode(q, k_cache, v_cache, return_lse=True, **kw)  # direct
    assert torch.equal(out1, out0) and torch.equal(lse1, lse0)
    assert torch.equal(out2, out0) and torch.equal(out3, out0) and torch.equal(lse3, lse0)
    # non-contiguous q: copied by the dispatcher every time, never registered
    q_strided = torch.empty(2, 1, 32, 256, dtype=q.dtype, device="cuda")[..., :128]
    q_strided.copy_(q)
    n_direct = len(dispatch._decode_direct)
    for _ in range(2):
        assert torch.equal(blasst_cute.decode(q_strided, k_cache, v_cache, **kw), out0)
    assert len(dispatch._decode_direct) == n_direct
    assert int(stats.visited.sum()) > 0


def test_decode_head_major_caches_read_in_place():
    """A [B, H, S, D] cache (transformers) seen as [B, S, H, D], and HND pages (FlashInfer's
    [pages, H, page_size, D]) seen as [pages, page_size, H, D]: the kernel reads them through
    their strides, bitwise equal to the token-major layouts; a cache stride that is not a
    16-byte multiple is refused."""
    B, S = 2, 3000
    q, k, v = synthetic_qkv(B, 1, S, 32, 8, 128, device="cuda", seed=41)
    lens = torch.tensor([3000, 1234], dtype=torch.int32, device="cuda")
    kw = dict(cache_seqlens=lens, threshold_scale_factor=30.0, return_lse=True, return_stats=True)

    def head_major(x):
        return x.transpose(1, 2).contiguous().transpose(1, 2)

    want = blasst_cute.decode(q, k, v, **kw)
    got = blasst_cute.decode(q, head_major(k), head_major(v), **kw)
    kc, vc, table = to_paged(k, v, 64, seed=6)
    want_p = blasst_cute.decode(q, kc, vc, block_table=table, **kw)
    got_p = blasst_cute.decode(q, head_major(kc), head_major(vc), block_table=table, **kw)
    for (o, l, st), (wo, wl, wst) in ((got, want), (got_p, want_p)):
        assert torch.equal(o, wo) and torch.equal(l, wl)
        assert torch.equal(st.skipped, wst.skipped) and torch.equal(st.visited, wst.visited)
    odd = torch.empty(B, 8, S * 128 + 4, dtype=k.dtype, device="cuda")[..., :S * 128].view(B, 8, S, 128)
    with pytest.raises(NotImplementedError, match="16 bytes"):
        blasst_cute.decode(q, odd.transpose(1, 2), odd.transpose(1, 2), cache_seqlens=lens)


def test_prefill_gated_v_equals_head_pairs(monkeypatch):
    """blasst_cute.prefill at a long, high-lambda shape runs one CTA per q-tile whose V loads
    wait for the skip votes (the launcher's "auto"); forcing the q-head pair cluster (which loads
    every V) gives bitwise the same output, lse and skip counts."""
    from blasst_cute.kernels import launch
    L = launch.AUTO_MIN_SEQLEN_K
    q, k, v = synthetic_qkv(1, 512, L, 8, 2, 128, device="cuda", seed=51)
    kw = dict(causal=True, threshold_scale_factor=0.5 * L, return_lse=True, return_stats=True)
    assert launch.prefill_cluster(True, 8, 2, has_skip=True, factor=0.5 * L, seqlen_k=L) == \
        dict(cluster_m=1, cluster_h=1)
    o1, l1, s1 = blasst_cute.prefill(q, k, v, **kw)
    monkeypatch.setattr(launch, "CLUSTER_MODE", "heads")
    assert launch.prefill_cluster(True, 8, 2, has_skip=True)["cluster_h"] == 2
    o2, l2, s2 = blasst_cute.prefill(q, k, v, **kw)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    assert torch.equal(s1.skipped, s2.skipped) and int(s1.skipped.sum()) > 0
