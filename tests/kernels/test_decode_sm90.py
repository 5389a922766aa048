"""sm90 decode kernel: CPU compile of every configuration (CUTE_DSL_ARCH=sm_90a) and GPU checks.

The GPU checks share their helpers with tests/kernels/gpu_decode_smoke.py (one-call device run).
"""

import os
import sys

import pytest
import torch

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

cutlass = pytest.importorskip("cutlass")

from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.reference import blasst_attention_paged  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))


def _cfg_id(c):
    ps = c["page_size"] if c["page_size"] is not None else "contig"
    skip = "dense" if not c["has_skip"] else ("skip-fpb-stats" if c["has_stats"] else "skip")
    split = "fused" if c.get("fused_merge") else "split"
    tile = f"-tile{c['tile_n']}" if c.get("tile_n") else ""
    return f"{ps}-{skip}-{'direct' if c.get('direct_out') else split}{tile}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check (GPU runs the gpu tests)")
@pytest.mark.parametrize("config", launch_decode.supported_configs(), ids=_cfg_id)
def test_compile_decode_cpu(config):
    fn = launch_decode.compile_decode_sm90(config)
    assert fn is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check")
@pytest.mark.parametrize("extra", [dict(head_dim=64, page_size=64, has_skip=True),
                                   dict(head_dim=64, page_size=32, tile_n=64, has_skip=True),
                                   dict(head_dim=128, page_size=128, tile_n=64, has_skip=True),
                                   dict(head_dim=128, page_size=None, has_skip=True,
                                        order="reverse", causal=False),
                                   dict(head_dim=128, page_size=64, has_skip=True,
                                        fused_merge=False),
                                   dict(head_dim=128, page_size=64, producer_v=True,
                                        fused_merge=True),
                                   dict(head_dim=128, page_size=256, has_skip=True,
                                        producer_v=True, fused_merge=True,
                                        pipelined_merge=False, use_pdl=False),
                                   dict(head_dim=128, page_size=16, has_skip=True,
                                        num_k_stages=2, num_v_stages=3),
                                   dict(head_dim=128, page_size=16, tile_n=64, has_skip=True,
                                        has_stats=True, interleave_splits=True, use_pdl=True,
                                        speculate_pages=False),
                                   dict(head_dim=128, page_size=64, interleave_splits=True,
                                        speculate_pages=False),
                                   dict(head_dim=128, page_size=256, has_skip=True,
                                        direct_out=True, speculate_pages=False),
                                   dict(head_dim=128, page_size=16, has_skip=True,
                                        has_stats=True, interleave_splits=True, use_pdl=True,
                                        speculate_pages=True, l2_prefetch_tiles=2),
                                   dict(head_dim=128, page_size=None, interleave_splits=True,
                                        use_pdl=True, l2_prefetch_tiles=4)],
                         ids=["d64", "d64-tile64", "tile64", "reverse-noncausal", "combine-kernel",
                              "producer-v-dense", "producer-v-skip-old-merge", "k2-v3",
                              "nospeculate-p16-tile64-skip", "nospeculate-p64-dense",
                              "nospeculate-p256-direct", "l2-prefetch-p16-skip",
                              "l2-prefetch-contiguous"])
def test_compile_decode_variants_cpu(extra):
    cfg = dict(dtype=torch.bfloat16)
    cfg.update(extra)
    assert launch_decode.compile_decode_sm90(cfg) is not None


def test_ring_depths_checked_against_smem():
    from blasst_cute.kernels.sm90.decode import BlasstDecodeSm90, decode_stages
    assert decode_stages(128, 128) == (3, 2)
    assert decode_stages(128, 128, has_skip=True) == (2, 3)
    assert decode_stages(64, 128, has_skip=True) == decode_stages(64, 128) == (7, 3)
    BlasstDecodeSm90(cutlass.BFloat16, 128, page_size=64, num_k_stages=2, num_v_stages=3)
    with pytest.raises(ValueError, match="shared memory"):
        BlasstDecodeSm90(cutlass.BFloat16, 128, page_size=64, num_k_stages=3, num_v_stages=3)
    with pytest.raises(ValueError, match="num_v_stages 1"):
        BlasstDecodeSm90(cutlass.BFloat16, 128, page_size=64, num_v_stages=1)


def test_l2_prefetch_tiles_checked():
    # the prefetch runs before griddepcontrol.wait, so only launches with PDL have it; one lane
    # per TMA copy hands out the page ids (at most 32 copies)
    from blasst_cute.kernels.sm90.decode import BlasstDecodeSm90
    bf16 = cutlass.BFloat16
    assert BlasstDecodeSm90(bf16, 128, page_size=64, l2_prefetch_tiles=2).l2_prefetch_tiles == 0
    assert BlasstDecodeSm90(bf16, 128, page_size=16, use_pdl=True,
                            l2_prefetch_tiles=4).l2_prefetch_tiles == 4  # 4 x 8 copies
    for bad in (5, -1):
        with pytest.raises(ValueError, match="l2_prefetch_tiles"):
            BlasstDecodeSm90(bf16, 128, page_size=16, use_pdl=True, l2_prefetch_tiles=bad)
    pdl = [c for c in launch_decode.supported_configs() if c.get("use_pdl")]
    assert bool(pdl) == launch_decode.USE_PDL
    assert all(c["l2_prefetch_tiles"] == launch_decode.L2_PREFETCH_TILES for c in pdl)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check")
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 128),
                                             (torch.bfloat16, 512)])  # 512: MLA decode's merge
def test_compile_combine_cpu(dtype, head_dim):
    assert launch_decode.compile_combine_sm90(dtype, head_dim) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check")
def test_compile_combine_grouped_pdl_cpu():
    assert launch_decode.compile_combine_sm90(torch.bfloat16, 128, use_pdl=True,
                                              grouped=True, warps_per_row=2) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check")
@pytest.mark.parametrize("tile_n", [128, 64])
def test_compile_decode_trace_cpu(tile_n):
    # perf/decode_trace.py's diagnostic build (per-CTA phase timestamps), at both key tile sizes
    # the launcher plans
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "perf"))
    import decode_trace
    assert decode_trace.compile_traced(dict(skip=True, producer_v=True, pipelined_merge=True),
                                       tile_n) is not None


def test_geometry_matches_reference_contract():
    geo = launch_decode.decode_geometry_sm90(4, 1, 64, 1, 8, 131072, 132)
    assert geo["block_m"] == 64 and geo["pack_gqa"] and geo["rows_per_decision"] == 64
    assert geo["num_splits"] == 16
    assert geo["interleave_splits"] is launch_decode.INTERLEAVE_SPLITS
    assert not launch_decode.decode_geometry_sm90(4, 1, 64, 1, 8, 131072, 132,
                                                  interleave_splits=False)["interleave_splits"]
    assert launch_decode.decode_geometry_sm90(4, 1, 64, 64, 8, 32768, 132)["num_splits"] == 1
    assert launch_decode.decode_geometry_sm90(4, 1, 64, 8, 8, 32768, 132)["num_splits"] == 2
    # few tiles: at least MIN_TILES_PER_SPLIT tiles per split; where that leaves SMs idle,
    # 64-key tiles (twice the splits), unless a tile size is asked for
    geo = launch_decode.decode_geometry_sm90(4, 1, 64, 1, 8, 1024, 132)
    assert (geo["block_n"], geo["num_splits"]) == (64, 4)
    geo = launch_decode.decode_geometry_sm90(4, 1, 64, 1, 8, 1024, 132, tile_n=128)
    assert (geo["block_n"], geo["num_splits"]) == (128, 2)
    geo = launch_decode.decode_geometry_sm90(16, 1, 64, 1, 4, 8192, 132)
    assert (geo["block_n"], geo["num_splits"]) == (64, 32)
    # enough tiles for the SMs, or only a few more splits with 64 keys: 128-key tiles
    assert launch_decode.decode_geometry_sm90(4, 1, 64, 1, 8, 8192, 132)["block_n"] == 128
    assert launch_decode.decode_geometry_sm90(16, 1, 64, 1, 4, 16384, 132)["block_n"] == 128
    assert launch_decode.decode_geometry_sm90(16, 1, 64, 1, 4, 32768, 132)["block_n"] == 128
    # the reference accepts the geometry as is
    q = torch.randn(1, 1, 8, 64)
    k = torch.randn(1, 300, 2, 64)
    g = launch_decode.decode_geometry_sm90(4, 1, None, 1, 2, 300, 132)
    blasst_attention_paged(q, k, k, cache_seqlens=torch.tensor([300]), threshold_scale_factor=1.0,
                           **{kk: g[kk] for kk in ("block_m", "block_n", "pack_gqa", "order",
                                                   "num_splits", "rows_per_decision",
                                                   "split_tiles", "interleave_splits")})


# ------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("page_size", [None, 16, 64, 256])
def test_dense_vs_sdpa64(page_size):
    from gpu_decode_smoke import check_case
    ok, msg = check_case(4, 1, 32, 8, [1, 128, 1000, 4096], page_size, num_splits=None)
    assert ok, msg


@gpu
@pytest.mark.parametrize("lq,G,ps,splits", [(1, 4, 64, None), (2, 4, 64, 4), (4, 4, 256, 3),
                                            (1, 8, 16, None), (8, 16, 32, 2)])
def test_skip_vs_reference(lq, G, ps, splits):
    from gpu_decode_smoke import check_case
    hk = 2
    ok, msg = check_case(3, lq, G * hk, hk, [4096, 2048, 64], ps, factor=100.0, synth=True,
                         num_splits=splits)
    assert ok, msg


@gpu
def test_empty_and_tiny_sequences():
    from gpu_decode_smoke import check_case
    ok, msg = check_case(3, 1, 8, 8, [0, 1, 0], 64, num_splits=3)
    assert ok, msg


@gpu
@pytest.mark.parametrize("alt", range(4), ids=["fused-pipelined", "combine-old-nopdl",
                                               "fused-old-producer-v", "no-speculate-pages"])
def test_alternate_kernel_paths(alt):
    from gpu_decode_smoke import ALT_TUNINGS, check_case
    _, tuning = ALT_TUNINGS[alt]
    ok, msg = check_case(2, 8, 32, 2, [8, 999], 32, num_splits=3, tuning=tuning)
    assert ok, msg
    ok, msg = check_case(3, 1, 32, 8, [4096, 2048, 700], 64, factor=100.0, synth=True,
                         tuning=tuning)
    assert ok, msg


@gpu
def test_merge_and_pdl_choice():
    # combine kernel unless BLASST_DECODE_FUSED_MERGE=1, or an eager call whose cache holds at
    # most EAGER_FUSED_MAX_KV_BYTES (fused merge: one launch); PDL from PDL_MIN_SPLITS splits on
    from gpu_decode_smoke import run_kernel, make_cache
    for B, L, hq, hk in ((1, 8192, 32, 8), (8, 8192, 64, 4), (1, 1024, 32, 8)):
        q = torch.randn(B, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
        _, _, kc, vc, bt = make_cache(B, L, hk, 128, 64)
        lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        launch_decode._plans.clear()  # rebuilt on demand
        geo = run_kernel(q, kc, vc, lens, bt)[3]
        assert geo["num_splits"] > 1
        (plan,) = launch_decode._plans.values()
        small = 2 * B * L * hk * 128 * 2 <= launch_decode.EAGER_FUSED_MAX_KV_BYTES
        assert launch_decode.cache_kv_bytes(q, kc, vc, bt) == 2 * B * L * hk * 128 * 2
        assert plan.fused == (launch_decode.FUSED_MERGE or small)
        assert plan.use_pdl == (launch_decode.USE_PDL
                                and geo["num_splits"] >= launch_decode.PDL_MIN_SPLITS)


@gpu
@pytest.mark.parametrize("L,hq,hk,min_splits", [(4096, 32, 8, 2), (16384, 32, 8, 9),
                                                 (16384, 64, 4, 17)],
                         ids=["G4-one-row-per-warp", "G4-two-groups-per-batch",
                              "G16-row-batches-several-groups"])
def test_eager_fused_merge_and_captured_combine(L, hq, hk, min_splits, monkeypatch):
    # A small cache: eager API calls merge in the decode launch (one launch), a graph capture of
    # the same call uses the combine kernel; both give the same bits (one summation order). G=4
    # at 16 splits: one batch of 16 splits holds two groups of 8; G=16 merges 4 rows per warp in
    # batches of 4 splits, over several groups.
    import blasst_cute
    from blasst_cute.testing import capture_graph
    from gpu_decode_smoke import make_cache
    B = 1
    if launch_decode.EAGER_FUSED_MAX_KV_BYTES <= 0:
        pytest.skip("the eager fused-merge rule is off")
    monkeypatch.setattr(launch_decode, "EAGER_FUSED_MAX_KV_BYTES", 2 * B * L * hk * 128 * 2)
    q = torch.randn(B, 1, hq, 128, device="cuda", dtype=torch.bfloat16)
    _, _, kc, vc, bt = make_cache(B, L, hk, 128, 64)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    launch_decode._plans.clear()

    def call():
        return blasst_cute.decode(q, kc, vc, cache_seqlens=lens, block_table=bt,
                                  threshold_scale_factor=100.0)
    eager = call()
    torch.cuda.synchronize()
    plans = list(launch_decode._plans.values())
    assert [(p.splits >= min_splits, p.fused) for p in plans] == [(True, True)]
    out = torch.full_like(q, float("nan"))
    g = capture_graph(lambda: out.copy_(call()), eager_first=False)
    g.replay()
    torch.cuda.synchronize()
    assert sorted(p.fused for p in launch_decode._plans.values()) == [False, True]
    assert torch.equal(out, eager)


@gpu
@pytest.mark.parametrize("tuning", [{"num_k_stages": 3, "num_v_stages": 2},
                                    {"num_k_stages": 2, "num_v_stages": 2}], ids=["k3-v2", "k2-v2"])
def test_ring_depths_same_bits(tuning):
    # The skip build's default rings (2 K, 3 V/P stages: each PV deferred by 2 kept tiles)
    # against others (deferred by 1): the same operations on O in the same order, so the same
    # counters and bits, at a factor that skips.
    from blasst_cute.workloads import synthetic_qkv
    from gpu_decode_smoke import make_cache
    B, L, hq, hk = 3, 8192, 64, 4
    q, k, v = synthetic_qkv(B, 1, L, hq, hk, 128, device="cuda", seed=1)
    _, _, kc, vc, bt = make_cache(B, L, hk, 128, 64, k=k, v=v)
    lens = torch.tensor([L, 5000, 1], dtype=torch.int32, device="cuda")
    res = []
    for t in (None, tuning):
        cnt = [torch.zeros(B, hk, dtype=torch.int32, device="cuda") for _ in range(3)]
        out, lse = launch_decode.decode_sm90(
            q, kc, vc, cache_seqlens=lens, block_table=bt, threshold_scale_factor=3000.0,
            visited=cnt[0], skipped=cnt[1], v_loaded=cnt[2], tuning=t)
        torch.cuda.synchronize()
        res.append((out, lse, cnt))
    (o1, l1, c1), (o0, l0, c0) = res
    assert 0 < int(c1[1].sum()) < int(c1[0].sum()), "the case should skip some tiles, not all"
    for a, b in zip(c1, c0):
        assert torch.equal(a, b)
    assert torch.equal(o1, o0) and torch.equal(l1, l0)


@gpu
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_l2_prefetch_same_bits(paged):
    # The first tiles' L2 prefetch before griddepcontrol.wait (1 tile: the default with PDL)
    # only warms the cache: the same counters and bits as without it, skipping or not, with
    # ragged lengths (1, a page, not a multiple of the tile).
    from blasst_cute.workloads import synthetic_qkv
    from gpu_decode_smoke import make_cache
    B, L, hq, hk = 4, 8192, 32, 8
    q, k, v = synthetic_qkv(B, 1, L, hq, hk, 128, device="cuda", seed=3)
    lens = torch.tensor([L, 1, 64, 5000], dtype=torch.int32, device="cuda")
    if paged:
        _, _, kc, vc, bt = make_cache(B, L, hk, 128, 64, k=k, v=v)
    else:
        kc, vc, bt = k.contiguous(), v.contiguous(), None
    for factor in (None, 3000.0):
        res = []
        for extra in ({"l2_prefetch_tiles": 0}, {"l2_prefetch_tiles": 1},
                      {"l2_prefetch_tiles": 2}):
            cnt = [torch.zeros(B, hk, dtype=torch.int32, device="cuda") for _ in range(3)]
            stats = {} if factor is None else dict(visited=cnt[0], skipped=cnt[1],
                                                   v_loaded=cnt[2])
            out, lse = launch_decode.decode_sm90(
                q, kc, vc, cache_seqlens=lens, block_table=bt, threshold_scale_factor=factor,
                tuning=dict(use_pdl=True, **extra), **stats)
            torch.cuda.synchronize()
            res.append((out, lse, cnt))
        o0, l0, c0 = res[0]
        if factor is not None:
            assert 0 < int(c0[1].sum()) < int(c0[0].sum()), "the case should skip some tiles"
        for o1, l1, c1 in res[1:]:
            for a, b in zip(c0, c1):
                assert torch.equal(a, b)
            assert torch.equal(o0, o1) and torch.equal(l0, l1)


@gpu
def test_cuda_graph_replay_new_factor():
    from gpu_decode_smoke import graph_check
    ok, msg = graph_check()
    assert ok, msg
