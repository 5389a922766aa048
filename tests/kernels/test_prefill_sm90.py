"""Tests of the Hopper prefill kernel (blasst_cute/kernels/sm90/prefill.py).

CPU: every supported configuration compiles for sm_90a (CUTE_DSL_ARCH=sm_90a, fake tensors).
GPU (H100/H200, marked ``gpu``): dense vs float64 attention, skipping vs the reference for the
kernel's geometry, poisoned outputs, varlen, and a randomized sweep.
"""

import itertools
import os
import sys

import pytest
import torch

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

launch = pytest.importorskip("blasst_cute.kernels.launch")

sys.path.insert(0, os.path.dirname(__file__))
import gpu_prefill_smoke as smoke  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16]
HEAD_DIMS = [64, 128, 256]
# (q/k head dim, v head dim): the MHA/GQA dims and MLA prefill (128 nope + 64 rope, v 128).
HEAD_DIM_PAIRS = [(d, d) for d in HEAD_DIMS] + [(192, 128)]
MLA = (192, 128)


def _dims_id(dims):
    return f"{dims[0]}x{dims[1]}"
VARIANTS = {
    "dense": dict(has_skip=False, has_stats=False),
    "skip": dict(has_skip=True, has_stats=False),
    "skip_stats": dict(has_skip=True, has_stats=True),
    "skip_factor_tensor": dict(has_skip=True, has_stats=True, factor_per_batch=True),
}


def _on_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


# ---------------------------------------------------------------------------------------------
# CPU: compilation of every configuration
# ---------------------------------------------------------------------------------------------

_CONFIGS = list(itertools.product(DTYPES, HEAD_DIM_PAIRS, [False, True], list(VARIANTS),
                                  [False, True]))


def _marks(dtype, variant, varlen):
    # The bf16 dense / skip+stats matrix is the fast default; the rest is the slow tail.
    fast = dtype == torch.bfloat16 and variant in ("dense", "skip_stats")
    return [] if fast else [pytest.mark.slow]


@pytest.mark.parametrize(
    "dtype,dims,causal,variant,varlen",
    [pytest.param(*c, marks=_marks(c[0], c[3], c[4])) for c in _CONFIGS],
    ids=lambda x: _dims_id(x) if isinstance(x, tuple) else str(x).replace("torch.", ""),
)
def test_compile_sm90a(dtype, dims, causal, variant, varlen):
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    cfg = dict(dtype=dtype, head_dim=dims[0], head_dim_v=dims[1], causal=causal, varlen=varlen,
               **VARIANTS[variant])
    fn = launch.compile_prefill_sm90(cfg)
    assert fn is not None


@pytest.mark.parametrize("tuning", [dict(decision_rows=64), dict(decision_rows=64, vote_smem=False),
                                    dict(pv_skip=False), dict(num_stages=3),
                                    dict(fast_vote=False), dict(late_v_wait=False),
                                    dict(v_load_skip=False), dict(v_load_skip=False, v_warp=True),
                                    dict(defer_v_release=False), dict(lazy_p_zero=True),
                                    dict(qk_lookahead=True), dict(qk_lookahead=True, has_skip=False),
                                    dict(lookahead_after_skips=0),
                                    dict(rescale_o_before_pv=True), dict(rescale_o_before_pv=False),
                                    dict(keep_first=False),
                                    dict(thr_add_only=True, lookahead_after_skips=0),
                                    dict(has_skip=False, v_warp=False),
                                    dict(fast_vote=False, late_v_wait=False, v_load_skip=False)],
                         ids=str)
@pytest.mark.parametrize("dims", [(128, 128), (256, 256), MLA], ids=_dims_id)
def test_compile_skip_variants(tuning, dims):
    """Selectable skip variants compile: per-warpgroup decision, PV always issued, 3 stages, the
    vote from the rule each tile (no per-row thresholds), the V wait before a skipped PV, every V
    loaded, the last three together (the earlier kernel), a skipped PV's V stage released at the
    end of its iteration (causal default: one iteration later), P zeroed only for PVs that run,
    the look-ahead schedule for the whole q-tile (skip and dense builds), the hdim-128 skip
    build without the switch to it (what keys shorter than 16k get; the other compile tests
    build the default, which switches), the O rescale before the next PV, the hdim-256 dense
    build with V issued by the producer's first warp (its default: a second warp), the hdim-128
    skip build with the skip block laid out first (the other head dims' default), the hdim-128
    skip build without the switch and with thr_add_only (off there by default; hdim 128 only on
    CPU). (The vote on per-thread maxima in the default schedule is compiled by the hdim-64 and
    256 skip builds, where it is the default.)"""
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    if dims[0] > 128 and tuning.get("num_stages") == 3:
        pytest.skip(f"hdim {dims[0]}/{dims[1]} x 3 stages does not fit shared memory")
    if tuning.get("rescale_o_before_pv") is (dims != MLA):
        pytest.skip(f"the default build at {dims[0]}/{dims[1]} (the other compile tests build it)")
    if "keep_first" in tuning and dims != (128, 128):
        pytest.skip(f"the default build at {dims[0]}/{dims[1]} (the other compile tests build it)")
    if "thr_add_only" in tuning and dims != (128, 128):
        pytest.skip("thr_add_only: hdim 128 on CPU (the GPU tests run it at other dims)")
    single_v_producer = tuning == dict(has_skip=False, v_warp=False)
    if single_v_producer:
        if dims[1] <= 128:
            pytest.skip("the default dense build (the other compile tests build it)")
    elif dims != (128, 128) and set(tuning) <= {"fast_vote", "late_v_wait", "v_load_skip", "v_warp",
                                                "defer_v_release", "lazy_p_zero", "qk_lookahead",
                                                "lookahead_after_skips", "has_skip"}:
        pytest.skip("schedule variants: hdim 128 on CPU (the GPU tests run them at other dims)")
    cfg = dict(dtype=torch.bfloat16, head_dim=dims[0], head_dim_v=dims[1], causal=True,
               has_skip=True, has_stats=True)
    cfg.update(tuning)
    cfg["has_stats"] = cfg["has_skip"]
    assert launch.compile_prefill_sm90(cfg) is not None


@pytest.mark.parametrize("tuning", [dict(lpt_heads=1), dict(lpt=False)], ids=str)
def test_compile_causal_schedule_variants(tuning):
    """Causal q-tile orders kept for A/B timing: LPT with a fixed section size, plain reverse."""
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    cfg = dict(dtype=torch.bfloat16, head_dim=128, causal=True, **tuning)
    assert launch.compile_prefill_sm90(cfg) is not None


@pytest.mark.parametrize("tuning", [dict(pingpong=True), dict(tile_n=112)], ids=str)
@pytest.mark.parametrize("has_skip", [False, True])
def test_compile_mla_tile_variants(tuning, has_skip):
    """MLA prefill (192/128) alternatives: ping-pong on (off by default, as FA4 for hdim > 128),
    FA4's 128 x 112 tile."""
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    cfg = dict(dtype=torch.bfloat16, head_dim=192, head_dim_v=128, causal=True,
               has_skip=has_skip, has_stats=has_skip, **tuning)
    assert launch.compile_prefill_sm90(cfg) is not None


# 2-CTA clusters sharing K/V by TMA multicast: q-tile pairs (non-causal) or q-head pairs.
PAIRS = {"tiles": dict(cluster_m=2), "heads": dict(cluster_h=2)}


# Each head dim, both pair kinds, varlen and both epilogue variants at least once (CPU time:
# every case is a full prefill compile; the GPU test runs all of them).
@pytest.mark.parametrize("pair,causal,dims,varlen,variant", [
    ("tiles", False, (128, 128), False, "dense"), ("tiles", False, (64, 64), True, "skip_stats"),
    ("heads", True, (128, 128), False, "skip_stats"), ("heads", False, (256, 256), False, "dense"),
    ("heads", True, MLA, True, "skip_stats"),
], ids=lambda x: _dims_id(x) if isinstance(x, tuple) else str(x))
def test_compile_cluster_pair(pair, causal, dims, varlen, variant):
    """2-CTA clusters sharing K/V by TMA multicast compile (q-tile pairs: non-causal)."""
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    cfg = dict(dtype=torch.bfloat16, head_dim=dims[0], head_dim_v=dims[1], causal=causal,
               varlen=varlen, **PAIRS[pair], **VARIANTS[variant])
    assert launch.compile_prefill_sm90(cfg) is not None


@pytest.mark.parametrize("pair,causal,dims,varlen", [
    ("heads", True, (128, 128), False), ("tiles", False, (256, 256), True),
], ids=lambda x: _dims_id(x) if isinstance(x, tuple) else str(x))
def test_compile_cluster_pair_gated_v(pair, causal, dims, varlen):
    """Pairs sharing only K (multicast), each CTA loading its own V gated by its votes."""
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    cfg = dict(dtype=torch.bfloat16, head_dim=dims[0], head_dim_v=dims[1], causal=causal,
               varlen=varlen, v_load_skip=True, **PAIRS[pair], **VARIANTS["skip_stats"])
    assert launch.compile_prefill_sm90(cfg) is not None


def test_cluster_pair_unsupported_and_policy(monkeypatch):
    """q-tile pairs need non-causal attention without LPT, head pairs an even Hq/Hk; the launcher's
    policy picks a pair only where it is supported."""
    for bad in (dict(causal=True, cluster_m=2), dict(causal=False, cluster_m=3),
                dict(causal=False, cluster_m=2, lpt=True), dict(causal=False, cluster_h=3),
                dict(causal=False, cluster_m=2, cluster_h=2),
                dict(causal=True, cluster_h=2, lpt_heads=3)):
        with pytest.raises(NotImplementedError):
            launch.compile_prefill_sm90(dict(dtype=torch.bfloat16, head_dim=128, **bad))
    one, tiles, heads = (dict(cluster_m=1, cluster_h=1), dict(cluster_m=2, cluster_h=1),
                         dict(cluster_m=1, cluster_h=2))
    monkeypatch.setattr(launch, "CLUSTER_MODE", "tiles")
    assert launch.prefill_cluster(False, 32, 8) == tiles
    assert launch.prefill_cluster(True, 32, 8) == one
    assert launch.prefill_cluster(False, 32, 8, dict(lpt=True)) == one
    assert launch.prefill_cluster(True, 32, 8, dict(cluster_m=1)) == one
    monkeypatch.setattr(launch, "CLUSTER_MODE", "heads")
    assert launch.prefill_cluster(True, 32, 8) == heads
    assert launch.prefill_cluster(False, 32, 8) == heads
    assert launch.prefill_cluster(True, 24, 8) == one  # Hq/Hk = 3
    assert launch.prefill_cluster(True, 8, 8) == one
    assert launch.prefill_cluster(True, 32, 8, dict(lpt_heads=1)) == one
    with pytest.raises(NotImplementedError, match="Hq/Hk"):
        launch.prefill_cluster(True, 24, 8, dict(cluster_h=2))
    monkeypatch.setattr(launch, "CLUSTER_MODE", "auto")  # the default
    hi = dict(has_skip=True, factor=0.3 * 16384, seqlen_k=16384)
    old = dict(v_load_skip=False)  # the rule from before V loads were gated by the votes
    for causal in (False, True):
        assert launch.prefill_cluster(causal, 32, 8, **hi) == one  # v_load_skip instead
        assert launch.prefill_cluster(causal, 32, 8, old, **hi) == heads
        assert launch.prefill_cluster(causal, 32, 8) == one  # dense
        assert launch.prefill_cluster(causal, 32, 8, old, **dict(hi, seqlen_k=8192, factor=0.3 * 8192)) == one
        assert launch.prefill_cluster(causal, 32, 8, old, **dict(hi, factor=0.1 * 16384)) == one
        assert launch.prefill_cluster(causal, 32, 8, old, **dict(hi, seqlen_k=None)) == one
        assert launch.prefill_cluster(causal, 24, 8, old, **hi) == one
        assert launch.prefill_cluster(causal, 32, 8, old, **dict(hi, head_dims=(64, 64))) == one
        assert launch.prefill_cluster(causal, 32, 8, dict(v_load_skip=True), **hi) == one
    monkeypatch.setattr(launch, "CLUSTER_MODE", "never")
    assert launch.prefill_cluster(False, 32, 8) == one
    assert launch.prefill_cluster(False, 32, 8, **hi) == one
    assert launch.prefill_cluster(False, 32, 8, dict(cluster_m=2)) == tiles
    monkeypatch.setattr(launch, "CLUSTER_MODE", "sometimes")
    with pytest.raises(ValueError, match="CLUSTER_MODE"):
        launch.prefill_cluster(False, 32, 8)


def test_geometry():
    block_n = {(64, 64): 128, (128, 128): 128, (256, 256): 80, (192, 128): 128}
    block_m = {(64, 64): 192}  # 3 consumer warpgroups; 2 (128 rows) elsewhere
    for d, dv in HEAD_DIM_PAIRS:
        for causal in (False, True):
            g = launch.prefill_geometry(d, dv, causal, torch.bfloat16)
            assert g["rows_per_decision"] == 16 and g["block_m"] == block_m.get((d, dv), 128)
            assert g["block_n"] == block_n[(d, dv)]
            assert g["order"] == "reverse" and g["pack_gqa"] is False
            assert g["rows_per_pv"] == 64  # a warpgroup's P·V wgmma
            assert set(g) == {"block_m", "block_n", "rows_per_decision", "order", "pack_gqa",
                              "rows_per_pv"}
    assert launch.prefill_geometry(64, 64, False, torch.bfloat16, tile_m=128)["block_m"] == 128


@pytest.mark.parametrize("bad", [dict(head_dim=128, tile_m=192), dict(head_dim=192, head_dim_v=128,
                                                                     tile_m=192),
                                 dict(head_dim=64, tile_m=256), dict(head_dim=64, tile_m=64)])
def test_unsupported_tile_m_raises(bad):
    """192-row tiles (3 consumer warpgroups at 160 registers) only for head dims <= 64."""
    with pytest.raises(NotImplementedError, match="tile_m"):
        launch.compile_prefill_sm90(dict(dtype=torch.bfloat16, causal=False, **bad))


@pytest.mark.parametrize("has_skip", [False, True])
def test_compile_two_warpgroup_hdim64(has_skip):
    """hdim 64 with 128-row tiles (2 consumer warpgroups, the earlier default) stays selectable."""
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    cfg = dict(dtype=torch.bfloat16, head_dim=64, causal=True, has_skip=has_skip,
               has_stats=has_skip, tile_m=128)
    assert launch.compile_prefill_sm90(cfg) is not None


def test_dispatch_geometry_mla():
    """The public geometry (used by the reference backend) is the kernel's for 192/128."""
    from blasst_cute import dispatch
    g = dispatch.prefill_geometry(192, 128, True, torch.bfloat16).kwargs()
    assert g["block_m"] == 128 and g["block_n"] == 128 and g["rows_per_decision"] == 16


def _kernel_of(**kw):
    cfg = dict(dtype=torch.bfloat16, head_dim=128)
    cfg.update(kw)
    return launch._make_kernel(launch._config_key(cfg))


def test_v_warp_and_rescale_defaults():
    """V tiles come from a second producer warp in the skip build (v_load_skip) and, at hdim_v
    256 without a cluster, in the dense build; the O rescale before the next PV is the default
    for 192/128 (MLA) only."""
    for kw in (dict(head_dim=256), dict(head_dim=256, causal=True), dict(has_skip=True),
               dict(head_dim=256, has_skip=True, v_load_skip=False)):
        assert _kernel_of(**kw).v_warp, kw
    for kw in (dict(), dict(causal=True), dict(head_dim=64), dict(head_dim=192, head_dim_v=128),
               dict(head_dim=256, cluster_h=2), dict(head_dim=256, v_warp=False)):
        assert not _kernel_of(**kw).v_warp, kw
    for kw in (dict(), dict(head_dim=256), dict(head_dim=256, has_skip=True)):
        assert not _kernel_of(**kw).rescale_o_before_pv, kw
    assert _kernel_of(head_dim=256, rescale_o_before_pv=True).rescale_o_before_pv
    for kw in (dict(), dict(causal=True), dict(has_skip=True)):
        assert _kernel_of(head_dim=192, head_dim_v=128, **kw).rescale_o_before_pv, kw
    assert not _kernel_of(head_dim=192, head_dim_v=128,
                          rescale_o_before_pv=False).rescale_o_before_pv
    assert not _kernel_of(head_dim=192, head_dim_v=128, qk_lookahead=True).rescale_o_before_pv


def test_vote_thread_max_defaults():
    """The vote on per-thread maxima runs by default at hdim 128 in the look-ahead schedule and,
    alongside the row max's shuffles, in the default one; in both schedules with the shuffles
    after the branch at hdim 64 and 256; in the look-ahead schedule only for MLA's 192/128 (it
    has none); never without fast_vote (the dense build, 64-row decisions); other values are
    refused."""
    def modes(**kw):
        k = _kernel_of(**kw)
        return k.vote_thread_max, k.vote_overlap, k.vote_thread_max_lookahead
    assert modes(has_skip=True) == (False, True, True)
    for d in (64, 256):
        assert modes(has_skip=True, head_dim=d) == (True, False, True), d
    assert modes(has_skip=True, head_dim=192, head_dim_v=128) == (False, False, True)
    assert modes(has_skip=True, vote_thread_max=True) == (True, False, True)
    assert modes(has_skip=True, vote_thread_max="lookahead") == (False, False, True)
    assert modes(has_skip=True, head_dim=64, vote_thread_max="overlap") == (False, True, True)
    for kw in (dict(), dict(has_skip=True, vote_thread_max=False),
               dict(has_skip=True, decision_rows=64, vote_thread_max=True),
               dict(has_skip=True, decision_rows=64, vote_thread_max="overlap")):
        assert modes(**kw) == (False, False, False), kw
    with pytest.raises(NotImplementedError, match="vote_thread_max"):
        _kernel_of(has_skip=True, vote_thread_max="always")


def test_run_pv_counts_errors():
    """The launcher refuses P·V counters without the tile counters, of the wrong shape or dtype,
    and stats where a 16-bit half of a warp's counter could overflow (before touching a GPU)."""
    q = torch.empty(1, 64, 2, 128, dtype=torch.bfloat16)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 64)
    vis, skp = torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32)
    run = lambda k, **kw: launch.run_prefill_sm90(q, k, k, out, lse, causal=False,
                                                  softmax_scale=0.1, **kw)
    with pytest.raises(NotImplementedError, match="pv_counts needs visited"):
        run(q, pv_counts=torch.zeros(2, 1, 2, dtype=torch.int32))
    for bad in (torch.zeros(1, 2, dtype=torch.int32), torch.zeros(2, 1, 2, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"pv_counts must be int32 \[2, 1, 2\]"):
            run(q, visited=vis, skipped=skp, pv_counts=bad)
    long_k = q[:, :1].expand(1, 64 << 16, 2, 128)  # 2^16 key tiles of 64, no memory
    with pytest.raises(NotImplementedError, match="stats need fewer than 4194304 keys"):
        run(long_k, visited=vis, skipped=skp)
    # varlen: the one sequence's exact length (the packed total is only a bound)
    cu_q, cu_k = torch.tensor([0, 64], dtype=torch.int32), torch.tensor([0, 64 << 16], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="got 4194304"):
        launch.run_prefill_sm90(q[0], long_k[0], long_k[0], out[0], lse[0], causal=False,
                                softmax_scale=0.1, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                visited=vis, skipped=skp)


def test_kernel_args_follow_call_signature(monkeypatch):
    """prefill_kernel_args (used by the launcher and the A/B tool) gives one argument per
    parameter of the kernel's __call__, the stream last."""
    import inspect

    from blasst_cute.kernels.sm90.prefill import BlasstFwdSm90

    class _Stream:
        cuda_stream = 0
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    q = torch.randn(1, 64, 2, 128).to(torch.bfloat16)
    args = launch.prefill_kernel_args(q, q, q, torch.empty_like(q), torch.empty(1, 2, 64), 0.1, 1.0)
    params = list(inspect.signature(BlasstFwdSm90.__call__).parameters)[1:]
    assert len(args) == len(params) and params[-1] == "stream"


def test_flag_addr_before_sync_defaults():
    """The PV flag word's address is formed before the ping-pong barrier by default at hdim 128
    only (the other head dims compile the other form); never without the PV skip."""
    assert _kernel_of(has_skip=True).flag_addr_before_sync
    for kw in (dict(has_skip=True, head_dim=64), dict(has_skip=True, head_dim=256),
               dict(has_skip=True, head_dim=192, head_dim_v=128), dict(),
               dict(has_skip=True, pv_skip=False), dict(has_skip=True, flag_addr_before_sync=False)):
        assert not _kernel_of(**kw).flag_addr_before_sync, kw
    assert _kernel_of(has_skip=True, head_dim=64, flag_addr_before_sync=True).flag_addr_before_sync


def test_thr_add_only_defaults():
    """thr_add_only is on by default in the hdim-128 builds with the look-ahead switch (keys
    from 16k) and the causal hdim-128 builds, and needs the per-row thresholds (fast_vote)."""
    k = _kernel_of(has_skip=True)
    assert k.lookahead_after_skips > 0 and k.thr_add_only
    assert _kernel_of(has_skip=True, causal=True, lookahead_after_skips=0).thr_add_only
    for kw in (dict(lookahead_after_skips=0), dict(head_dim=64), dict(head_dim=256),
               dict(head_dim=64, causal=True), dict(head_dim=256, causal=True),
               dict(head_dim=192, head_dim_v=128, causal=True), dict(thr_add_only=False),
               dict(causal=True, thr_add_only=False)):
        assert not _kernel_of(has_skip=True, **kw).thr_add_only, kw
    assert _kernel_of(has_skip=True, lookahead_after_skips=0, thr_add_only=True).thr_add_only
    # what the launcher builds: the switch (and thr_add_only) from LOOKAHEAD_MIN_SEQLEN_K keys
    assert launch.prefill_lookahead(launch.LOOKAHEAD_MIN_SEQLEN_K - 1, None) == dict(
        lookahead_after_skips=0)
    assert launch.prefill_lookahead(launch.LOOKAHEAD_MIN_SEQLEN_K, None) == {}
    assert not _kernel_of(has_skip=True, thr_add_only=True, fast_vote=False).thr_add_only


def test_keep_first_defaults():
    """The keep block is laid out as the vote branch's fall-through path by default at
    hdim 128/128 only (measured faster there, not at 64, 256 or 192/128)."""
    assert _kernel_of(has_skip=True).keep_first
    for kw in (dict(has_skip=True, head_dim=64), dict(has_skip=True, head_dim=256),
               dict(has_skip=True, head_dim=192, head_dim_v=128),
               dict(has_skip=True, keep_first=False)):
        assert not _kernel_of(**kw).keep_first, kw
    assert _kernel_of(has_skip=True, head_dim=256, keep_first=True).keep_first


def test_lookahead_defaults_and_policy():
    """The skip build switches to the look-ahead schedule after 4 skipped tiles by default where
    it was measured (hdim 128, 128 x 128 tiles, one CTA) and never elsewhere; the launcher turns
    the switch off for keys shorter than LOOKAHEAD_MIN_SEQLEN_K (and of unknown length)."""
    def k_of(**kw):
        cfg = dict(dtype=torch.bfloat16, head_dim=128, causal=False, has_skip=True)
        cfg.update(kw)
        return launch._make_kernel(launch._config_key(cfg)).lookahead_after_skips
    assert k_of() == 4 and k_of(causal=True, has_stats=True, varlen=True) == 4
    assert k_of(lookahead_after_skips=2) == 2
    for off in (dict(has_skip=False), dict(head_dim=256), dict(head_dim=192, head_dim_v=128),
                dict(head_dim=64), dict(tile_n=176), dict(cluster_h=2), dict(pv_skip=False),
                dict(decision_rows=64), dict(qk_lookahead=True), dict(lookahead_after_skips=0)):
        assert k_of(**off) == 0, off
    min_len = launch.LOOKAHEAD_MIN_SEQLEN_K
    assert launch.prefill_lookahead(min_len) == {}
    assert launch.prefill_lookahead(min_len - 1) == dict(lookahead_after_skips=0)
    assert launch.prefill_lookahead(None) == dict(lookahead_after_skips=0)
    assert launch.prefill_lookahead(1024, dict(lookahead_after_skips=4)) == {}
    with pytest.raises(NotImplementedError, match="lookahead_after_skips"):
        k_of(cluster_h=2, lookahead_after_skips=4)


@pytest.mark.parametrize("bad", [dict(head_dim=64), dict(head_dim=128, cluster_h=2),
                                 dict(head_dim=128, decision_rows=64),
                                 dict(head_dim=128, defer_v_release=True),
                                 dict(head_dim=128, lazy_p_zero=True),
                                 dict(head_dim=128, pingpong=True)], ids=str)
def test_qk_lookahead_unsupported_raises(bad):
    """qk_lookahead: 2 consumer warpgroups (not hdim 64's 3), no cluster, and with skipping
    16-row decisions; no ping-pong and none of the other skip-path knobs."""
    cfg = dict(dtype=torch.bfloat16, causal=True, has_skip=True, qk_lookahead=True)
    cfg.update(bad)
    with pytest.raises(NotImplementedError, match="qk_lookahead"):
        launch.compile_prefill_sm90(cfg)


@pytest.mark.parametrize("bad", [dict(head_dim=96), dict(head_dim=128, head_dim_v=64),
                                 dict(head_dim=192), dict(head_dim=192, head_dim_v=64),
                                 dict(head_dim=128, head_dim_v=192),
                                 dict(head_dim=128, dtype=torch.float32)])
def test_unsupported_raises(bad):
    cfg = dict(dtype=torch.bfloat16, causal=False)
    cfg.update(bad)
    with pytest.raises(NotImplementedError):
        launch.compile_prefill_sm90(cfg)
    with pytest.raises(NotImplementedError):
        launch.prefill_geometry(cfg["head_dim"], cfg.get("head_dim_v", cfg["head_dim"]), False,
                                cfg["dtype"])


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", HEAD_DIM_PAIRS, ids=_dims_id)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 333, 1000, 8, 2), (1, 700, 250, 4, 1), (3, 128, 128, 4, 4),
                                   (1, 1, 77, 2, 2)])
@pytest.mark.gpu
def test_dense_vs_float64(dtype, dims, causal, shape):
    if not _on_hopper():
        pytest.skip("needs sm_90")
    B, Lq, Lk, Hq, Hk = shape
    assert smoke.check_dense(B, Lq, Lk, Hq, Hk, dims[0], causal, dtype, seed=hash(shape) % 1000,
                             Dv=dims[1])


@pytest.mark.parametrize("dims", HEAD_DIM_PAIRS, ids=_dims_id)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("factor,synthetic", [(30.0, True), (300.0, True), (5.0, False),
                                              (1e4, False)])
@pytest.mark.gpu
def test_skip_matches_reference(dims, causal, factor, synthetic):
    if not _on_hopper():
        pytest.skip("needs sm_90")
    d, dv = dims
    assert smoke.check_skip(2, 1000, 1500, 4, 1, d, causal, torch.bfloat16, factor,
                            synthetic=synthetic, Dv=dv)
    assert smoke.check_skip(1, 777, 777, 4, 4, d, causal, torch.float16, factor,
                            synthetic=synthetic, Dv=dv)


@pytest.mark.gpu
def test_mla_public_api():
    """blasst_cute.prefill runs the kernel for 192/128 (MHA, causal, varlen and batched, stats)."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    import blasst_cute
    from blasst_cute import reference
    from blasst_cute.workloads import synthetic_qkv
    q, k, v = synthetic_qkv(2, 500, 500, 4, 4, 192, 128, device="cuda", seed=5)
    out, lse, st = blasst_cute.prefill(q, k, v, causal=True, threshold_scale_factor=50.0,
                                       return_lse=True, return_stats=True, backend="cute")
    assert out.shape == (2, 500, 4, 128)
    ro, rl, rst = reference.blasst_attention(q, k, v, causal=True, softmax_scale=192 ** -0.5,
                                             threshold_scale_factor=50.0,
                                             **smoke.geometry(q, v, True))
    assert smoke.rel_err(out, ro) < 2e-2
    assert bool((st.visited.cpu() == rst.visited.cpu()).all())
    assert int((st.skipped.cpu() - rst.skipped.cpu()).abs().sum()) <= max(
        1, 0.005 * int(rst.visited.sum()))
    # varlen through the API
    cu = torch.tensor([0, 500, 1000], dtype=torch.int32, device="cuda")
    out_v = blasst_cute.prefill(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True,
                                threshold_scale_factor=50.0, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                max_seqlen_q=500, max_seqlen_k=500, backend="cute")
    assert smoke.rel_err(out_v.view(2, 500, 4, 128), out) < 1e-3


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.gpu
def test_skip_rule_vote_variant(causal):
    """fast_vote=False (the rule evaluated every tile) stays selectable and matches the
    reference; the default per-row thresholds give the same decisions up to rare borderline
    flips."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    assert smoke.check_skip(2, 1000, 1500, 4, 1, 128, causal, torch.bfloat16, 30.0,
                            tuning={"fast_vote": False})
    from blasst_cute.workloads import synthetic_qkv
    q, k, v = synthetic_qkv(2, 1000, 1500, 4, 1, 128, device="cuda", seed=11)
    res = [smoke.run_kernel(q, k, v, causal=causal, scale=128 ** -0.5, factor=300.0, stats=True,
                            tuning={"fast_vote": fv}) for fv in (False, True)]
    (o1, l1, v1, s1), (o2, l2, v2, s2) = res
    assert torch.equal(v1, v2)
    assert int((s1 - s2).abs().sum()) <= max(1, int(0.002 * int(v1.sum())))
    assert smoke.rel_err(o2, o1) < 1e-2


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (64, 64), MLA], ids=_dims_id)
@pytest.mark.gpu
def test_skip_schedule_variants_bitwise(causal, dims):
    """late_v_wait (a skipped PV's V stage is waited for after the ping-pong token),
    v_load_skip (V loads gated by the votes), each on or off, lazy_p_zero (skipping warps zero
    their P rows only for a PV that runs), defer_v_release (a skipped PV's V stage released
    one iteration later; default for causal): the same bits, counters included,
    as the build with both off at mixed sparsity; and each matches the reference (skip,
    varlen)."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    from blasst_cute.workloads import synthetic_qkv
    d, dv = dims
    combos = [dict(v_load_skip=vs, late_v_wait=lvw) for vs in (False, True)
              for lvw in (False, True)]
    combos += [dict(v_load_skip=False, lazy_p_zero=True),
               dict(v_load_skip=True, lazy_p_zero=True, defer_v_release=True),
               dict(v_load_skip=True, defer_v_release=not causal)]
    mixed = 0
    for (B, Lq, Lk, Hq, Hk), factor in [((2, 1000, 1500, 4, 1), 30.0), ((1, 700, 2100, 4, 2), 300.0),
                                        ((2, 333, 1000, 2, 2), 3000.0)]:
        q, k, v = synthetic_qkv(B, Lq, Lk, Hq, Hk, d, dv, device="cuda", seed=Lq + Lk)
        res = [smoke.run_kernel(q, k, v, causal=causal, scale=d ** -0.5, factor=factor, stats=True,
                                tuning=t) for t in combos]
        torch.cuda.synchronize()
        o1, l1, v1, s1 = res[0]
        mixed += int(0 < int(s1.sum()) < int(v1.sum()))
        for t, (o2, l2, v2, s2) in zip(combos[1:], res[1:]):
            assert torch.equal(v1, v2) and torch.equal(s1, s2), (B, Lq, Lk, factor, t)
            assert torch.equal(o1, o2) and torch.equal(l1, l2), (B, Lq, Lk, factor, t)
    assert mixed >= 2  # some tiles skipped, some kept
    for t in combos[1:]:
        assert smoke.check_skip(2, 1000, 1500, 4, 1, d, causal, torch.bfloat16, 30.0, Dv=dv,
                                tuning=t)
    assert smoke.check_varlen([100, 1, 300, 257, 0], [200, 5, 300, 700, 3], 4, 2, d, causal,
                              torch.bfloat16, 20.0, Dv=dv, tuning=combos[-1])


def _assert_schedules_bitwise(dims, causal, cases, tunings):
    """Each tuning gives the default build's outputs, lse and counters bit for bit, dense and
    with skipping, on every (B, Lq, Lk, Hq, Hk), factor case (some must mix skipped and kept
    tiles); then each matches the reference (skip, varlen)."""
    from blasst_cute.workloads import synthetic_qkv
    d, dv = dims
    mixed = 0
    for (B, Lq, Lk, Hq, Hk), factor in cases:
        q, k, v = synthetic_qkv(B, Lq, Lk, Hq, Hk, d, dv, device="cuda", seed=Lq + Lk)
        for has_skip in (False, True):
            f = factor if has_skip else None
            o1, l1, v1, s1, p1 = smoke.run_kernel(q, k, v, causal=causal, scale=d ** -0.5,
                                                  factor=f, stats=has_skip, pv=True)
            for t in tunings:
                o2, l2, v2, s2, p2 = smoke.run_kernel(q, k, v, causal=causal, scale=d ** -0.5,
                                                      factor=f, stats=has_skip, tuning=t, pv=True)
                torch.cuda.synchronize()
                assert torch.equal(o1, o2) and torch.equal(l1, l2), (B, Lq, Lk, f, t)
                if has_skip:
                    assert torch.equal(v1, v2) and torch.equal(s1, s2), (B, Lq, Lk, f, t)
                    assert torch.equal(p1, p2), (B, Lq, Lk, f, t)
            if has_skip:
                mixed += int(0 < int(s1.sum()) < int(v1.sum()))
    assert mixed >= 2  # some tiles skipped, some kept
    for t in tunings:
        assert smoke.check_skip(2, 1000, 1500, 4, 1, d, causal, torch.bfloat16, 30.0, Dv=dv,
                                tuning=t)
        assert smoke.check_varlen([100, 1, 300, 257, 0], [200, 5, 300, 700, 3], 4, 2, d, causal,
                                  torch.bfloat16, 20.0, Dv=dv, tuning=t)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (256, 256), MLA], ids=_dims_id)
@pytest.mark.gpu
def test_qk_lookahead_bitwise(causal, dims):
    """qk_lookahead (the next tile's QK issued before the current tile's vote and softmax), with
    2 and (hdim 128) 3 stages, and the switch to it after 1 or 2 skipped tiles: the same bits,
    counters included, as the default schedule, dense and at mixed sparsity with tile counts odd
    and even, 1 and 2; against the reference (skip, varlen)."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    las = [dict(qk_lookahead=True), dict(lookahead_after_skips=1),
           dict(lookahead_after_skips=2)] + (
        [dict(qk_lookahead=True, num_stages=3)] if dims[0] == 128 else [])
    _assert_schedules_bitwise(dims, causal, [
        ((2, 1000, 1500, 4, 1), 30.0), ((1, 700, 2100, 4, 2), 300.0), ((2, 333, 1000, 2, 2), 3000.0),
        ((1, 200, 100, 2, 1), 30.0), ((1, 130, 250, 2, 2), 3.0)], las)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (256, 256), MLA], ids=_dims_id)
@pytest.mark.gpu
def test_rescale_o_before_pv_bitwise(causal, dims):
    """The O rescale of a kept tile applied before the next PV (rescale_o_before_pv; MLA's
    default) or right after the tile (the others'): the same bits, counters included, dense and
    at low to near-total sparsity (whole-warpgroup PV skips), 1 and 2 tiles; against the
    reference (skip, varlen)."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    _assert_schedules_bitwise(dims, causal, [
        ((2, 1000, 1500, 4, 1), 30.0), ((1, 700, 2100, 4, 2), 300.0), ((1, 512, 4096, 2, 1), 1e5),
        ((1, 200, 100, 2, 1), 30.0), ((1, 130, 150, 2, 2), 3.0)],
        [dict(rescale_o_before_pv=dims != MLA)])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (256, 256), (64, 64)], ids=_dims_id)
@pytest.mark.gpu
def test_vote_thread_max_bitwise(causal, dims):
    """The vote on each thread's own columns' maxima (vote_thread_max True: in both schedules,
    the shuffles after the branch; "overlap", the hdim-128 default: with the shuffles before
    it; "lookahead": in the look-ahead schedule only) or on the row maxima (False): the same
    decisions, so the same bits and counters, in the default schedule, after the look-ahead
    switch and in qk_lookahead (hdim 128)."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    tunings = [dict(vote_thread_max=v) for v in (False, True, "lookahead", "overlap")]
    if dims == (128, 128):
        tunings += [dict(qk_lookahead=True), dict(qk_lookahead=True, vote_thread_max=False)]
    _assert_schedules_bitwise(dims, causal, [
        ((2, 1000, 1500, 4, 1), 30.0), ((1, 700, 2100, 4, 2), 300.0), ((1, 512, 4096, 2, 1), 1e5),
        ((1, 200, 100, 2, 1), 30.0), ((1, 130, 150, 2, 2), 3.0)], tunings)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (64, 64)], ids=_dims_id)
@pytest.mark.gpu
def test_flag_addr_before_sync_bitwise(causal, dims):
    """The PV flag word's address formed before the ping-pong barrier (hdim-128 default) or
    after it: the same bits and counters."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    _assert_schedules_bitwise(dims, causal, [
        ((2, 1000, 1500, 4, 1), 30.0), ((1, 700, 2100, 4, 2), 300.0), ((1, 512, 4096, 2, 1), 1e5),
        ((1, 130, 150, 2, 2), 3.0)], [dict(flag_addr_before_sync=dims[0] != 128)])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (64, 64), (256, 256)], ids=_dims_id)
@pytest.mark.gpu
def test_keep_first_bitwise(causal, dims):
    """The keep block before or after the skip block (keep_first, the hdim-128 default): the
    same bits and counters."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    _assert_schedules_bitwise(dims, causal, [
        ((2, 1000, 1500, 4, 1), 30.0), ((1, 700, 2100, 4, 2), 300.0), ((1, 512, 4096, 2, 1), 1e5),
        ((1, 130, 150, 2, 2), 3.0)], [dict(keep_first=dims != (128, 128))])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(128, 128), (64, 64), (256, 256)], ids=_dims_id)
@pytest.mark.gpu
def test_thr_add_only_bitwise(causal, dims):
    """thr_add_only flipped from its default against the default build: the same bits and
    counters, with padding rows, rows that see no key (Lq > Lk, causal) and skipping off
    (factor >= Lk)."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    # these keys are short (no look-ahead switch): at hdim 128 the default is on for causal and
    # off otherwise, at the other head dims off
    tunings = [dict(thr_add_only=not causal if dims == (128, 128) else True)]
    _assert_schedules_bitwise(dims, causal, [
        ((2, 1000, 1500, 4, 1), 30.0), ((1, 700, 2100, 4, 2), 300.0), ((1, 512, 4096, 2, 1), 1e5),
        ((1, 130, 150, 2, 2), 3.0), ((1, 300, 200, 2, 1), 30.0), ((1, 300, 200, 2, 1), 1e4)],
        tunings)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.gpu
def test_lookahead_long_keys(causal):
    """Keys of LOOKAHEAD_MIN_SEQLEN_K: the launcher's default (the look-ahead switch after 4
    skipped tiles) gives the bits of the build without it, through the public API too, and
    matches the reference."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    import blasst_cute
    from blasst_cute.workloads import synthetic_qkv
    Lk = launch.LOOKAHEAD_MIN_SEQLEN_K
    q, k, v = synthetic_qkv(1, 640, Lk, 4, 2, 128, device="cuda", seed=7)
    factor = 0.5 * Lk
    o1, l1, v1, s1 = smoke.run_kernel(q, k, v, causal=causal, scale=128 ** -0.5, factor=factor,
                                      stats=True)
    o0, l0, v0, s0 = smoke.run_kernel(q, k, v, causal=causal, scale=128 ** -0.5, factor=factor,
                                      stats=True, tuning=dict(lookahead_after_skips=0))
    o2, st = blasst_cute.prefill(q, k, v, causal=causal, threshold_scale_factor=factor,
                                 return_stats=True)
    torch.cuda.synchronize()
    assert 0.3 < float(s1.sum()) / float(v1.sum()) < 0.995  # skipped runs and kept tiles
    assert torch.equal(o1, o0) and torch.equal(l1, l0)
    assert torch.equal(v1, v0) and torch.equal(s1, s0)
    assert torch.equal(o2, o1)
    assert smoke.check_skip(1, 640, Lk, 4, 2, 128, causal, torch.bfloat16, factor)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", HEAD_DIM_PAIRS, ids=_dims_id)
@pytest.mark.gpu
def test_v_load_skip_bitwise(dims, causal):
    """V loads gated by the skip decisions (v_load_skip, default for 2 warpgroups): outputs, lse
    and counters are bitwise those of the build that loads every V (same math; only which V
    tiles reach smem differs), from low to near-total sparsity; against the reference, with
    varlen too."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    from blasst_cute.workloads import synthetic_qkv
    d, dv = dims
    gated, every_v = dict(v_load_skip=True), dict(v_load_skip=False)
    for (B, Lq, Lk, Hq, Hk), factor in [((2, 1000, 1500, 4, 1), 30.0), ((1, 700, 2100, 4, 2), 300.0),
                                        ((2, 333, 1000, 2, 2), 3000.0), ((1, 512, 4096, 2, 1), 1e5)]:
        q, k, v = synthetic_qkv(B, Lq, Lk, Hq, Hk, d, dv, device="cuda", seed=Lq + Lk)
        o1, l1, v1, s1 = smoke.run_kernel(q, k, v, causal=causal, scale=d ** -0.5, factor=factor,
                                          stats=True, tuning=every_v)
        o2, l2, v2, s2 = smoke.run_kernel(q, k, v, causal=causal, scale=d ** -0.5, factor=factor,
                                          stats=True, tuning=gated)
        torch.cuda.synchronize()
        assert torch.equal(v1, v2) and torch.equal(s1, s2), (B, Lq, Lk, factor)
        assert torch.equal(o1, o2) and torch.equal(l1, l2), (B, Lq, Lk, factor)
    assert smoke.check_skip(2, 1000, 1500, 4, 1, d, causal, torch.bfloat16, 30.0, Dv=dv,
                            tuning=gated)
    assert smoke.check_varlen([100, 1, 300, 257, 0], [200, 5, 300, 700, 3], 4, 2, d, causal,
                              torch.bfloat16, 20.0, Dv=dv, tuning=gated)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", HEAD_DIM_PAIRS, ids=_dims_id)
@pytest.mark.gpu
def test_v_warp_bitwise(dims, causal):
    """V tiles issued by a second producer warp (v_warp; the hdim-256 dense default) without
    gating: the dense build and the skip build that loads every V give the bits of their
    one-producer-warp builds."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    from blasst_cute.workloads import synthetic_qkv
    d, dv = dims
    q, k, v = synthetic_qkv(2, 1000, 1500, 4, 2, d, dv, device="cuda", seed=7)
    for factor, base in ((None, dict(v_warp=False)), (300.0, dict(v_load_skip=False, v_warp=False))):
        stats = factor is not None
        o1, l1, v1, s1 = smoke.run_kernel(q, k, v, causal=causal, scale=d ** -0.5, factor=factor,
                                          stats=stats, tuning=base)
        o2, l2, v2, s2 = smoke.run_kernel(q, k, v, causal=causal, scale=d ** -0.5, factor=factor,
                                          stats=stats, tuning=dict(base, v_warp=True))
        torch.cuda.synchronize()
        assert torch.equal(o1, o2) and torch.equal(l1, l2), factor
        if stats:
            assert torch.equal(v1, v2) and torch.equal(s1, s2)
    assert smoke.check_dense(2, 333, 1000, 8, 2, d, causal, torch.bfloat16, Dv=dv,
                             tuning=dict(v_warp=True))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.gpu
def test_skip_warpgroup_decision_variant(causal):
    """The per-warpgroup decision (decision_rows=64, the older scheme) stays selectable."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    assert smoke.check_skip(2, 1000, 1500, 4, 1, 128, causal, torch.bfloat16, 30.0,
                            tuning={"decision_rows": 64})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.gpu
def test_hdim64_two_warpgroup_variant(causal):
    """hdim 64 with 128-row tiles (2 consumer warpgroups) stays selectable and correct."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    tuning = {"tile_m": 128}
    assert smoke.check_dense(2, 333, 1000, 8, 2, 64, causal, torch.bfloat16, tuning=tuning)
    assert smoke.check_skip(2, 1000, 1500, 4, 1, 64, causal, torch.bfloat16, 30.0, tuning=tuning)


@pytest.mark.gpu
def test_skip_factor_tensor_and_stats_without_factor():
    if not _on_hopper():
        pytest.skip("needs sm_90")
    from blasst_cute import reference
    from blasst_cute.workloads import synthetic_qkv
    q, k, v = synthetic_qkv(3, 600, 900, 4, 2, 128, device="cuda", seed=3)
    fac = torch.tensor([0.0, 50.0, 2000.0], device="cuda")
    out, lse, vis, skp = smoke.run_kernel(q, k, v, causal=True, scale=128 ** -0.5, factor=fac,
                                          stats=True)
    ro, rl, st = reference.blasst_attention(q, k, v, causal=True, softmax_scale=128 ** -0.5,
                                            threshold_scale_factor=fac.cpu(),
                                            **smoke.geometry(q, v, True))
    assert bool((vis.long() == st.visited).all())
    assert int((skp.long() - st.skipped).abs().sum()) <= max(1, 0.005 * int(st.visited.sum()))
    assert int(skp[0].sum()) == 0
    assert smoke.rel_err(out, ro) < 2e-2
    # stats requested with no factor: visited counted, nothing skipped
    out2, _, vis2, skp2 = smoke.run_kernel(q, k, v, causal=True, scale=128 ** -0.5, stats=True)
    assert bool((vis2.long() == st.visited).all()) and int(skp2.sum()) == 0


@pytest.mark.gpu
def test_dense_skip_bit_identical_at_zero_sparsity():
    """Skipping compiled in but never triggered gives exactly the dense kernel's output."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    g = torch.Generator(device="cuda").manual_seed(7)
    q, k, v = (torch.randn(2, 513, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    o1, l1, _, _ = smoke.run_kernel(q, k, v, causal=True, scale=0.1)
    o2, l2, _, skp = smoke.run_kernel(q, k, v, causal=True, scale=0.1, factor=1e-30, stats=True)
    assert int(skp.sum()) == 0
    assert torch.equal(o1, o2) and torch.equal(l1, l2)


@pytest.mark.parametrize("dims", HEAD_DIM_PAIRS, ids=_dims_id)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("factor", [None, 20.0])
@pytest.mark.gpu
def test_varlen(dims, causal, factor):
    if not _on_hopper():
        pytest.skip("needs sm_90")
    assert smoke.check_varlen([100, 1, 300, 257, 0], [200, 5, 300, 700, 3], 4, 2, dims[0], causal,
                              torch.bfloat16, factor, Dv=dims[1])


@pytest.mark.gpu
@pytest.mark.slow
def test_random_sweep_200():
    if not _on_hopper():
        pytest.skip("needs sm_90")
    assert smoke.random_sweep(200)


@pytest.mark.parametrize("dims", HEAD_DIM_PAIRS, ids=_dims_id)
@pytest.mark.parametrize("pair,causal", [("tiles", False), ("heads", False), ("heads", True)])
@pytest.mark.gpu
def test_cluster_pair(dims, pair, causal):
    """2-CTA clusters sharing K/V by TMA multicast (q-tile or q-head pairs; also sharing only K,
    each CTA loading its V gated by its own votes): the output, LSE and
    skip counters are bitwise those without a cluster (the per-CTA math is unchanged), also with
    an odd q-tile count (q-tile pairs: the last pair's second q-tile runs as padding); dense vs
    float64, skipping vs the reference and varlen (empty and odd-tile sequences) with the pair on."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    from blasst_cute.workloads import synthetic_qkv
    d, dv = dims
    on = PAIRS[pair]
    off = {k: 1 for k in on}
    gated = dict(on, v_load_skip=True)  # K shared, each CTA's own V loads gated by its votes
    for (B, Lq, Lk, Hq, Hk), factor in [((2, 333, 1000, 4, 2), None), ((2, 333, 1000, 4, 2), 30.0),
                                        ((1, 1100, 3000, 8, 2), 300.0), ((3, 128, 77, 2, 1), 5.0)]:
        q, k, v = synthetic_qkv(B, Lq, Lk, Hq, Hk, d, dv, device="cuda", seed=Lq + Lk)
        tunings = (off, on) if factor is None else (off, on, gated)
        res = [smoke.run_kernel(q, k, v, causal=causal, scale=d ** -0.5, factor=factor,
                                stats=factor is not None, tuning=t) for t in tunings]
        torch.cuda.synchronize()
        o1, l1, v1, s1 = res[0]
        for o2, l2, v2, s2 in res[1:]:
            assert not torch.isnan(o2).any() and not torch.isnan(l2).any()
            assert torch.equal(o1, o2) and torch.equal(l1, l2), (B, Lq, Lk, factor)
            if factor is not None:
                assert torch.equal(v1, v2) and torch.equal(s1, s2)
    assert smoke.check_dense(2, 333, 1000, 8, 2, d, causal, torch.float16, seed=3, Dv=dv,
                             tuning=on)
    for t in (on, gated):
        assert smoke.check_skip(2, 1000, 1500, 4, 2, d, causal, torch.bfloat16, 30.0, Dv=dv, tuning=t)
        assert smoke.check_varlen([100, 1, 300, 257, 0], [200, 5, 300, 700, 3], 4, 2, d, causal,
                                  torch.bfloat16, 20.0, Dv=dv, tuning=t)
