"""Small helpers over cutlass.pipeline / wgmma shared by the SM90 kernels."""

import enum

import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_helpers
from cutlass import Float32
from cutlass._mlir.dialects import llvm
from cutlass.cute.nvgpu import warpgroup
from cutlass.cutlass_dsl import dsl_user_op


class NamedBarrierSm90(enum.IntEnum):
    """Named-barrier ids (0 is __syncthreads)."""

    Epilogue = 1
    # Ping-pong token of consumer warpgroup 1, 2, 3 (ids are used as SchedulerWG1 + group index).
    SchedulerWG1 = 2
    SchedulerWG2 = 3
    SchedulerWG3 = 4
    # BLASST decision of consumer warpgroup 1, 2, 3 (SkipVoteWG1 + group index).
    SkipVoteWG1 = 5
    SkipVoteWG2 = 6
    SkipVoteWG3 = 7


def wgmma(tiled_mma: cute.TiledMma, acc: cute.Tensor, tCrA: cute.Tensor, tCrB: cute.Tensor,
          zero_init: bool):
    """Issue one warpgroup GEMM over all k-blocks and commit it as one wgmma group (no wait)."""
    warpgroup.fence()
    # A fresh atom per call: its ACCUMULATE field is mutated below.
    atom = cute.make_mma_atom(tiled_mma.op)
    atom.set(warpgroup.Field.ACCUMULATE, not zero_init)
    for k in range(cute.size(tCrA.shape[2])):
        cute.gemm(atom, acc, tCrA[None, None, k], tCrB[None, None, k], acc)
        atom.set(warpgroup.Field.ACCUMULATE, True)
    warpgroup.commit_group()


@dsl_user_op
def compiler_barrier(*, loc=None, ip=None):
    """An empty volatile asm: emits nothing, but LLVM keeps the block holding it a branch (it
    cannot turn a side-effecting block into selects)."""
    llvm.inline_asm(None, [], "", "", has_side_effects=True, is_align_stack=False,
                    asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


def elem_ptr(t: cute.Tensor, coord):
    """Pointer to one element of a gmem tensor (for atomics)."""
    return t.iterator + cute.crd2idx(coord, t.layout)


def qk_pv_tiled_mmas(dtype, atom_layout_mnk, qk_tiler_mn, pv_tiler_mn,
                     pv_a_source=warpgroup.OperandSource.SMEM):
    """(S = Q K^T, O += P V) tiled wgmmas with fp32 accumulators: Q, K and P K-major, V MN-major
    (row-major V read as the transposed B operand); P from smem or (RMEM) registers."""
    K = cute.nvgpu.OperandMajorMode.K
    MN = cute.nvgpu.OperandMajorMode.MN
    mma_qk = sm90_helpers.make_trivial_tiled_mma(
        dtype, dtype, K, K, Float32, atom_layout_mnk=atom_layout_mnk, tiler_mn=qk_tiler_mn,
    )
    mma_pv = sm90_helpers.make_trivial_tiled_mma(
        dtype, dtype, K, MN, Float32, atom_layout_mnk=atom_layout_mnk, tiler_mn=pv_tiler_mn,
        a_source=pv_a_source,
    )
    return mma_qk, mma_pv
