"""sm90 absorbed-MLA decode kernel: CPU compile of every configuration (CUTE_DSL_ARCH=sm_90a),
geometry / reference contract, API routing; GPU checks (marked ``gpu``).

The GPU checks share their helpers with tests/kernels/gpu_mla_decode_smoke.py (one-call device run).
"""

import math
import os
import sys

import pytest
import torch

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

cutlass = pytest.importorskip("cutlass")

import blasst_cute  # noqa: E402
from blasst_cute import dispatch  # noqa: E402
from blasst_cute.kernels import launch_mla  # noqa: E402
from blasst_cute.reference import blasst_attention_paged  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

GEO_KEYS = ("block_m", "block_n", "pack_gqa", "order", "num_splits", "rows_per_decision",
            "split_tiles", "interleave_splits")


def _cfg_id(c):
    ps = c["page_size"] if c["page_size"] is not None else "contig"
    skip = "dense" if not c["has_skip"] else ("skip-fpb-stats" if c["has_stats"] else "skip")
    return f"{ps}-{skip}-{'direct' if c['direct_out'] else 'split'}"


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check (GPU runs the gpu tests)")


@cpu_only
@pytest.mark.parametrize("config", launch_mla.supported_configs(), ids=_cfg_id)
def test_compile_mla_decode_cpu(config):
    assert launch_mla.compile_mla_decode_sm90(config) is not None


@cpu_only
@pytest.mark.parametrize("extra", [dict(dtype=torch.float16, page_size=128, has_skip=True),
                                   dict(page_size=32, has_skip=True, has_stats=True),
                                   dict(page_size=256, has_skip=True, direct_out=True),
                                   dict(page_size=None, has_skip=True, causal=False),
                                   dict(page_size=16, direct_out=True),
                                   dict(page_size=64, has_skip=True, has_stats=True,
                                        early_release=False, interleave_splits=True),
                                   dict(page_size=64, cluster_m=2, early_release=False)],
                         ids=["fp16-p128", "p32-stats", "p256-direct", "contig-noncausal",
                              "p16-dense-direct", "p64-skip-late-release",
                              "p64-dense-cluster-late-release"])
def test_compile_mla_decode_variants_cpu(extra):
    cfg = dict(dtype=torch.bfloat16)
    cfg.update(extra)
    assert launch_mla.compile_mla_decode_sm90(cfg) is not None


@cpu_only
@pytest.mark.parametrize("schedule", ["alternate", "split_keys"])
@pytest.mark.parametrize("extra", [dict(page_size=64, has_skip=True, has_stats=True, cluster_m=2,
                                        interleave_splits=True),
                                   dict(page_size=None, direct_out=True)],
                         ids=["p64-skip-stats-cluster", "contig-dense-direct"])
def test_compile_mla_decode_schedules_cpu(schedule, extra):
    cfg = dict(dtype=torch.bfloat16, schedule=schedule)
    cfg.update(extra)
    assert launch_mla.compile_mla_decode_sm90(cfg) is not None


@cpu_only
@pytest.mark.parametrize("config", launch_mla.supported_cluster_configs(),
                         ids=lambda c: "cluster-" + _cfg_id(
                             dict(dict(has_skip=False, has_stats=False, direct_out=False), **c)))
def test_compile_mla_decode_cluster_cpu(config):
    assert launch_mla.compile_mla_decode_sm90(config) is not None


@cpu_only
def test_compile_combine_with_pdl_cpu():
    # the combine launched after the MLA kernel (programmatic dependent launch, D = 512)
    import cutlass.cute as cute
    from blasst_cute.kernels.launch_common import combine_compile_args
    from blasst_cute.kernels.sm90.combine import BlasstDecodeCombineSm90
    fn = BlasstDecodeCombineSm90(cutlass.BFloat16, 512, use_pdl=True).launch_ptrs
    assert cute.compile(fn, *combine_compile_args(cutlass.BFloat16)) is not None


def test_cluster_choice():
    # q-tiles of a sequence pair into a 2-CTA cluster only when they see the same key tiles
    assert launch_mla.mla_cluster_m(128, 1) == 2
    assert launch_mla.mla_cluster_m(128, 2) == 2
    assert launch_mla.mla_cluster_m(256, 1) == 2
    assert launch_mla.mla_cluster_m(64, 1) == 1  # one q-tile
    assert launch_mla.mla_cluster_m(192, 1) == 1  # odd q-tile count
    assert launch_mla.mla_cluster_m(64, 2) == 1  # causal: the two q-tiles see different keys
    assert launch_mla.mla_cluster_m(64, 2, causal=False) == 2
    # auto: only where a CTA walks many key tiles (short ranges measured no faster)
    assert launch_mla.mla_cluster_m(128, 1, tiles_per_split=64) == 1
    assert launch_mla.mla_cluster_m(128, 1, tiles_per_split=512) == 2
    with pytest.raises(NotImplementedError, match="cluster_m 4"):
        launch_mla.compile_mla_decode_sm90(dict(page_size=64, cluster_m=4))


def test_unsupported_configs_raise():
    with pytest.raises(NotImplementedError, match="page_size 8"):
        launch_mla.compile_mla_decode_sm90(dict(page_size=8))
    with pytest.raises(NotImplementedError, match="schedule 'fast'"):
        launch_mla.compile_mla_decode_sm90(dict(page_size=64, schedule="fast"))
    with pytest.raises(NotImplementedError, match="dtype"):
        launch_mla.compile_mla_decode_sm90(dict(dtype=torch.float32, page_size=64))
    with pytest.raises(NotImplementedError, match="page_size 48"):
        launch_mla.mla_decode_geometry_sm90(128, 1, 48, 1, 4096)


def test_geometry_contract():
    g = launch_mla.mla_decode_geometry_sm90(128, 1, 64, 1, 32768, 132)
    assert (g["block_m"], g["block_n"], g["pack_gqa"], g["rows_per_decision"]) == (64, 64, True, 64)
    assert g["num_splits"] == launch_mla.MAX_SPLITS == 64  # 66 would fill 132 SMs; capped
    assert launch_mla.mla_decode_geometry_sm90(128, 1, 64, 64, 32768, 132)["num_splits"] == 1
    assert launch_mla.mla_decode_geometry_sm90(128, 1, 64, 16, 4096, 132)["num_splits"] == 4
    assert launch_mla.mla_decode_geometry_sm90(16, 1, 64, 1, 1024, 132)["num_splits"] == 4
    # 64 single-tile sequences: 2 splits fill 128 of 132 SMs
    assert launch_mla.mla_decode_geometry_sm90(16, 1, 64, 64, 32768, 132)["num_splits"] == 2
    geo = dispatch.mla_decode_geometry((1, 1, 128, 576), (512, 64, 576), (1, 512))
    assert geo.kwargs() == {**{k: g[k] for k in GEO_KEYS}, "rows_per_pv": None}  # no P·V counts


def _mla_inputs(B=2, lq=2, H=16, L=300, ps=64, seed=0):
    from blasst_cute.workloads import to_paged
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(B, L, 576, generator=gen)
    q = torch.randn(B, lq, H, 576, generator=gen)
    kc, _, table = to_paged(kv.unsqueeze(2), kv[..., :1].unsqueeze(2), ps)
    return q, kv, kc[:, :, 0], table


def test_api_reference_uses_kernel_geometry():
    q, kv, kvc, table = _mla_inputs(L=1000)
    lens = torch.tensor([1000, 333], dtype=torch.int32)
    scale = 1 / math.sqrt(192)
    out, lse, st = blasst_cute.decode_mla(q, kvc, cache_seqlens=lens, block_table=table,
                                         softmax_scale=scale, threshold_scale_factor=20.0,
                                         return_lse=True, return_stats=True)
    geo = dispatch.mla_decode_geometry(q.shape, kvc.shape, table.shape)
    ro, rl, rs = blasst_attention_paged(q, kv[:, :, None], kv[:, :, None, :512], cache_seqlens=lens,
                                        causal=True, softmax_scale=scale,
                                        threshold_scale_factor=20.0, **geo.kwargs())
    assert out.shape == (2, 2, 16, 512) and st.visited.shape == (2, 1)
    torch.testing.assert_close(out, ro)
    assert torch.equal(st.visited, rs.visited) and torch.equal(st.skipped, rs.skipped)
    # 64-key tiles: 16 + 6 tiles visited, 2 q-tiles... one q-tile (32 rows) per sequence
    assert int(st.visited.sum()) == 16 + 6


def test_api_errors():
    q, kv, kvc, table = _mla_inputs()
    lens = torch.tensor([300, 5], dtype=torch.int32)
    with pytest.raises(TypeError, match="kv_cache must have the dtype of q"):
        blasst_cute.decode_mla(q, kvc.double(), cache_seqlens=lens, block_table=table,
                               softmax_scale=0.1)
    with pytest.raises(ValueError, match="same head dim"):
        blasst_cute.decode_mla(q[..., :512], kvc, cache_seqlens=lens, block_table=table,
                               softmax_scale=0.1)
    with pytest.raises(ValueError, match="head_dim_v"):
        blasst_cute.decode_mla(q, kvc, cache_seqlens=lens, block_table=table, softmax_scale=0.1,
                               head_dim_v=600)
    with pytest.raises(ValueError, match="cache_seqlens must lie"):
        blasst_cute.decode_mla(q, kvc, cache_seqlens=lens + 1000, block_table=table,
                               softmax_scale=0.1)
    with pytest.raises(NotImplementedError, match="needs CUDA tensors"):
        blasst_cute.decode_mla(q, kvc, cache_seqlens=lens, block_table=table, softmax_scale=0.1,
                               backend="cute")
    with pytest.raises(ValueError, match="head_dim_v must be an int"):
        blasst_cute.decode_mla(q, kvc, cache_seqlens=lens, block_table=table, softmax_scale=0.1,
                               head_dim_v=True)
    with pytest.raises(ValueError, match="at least one head"):
        blasst_cute.decode_mla(q[:, :, :0], kvc, cache_seqlens=lens, block_table=table,
                               softmax_scale=0.1)
    with pytest.raises(ValueError, match="softmax_scale"):
        blasst_cute.decode_mla(q, kvc, cache_seqlens=lens, block_table=table, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        blasst_cute.decode_mla(q, kvc, cache_seqlens=lens, block_table=table, softmax_scale=0.1,
                               backend="triton")
    with pytest.raises(ValueError, match=r"without block_table, kv_cache must be \[B, capacity, 576\]"):
        blasst_cute.decode_mla(q, kvc[:3], cache_seqlens=lens, softmax_scale=0.1)


# ------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("page_size,lq,H,splits", [(64, 1, 16, None), (64, 2, 128, 3),
                                                   (None, 1, 16, None), (16, 3, 24, None),
                                                   (256, 1, 128, 1)])
def test_dense_vs_float64(page_size, lq, H, splits):
    from gpu_mla_decode_smoke import check_case
    ok, msg = check_case(2, lq, H, [3001, 130], page_size, num_splits=splits)
    assert ok, msg


@gpu
@pytest.mark.parametrize("page_size,lq,H,splits,ft", [(64, 1, 16, None, False),
                                                      (64, 2, 128, 4, True),
                                                      (32, 1, 64, 1, False)])
def test_skip_vs_reference(page_size, lq, H, splits, ft):
    from gpu_mla_decode_smoke import check_case
    ok, msg = check_case(2, lq, H, [4096, 2500], page_size, factor=100.0, use_synth=True,
                         num_splits=splits, factor_tensor=ft)
    assert ok, msg


@gpu
@pytest.mark.parametrize("page_size,lq,H,factor", [(16, 1, 128, None), (64, 2, 128, 100.0),
                                                   (64, 1, 256, 1000.0)])
def test_cluster_variant(page_size, lq, H, factor, monkeypatch):
    from gpu_mla_decode_smoke import check_case
    monkeypatch.setattr(launch_mla, "CLUSTER_MODE", "always")
    ok, msg = check_case(2, lq, H, [6000, 2500], page_size, factor=factor,
                         use_synth=factor is not None)
    assert ok, msg


@gpu
@pytest.mark.parametrize("page_size,lq,H,factor", [(64, 2, 128, 100.0), (None, 1, 16, None)])
def test_split_keys_schedule(page_size, lq, H, factor, monkeypatch):
    # the earlier schedule stays selectable (BLASST_MLA_SCHEDULE=split_keys): same contract
    from gpu_mla_decode_smoke import check_case
    monkeypatch.setattr(launch_mla, "SCHEDULE", "split_keys")
    ok, msg = check_case(2, lq, H, [4096, 2500], page_size, factor=factor,
                         use_synth=factor is not None)
    assert ok, msg


@gpu
@pytest.mark.parametrize("page_size,lq,H,factor", [(64, 1, 16, 100.0), (64, 2, 128, 100.0),
                                                   (None, 1, 64, None)])
def test_early_release_same_bits(page_size, lq, H, factor, monkeypatch):
    # BLASST_MLA_EARLY_RELEASE=1 moves a wait and a stage release, never the arithmetic: outputs
    # (every element written: they start as NaN) and counters bitwise those of the default
    from gpu_mla_decode_smoke import make_mla_cache, run_kernel, synth
    B, L = 2, 5000
    q, kv = synth(B, lq, L, H, 3)
    _, kvc, bt = make_mla_cache(B, L, page_size, seed=2, kv=kv)
    lens = torch.tensor([L, 2500], dtype=torch.int32, device="cuda")
    res = []
    for early in (False, True):
        monkeypatch.setattr(launch_mla, "EARLY_RELEASE", early)
        out, lse, cnt, _ = run_kernel(q, kvc, lens, bt, factor=factor, stats=factor is not None)
        res.append((out, lse, cnt))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    if factor is not None:
        assert all(torch.equal(a, b) for a, b in zip(res[0][2], res[1][2]))
        assert int(res[0][2][1].sum()) > 0  # some tiles skipped: both paths ran


@gpu
def test_api_on_gpu():
    from gpu_mla_decode_smoke import api_check
    ok, msg = api_check()
    assert ok, msg


@gpu
def test_cuda_graph_replay_new_factor():
    from gpu_mla_decode_smoke import graph_check
    ok, msg = graph_check()
    assert ok, msg


@gpu
def test_empty_and_tiny_sequences():
    from gpu_mla_decode_smoke import check_case
    ok, msg = check_case(3, 1, 16, [0, 1, 0], 64, num_splits=3)
    assert ok, msg
