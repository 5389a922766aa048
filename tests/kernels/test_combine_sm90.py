"""The split-KV combine kernel (blasst_cute/kernels/sm90/combine.py): CPU compiles of every form,
and on a GPU the merge against float64 on random partials, with the same bits for every number
of warps per row (the grouped merge's fixed summation order)."""

import math

import pytest
import torch

from blasst_cute.kernels import launch_decode
from blasst_cute.kernels.sm90 import combine

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_warps_per_row():
    # one warp per group of MERGE_GROUP splits, a power of two, at most MAX_WARPS_PER_ROW
    g = combine.MERGE_GROUP
    assert combine.combine_warps_per_row(2) == 1
    assert combine.combine_warps_per_row(g) == 1
    assert combine.combine_warps_per_row(g + 1) == 2
    assert combine.combine_warps_per_row(2 * g) == 2
    assert combine.combine_warps_per_row(33) == 8  # 5 groups
    assert combine.combine_warps_per_row(128) == combine.MAX_WARPS_PER_ROW


def test_bad_warps_per_row():
    import cutlass
    with pytest.raises(ValueError, match="warps_per_row 3"):
        combine.BlasstDecodeCombineSm90(cutlass.BFloat16, 128, grouped=True, warps_per_row=3)
    with pytest.raises(ValueError, match="grouped=True"):
        combine.BlasstDecodeCombineSm90(cutlass.BFloat16, 128, grouped=False, warps_per_row=2)


@cpu_only
@pytest.mark.parametrize("head_dim", [64, 128, 256, 512])
@pytest.mark.parametrize("warps", [1, 2, 4, 8])
def test_compile_grouped_cpu(head_dim, warps):
    assert launch_decode.compile_combine_sm90(torch.bfloat16, head_dim, use_pdl=warps == 8,
                                              grouped=True, warps_per_row=warps) is not None


@cpu_only
def test_compiled_combine_is_shared():
    """The launchers' combine (launch_common.compiled_combine): one compiled kernel per dtype,
    head dim, launch mode and warps per row, whichever launcher or split count asks for it."""
    from blasst_cute.kernels import launch_common
    fn = launch_common.compiled_combine(torch.bfloat16, 512, 9, True, True)
    assert fn is launch_common.compiled_combine(torch.bfloat16, 512, 16, True, True)  # 2 warps
    assert combine.combine_warps_per_row(9) == combine.combine_warps_per_row(16) == 2


_compiled = {}


def _run(op, lsep, out_dtype, warps, grouped=True):
    """Launch the combine on (splits, b, lq, hq, d) fp32 partials and (splits, b, hq, lq) lse."""
    from cutlass import Float32, Int32

    from blasst_cute.kernels.dtypes import TORCH_TO_CUTLASS
    from blasst_cute.kernels.launch_common import cuda_stream, make_ptr
    S, B, lq, hq, d = op.shape
    key = (out_dtype, d, grouped, warps)
    if key not in _compiled:
        _compiled[key] = launch_decode.compile_combine_sm90(out_dtype, d, grouped=grouped,
                                                            warps_per_row=warps)
    fn = _compiled[key]
    out = torch.full((B, lq, hq, d), float("nan"), device="cuda", dtype=out_dtype)
    lse = torch.full((B, hq, lq), float("nan"), device="cuda", dtype=torch.float32)
    fn(make_ptr(Float32, op.data_ptr(), 16), make_ptr(Float32, lsep.data_ptr(), 4),
       make_ptr(TORCH_TO_CUTLASS[out_dtype], out.data_ptr(), 16),
       make_ptr(Float32, lse.data_ptr(), 4), Int32(S), Int32(B), Int32(lq), Int32(hq),
       cuda_stream(torch.cuda.current_stream().cuda_stream))
    torch.cuda.synchronize()
    return out, lse


def _partials(S, B, lq, hq, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    op = torch.randn(S, B, lq, hq, d, device="cuda", generator=g)
    lsep = 3 * torch.randn(S, B, hq, lq, device="cuda", generator=g)
    # empty splits (lse -inf, O garbage that must not leak in), and one row with every split empty
    empty = torch.rand(S, B, hq, lq, device="cuda", generator=g) < 0.2
    lsep[empty] = -math.inf
    op.masked_fill_(empty.permute(0, 1, 3, 2).unsqueeze(-1), float("nan"))
    lsep[:, 0, 0, 0] = -math.inf
    op[:, 0, 0, 0] = float("nan")
    return op, lsep


def _reference(op, lsep):
    op64 = torch.nan_to_num(op.double(), nan=0.0)
    l64 = lsep.double()
    lse = torch.logsumexp(l64, dim=0)  # (b, hq, lq); -inf where every split is empty
    w = torch.exp(l64 - lse.unsqueeze(0)).nan_to_num(0.0)  # (s, b, hq, lq)
    o = (w.permute(0, 1, 3, 2).unsqueeze(-1) * op64).sum(0)
    return o, lse


@gpu
@needs_cuda
@pytest.mark.parametrize("S", [2, 3, 8, 9, 16, 17, 33, 64, 100, 128])
@pytest.mark.parametrize("d", [128, 512])
def test_grouped_merge_matches_float64_and_warp_counts(S, d):
    B, lq, hq = 3, 2, 5
    op, lsep = _partials(S, B, lq, hq, d, seed=S * 7 + d)
    ref_o, ref_lse = _reference(op, lsep)
    outs = {}
    for warps in sorted({1, 2, 4, 8, combine.combine_warps_per_row(S)}):
        out, lse = _run(op, lsep, torch.bfloat16, warps)
        assert not out.isnan().any() and not lse.isnan().any(), "every element written"
        torch.testing.assert_close(out.double(), ref_o, atol=2e-2, rtol=2e-2)
        finite = ref_lse.isfinite()
        torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)
        assert torch.equal(lse[~finite], ref_lse[~finite].float())
        assert torch.equal(out[0, 0, 0], torch.zeros_like(out[0, 0, 0]))  # all splits empty
        outs[warps] = (out, lse)
    first = next(iter(outs.values()))
    for warps, (out, lse) in outs.items():  # one summation order, whatever the warp count
        assert torch.equal(out, first[0]) and torch.equal(lse, first[1]), f"warps_per_row {warps}"
    # the one-warp-per-row loops (A/B option) agree to rounding
    out_old, lse_old = _run(op, lsep, torch.bfloat16, 1, grouped=False)
    torch.testing.assert_close(out_old.double(), ref_o, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_old, first[1], atol=1e-5, rtol=1e-5)
