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

_CONFIGS = list(itertools.product(DTYPES, HEAD_DIMS, [False, True], list(VARIANTS), [False, True]))


def _marks(dtype, variant, varlen):
    # The bf16 dense / skip+stats matrix is the fast default; the rest is the slow tail.
    fast = dtype == torch.bfloat16 and variant in ("dense", "skip_stats")
    return [] if fast else [pytest.mark.slow]


@pytest.mark.parametrize(
    "dtype,head_dim,causal,variant,varlen",
    [pytest.param(*c, marks=_marks(c[0], c[3], c[4])) for c in _CONFIGS],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_compile_sm90a(dtype, head_dim, causal, variant, varlen):
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    cfg = dict(dtype=dtype, head_dim=head_dim, causal=causal, varlen=varlen, **VARIANTS[variant])
    fn = launch.compile_prefill_sm90(cfg)
    assert fn is not None


@pytest.mark.parametrize("tuning", [dict(decision_rows=64), dict(decision_rows=64, vote_smem=False),
                                    dict(pv_skip=False), dict(num_stages=3)], ids=str)
@pytest.mark.parametrize("head_dim", [128, 256])
def test_compile_skip_variants(tuning, head_dim):
    """Selectable skip variants (per-warpgroup decision, PV always issued, 3 stages) compile."""
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" and not _on_hopper():
        pytest.skip("CUTE_DSL_ARCH is not sm_90a")
    if head_dim == 256 and tuning.get("num_stages") == 3:
        pytest.skip("hdim 256 x 3 stages does not fit shared memory")
    cfg = dict(dtype=torch.bfloat16, head_dim=head_dim, causal=True, has_skip=True, has_stats=True,
               **tuning)
    assert launch.compile_prefill_sm90(cfg) is not None


def test_geometry():
    for d in HEAD_DIMS:
        for causal in (False, True):
            g = launch.prefill_geometry(d, d, causal, torch.bfloat16)
            assert g["rows_per_decision"] == 16 and g["block_m"] == 128
            assert g["order"] == "reverse" and g["pack_gqa"] is False
            assert set(g) == {"block_m", "block_n", "rows_per_decision", "order", "pack_gqa"}


@pytest.mark.parametrize("bad", [dict(head_dim=96), dict(head_dim=128, head_dim_v=64),
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
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 333, 1000, 8, 2), (1, 700, 250, 4, 1), (3, 128, 128, 4, 4),
                                   (1, 1, 77, 2, 2)])
@pytest.mark.gpu
def test_dense_vs_float64(dtype, head_dim, causal, shape):
    if not _on_hopper():
        pytest.skip("needs sm_90")
    B, Lq, Lk, Hq, Hk = shape
    assert smoke.check_dense(B, Lq, Lk, Hq, Hk, head_dim, causal, dtype, seed=hash(shape) % 1000)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("factor,synthetic", [(30.0, True), (300.0, True), (5.0, False),
                                              (1e4, False)])
@pytest.mark.gpu
def test_skip_matches_reference(head_dim, causal, factor, synthetic):
    if not _on_hopper():
        pytest.skip("needs sm_90")
    assert smoke.check_skip(2, 1000, 1500, 4, 1, head_dim, causal, torch.bfloat16, factor,
                            synthetic=synthetic)
    assert smoke.check_skip(1, 777, 777, 4, 4, head_dim, causal, torch.float16, factor,
                            synthetic=synthetic)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.gpu
def test_skip_warpgroup_decision_variant(causal):
    """The per-warpgroup decision (decision_rows=64, the older scheme) stays selectable."""
    if not _on_hopper():
        pytest.skip("needs sm_90")
    assert smoke.check_skip(2, 1000, 1500, 4, 1, 128, causal, torch.bfloat16, 30.0,
                            tuning={"decision_rows": 64})


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


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("factor", [None, 20.0])
@pytest.mark.gpu
def test_varlen(head_dim, causal, factor):
    if not _on_hopper():
        pytest.skip("needs sm_90")
    assert smoke.check_varlen([100, 1, 300, 257, 0], [200, 5, 300, 700, 3], 4, 2, head_dim, causal,
                              torch.bfloat16, factor)


@pytest.mark.gpu
@pytest.mark.slow
def test_random_sweep_200():
    if not _on_hopper():
        pytest.skip("needs sm_90")
    assert smoke.random_sweep(200)
