"""Small helpers over cutlass.pipeline / wgmma shared by the SM90 kernels."""

import enum

import cutlass.cute as cute
from cutlass.cute.nvgpu import warpgroup


class NamedBarrierSm90(enum.IntEnum):
    """Named-barrier ids (0 is __syncthreads)."""

    Epilogue = 1
    SchedulerWG1 = 2  # ping-pong token of consumer warpgroup 1 (2: WG2, ...)
    SchedulerWG2 = 3
    SkipVoteWG1 = 4  # BLASST decision of consumer warpgroup 1 (5: WG2)
    SkipVoteWG2 = 5


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


def elem_ptr(t: cute.Tensor, coord):
    """Pointer to one element of a gmem tensor (for atomics)."""
    return t.iterator + cute.crd2idx(coord, t.layout)
