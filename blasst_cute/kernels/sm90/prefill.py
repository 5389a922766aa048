# blasst_cute: Hopper (sm_90a) warp-specialized FlashAttention forward with BLASST skipping.
#
# Structure (per CTA = one q-tile of tile_m rows of one (batch, q-head)):
#   warpgroup 0 : producer; its warp 0 issues TMA loads of Q (once) and K/V tiles into
#                 `num_stages`-deep mbarrier pipelines (K of tile j is issued before V of tile j+1,
#                 matching the consumers' software pipeline); with v_load_skip warp 0 issues Q and
#                 K, warp 1 the V tiles the consumer warps' votes keep (warp 1 also issues every V
#                 of the hdim-256 dense build: v_warp).
#   warpgroups 1..n : consumers (n = tile_m / 64: 2, or 3 for head dim 64), 64 query rows each.
#                 Per key tile j (visited right to left):
#                 S_j = Q K_j^T (wgmma, async) overlapped with O += P_{j+1} V_{j+1} (wgmma, P from
#                 registers), then mask, tile row max, BLASST vote, online softmax (exp2 domain,
#                 scale folded in), O rescale. A ping-pong token (named barriers, passed round
#                 robin) lets one warpgroup issue its GEMMs while the others do softmax.
# BLASST (rows_per_decision = 16): each warp owns 16 rows of its warpgroup's m64 accumulator and
# decides alone (vote.all, no cross-warp sync) per tile; a skipping warp does no exp / row-sum /
# max update / O rescale and zeroes its P rows. The warpgroup skips the PV wgmma of a tile when all
# 4 warps skipped it: each warp publishes a byte flag (smem, slot = tile parity) that the group
# reads one iteration later behind the ping-pong bar.sync it passes anyway (a warpgroup barrier
# when there is no ping-pong, and once for the last PV). Every pipeline wait/release and barrier is
# identical on both paths; V is loaded unless every warp skipped the tile (v_load_skip, below).
# The first visited tile is never skipped.
# fast_vote (default): each row's skip threshold in raw score units, m_run + log2(lambda) /
# scale_log2, is refreshed on kept tiles (in the exp2 block's MUFU shadow), so a tile's vote is
# one compare per row right after the tile row max; fast_vote=False evaluates the rule as written
# ((m_tile - m_run) * scale_log2 < log2(lambda), or padding, or no key seen) every tile.
# vote_thread_max: the vote compares each thread's own columns' max (same decision), so the row
# max's shuffles run in the keep block after the branch, off a skipping warp's path, or (hdim
# 128's default schedule) alongside the vote, before the branch.
# late_v_wait (default): a warpgroup skipping a PV waits for that V stage only after passing the
# ping-pong token (+1-6 % at 50-98 % skipped). Skip cost at 0 % skipped (H100): 0-4.4 % below
# the dense build with the A/B rounds in alternating order (perf/results/prefill-h100-chain.md;
# the 2-7 % of prefill-h100-skipcost.md were timed right after the dense build, a position the
# fixed order penalised). What remains is structural (a build with no vote at all costs as much):
# ~20 more instructions per kept tile, and the keep block waits for the warp vote over both of a
# thread's rows, while the dense build starts row 0's exp2s during row 1's max reduction.
# ptxas puts the keep block's wait for the previous PV first, where the dense build has ~17 exp2s
# ahead of it, and wraps the softmax in a reconvergence region (BSSY) the dense loop lacks
# unless the keep block is the branch's fall-through side (keep_first, hdim 128's default: no
# region, 0.5-0.8 % fewer cycles); builds that moved the wait below 8-64 exp2s, or ahead of the
# branch (no region, but P zeroed on both paths), were 0.5-10 % slower (ncu cycles,
# prefill-h100-skip-cost-ncu.md sections 7-8).
# In long skipped runs each warpgroup's time per tile is a serial chain (its QK, the row max, the
# vote, the skip path, the waits before its next QK) that the other warpgroup's QK only partly
# covers (ncu: the tensor pipe ~74 % busy at 85 % skipped against 85 % dense); defer_v_release
# (default for causal) takes the V stage release of a skipped PV off that chain.
# decision_rows=64 keeps the older per-warpgroup decision (vote + smem + barrier each tile).
# Look-ahead (lookahead_after_skips, default for hdim 128 with keys >= 16k): once a warpgroup has
# skipped 4 tiles in a row it switches, for the rest of its q-tile, to a schedule that issues
# the next tile's QK before the current tile's vote (a second S accumulator), which breaks that
# chain: +0-8 % at 71-98 % skipped (prefill-h100-lookahead.md). qk_lookahead runs it for the
# whole q-tile (an option: slower on runs of kept tiles).
#
# 2-CTA clusters sharing K/V: two CTAs that walk the same key tiles of the same KV head run as a
# cluster; each CTA's producer loads half of every K and V tile and TMA-multicasts it to both, so
# each tile leaves L2 once per pair. Why: at high sparsity a skipped tile costs about half the
# compute of a kept one but the same 64 KiB of K+V, and the kernel becomes bound by the L2 -> SM
# port (ncu, H100, L=16k, ~85% skipped: lts2xbar 85% busy, 8.5 TB/s to the SMs). The pair is
#   cluster_m=2 (non-causal): q-tiles 2i, 2i+1 of one (batch, head); a q-tile past the sequence
#       end still runs (as padding: its rows vote skip, nothing is written) when its partner is
#       valid, so that both consume the same key tiles;
#   cluster_h=2 (causal too; needs Hq/Hk even, checked by the launcher): q-heads 2h, 2h+1 (one
#       KV head) at the same q-tile.
# Each full barrier expects the whole tile; each empty barrier collects the consumer warps of
# both CTAs (lanes 0 and 1 of a warp release the stage in CTA 0 and CTA 1); cluster barriers after
# the mbarrier init and before exit keep the peer's barriers alive. Skip decisions stay per CTA
# (same geometry and reference; outputs are bitwise those without a cluster). Measured (H100,
# H200; perf/results/prefill-h100-cluster.md): +3-8 % at >= 70 % skipped with L >= 16k, but
# 2-9 % slower dense and at short L (the pair runs in lock step). Since the skip build gates its
# V loads by the votes (v_load_skip, below), which measured as fast or faster at high sparsity,
# launch.CLUSTER_MODE "auto" picks a pair only for a skip build with v_load_skip turned off.
# A pair with v_load_skip=True shares only K; each CTA loads its own V, gated by its own votes
# (an option: +2-4 % at 16k/32k causal, 2-8 % slower elsewhere; prefill-h100-chain.md).
#
# v_load_skip (default for the 2-warpgroup skip build without a cluster): producer warp 1 issues
# the V loads, each only once the consumer warps' votes show that some warp keeps the tile (or at
# once after a tile the CTA kept); a tile all warps skipped never leaves L2 for V. See __init__.
# Idioms follow FlashAttention-4's SM90 forward (flash_attn/cute/flash_fwd_sm90.py) and CUTLASS's
# CuTe DSL Hopper FMHA example; the code here is written for blasst_cute.

import math
from typing import Optional

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
from cutlass import Boolean, Float32, Int32, const_expr
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait

from blasst_cute.kernels.common.layout import (
    acc_as_operand_a,
    acc_rows_cols,
    assume_rows_aligned,
    select_modes,
    smem_layout,
    transpose_mn,
)
from blasst_cute.kernels.common.masking import apply_mask
from blasst_cute.kernels.common.pipelines import (
    NamedBarrierSm90,
    compiler_barrier,
    elem_ptr,
    qk_pv_tiled_mmas,
    wgmma,
)
from blasst_cute.kernels.common.softmax_skip import (
    LOG2_E,
    OnlineSoftmax,
    convert_f32_to_16bit,
    group_all,
    all_published,
    group_all_published,
    group_flag_word,
    publish_warp_flag,
    rescale_rows,
    threshold_log2,
    warp_vote_all,
    warpgroup_vote_all,
)
from blasst_cute.kernels.common.tile_info import KeyTileRange, SeqInfo

FLT_MAX = 3.4028234663852886e38
# Stats builds count a warp's skipped softmaxes in the low 16 bits of its counter and its
# warpgroup's skipped PVs in the high 16 bits (the launcher bounds key tiles per q-tile below 2^16).
PV_SKIP_UNIT = 1 << 16
SUPPORTED_HEAD_DIMS = (64, 128, 256)  # with head_dim_v == head_dim
# (q/k head dim, v head dim) pairs: the MHA/GQA dims, and DeepSeek MLA prefill (128 nope + 64 rope
# q/k dims, 128 v dims).
SUPPORTED_HEAD_DIM_PAIRS = tuple((d, d) for d in SUPPORTED_HEAD_DIMS) + ((192, 128),)


def check_head_dims(head_dim: int, head_dim_v: int) -> None:
    if (head_dim, head_dim_v) not in SUPPORTED_HEAD_DIM_PAIRS:
        raise NotImplementedError(
            f"blasst sm90 prefill: head dims q/k={head_dim}, v={head_dim_v} "
            f"(supported: {', '.join(f'{d}/{dv}' for d, dv in SUPPORTED_HEAD_DIM_PAIRS)})"
        )


def default_tile_config(head_dim: int, causal: bool, head_dim_v: Optional[int] = None) -> dict:
    """Tile sizes per head dims (consumer warpgroups of 64 rows each: tile_m / 64).

    64/64: 192 x 128 with 3 consumer warpgroups, as FA3/FA4 pick: with 128-row tiles the
    MUFU-bound softmax of hdim 64 is not hidden behind the (short) GEMMs of one other warpgroup.

    192/128 (MLA prefill): 128 x 128 as FA3/FA4 pick for hdim <= 192 with hdim_v <= 128; the
    register budget is that of hdim 128 (O and P are sized by hdim_v and tile_n, Q stays in smem)
    and shared memory is Q 48 KiB + K 2 x 48 KiB + V 2 x 32 KiB = 208 KiB.
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    if head_dim <= 64:
        return dict(tile_m=192, tile_n=128, num_stages=2)
    if head_dim <= 128:
        return dict(tile_m=128, tile_n=128, num_stages=2)
    if head_dim <= 192:
        return dict(tile_m=128, tile_n=128 if head_dim_v <= 128 else 112, num_stages=2)
    return dict(tile_m=128, tile_n=80, num_stages=2)


class BlasstFwdSm90:
    """Static configuration of one compiled prefill kernel (see module comment).

    Dynamic (not part of the compiled code): batch, lengths, head counts (so MHA/GQA/MQA share a
    kernel), softmax scale and the BLASST threshold factor.
    """

    def __init__(
        self,
        dtype,
        head_dim: int,
        head_dim_v: Optional[int] = None,
        causal: bool = False,
        has_skip: bool = False,
        has_stats: bool = False,
        varlen: bool = False,
        factor_per_batch: bool = False,
        tile_m: Optional[int] = None,
        tile_n: Optional[int] = None,
        num_stages: Optional[int] = None,
        intra_wg_overlap: bool = True,
        pingpong: Optional[bool] = None,
        vote_smem: bool = True,
        lpt: Optional[bool] = None,
        debug_no_vote: bool = False,
        decision_rows: int = 16,
        debug_no_v_load: bool = False,
        pv_skip: bool = True,
        lpt_heads: Optional[int] = None,
        cluster_m: int = 1,
        cluster_h: int = 1,
        fast_vote: bool = True,
        late_v_wait: bool = True,
        v_load_skip: Optional[bool] = None,
        v_warp: Optional[bool] = None,
        lazy_p_zero: bool = False,
        defer_v_release: Optional[bool] = None,
        qk_lookahead: bool = False,
        lookahead_after_skips: Optional[int] = None,
        rescale_o_before_pv: Optional[bool] = None,
        vote_thread_max=None,
        flag_addr_before_sync: Optional[bool] = None,
        keep_first: Optional[bool] = None,
        thr_add_only: Optional[bool] = None,
    ):
        head_dim_v = head_dim if head_dim_v is None else head_dim_v
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise NotImplementedError(f"blasst sm90 prefill: dtype {dtype} (bf16/fp16 only)")
        check_head_dims(head_dim, head_dim_v)
        if has_stats and not has_skip:
            raise NotImplementedError("blasst sm90 prefill: stats without skipping")
        cfg = default_tile_config(head_dim, causal, head_dim_v)
        self.dtype = dtype
        self.head_dim = head_dim
        self.head_dim_v = head_dim_v
        self.causal = causal
        self.has_skip = has_skip
        self.has_stats = has_stats
        self.varlen = varlen
        self.factor_per_batch = factor_per_batch
        self.tile_m = tile_m or cfg["tile_m"]
        self.tile_n = tile_n or cfg["tile_n"]
        self.num_stages = num_stages or cfg["num_stages"]
        if self.tile_m not in (128, 192):
            raise NotImplementedError(
                f"blasst sm90 prefill: tile_m {self.tile_m} (128 or 192: 2 or 3 64-row warpgroups)")
        if self.tile_m == 192 and max(head_dim, head_dim_v) > 64:
            # 3 consumer warpgroups get 160 registers each: O, S and P of hdim <= 64 only.
            raise NotImplementedError(
                f"blasst sm90 prefill: tile_m 192 needs head dims <= 64 (got {head_dim}/{head_dim_v})")
        self.intra_wg_overlap = intra_wg_overlap
        # Rows per BLASST decision: 16 (default) = one warp of an m64 accumulator decides alone
        # (warp vote, no cross-warp sync) for its softmax; the warpgroup's PV wgmma is skipped when
        # its 4 warps all skipped, read from smem flags behind the next ping-pong barrier.
        # 64 = the older per-warpgroup decision (warp vote + smem + named barrier every tile).
        if decision_rows not in (16, 64):
            raise NotImplementedError("blasst sm90 prefill: decision_rows must be 16 or 64")
        self.decision_rows = decision_rows
        # 64-row decision channel: warp vote + smem word per warp + named barrier (default), or a
        # single bar.red.and.pred.
        self.vote_smem = vote_smem
        # Profiling aid only (wrong results when a tile would be skipped): keep the skip-path code
        # but replace the cross-warp vote by a uniform, never-true runtime flag.
        self.debug_no_vote = debug_no_vote
        # Profiling aid only (wrong results): V tiles are never loaded (their barriers complete
        # with 0 bytes), to measure how much of the time is the V traffic.
        self.debug_no_v_load = debug_no_v_load
        # Skip the PV wgmma of tiles all 4 warps of a warpgroup skipped (False: always issue it;
        # skipping warps' zero P rows add nothing). For measurements.
        self.pv_skip = pv_skip and has_skip
        # 16-row decisions only: each row keeps a raw-score threshold m_run + log2(lambda) /
        # scale_log2, refreshed when m_run changes (kept tiles, in the exp2 block), so the vote
        # is one compare per row after the tile row max (with padding rows, rows that saw no key
        # and skipping off folded into the threshold's floor) instead of sub / mul / compare /
        # three ORs; the tile-parity slots use `& 1`. Same rule up to fp32 rounding of the
        # threshold (rare borderline flips, as against the float64 reference anyway).
        self.fast_vote = fast_vote and has_skip and decision_rows == 16 and not debug_no_vote
        # vote_thread_max (fast_vote): each thread compares the max of its own columns of a row
        # with the row's threshold and the warp vote ANDs them; the row max is one of the 4
        # compared, so the decision is the same (same bits, tested). The row max (2 shuffle
        # rounds) is then reduced inside the keep block, after the branch, so the vote and a
        # skipping warp no longer wait for it. True: in both schedules; "lookahead": in the
        # look-ahead schedule only (after lookahead_after_skips skipped tiles, or qk_lookahead);
        # "overlap": "lookahead", and in the default schedule the vote on the thread maxima
        # while the row max's shuffles still run before the branch (the vote and the shuffles
        # overlap instead of following each other); False: never. Default (None): True for
        # head dims 64 and 256, "overlap" for 128, "lookahead" otherwise (MLA's 192/128, which
        # has no look-ahead schedule: the same as False).
        # H100, 32/8, B*L = 32k (perf/results/prefill-h100-vote-thread-max.md): hdim 128, both
        # schedules: +2-7 % at 53-98 % skipped, ~1 % slower at 0 % (the keep block's exp2s
        # start later); look-ahead schedule only: +0-7 % (mostly 3-4 %) at 71-98 % skipped from
        # 16k keys up (where it runs; shorter keys are unchanged), no cost at 0 %. Hdim 256 / 64,
        # both schedules: +1-7 % at 59-97 % skipped, at 0 % within the noise. "overlap" against
        # "lookahead", ncu cycles at locked clocks (prefill-h100-skip-cost-ncu.md): hdim 128
        # -0.2 to -1.1 % at 0 % skipped, -0.25 to 0 % at 53-85 %; at hdim 64 / 256 -1.4 / -1.0 %
        # at 0 % but +0.4 / -0.3 % at 67-68 % against True, whose skipped tiles run no shuffle.
        if vote_thread_max is None:
            vote_thread_max = True if head_dim in (64, 256) else (
                "overlap" if head_dim == 128 else "lookahead")
        if vote_thread_max not in (True, False, "lookahead", "overlap"):
            raise NotImplementedError(
                f"blasst sm90 prefill: vote_thread_max {vote_thread_max!r} (True, False, "
                "'lookahead' or 'overlap')")
        self.vote_thread_max = vote_thread_max is True and self.fast_vote
        self.vote_overlap = vote_thread_max == "overlap" and self.fast_vote
        self.vote_thread_max_lookahead = bool(vote_thread_max) and self.fast_vote
        # When a warpgroup skips the PV of a tile it does not need V there, only to know the stage
        # landed before releasing it: wait for it after passing the ping-pong token (and the QK
        # wait), not before, so that a late V does not hold back the other warpgroup's GEMMs.
        self.late_v_wait = late_v_wait and self.pv_skip
        # V loads gated by the skip decisions (one CTA; pv_skip): producer warp 1 issues the V
        # tiles, warp 0 Q and K. V of tile j is loaded at once if the CTA kept the previous tile
        # (j + 1; runs of kept tiles load as before), else only once the consumer warps' votes on
        # tile j (their published flags, counted by a decision mbarrier per flag slot) show a warp
        # that keeps it; a tile every warp skipped completes its V stage with a plain arrive and
        # no bytes. Why: at high sparsity a skipped tile costs the same 64 KiB of K+V from L2 as a
        # kept one and the kernel is bound by the L2 -> SM port (ncu); a debug build that loads
        # no V at all was 7-9 % faster there. The cost: a kept tile after a skipped one waits for
        # its V (about one L2 round trip). Default (None): on for the skip build of 2 consumer
        # warpgroups without a cluster (H100, perf/results/prefill-h100-vskip.md: hdim 128 up to
        # +10 % at 85-98 % skipped, a few % either way below ~80 %; hdim 256 +3-10 %; as fast
        # as the K/V-sharing head pairs or faster), off for hdim 64's 3 warpgroups (the V of a
        # tile waits for the last of 3 votes; -4 to +3 % there).
        # With a 2-CTA cluster the K tiles stay shared (multicast) and each CTA loads its own V
        # tiles (CTA-local V ring), gated by its own votes.
        if v_load_skip is None:
            v_load_skip = has_skip and pv_skip and cluster_m * cluster_h == 1 and self.tile_m == 128
        if v_load_skip and not (has_skip and pv_skip):
            raise NotImplementedError("blasst sm90 prefill: v_load_skip needs the skip build with pv_skip")
        self.v_load_skip = v_load_skip and not debug_no_v_load
        # V tiles issued by producer warp 1 (warp 0: Q and K), so that neither stream waits for
        # the other's stages; implied by v_load_skip. On its own (every V loaded): default (None)
        # for hdim_v > 128 without a cluster (H100, hdim 256 dense: +0.3 to +5.2 % in 12 of 12
        # shape-runs, prefill-h100-d256-vwarp.md), off elsewhere (hdim 128 dense: 0.96-1.02x,
        # prefill-h100-vskip.md run 5, and 0.99-1.01x in the d256-vwarp run 2). In a cluster, V
        # from warp 1 is not multicast.
        if v_warp is None:
            v_warp = head_dim_v > 128 and cluster_m * cluster_h == 1
        if v_warp and not self.v_load_skip and cluster_m * cluster_h > 1:
            raise NotImplementedError("blasst sm90 prefill: v_warp with a 2-CTA cluster")
        self.v_warp = (v_warp or self.v_load_skip) and not debug_no_v_load
        # In a run of skipped tiles each warpgroup's time per tile is a serial chain: its QK,
        # then the row max, the vote, the skip path, and the waits at the top of the next
        # iteration, before its next QK can issue; the other warpgroup's QK covers only part of
        # it (ncu, perf/results/prefill-h100-chain.md). Two ways to shorten it:
        # lazy_p_zero: a warp that skips a tile leaves its P rows stale and zeroes them only when
        # its warpgroup's PV of that tile runs anyway (some other warp kept it). Option, off:
        # ptxas predicates that fill, so every kept PV pays 32 SELs in the ping-pong window
        # (1-6 % slower at 0 % skipped).
        self.lazy_p_zero = lazy_p_zero and self.pv_skip
        # defer_v_release (v_load_skip): the V stage of a skipped PV is waited for and released
        # one iteration later, after the next QK issued and the token passed, rather than at the
        # end of the iteration. Default: on for causal, whose skipped runs are long (H100, d128:
        # +1-4 % at 81-98 % skipped, near the noise; 0 % within +-4 %), off otherwise
        # (non-causal -3 to +2 %); perf/results/prefill-h100-chain.md.
        if defer_v_release is None:
            defer_v_release = causal and self.v_load_skip and not qk_lookahead
        if defer_v_release and not self.v_load_skip:
            raise NotImplementedError("blasst sm90 prefill: defer_v_release needs v_load_skip")
        self.defer_v_release = defer_v_release
        # Causal: longest-first q-tiles, heads grouped so their K/V fit in L2 (FA4-style LPT).
        self.lpt = (causal and not varlen) if lpt is None else (lpt and not varlen)
        # (head, batch) pairs per LPT section; None: as many as have K/V fitting in L2.
        self.lpt_heads = lpt_heads
        # CTAs sharing K/V by TMA multicast: consecutive q-tiles of one (batch, head)
        # (cluster_m) or consecutive q-heads of one KV head at one q-tile (cluster_h).
        if cluster_m not in (1, 2) or cluster_h not in (1, 2) or cluster_m * cluster_h > 2:
            raise NotImplementedError(
                f"blasst sm90 prefill: cluster_m {cluster_m}, cluster_h {cluster_h} (one of them "
                "may be 2)")
        if cluster_m > 1 and causal:
            raise NotImplementedError(
                "blasst sm90 prefill: cluster_m=2 needs non-causal attention (the pair of q-tiles "
                "must visit the same key tiles); cluster_h=2 pairs q-heads instead")
        if cluster_m > 1 and self.lpt:
            raise NotImplementedError("blasst sm90 prefill: cluster_m=2 with the LPT schedule")
        if cluster_h > 1 and self.lpt and lpt_heads is not None and lpt_heads % cluster_h:
            raise NotImplementedError("blasst sm90 prefill: cluster_h=2 needs an even lpt_heads")
        self.cluster_m = cluster_m
        self.cluster_h = cluster_h
        self.cluster_size = cluster_m * cluster_h
        # V tiles shared by TMA multicast like K (else each CTA of a cluster loads its own)
        self.v_multicast = self.cluster_size > 1 and not self.v_warp
        self.num_mma_wg = self.tile_m // 64
        self.rows_per_decision = decision_rows
        # qk_lookahead: a warpgroup issues the QK of its next key tile as soon as the current
        # tile's S is complete, before that tile's row max, vote and softmax (two S
        # accumulators take turns; P overlays the current one as it is converted), then the
        # tile's PV, and waits for both at the end of the tile. Why: in a run of skipped tiles
        # the default schedule makes each warpgroup's next QK wait for its whole vote chain
        # (prefill-h100-chain.md: ~900 clocks against a 512-clock QK); here the vote of tile j
        # runs while the QK of tile j - 1 is on the tensor pipe. Same math in the same order:
        # outputs, lse and counters are bitwise those of the default schedule. The PV skip is
        # one bar.red.and over the warpgroup's warp decisions; no ping-pong token. For the whole
        # q-tile an option, off (H100, d128: +4-8 % at 85-98 % skipped, but 0.83-0.91x at 0 %,
        # where each kept tile waits for its own PV; prefill-h100-lookahead.md); the default
        # skip build switches to it after a run of skipped tiles (lookahead_after_skips).
        if qk_lookahead:
            if self.num_mma_wg != 2 or self.cluster_size > 1:
                raise NotImplementedError(
                    "blasst sm90 prefill: qk_lookahead needs 2 consumer warpgroups and no cluster")
            if has_skip and decision_rows != 16:
                raise NotImplementedError(
                    "blasst sm90 prefill: qk_lookahead with skipping needs 16-row decisions")
            if self.lazy_p_zero or self.defer_v_release or debug_no_vote or debug_no_v_load:
                raise NotImplementedError(
                    "blasst sm90 prefill: qk_lookahead with lazy_p_zero, defer_v_release or a "
                    "debug knob")
            if pingpong:
                # measured: a token around each warpgroup's PV + wait + next QK made the dense
                # case 0.72-0.75x and did not help the sparse one (prefill-h100-lookahead.md)
                raise NotImplementedError("blasst sm90 prefill: qk_lookahead has no ping-pong")
            pingpong = False
        self.qk_lookahead = qk_lookahead
        # lookahead_after_skips = k > 0 (skip build): the default schedule until this warpgroup
        # has skipped the PVs of k tiles in a row, then the qk_lookahead schedule for the rest
        # of the q-tile (switched where no GEMM is in flight; the ping-pong token keeps passing
        # once per tile, as the other warpgroup may not have switched). Why: qk_lookahead is
        # faster in runs of skipped tiles and slower on kept ones, and at 0 % sparsity nothing
        # switches. Same bits as the default schedule. (The dense build never skips, so never
        # switches.) Default (None): 4 for the hdim 128 skip build of one CTA with 128 x 128
        # tiles, 0 otherwise (not measured). H100, d128, B*L = 32k: 0-8 % faster at 71-98 %
        # skipped from L = 16k up, the same speed at 0 %, up to 6 % slower at L = 4k, so the
        # launcher sets 0 for shorter keys (launch.prefill_lookahead); prefill-h100-lookahead.md.
        if lookahead_after_skips is None:
            lookahead_after_skips = 4 if (
                has_skip and self.pv_skip and not qk_lookahead and head_dim == 128
                and head_dim_v == 128 and self.tile_n == 128 and self.num_mma_wg == 2
                and cluster_m * cluster_h == 1
                and decision_rows == 16 and not (debug_no_vote or debug_no_v_load)) else 0
        lookahead_after_skips = int(lookahead_after_skips) if has_skip else 0
        if lookahead_after_skips < 0:
            raise NotImplementedError(
                f"blasst sm90 prefill: lookahead_after_skips {lookahead_after_skips} (>= 0)")
        if lookahead_after_skips:
            if qk_lookahead:
                raise NotImplementedError(
                    "blasst sm90 prefill: lookahead_after_skips or qk_lookahead, not both")
            if self.num_mma_wg != 2 or self.cluster_size > 1:
                raise NotImplementedError(
                    "blasst sm90 prefill: lookahead_after_skips needs 2 consumer warpgroups and "
                    "no cluster")
            if not (self.pv_skip and decision_rows == 16) or debug_no_vote or debug_no_v_load:
                raise NotImplementedError(
                    "blasst sm90 prefill: lookahead_after_skips needs pv_skip, 16-row decisions "
                    "and no debug knob")
        self.lookahead_after_skips = lookahead_after_skips
        # flag_addr_before_sync (default schedule, pv_skip): the address of the warpgroup's PV
        # flag word is formed before the ping-pong barrier, its load stays after it. Only
        # ptxas's schedule of the QK issue changes. ncu cycles at locked clocks, 0 % skipped
        # (prefill-h100-skip-cost-ncu.md, section 5): hdim 128 16k non-causal -0.85 % (H100 and
        # H200, three runs), causal -0.1 %; hdim 64 +0.4 % (two runs), hdim 256 +0.05 %. Default:
        # hdim 128 only.
        if flag_addr_before_sync is None:
            flag_addr_before_sync = head_dim == 128
        self.flag_addr_before_sync = bool(flag_addr_before_sync) and self.pv_skip
        # keep_first (skip builds): the vote branch's "then" side is the keep block, so ptxas lays
        # the keep path out as the fall-through and drops the BSSY/BSYNC reconvergence region
        # around the softmax (SASS); the same instructions and bits. ncu cycles at locked clocks,
        # H100, 0 % skipped, against dense (prefill-h100-skip-cost-ncu.md, section 8): hdim 128
        # 16k non-causal 1.044 instead of 1.051-1.053 (three runs), causal 1.035 instead of
        # 1.040, 4k 1.022 instead of 1.027; 71 % skipped -0.2 %. Hdim 64 +0.1 % (70 %: -0.8 %),
        # hdim 256 +1.1 % (69 %: +0.5 %). Default (None): hdim 128/128 only.
        if keep_first is None:
            keep_first = (head_dim, head_dim_v) == (128, 128)
        self.keep_first = bool(keep_first)
        # Keep-path trims (prefill-h100-skip-cost-ncu.md, sections 10-13). ncu cycles at
        # locked clocks, H100, hdim 128, 0 % skipped, against the build without them:
        # - thr_add_only (fast_vote): row r skips iff m_tile <= m_run + margin_r, margin_r =
        #   log2(lambda) / scale_log2 on valid rows, +inf on padding rows, NaN with skipping
        #   off (never true); a row that saw no key (m_run = -inf) votes skip only while it sees
        #   none (-inf <= -inf). The threshold is one FADD per row instead of FADD + FMNMX with
        #   a floor (<= instead of <: a flip only at exact equality). 16k non-causal -0.26 /
        #   -0.28 % (two sessions), causal -1.0 %; 71 / 70 % skipped +0.16 / -0.26 %; 4k
        #   causal -0.4 % (73 % skipped: -0.65 %); 4k non-causal (no look-ahead switch) +1 %
        #   (there ptxas keeps the tile index, pipeline phase and flag address in vector, not
        #   uniform, registers; SASS). Default (None): on in the hdim-128 builds with the
        #   look-ahead switch (keys from 16k) and the causal hdim-128 builds; off elsewhere
        #   (other head dims not measured).
        # Tried and removed: the flag byte and decision-mbarrier addresses formed in uniform
        # registers before the lane test (4 fewer keep-path instructions), and "the previous PV
        # ran" with the signalling lane as one predicate (2 fewer). Alone +0.8 % and +0.2 % of
        # dense's cycles at 16k; with thr_add_only -0.6 % at 0 % but +0.6-1.4 % at 70-71 %
        # skipped and +1.9 % at 4k (sections 10-12). Also a warp that kept the tile issuing the
        # PV without loading the flag word, +0.4-0.8 %: ptxas predicated the load and hoisted
        # its R2UR into the QK issue.
        if thr_add_only is None:
            thr_add_only = self.lookahead_after_skips > 0 or (
                causal and (head_dim, head_dim_v) == (128, 128))
        self.thr_add_only = bool(thr_add_only) and self.fast_vote
        self.pingpong = (head_dim <= 128 and intra_wg_overlap) if pingpong is None else pingpong
        # rescale_o_before_pv (default schedule): the O rescale of a kept tile waits in a
        # register per row and is applied at the next iteration, while that iteration's QK is on
        # the tensor pipe, just before the PV it must precede (rows that skipped the tile keep
        # scale 1; a PV every warp skipped needs none), instead of after the tile's last wait,
        # where it delays the next QK (FA4 does so for hdim_v > 128). Same arithmetic in the
        # same order: same bits. Default (None): on for 192/128 (MLA), where the QK is 1.5x
        # the PV and the rescale sat in its way: H100, 32 heads, B*L = 32k, two runs of 10-16
        # rounds (mla-prefill-h100-s30.md): causal dense +7-14 % (0.98-1.02x FA4 instead of
        # 0.85-0.92x), the skip build at 0 % +2-4 %, 48-94 % skipped +0-4 %; non-causal dense
        # within +-1.5 %. Off elsewhere: H100, hdim 256, two runs of 6-8 rounds
        # (prefill-h100-d256-vwarp.md): dense -2 to +3 % (noise), the skip build at 0 % -6 to
        # 0 %, never a gain; no gain at hdim 128 either.
        if rescale_o_before_pv is None:
            rescale_o_before_pv = (head_dim, self.head_dim_v) == (192, 128) and not qk_lookahead
        self.rescale_o_before_pv = bool(rescale_o_before_pv)
        self.num_threads = 128 * (self.num_mma_wg + 1)
        self.num_mma_threads = 128 * self.num_mma_wg
        # 64K registers per SM: 2 consumer warpgroups at 240 + producer at 24, or 3 at 160 + 32.
        self.num_mma_regs, self.num_producer_regs = (240, 24) if self.num_mma_wg == 2 else (160, 32)

    # ------------------------------------------------------------------ host-side derivations
    def _smem_layout(self, rows: int, cols: int, stages: Optional[int] = None):
        return smem_layout(self.dtype, rows, cols, stages)

    def _tiled_mmas(self):
        return qk_pv_tiled_mmas(self.dtype, (self.num_mma_wg, 1, 1), (64, self.tile_n),
                                (64, self.head_dim_v), pv_a_source=warpgroup.OperandSource.RMEM)

    def _gmem_copy_O(self):
        vec = 128 // self.dtype.width
        threads_per_row = self.head_dim_v // vec
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=128)
        thr = cute.make_ordered_layout(
            (self.num_mma_threads // threads_per_row, threads_per_row), order=(1, 0)
        )
        val = cute.make_layout((1, vec))
        return cute.make_tiled_copy_tv(atom, thr, val)

    def _launch_cluster(self):
        if self.cluster_size == 1:
            return None
        if self.cluster_h > 1 and not self.lpt:
            return [1, self.cluster_h, 1]  # grid (q-tile, head, batch): pairs of heads
        return [self.cluster_size, 1, 1]  # pairs of q-tiles, or LPT's 1-D grid (heads fastest)

    # ------------------------------------------------------------------ host launch
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (b, s_q, h, d) or varlen (total_q, h, d)
        mK: cute.Tensor,  # (b, s_k, h_k, d) or varlen (total_k, h_k, d)
        mV: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,  # float32 (b, h, s_q) or varlen (h, total_q)
        softmax_scale: Float32,
        threshold_scale_factor: Float32,
        mFactor: Optional[cute.Tensor],  # float32 (b,) per-sequence factor, or None
        mCuSeqlensQ: Optional[cute.Tensor],
        mCuSeqlensK: Optional[cute.Tensor],
        max_seqlen_q: Int32,
        mVisited: Optional[cute.Tensor],  # int32 (b, h) or None
        mSkipped: Optional[cute.Tensor],
        mPvCounts: Optional[cute.Tensor],  # int32 (2, b, h): PVs issued + skipped, or None
        stream: cuda.CUstream,
    ):
        for t in (mQ, mK, mV, mO):
            if const_expr(t.element_type != self.dtype):
                raise TypeError(f"expected {self.dtype}, got {t.element_type}")
        if const_expr(mLSE.element_type != Float32):
            raise TypeError("lse must be float32")
        # Rows of Q/K/V/O are 16-byte aligned (checked by the caller): tell the compiler.
        mQ, mK, mV, mO = [assume_rows_aligned(t) for t in (mQ, mK, mV, mO)]
        # CuTe mode order: (seqlen, d, h[, b]); the head dim is contiguous.
        if const_expr(self.varlen):
            mQ, mK, mV, mO = [select_modes(t, [0, 2, 1]) for t in (mQ, mK, mV, mO)]
            mLSE = select_modes(mLSE, [1, 0])
        else:
            mQ, mK, mV, mO = [select_modes(t, [1, 3, 2, 0]) for t in (mQ, mK, mV, mO)]
            mLSE = select_modes(mLSE, [2, 1, 0])

        tiled_mma_qk, tiled_mma_pv = self._tiled_mmas()
        sQ_layout = self._smem_layout(self.tile_m, self.head_dim)
        sK_layout = self._smem_layout(self.tile_n, self.head_dim, self.num_stages)
        sV_layout = self._smem_layout(self.tile_n, self.head_dim_v, self.num_stages)
        sO_layout = self._smem_layout(self.tile_m, self.head_dim_v)

        load_op = cpasync.CopyBulkTensorTileG2SOp()
        tma_atom_Q, tma_Q = cpasync.make_tiled_tma_atom(
            load_op, mQ, sQ_layout, (self.tile_m, self.head_dim)
        )
        # K/V: with a cluster, each CTA copies 1/cluster_size of a tile and multicasts it.
        kv_load_op = load_op
        if const_expr(self.cluster_size > 1):
            kv_load_op = cpasync.CopyBulkTensorTileG2SMulticastOp()
        tma_atom_K, tma_K = cpasync.make_tiled_tma_atom(
            kv_load_op, mK, cute.select(sK_layout, mode=[0, 1]), (self.tile_n, self.head_dim),
            self.cluster_size,
        )
        tma_atom_V, tma_V = cpasync.make_tiled_tma_atom(
            kv_load_op if const_expr(self.v_multicast) else load_op, mV,
            cute.select(sV_layout, mode=[0, 1]), (self.tile_n, self.head_dim_v),
            self.cluster_size if const_expr(self.v_multicast) else 1,
        )
        self.tx_bytes_Q = cute.size_in_bytes(self.dtype, sQ_layout)
        self.tx_bytes_K = cute.size_in_bytes(self.dtype, cute.select(sK_layout, mode=[0, 1]))
        self.tx_bytes_V = cute.size_in_bytes(self.dtype, cute.select(sV_layout, mode=[0, 1]))
        if const_expr(self.debug_no_v_load):
            self.tx_bytes_V = 0

        @cute.struct
        class SharedStorage:
            mbar_Q: cute.struct.MemRange[cutlass.Int64, 2]
            mbar_K: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            mbar_V: cute.struct.MemRange[cutlass.Int64, 2 * self.num_stages]
            # v_load_skip: consumer warps -> V producer, one per flag slot (tile parity)
            mbar_decision: cute.struct.MemRange[cutlass.Int64, 2]
            votes: cute.struct.MemRange[Int32, 2 * self.num_mma_wg * 4]
            flags: cute.struct.Align[cute.struct.MemRange[cutlass.Int8, 2 * self.num_mma_wg * 4], 16]
            sQ: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sQ_layout)], 1024]
            sK: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sK_layout)], 1024]
            sV: cute.struct.Align[cute.struct.MemRange[self.dtype, cute.cosize(sV_layout)], 1024]

        self.shared_storage = SharedStorage

        if const_expr(self.varlen):
            num_batch = mCuSeqlensQ.shape[0] - 1
            num_m_blocks = (max_seqlen_q + self.tile_m - 1) // self.tile_m
        else:
            num_batch = mQ.shape[3]
            num_m_blocks = (mQ.shape[0] + self.tile_m - 1) // self.tile_m
        num_heads = mQ.shape[2]
        qhead_per_kvhead = mQ.shape[2] // mK.shape[2]
        scale_log2 = softmax_scale * LOG2_E
        grid = [num_m_blocks, num_heads, num_batch]
        l2_heads = Int32(1)
        if const_expr(self.lpt):
            # As many heads per section as have K/V fitting in ~50 MB of L2 (a power of two).
            kv_bytes = mK.shape[0] * (self.head_dim + self.head_dim_v) * (self.dtype.width // 8)
            fit = cutlass.max(Int32(50 * 1024 * 1024) // cutlass.max(kv_bytes, 1), 1)
            if const_expr(self.lpt_heads is not None):
                l2_heads = Int32(self.lpt_heads)
            else:
                while l2_heads * 2 <= fit:
                    l2_heads = l2_heads * 2
                if const_expr(self.cluster_h > 1):
                    # the head pairs of the clusters stay inside one section
                    l2_heads = cutlass.max(l2_heads, Int32(self.cluster_h))
            grid = [num_m_blocks * num_heads * num_batch, 1, 1]
        if const_expr(self.cluster_m > 1):
            # whole clusters along the q-tiles (an odd last q-tile gets a padding partner)
            grid[0] = (num_m_blocks + self.cluster_m - 1) // self.cluster_m * self.cluster_m

        self.kernel(
            tma_Q, tma_K, tma_V, mO, mLSE,
            tma_atom_Q, tma_atom_K, tma_atom_V,
            scale_log2, threshold_scale_factor, mFactor,
            mCuSeqlensQ, mCuSeqlensK, mVisited, mSkipped, mPvCounts,
            qhead_per_kvhead, num_m_blocks, num_heads, num_batch, l2_heads,
            sQ_layout, sK_layout, sV_layout, sO_layout,
            tiled_mma_qk, tiled_mma_pv, self._gmem_copy_O(),
        ).launch(
            grid=grid,
            block=[self.num_threads, 1, 1],
            cluster=self._launch_cluster(),
            stream=stream,
            min_blocks_per_mp=1,
        )

    # ------------------------------------------------------------------ device entry
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mO: cute.Tensor,
        mLSE: cute.Tensor,
        tma_atom_Q: cute.CopyAtom,
        tma_atom_K: cute.CopyAtom,
        tma_atom_V: cute.CopyAtom,
        scale_log2: Float32,
        threshold_scale_factor: Float32,
        mFactor: Optional[cute.Tensor],
        mCuSeqlensQ: Optional[cute.Tensor],
        mCuSeqlensK: Optional[cute.Tensor],
        mVisited: Optional[cute.Tensor],
        mSkipped: Optional[cute.Tensor],
        mPvCounts: Optional[cute.Tensor],
        qhead_per_kvhead: Int32,
        num_m_blocks: Int32,
        num_heads: Int32,
        num_batch: Int32,
        l2_heads: Int32,
        sQ_layout: cute.ComposedLayout,
        sK_layout: cute.ComposedLayout,
        sV_layout: cute.ComposedLayout,
        sO_layout: cute.ComposedLayout,
        tiled_mma_qk: cute.TiledMma,
        tiled_mma_pv: cute.TiledMma,
        gmem_copy_O: cute.TiledCopy,
    ):
        warp_idx = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        tidx, _, _ = cute.arch.thread_idx()
        bidx, head_idx, batch_idx = cute.arch.block_idx()
        m_block = bidx
        if const_expr(self.lpt):
            # Sections of `l2_heads` (head, batch) pairs; inside one, q-tiles longest first with
            # the heads of the section side by side (they share K/V through L2).
            num_hb = num_heads * num_batch
            sec_size = l2_heads * num_m_blocks
            sec = bidx // sec_size
            r = bidx - sec * sec_size
            heads_here = cutlass.min(l2_heads, num_hb - sec * l2_heads)
            m_idx = r // heads_here
            hb = sec * l2_heads + (r - m_idx * heads_here)
            m_block = num_m_blocks - 1 - m_idx
            batch_idx = hb // num_heads
            head_idx = hb - batch_idx * num_heads
        elif const_expr(self.causal):
            # Heaviest q-tiles (bottom of the matrix) first.
            m_block = num_m_blocks - 1 - bidx

        # Rank in the cluster: q-tile 2i + rank (cluster_m; the grid's q-tile index is fastest)
        # or q-head 2h + rank (cluster_h; cluster along the grid's heads, or LPT's 1-D order
        # with the heads of a section fastest).
        cta_rank = Int32(0)
        if const_expr(self.cluster_size > 1):
            cta_rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())

        if warp_idx == 0:
            for atom in (tma_atom_Q, tma_atom_K, tma_atom_V):
                cpasync.prefetch_descriptor(atom)

        smem = cutlass.utils.SmemAllocator()
        storage = smem.allocate(self.shared_storage)

        tma_warp = pipeline.CooperativeGroup(pipeline.Agent.Thread, 1)
        # TMA pipelines release from one lane per consumer warp.
        mma_warps = pipeline.CooperativeGroup(pipeline.Agent.Thread, self.num_mma_threads // 32)
        # K/V stages are written by the producers of every CTA of the cluster: lane r of each
        # consumer warp releases the stage to CTA r, so an empty barrier counts the consumer
        # warps of all CTAs.
        kv_cluster = cute.make_layout((1, self.cluster_size, 1, 1))
        mma_warps_kv = pipeline.CooperativeGroup(
            pipeline.Agent.Thread, self.num_mma_threads // 32 * self.cluster_size
        )
        pipeline_q = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_Q.data_ptr(), num_stages=1,
            producer_group=tma_warp, consumer_group=mma_warps,
            tx_count=self.tx_bytes_Q, defer_sync=True,
        )
        pipeline_k = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_K.data_ptr(), num_stages=self.num_stages,
            producer_group=tma_warp, consumer_group=mma_warps_kv,
            tx_count=self.tx_bytes_K, cta_layout_vmnk=kv_cluster, defer_sync=True,
        )
        pipeline_v = pipeline.PipelineTmaAsync.create(
            barrier_storage=storage.mbar_V.data_ptr(), num_stages=self.num_stages,
            producer_group=tma_warp,
            consumer_group=mma_warps_kv if const_expr(self.v_multicast) else mma_warps,
            tx_count=self.tx_bytes_V,
            cta_layout_vmnk=kv_cluster if const_expr(self.v_multicast) else None, defer_sync=True,
        )
        mbar_decision = storage.mbar_decision.data_ptr()
        if const_expr(self.v_load_skip):
            if warp_idx == 0:
                with cute.arch.elect_one():
                    for slot in cutlass.range_constexpr(2):
                        cute.arch.mbarrier_init(mbar_decision + slot, self.num_mma_threads // 32)
        # (with a cluster: the mbarrier init is visible to the peer before its multicasts and
        # remote arrivals)
        pipeline_init_arrive(cluster_shape_mn=(self.cluster_size, 1), is_relaxed=True)

        sQ = storage.sQ.get_tensor(sQ_layout.outer, swizzle=sQ_layout.inner)
        sK = storage.sK.get_tensor(sK_layout.outer, swizzle=sK_layout.inner)
        sV = storage.sV.get_tensor(sV_layout.outer, swizzle=sV_layout.inner)
        sVt = transpose_mn(sV)  # (d_v, tile_n, stages): B operand of O += P V
        sO = storage.sQ.get_tensor(sO_layout.outer, swizzle=sO_layout.inner)  # reuses Q's buffer
        sVote = storage.votes.get_tensor(cute.make_layout((2, self.num_mma_wg, 4)))
        # Per-warp skip flags, one byte each: (warp_in_group, group, slot = tile parity).
        sFlags = storage.flags.get_tensor(cute.make_layout((4, self.num_mma_wg, 2)))

        seq = SeqInfo(batch_idx, mQ.shape[0], mK.shape[0], mCuSeqlensQ, mCuSeqlensK)
        n_block_min, n_block_max, n_block_causal = KeyTileRange(
            self.tile_m, self.tile_n, self.causal
        ).get(seq, m_block)

        pipeline_init_wait(cluster_shape_mn=(self.cluster_size, 1))

        # With a q-tile pair, a q-tile past the end of the sequence still runs (as padding: its
        # rows vote skip, nothing is written) when the pair's first q-tile is valid, since the
        # pair shares the K/V ring; pairs with no valid q-tile exit together. (Head pairs share
        # the q-tile.)
        pair_m_block = m_block
        if const_expr(self.cluster_m > 1):
            pair_m_block = m_block - cta_rank
        tile_valid = pair_m_block * self.tile_m < seq.seqlen_q
        if tile_valid:
            if warp_idx < 4:
                cute.arch.setmaxregister_decrease(self.num_producer_regs)
                if warp_idx == 0:
                    self.load(
                        mQ, mK, mV, sQ, sK, sV, tma_atom_Q, tma_atom_K, tma_atom_V,
                        pipeline_q, pipeline_k, pipeline_v, seq,
                        m_block, head_idx // qhead_per_kvhead, head_idx, batch_idx,
                        n_block_min, n_block_max, cta_rank,
                    )
                if const_expr(self.v_warp):
                    if warp_idx == 1:
                        self.load_v(
                            mV, sV, tma_atom_V, pipeline_v, sFlags, mbar_decision, seq,
                            head_idx // qhead_per_kvhead, batch_idx, n_block_min, n_block_max,
                        )
            else:
                cute.arch.setmaxregister_increase(self.num_mma_regs)
                self.mma(
                    mO, mLSE, sQ, sK, sVt, sO, sVote, sFlags, mbar_decision,
                    tiled_mma_qk, tiled_mma_pv, gmem_copy_O,
                    pipeline_q, pipeline_k, pipeline_v,
                    tidx - 128, seq, m_block, head_idx, batch_idx,
                    n_block_min, n_block_max, n_block_causal,
                    scale_log2, threshold_scale_factor, mFactor, mVisited, mSkipped, mPvCounts,
                )
        if const_expr(self.cluster_size > 1):
            # No CTA exits while its peer may still multicast into it or arrive on its barriers.
            cute.arch.cluster_arrive()
            cute.arch.cluster_wait()

    # ------------------------------------------------------------------ producer
    @cute.jit
    def load(
        self,
        mQ: cute.Tensor, mK: cute.Tensor, mV: cute.Tensor,
        sQ: cute.Tensor, sK: cute.Tensor, sV: cute.Tensor,
        tma_atom_Q: cute.CopyAtom, tma_atom_K: cute.CopyAtom, tma_atom_V: cute.CopyAtom,
        pipeline_q, pipeline_k, pipeline_v,
        seq: SeqInfo,
        m_block: Int32, head_kv: Int32, head_idx: Int32, batch_idx: Int32,
        n_block_min: Int32, n_block_max: Int32, cta_rank: Int32,
    ):
        gQ = cute.local_tile(
            seq.q_slice(mQ, head_idx, batch_idx), (self.tile_m, self.head_dim), (m_block, 0)
        )
        gK = cute.local_tile(
            seq.k_slice(mK, head_kv, batch_idx), (self.tile_n, self.head_dim), (None, 0)
        )
        gV = cute.local_tile(
            seq.k_slice(mV, head_kv, batch_idx), (self.tile_n, self.head_dim_v), (None, 0)
        )
        tQsQ, tQgQ = cpasync.tma_partition(
            tma_atom_Q, 0, cute.make_layout(1),
            cute.group_modes(sQ, 0, 2), cute.group_modes(gQ, 0, 2),
        )
        # With a cluster: this CTA's 1/cluster_size slice of each K/V tile, multicast to all.
        cluster_layout = cute.make_layout(self.cluster_size)
        tKsK, tKgK = cpasync.tma_partition(
            tma_atom_K, cta_rank, cluster_layout,
            cute.group_modes(sK, 0, 2), cute.group_modes(gK, 0, 2),
        )
        tVsV, tVgV = None, None
        if const_expr(not self.v_warp):
            tVsV, tVgV = cpasync.tma_partition(
                tma_atom_V, cta_rank, cluster_layout,
                cute.group_modes(sV, 0, 2), cute.group_modes(gV, 0, 2),
            )
        mcast = {}
        if const_expr(self.cluster_size > 1):
            mcast = dict(mcast_mask=cutlass.Int16((1 << self.cluster_size) - 1))
        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.num_stages)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, 1)
        has_work = n_block_max > n_block_min

        if has_work:
            pipeline_k.producer_acquire(kv_state)
            cute.copy(
                tma_atom_K, tKgK[None, n_block_max - 1], tKsK[None, kv_state.index],
                tma_bar_ptr=pipeline_k.producer_get_barrier(kv_state), **mcast,
            )
        pipeline_q.producer_acquire(q_state)
        cute.copy(tma_atom_Q, tQgQ, tQsQ, tma_bar_ptr=pipeline_q.producer_get_barrier(q_state))
        if has_work:
            # K of tile n is issued before V of tile n + 1 (the consumers' order).
            for i in cutlass.range(n_block_max - 1 - n_block_min, unroll=1):
                n_prev = n_block_max - 1 - i
                state_prev = kv_state.clone()
                kv_state.advance()
                pipeline_k.producer_acquire(kv_state)
                cute.copy(
                    tma_atom_K, tKgK[None, n_prev - 1], tKsK[None, kv_state.index],
                    tma_bar_ptr=pipeline_k.producer_get_barrier(kv_state), **mcast,
                )
                if const_expr(not self.v_warp):  # else warp 1 issues V: load_v
                    pipeline_v.producer_acquire(state_prev)
                    if const_expr(not self.debug_no_v_load):
                        cute.copy(
                            tma_atom_V, tVgV[None, n_prev], tVsV[None, state_prev.index],
                            tma_bar_ptr=pipeline_v.producer_get_barrier(state_prev), **mcast,
                        )
            if const_expr(not self.v_warp):
                pipeline_v.producer_acquire(kv_state)
                if const_expr(not self.debug_no_v_load):
                    cute.copy(
                        tma_atom_V, tVgV[None, n_block_min], tVsV[None, kv_state.index],
                        tma_bar_ptr=pipeline_v.producer_get_barrier(kv_state), **mcast,
                    )

    @cute.jit
    def load_v(
        self, mV: cute.Tensor, sV: cute.Tensor, tma_atom_V: cute.CopyAtom, pipeline_v,
        sFlags: cute.Tensor, mbar_decision, seq: SeqInfo, head_kv: Int32, batch_idx: Int32,
        n_block_min: Int32, n_block_max: Int32,
    ):
        """Producer warp 1 (v_warp): the V tiles in visit order. With v_load_skip, V tile n (visit
        i) is loaded if the CTA kept the previous tile n + 1, or any consumer warp keeps n;
        otherwise its stage completes with a plain arrive (no bytes: no consumer reads it, since
        every warpgroup skips that PV). (Loading the second visited tile's V without waiting for
        the first tile's votes, which always keep it, measured 4-8% slower on causal shapes.)

        The flags of tile n sit in slot n & 1 until the consumers publish tile n - 2's, which
        needs V_n's stage first (PV of tile n is issued in the iteration of tile n - 1), so a
        slot is never overwritten before it is read here; a decision barrier completes once per
        use of its slot, so visit i waits phase (i // 2) & 1.
        """
        gV = cute.local_tile(
            seq.k_slice(mV, head_kv, batch_idx), (self.tile_n, self.head_dim_v), (None, 0)
        )
        tVsV, tVgV = cpasync.tma_partition(
            tma_atom_V, 0, cute.make_layout(1),
            cute.group_modes(sV, 0, 2), cute.group_modes(gV, 0, 2),
        )
        v_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.num_stages)
        for i in cutlass.range(n_block_max - n_block_min, unroll=1):
            n_block = n_block_max - 1 - i
            if const_expr(self.v_load_skip):
                load = Boolean(True)  # the first visited tile is never skipped
                if i > 0:
                    cute.arch.mbarrier_wait(mbar_decision + ((n_block + 1) & 1), ((i - 1) >> 1) & 1)
                    if self.cta_skipped(sFlags, n_block + 1):
                        cute.arch.mbarrier_wait(mbar_decision + (n_block & 1), (i >> 1) & 1)
                        load = not self.cta_skipped(sFlags, n_block)
                if load:
                    self.issue_v(pipeline_v, v_state, tma_atom_V, tVgV, tVsV, n_block)
                else:
                    pipeline_v.sync_object_empty.wait(v_state.index, v_state.phase)
                    with cute.arch.elect_one():
                        cute.arch.mbarrier_arrive(pipeline_v.producer_get_barrier(v_state))
            else:
                self.issue_v(pipeline_v, v_state, tma_atom_V, tVgV, tVsV, n_block)
            v_state.advance()

    @cute.jit
    def issue_v(self, pipeline_v, v_state, tma_atom_V: cute.CopyAtom, tVgV: cute.Tensor,
                tVsV: cute.Tensor, n_block: Int32):
        pipeline_v.producer_acquire(v_state)
        cute.copy(
            tma_atom_V, tVgV[None, n_block], tVsV[None, v_state.index],
            tma_bar_ptr=pipeline_v.producer_get_barrier(v_state),
        )

    @cute.jit
    def cta_skipped(self, sFlags: cute.Tensor, n_block: Int32) -> Boolean:
        """True iff every consumer warp published a skip flag for tile n_block."""
        skipped = Boolean(True)
        for g in cutlass.range_constexpr(self.num_mma_wg):
            skipped = skipped and group_all_published(sFlags, self._slot(n_block), g)
        return skipped

    # ------------------------------------------------------------------ consumers
    @cute.jit
    def mma(
        self,
        mO: cute.Tensor, mLSE: cute.Tensor,
        sQ: cute.Tensor, sK: cute.Tensor, sVt: cute.Tensor, sO: cute.Tensor, sVote: cute.Tensor,
        sFlags: cute.Tensor, mbar_decision,
        tiled_mma_qk: cute.TiledMma, tiled_mma_pv: cute.TiledMma, gmem_copy_O: cute.TiledCopy,
        pipeline_q, pipeline_k, pipeline_v,
        tidx: Int32,
        seq: SeqInfo,
        m_block: Int32, head_idx: Int32, batch_idx: Int32,
        n_block_min: Int32, n_block_max: Int32, n_block_causal: Int32,
        scale_log2: Float32,
        threshold_scale_factor: Float32,
        mFactor: Optional[cute.Tensor],
        mVisited: Optional[cute.Tensor],
        mSkipped: Optional[cute.Tensor],
        mPvCounts: Optional[cute.Tensor],
    ):
        wg_idx = cute.arch.make_warp_uniform(tidx // 128)
        thr_mma_qk = tiled_mma_qk.get_slice(tidx)
        wg_mma_qk = tiled_mma_qk.get_slice(wg_idx * 128)
        wg_mma_pv = tiled_mma_pv.get_slice(wg_idx * 128)
        tSrQ = wg_mma_qk.make_fragment_A(wg_mma_qk.partition_A(sQ))
        tSrK = wg_mma_qk.make_fragment_B(wg_mma_qk.partition_B(sK))
        tOrVt = wg_mma_pv.make_fragment_B(wg_mma_pv.partition_B(sVt))
        tOrP = wg_mma_pv.make_fragment_A(wg_mma_pv.partition_shape_A((self.tile_m, self.tile_n)))
        acc_O = cute.make_rmem_tensor(
            tiled_mma_pv.partition_shape_C((self.tile_m, self.head_dim_v)), Float32
        )
        acc_S_shape = tiled_mma_qk.partition_shape_C((self.tile_m, self.tile_n))

        cS = cute.make_identity_tensor((self.tile_m, self.tile_n))
        tScS = thr_mma_qk.partition_C(cS)
        t0ScS = tiled_mma_qk.get_slice(0).partition_C(cS)
        num_rows = cute.size(acc_rows_cols(tScS), mode=[0])

        softmax = OnlineSoftmax(scale_log2, num_rows)
        softmax.reset()
        if const_expr(not self.qk_lookahead):
            acc_O.fill(0.0)  # (qk_lookahead: the first PV initializes O)
        # rescale_o_before_pv: the O rescale still to apply before the next PV, per row
        o_scale = cute.make_rmem_tensor(num_rows, Float32)
        o_scale.fill(1.0)

        # BLASST threshold and the validity of this thread's rows (padding rows vote skip).
        log2_lambda = Float32(0.0)
        skip_enabled = Boolean(False)
        row_valid = cute.make_rmem_tensor(num_rows, Boolean)
        if const_expr(self.has_skip):
            factor = threshold_scale_factor
            if const_expr(mFactor is not None):
                factor = mFactor[batch_idx]
            log2_lambda, skip_enabled = threshold_log2(factor, seq.seqlen_k)
            tScS_mn = acc_rows_cols(tScS)
            for r in cutlass.range_constexpr(num_rows):
                row_valid[r] = tScS_mn[r, 0][0] + m_block * self.tile_m < seq.seqlen_q
        # fast_vote: row r skips a tile iff m_tile < row_thr = max(m_run + margin, row_floor).
        # margin = log2(lambda) / scale_log2 (raw score units; the API requires scale > 0);
        # floor: -FLT_MAX for valid rows (m_run = -inf: a row that saw no key keeps voting skip
        # only while it sees none), +inf for padding rows (always skip), -inf when skipping is
        # off (never skip).
        row_thr = cute.make_rmem_tensor(num_rows, Float32)
        row_floor = cute.make_rmem_tensor(num_rows, Float32)
        margin = Float32(0.0)
        if const_expr(self.thr_add_only):
            # row_floor holds the per-row margin (see thr_add_only)
            vote_on = skip_enabled and scale_log2 > Float32(0.0)
            margin = log2_lambda / scale_log2
            for r in cutlass.range_constexpr(num_rows):
                margin_r = margin if row_valid[r] else Float32.inf
                row_floor[r] = margin_r if vote_on else Float32(math.nan)
        elif const_expr(self.fast_vote):
            vote_on = skip_enabled and scale_log2 > Float32(0.0)
            margin = log2_lambda / scale_log2 if vote_on else -Float32.inf
            for r in cutlass.range_constexpr(num_rows):
                floor_r = Float32(-FLT_MAX) if row_valid[r] else Float32.inf
                row_floor[r] = floor_r if vote_on else -Float32.inf

        if const_expr(self.pingpong):
            if wg_idx == 0:
                # WG1 holds the first token.
                cute.arch.barrier_arrive(
                    barrier_id=int(NamedBarrierSm90.SchedulerWG1),
                    number_of_threads=2 * 128,
                )

        ctx = dict(
            tiled_mma_qk=tiled_mma_qk, tiled_mma_pv=tiled_mma_pv,
            tSrQ=tSrQ, tSrK=tSrK, tOrVt=tOrVt, tOrP=tOrP, acc_O=acc_O,
            acc_S_shape=acc_S_shape, tScS=tScS, t0ScS=t0ScS,
            pipeline_k=pipeline_k, pipeline_v=pipeline_v,
            softmax=softmax, seq=seq, m_block=m_block, wg_idx=wg_idx,
            sVote=sVote, sFlags=sFlags, mbar_decision=mbar_decision, row_valid=row_valid,
            log2_lambda=log2_lambda, skip_enabled=skip_enabled, row_thr=row_thr, row_floor=row_floor, margin=margin,
            o_scale=o_scale,
        )

        kv_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.num_stages)
        q_state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, 1)
        pipeline_q.consumer_wait(q_state)

        num_skipped = Int32(0)
        # lazy_p_zero: this warp skipped the tile whose PV comes next (its P rows are stale);
        # defer_v_release: the V stage of the previous iteration's skipped PV awaits release.
        warp_skipped = Boolean(False)
        v_pending = Boolean(False)
        v_pending_state = kv_state.clone()

        if const_expr(self.qk_lookahead):
            if n_block_max > n_block_min:
                num_skipped = self.mainloop_lookahead(
                    ctx, kv_state, n_block_min, n_block_max,
                    self.first_unmasked(n_block_min, n_block_max, n_block_causal))
            else:
                acc_O.fill(0.0)
            pipeline_q.consumer_release(q_state)
        elif n_block_max > n_block_min:
            # First tile (never skipped), masked for the key length (and the diagonal).
            self.first_block(ctx, kv_state, n_block_max - 1)
            n_first_unmasked = self.first_unmasked(n_block_min, n_block_max, n_block_causal)
            # n_last: the last tile this loop visits (its PV is issued below)
            n_last = n_block_min
            if const_expr(self.lookahead_after_skips):
                carry = (kv_state, num_skipped, warp_skipped, v_pending, v_pending_state)
                n_block = n_block_max - 2
                skip_run = Int32(0)  # PVs this warpgroup skipped in a row
                if const_expr(self.causal):
                    carry, n_block, skip_run = self.blocks_until_skip_run(
                        ctx, carry, n_block, n_first_unmasked, skip_run, True)
                carry, n_block, skip_run = self.blocks_until_skip_run(
                    ctx, carry, n_block, n_block_min, skip_run, False)
                kv_state, num_skipped, warp_skipped, v_pending, v_pending_state = carry
                n_last = n_block + 1
            else:
                if const_expr(self.causal):
                    for i in cutlass.range(n_block_max - 1 - n_first_unmasked, unroll=1):
                        kv_state, num_skipped, warp_skipped, v_pending, v_pending_state, _ = (
                            self.next_block(ctx, kv_state, n_block_max - 2 - i, num_skipped, True,
                                            warp_skipped, v_pending, v_pending_state))
                for i in cutlass.range(n_first_unmasked - n_block_min, unroll=1):
                    kv_state, num_skipped, warp_skipped, v_pending, v_pending_state, _ = (
                        self.next_block(ctx, kv_state, n_first_unmasked - 1 - i, num_skipped, False,
                                        warp_skipped, v_pending, v_pending_state))
            if const_expr(not self.lookahead_after_skips):
                pipeline_q.consumer_release(q_state)
            if const_expr(self.defer_v_release):
                self.release_pending_v(ctx, v_pending, v_pending_state)
            # Last PV of the software pipeline (tile n_last).
            pv_skip = Boolean(False)
            if const_expr(self.pv_skip):
                cute.arch.barrier(
                    barrier_id=int(NamedBarrierSm90.SkipVoteWG1) + wg_idx, number_of_threads=128
                )
                pv_skip = group_all_published(sFlags, self._slot(n_last), wg_idx)
                num_skipped = self.count_pv_skip(num_skipped, pv_skip)
            if not pv_skip:
                self.apply_pending_o_scale(ctx)
            pipeline_v.consumer_wait(kv_state)
            if not pv_skip:
                if const_expr(self.lazy_p_zero):
                    self.zero_stale_p(tOrP, warp_skipped)
                wgmma(tiled_mma_pv, acc_O, tOrP, tOrVt[None, None, None, kv_state.index], False)
                warpgroup.wait_group(0)
            pipeline_v.consumer_release(kv_state)
            kv_state.advance()
            if const_expr(self.lookahead_after_skips):
                # the rest of the q-tile (tiles n_last - 1 .. n_block_min) looks ahead
                if n_last > n_block_min:
                    num_skipped = self.mainloop_lookahead(
                        ctx, kv_state, n_block_min, n_last, n_first_unmasked, num_skipped, False)
                pipeline_q.consumer_release(q_state)
        else:
            pipeline_q.consumer_release(q_state)

        # ---- counters: lane 0 of each decision group (a warp, or warp 0 of a warpgroup) whose
        # group has at least one valid row; the PV counts from each warpgroup's first thread.
        if const_expr(self.has_stats):
            warp_in_wg = cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4
            wg_first_row = m_block * self.tile_m + wg_idx * 64
            group_first_row = wg_first_row + warp_in_wg * 16
            counts = cute.arch.lane_idx() == 0
            if const_expr(self.decision_rows == 64):
                counts = tidx % 128 == 0
                group_first_row = wg_first_row
            n_visited = n_block_max - n_block_min
            if counts and group_first_row < seq.seqlen_q and n_visited > 0:
                cute.arch.atomic_add(elem_ptr(mVisited, (batch_idx, head_idx)), n_visited)
                cute.arch.atomic_add(elem_ptr(mSkipped, (batch_idx, head_idx)),
                                     num_skipped & (PV_SKIP_UNIT - 1))
            if tidx % 128 == 0 and wg_first_row < seq.seqlen_q and n_visited > 0:
                cute.arch.atomic_add(elem_ptr(mPvCounts, (0, batch_idx, head_idx)), n_visited)
                cute.arch.atomic_add(elem_ptr(mPvCounts, (1, batch_idx, head_idx)),
                                     num_skipped >> 16)

        # ---- epilogue
        inv_l, lse = softmax.finalize()
        rescale_rows(acc_O, inv_l)
        self.epilogue(
            acc_O, lse, mO, mLSE, sO, tiled_mma_pv, gmem_copy_O, tidx, seq, m_block, head_idx,
            batch_idx,
        )

    @cute.jit
    def first_unmasked(self, n_block_min: Int32, n_block_max: Int32, n_block_causal: Int32) -> Int32:
        """Tiles n_block_max - 2 down to this one need the causal mask (the first visited tile,
        n_block_max - 1, is masked for the key length and the diagonal anyway)."""
        n_first_unmasked = n_block_max - 1
        if const_expr(self.causal):
            n_first_unmasked = cutlass.max(cutlass.min(n_block_causal, n_block_max - 1), n_block_min)
        return n_first_unmasked

    @cute.jit
    def first_block(self, ctx, kv_state, n_block: Int32):
        pipeline_k = ctx["pipeline_k"]
        acc_S = cute.make_rmem_tensor(ctx["acc_S_shape"], Float32)
        pipeline_k.consumer_wait(kv_state)
        wgmma(ctx["tiled_mma_qk"], acc_S, ctx["tSrQ"], ctx["tSrK"][None, None, None, kv_state.index], True)
        warpgroup.wait_group(0)
        pipeline_k.consumer_release(kv_state)
        seq = ctx["seq"]
        apply_mask(
            acc_S, ctx["tScS"], ctx["t0ScS"], ctx["m_block"], n_block, seq.seqlen_q, seq.seqlen_k,
            self.tile_m, self.tile_n, True, self.causal,
        )
        if const_expr(self.pv_skip):
            # The first tile is never skipped: its PV is always issued.
            self.publish_decision(ctx, Boolean(False), n_block)
        softmax = ctx["softmax"]
        m_tile = softmax.tile_row_max(acc_S)
        softmax.update(acc_S, m_tile, True)
        self.update_row_thresholds(ctx)
        convert_f32_to_16bit(acc_as_operand_a(acc_S), ctx["tOrP"])

    @cute.jit
    def blocks_until_skip_run(self, ctx, carry, n_block: Int32, n_stop: Int32, skip_run: Int32,
                              mask_causal: cutlass.Constexpr[bool]):
        """Tiles n_block down to n_stop in the default schedule (next_block; carry = its state),
        until this warpgroup has skipped lookahead_after_skips PVs in a row. Returns the carry,
        the next tile to visit and the length of the current run of skipped PVs."""
        kv_state, num_skipped, warp_skipped, v_pending, v_pending_state = carry
        # The loop test is formed inside next_block as soon as the PV flag is read. Formed here,
        # after it, its chain of uniform ops and a uniform-to-vector move sat on the loop's back
        # edge: ncu, H100, 0 % skipped, 16k and 32k non-causal, 1.044 of dense's cycles instead
        # of 1.034 (prefill-h100-skip-cost-ncu.md, section 9).
        go_on = n_block >= n_stop and skip_run < self.lookahead_after_skips
        while go_on:
            kv_state, num_skipped, warp_skipped, v_pending, v_pending_state, _, skip_run, go_on = (
                self.next_block(ctx, kv_state, n_block, num_skipped, mask_causal,
                                warp_skipped, v_pending, v_pending_state, (skip_run, n_stop)))
            n_block -= 1
        return (kv_state, num_skipped, warp_skipped, v_pending, v_pending_state), n_block, skip_run

    @cute.jit
    def next_block(
        self, ctx, kv_state, n_block: Int32, num_skipped: Int32,
        mask_causal: cutlass.Constexpr[bool],
        warp_skipped: Boolean, v_pending: Boolean, v_pending_state, switch=None,
    ):
        """Tile n_block: S = QK^T overlapped with the PV of the previous tile (n_block + 1).

        BLASST: each warp (16 rows) decides alone whether to skip the softmax of this tile; a
        skipping warp leaves m, l, O untouched and zeroes its P rows. The PV wgmma of a tile is
        skipped when all 4 warps of the warpgroup skipped it: their flags (smem byte per warp, slot
        = tile parity) are read one iteration later, behind the ping-pong bar.sync every warp of
        the warpgroup passes (or a warpgroup barrier without ping-pong). Every pipeline wait /
        release and barrier is the same on both paths.
        warp_skipped (lazy_p_zero): this warp skipped tile n_block + 1; v_pending /
        v_pending_state (defer_v_release): the V stage of tile n_block + 2, whose PV was skipped.
        Returns the pipeline state, the skip count, the next warp_skipped, v_pending,
        v_pending_state, and whether the warpgroup skipped the PV of tile n_block + 1; with
        switch = (skip_run, n_stop) (blocks_until_skip_run) also the new skip run and whether
        the default schedule goes on with tile n_block - 1.
        """
        pipeline_k, pipeline_v = ctx["pipeline_k"], ctx["pipeline_v"]
        softmax = ctx["softmax"]
        acc_O, tOrP = ctx["acc_O"], ctx["tOrP"]
        seq = ctx["seq"]
        wg_idx = ctx["wg_idx"]
        kv_state_v = kv_state.clone()
        kv_state.advance()
        acc_S = cute.make_rmem_tensor(ctx["acc_S_shape"], Float32)

        flag_word = None
        if const_expr(self.flag_addr_before_sync):
            flag_word = group_flag_word(ctx["sFlags"], self._slot(n_block + 1), wg_idx)
        pipeline_k.consumer_wait(kv_state)
        if const_expr(self.pingpong):
            self.scheduler_sync(wg_idx)
        elif const_expr(self.pv_skip):
            cute.arch.barrier(
                barrier_id=int(NamedBarrierSm90.SkipVoteWG1) + wg_idx, number_of_threads=128
            )
        pv_skip = Boolean(False)
        if const_expr(self.flag_addr_before_sync):
            pv_skip = all_published(flag_word)  # (loaded only now: the barrier publishes it)
        elif const_expr(self.pv_skip):
            pv_skip = group_all_published(ctx["sFlags"], self._slot(n_block + 1), wg_idx)
        num_skipped = self.count_pv_skip(num_skipped, pv_skip)
        release_v = None
        switch_out = ()
        if const_expr(switch is not None):
            # the look-ahead switch's loop test (blocks_until_skip_run)
            skip_run, n_stop = switch
            skip_run = skip_run + 1 if pv_skip else Int32(0)
            go_on = n_block - 1 >= n_stop and skip_run < self.lookahead_after_skips
            switch_out = (skip_run, go_on)
        wgmma(ctx["tiled_mma_qk"], acc_S, ctx["tSrQ"], ctx["tSrK"][None, None, None, kv_state.index], True)
        if const_expr(not self.late_v_wait):
            pipeline_v.consumer_wait(kv_state_v)
        tOrVt_cur = ctx["tOrVt"][None, None, None, kv_state_v.index]
        if const_expr(self.pv_skip):
            if pv_skip:
                warpgroup.commit_group()  # empty group keeps wait_group counts uniform
            else:
                self.apply_pending_o_scale(ctx)
                if const_expr(self.late_v_wait):
                    pipeline_v.consumer_wait(kv_state_v)
                if const_expr(self.lazy_p_zero):
                    self.zero_stale_p(tOrP, warp_skipped)
                wgmma(ctx["tiled_mma_pv"], acc_O, tOrP, tOrVt_cur, False)
        else:
            self.apply_pending_o_scale(ctx)
            wgmma(ctx["tiled_mma_pv"], acc_O, tOrP, tOrVt_cur, False)
        self.scheduler_arrive(wg_idx)
        if const_expr(self.defer_v_release):
            self.release_pending_v(ctx, v_pending, v_pending_state)
        warpgroup.wait_group(1)
        pipeline_k.consumer_release(kv_state)
        # v_load_skip: the V stage of a skipped PV is waited for and released at the end of this
        # iteration instead: its (byte-less) completion needs the other warpgroups' votes on
        # that tile, which land while this one does its softmax.
        if const_expr(self.v_load_skip):
            release_v = not pv_skip
        elif const_expr(self.late_v_wait):
            if pv_skip:
                pipeline_v.consumer_wait(kv_state_v)  # before its release below

        if const_expr(mask_causal):
            apply_mask(
                acc_S, ctx["tScS"], ctx["t0ScS"], ctx["m_block"], n_block, seq.seqlen_q,
                seq.seqlen_k, self.tile_m, self.tile_n, False, True,
            )
        if const_expr(self.has_skip):
            if const_expr(self.vote_overlap):
                vote_m = softmax.thread_row_max(acc_S)
                m_tile = softmax.quad_row_max(vote_m)  # before the branch, alongside the vote
            else:
                vote_m = m_tile = self.vote_maxima(softmax, acc_S, self.vote_thread_max)
            skip = self.decide_skip(ctx, vote_m, n_block)
            if skip:
                num_skipped += 1
            self.softmax_skip_or_keep(ctx, acc_S, m_tile, kv_state_v, skip, release_v)
            if const_expr(self.lazy_p_zero):
                warp_skipped = skip
        else:
            m_tile = softmax.tile_row_max(acc_S)
            self.softmax_keep(ctx, acc_S, m_tile, kv_state_v)
        if const_expr(self.defer_v_release):
            v_pending = pv_skip
            v_pending_state = kv_state_v
        elif const_expr(self.v_load_skip):
            if pv_skip:
                pipeline_v.consumer_wait(kv_state_v)
                pipeline_v.consumer_release(kv_state_v)
        return (kv_state, num_skipped, warp_skipped, v_pending, v_pending_state, pv_skip) + switch_out

    # ------------------------------------------------------------------ qk_lookahead schedule
    @cute.jit
    def mainloop_lookahead(self, ctx, kv_state, n_block_min: Int32, n_block_max: Int32,
                           n_first_unmasked: Int32, num_skipped: Int32 = 0,
                           fresh: cutlass.Constexpr[bool] = True) -> Int32:
        """Every key tile of this q-tile with the QK of the next tile issued ahead (qk_lookahead).

        Two S accumulators take turns (S_a current then S_b, and back: two tiles per loop trip,
        so that each keeps its registers). The look-ahead QK is issued unconditionally inside a
        step (a wgmma under a runtime branch made ptxas serialize every wgmma), so the first and
        the last tile have steps of their own. Tiles from n_first_unmasked up get the causal
        mask (the q-tile's bound). fresh: tile n_block_max - 1 is the q-tile's first
        (else lookahead_after_skips switched here: earlier tiles are in the softmax state and O,
        no GEMM is in flight and no V stage is pending). Returns this warp's skipped-tile count
        (num_skipped plus this loop's).
        """
        acc_S_a = cute.make_rmem_tensor(ctx["acc_S_shape"], Float32)
        acc_S_b = cute.make_rmem_tensor(ctx["acc_S_shape"], Float32)
        num_skipped = Int32(num_skipped)
        pv_issued = Boolean(not fresh)  # (the state after the switch: no V stage pending)
        v_prev_state = kv_state.clone()
        ctx["pipeline_k"].consumer_wait(kv_state)
        wgmma(ctx["tiled_mma_qk"], acc_S_a, ctx["tSrQ"],
              ctx["tSrK"][None, None, None, kv_state.index], True)
        warpgroup.wait_group(0)
        ctx["pipeline_k"].consumer_release(kv_state)
        n_tiles = n_block_max - n_block_min
        carry = (kv_state, num_skipped, pv_issued, v_prev_state)
        if n_tiles == 1:
            carry = self.lookahead_step(ctx, *carry, n_block_max - 1, n_first_unmasked,
                                        acc_S_a, acc_S_b, fresh, False)
        else:
            carry = self.lookahead_step(ctx, *carry, n_block_max - 1, n_first_unmasked,
                                        acc_S_a, acc_S_b, fresh, True)
            n_mid = n_tiles - 2
            for i in cutlass.range(n_mid // 2, unroll=1):
                n_block = n_block_max - 2 - 2 * i
                carry = self.lookahead_step(ctx, *carry, n_block, n_first_unmasked,
                                            acc_S_b, acc_S_a, False, True)
                carry = self.lookahead_step(ctx, *carry, n_block - 1, n_first_unmasked,
                                            acc_S_a, acc_S_b, False, True)
            if n_mid % 2 == 1:
                carry = self.lookahead_step(ctx, *carry, n_block_min + 1, n_first_unmasked,
                                            acc_S_b, acc_S_a, False, True)
            else:
                # the last tile's S is in S_b: one copy (no GEMM in flight) instead of a
                # second instance of the last step
                acc_S_a.store(acc_S_b.load())
            carry = self.lookahead_step(ctx, *carry, n_block_min, n_first_unmasked,
                                        acc_S_a, acc_S_b, False, False)
        kv_state, num_skipped, pv_issued, v_prev_state = carry
        # The last tile's V stage, if its PV was skipped.
        if not pv_issued:
            ctx["pipeline_v"].consumer_wait(v_prev_state)
            ctx["pipeline_v"].consumer_release(v_prev_state)
        return num_skipped

    @cute.jit
    def lookahead_step(
        self, ctx, kv_state, num_skipped: Int32, pv_issued: Boolean, v_prev_state,
        n_block: Int32, n_first_unmasked: Int32, acc_S: cute.Tensor, acc_S_next: cute.Tensor,
        is_first: cutlass.Constexpr[bool], lookahead: cutlass.Constexpr[bool],
    ):
        """Tile n_block (its S complete in acc_S; kv_state is its stage).

        Issues the next tile's QK into acc_S_next (lookahead), then mask, row max, vote,
        softmax, and this tile's PV unless every warp of the warpgroup skipped it; then waits
        for both GEMMs, so that no wgmma is in flight across a loop edge, and releases the next
        tile's K stage and, if the PV ran, this tile's V stage. A skipped previous PV's V stage
        (pv_issued, v_prev_state) is waited for before this tile's flags are published: the V
        producer reads a flag slot (tile parity) until it has decided the V of the tile after
        it, so a slot is rewritten only once that V stage completed. Returns the next tile's
        state, the skip count, whether this PV was issued and this tile's state.
        """
        pipeline_k, pipeline_v = ctx["pipeline_k"], ctx["pipeline_v"]
        softmax, seq = ctx["softmax"], ctx["seq"]
        next_state = kv_state.clone()
        next_state.advance()
        if const_expr(lookahead):
            pipeline_k.consumer_wait(next_state)
        # (lookahead_after_skips: the other warpgroup may still run the default schedule, whose
        # ping-pong token passes once per tile)
        self.scheduler_sync(ctx["wg_idx"])
        if const_expr(lookahead):
            wgmma(ctx["tiled_mma_qk"], acc_S_next, ctx["tSrQ"],
                  ctx["tSrK"][None, None, None, next_state.index], True)
            # A barrier keeps the QK's k-block wgmmas together: without one, ptxas spread them
            # over this tile's row max and vote (each a warpgroup rendezvous; SASS).
            cute.arch.barrier(
                barrier_id=int(NamedBarrierSm90.SkipVoteWG1) + ctx["wg_idx"], number_of_threads=128
            )
        self.scheduler_arrive(ctx["wg_idx"])
        if const_expr(is_first):
            # Masked for the key length (and the diagonal); never skipped.
            apply_mask(
                acc_S, ctx["tScS"], ctx["t0ScS"], ctx["m_block"], n_block, seq.seqlen_q,
                seq.seqlen_k, self.tile_m, self.tile_n, True, self.causal,
            )
        elif const_expr(self.causal):
            if n_block >= n_first_unmasked:
                apply_mask(
                    acc_S, ctx["tScS"], ctx["t0ScS"], ctx["m_block"], n_block, seq.seqlen_q,
                    seq.seqlen_k, self.tile_m, self.tile_n, False, True,
                )
        thread_max = self.vote_thread_max_lookahead
        m_tile = self.vote_maxima(softmax, acc_S, thread_max)
        skip = Boolean(False)
        if const_expr(self.has_skip):
            if const_expr(not is_first):
                skip = self.decide_skip(ctx, m_tile, n_block, False)
                if not pv_issued:
                    pipeline_v.consumer_wait(v_prev_state)
                    pipeline_v.consumer_release(v_prev_state)
            if const_expr(self.v_load_skip):
                self.publish_decision(ctx, skip, n_block)
        if skip:
            num_skipped += 1
            ctx["tOrP"].fill(0.0)  # zero rows add nothing if another warp keeps the tile
            # Keeps this a branch: if LLVM turns it into selects (it did without the counters),
            # ptxas runs out of registers and serializes every wgmma.
            compiler_barrier()
        else:
            row_scale = softmax.update(acc_S, self.keep_row_max(softmax, m_tile, thread_max),
                                       is_first)
            self.update_row_thresholds(ctx)
            convert_f32_to_16bit(acc_as_operand_a(acc_S), ctx["tOrP"])
            if const_expr(not is_first):
                rescale_rows(ctx["acc_O"], row_scale)
        group_skip = Boolean(False)
        if const_expr(self.pv_skip and not is_first):
            group_skip = group_all(skip, int(NamedBarrierSm90.SkipVoteWG1) + ctx["wg_idx"])
            num_skipped = self.count_pv_skip(num_skipped, group_skip)
        # The wait closes both branches: a merge of O's registers (wgmma result or not) inside
        # the look-ahead QK's window made ptxas serialize every wgmma.
        if group_skip:
            warpgroup.wait_group(0)
        else:
            pipeline_v.consumer_wait(kv_state)
            # The first PV initializes O: a zero fill inside the window serializes them too.
            wgmma(ctx["tiled_mma_pv"], ctx["acc_O"], ctx["tOrP"],
                  ctx["tOrVt"][None, None, None, kv_state.index], is_first)
            warpgroup.wait_group(0)
        if const_expr(lookahead):
            pipeline_k.consumer_release(next_state)
        if not group_skip:
            pipeline_v.consumer_release(kv_state)
        return next_state, num_skipped, not group_skip, kv_state

    @cute.jit
    def count_pv_skip(self, num_skipped: Int32, pv_skip: Boolean) -> Int32:
        """Stats builds count a warpgroup's skipped P·V wgmmas in the high half of each warp's
        skip counter (the low half counts the warp's skipped softmaxes)."""
        if const_expr(self.has_stats):
            if pv_skip:
                num_skipped += PV_SKIP_UNIT
        return num_skipped

    @cute.jit
    def zero_stale_p(self, tOrP: cute.Tensor, warp_skipped: Boolean):
        """lazy_p_zero: the P rows of a warp that skipped the tile whose PV runs are zeroed.
        ptxas predicates this fill (32 SELs on every kept PV, inside the ping-pong window; a
        warp-uniform flag did not make it branch, a 0/1-trip loop added 64 register moves)."""
        if warp_skipped:
            tOrP.fill(0.0)

    @cute.jit
    def release_pending_v(self, ctx, v_pending: Boolean, v_pending_state):
        """defer_v_release: wait for and release the V stage of an earlier skipped PV."""
        if v_pending:
            ctx["pipeline_v"].consumer_wait(v_pending_state)
            ctx["pipeline_v"].consumer_release(v_pending_state)

    @cute.jit
    def softmax_skip_or_keep(self, ctx, acc_S: cute.Tensor, m_tile: cute.Tensor, kv_state_v,
                             skip: Boolean, release_v: Optional[Boolean] = None):
        """release_v (v_load_skip): whether to release the V stage of the previous tile's PV
        here (None: always)."""
        # The keep path is one basic block, as in the dense build, so that the compiler
        # interleaves the P conversion and O rescale with the exp2s (MUFU-bound).
        if const_expr(self.keep_first):
            if not skip:
                self.softmax_keep(ctx, acc_S, m_tile, kv_state_v, release_v=release_v)
            else:
                self.softmax_skip(ctx, kv_state_v, release_v)
        else:
            if skip:
                self.softmax_skip(ctx, kv_state_v, release_v)
            else:
                self.softmax_keep(ctx, acc_S, m_tile, kv_state_v, release_v=release_v)

    @cute.jit
    def softmax_skip(self, ctx, kv_state_v, release_v: Optional[Boolean]):
        """A skipped tile: no exp2, no row sum, no O rescale; once the previous PV is done, P
        rows of zeros (and the V stage released)."""
        warpgroup.wait_group(0)
        self.release_v_stage(ctx, kv_state_v, release_v)
        # Zero P rows add nothing if the warpgroup's PV of this tile still runs.
        if const_expr(not self.lazy_p_zero):
            ctx["tOrP"].fill(0.0)
        if const_expr(self.rescale_o_before_pv):
            ctx["o_scale"].fill(1.0)  # this warp's rows of O stay as they are

    @cute.jit
    def release_v_stage(self, ctx, kv_state_v, release_v: Optional[Boolean]):
        if const_expr(release_v is None):
            ctx["pipeline_v"].consumer_release(kv_state_v)
        else:
            if release_v:
                ctx["pipeline_v"].consumer_release(kv_state_v)

    @cute.jit
    def vote_maxima(self, softmax: OnlineSoftmax, acc_S: cute.Tensor,
                    thread_max: cutlass.Constexpr[bool]) -> cute.Tensor:
        """The maxima the vote compares: this thread's own columns' maxima with thread_max
        (keep_row_max reduces them to the row maxima in the keep block), else the row maxima."""
        if const_expr(thread_max):
            return softmax.thread_row_max(acc_S)
        return softmax.tile_row_max(acc_S)

    @cute.jit
    def keep_row_max(self, softmax: OnlineSoftmax, m_tile: cute.Tensor,
                     thread_max: cutlass.Constexpr[bool]) -> cute.Tensor:
        """The row maxima in the keep block, from vote_maxima's result."""
        if const_expr(thread_max):
            return softmax.quad_row_max(m_tile)
        return m_tile

    @cute.jit
    def decide_skip(self, ctx, m_tile: cute.Tensor, n_block: Int32,
                    publish: cutlass.Constexpr[bool] = True) -> Boolean:
        """This decision group's BLASST vote for tile n_block (published for the PV skip unless
        the caller publishes it). m_tile: row maxima, or with fast_vote any per-thread maxima
        whose warp-wide AND of `< threshold` equals the rows' (vote_thread_max)."""
        wg_idx = ctx["wg_idx"]
        skip = Boolean(False)
        if const_expr(self.fast_vote):
            vote = Boolean(True)
            for r in cutlass.range_constexpr(cute.size(m_tile)):
                if const_expr(self.thr_add_only):
                    vote = vote and m_tile[r] <= ctx["row_thr"][r]
                else:
                    vote = vote and m_tile[r] < ctx["row_thr"][r]
            skip = warp_vote_all(vote)
        elif const_expr(self.debug_no_vote):
            skip = ctx["log2_lambda"] > Float32(1e30)
        elif const_expr(self.decision_rows == 16):
            skip = warp_vote_all(self.rows_vote(ctx, m_tile))
        elif const_expr(self.vote_smem):
            skip = warpgroup_vote_all(
                self.rows_vote(ctx, m_tile), ctx["sVote"], n_block % 2, wg_idx,
                int(NamedBarrierSm90.SkipVoteWG1) + wg_idx,
            )
        else:
            skip = group_all(self.rows_vote(ctx, m_tile), int(NamedBarrierSm90.SkipVoteWG1) + wg_idx)
        if const_expr(self.pv_skip and publish):
            self.publish_decision(ctx, skip, n_block)
        return skip

    @cute.jit
    def publish_decision(self, ctx, skip: Boolean, n_block: Int32):
        """This warp's flag for tile n_block (read by its warpgroup for the PV skip, and with
        v_load_skip by the V producer once the slot's decision barrier completes)."""
        publish_warp_flag(skip, ctx["sFlags"], self._slot(n_block), ctx["wg_idx"])
        if const_expr(self.v_load_skip):
            if cute.arch.lane_idx() == 0:
                cute.arch.mbarrier_arrive(ctx["mbar_decision"] + self._slot(n_block))

    @cute.jit
    def rows_vote(self, ctx, m_tile: cute.Tensor) -> Boolean:
        """AND of this thread's row votes (the reference rule, evaluated per tile)."""
        vote = ctx["softmax"].rows_vote_skip(m_tile, ctx["row_valid"], ctx["log2_lambda"])
        return vote and ctx["skip_enabled"]

    @cute.jit
    def update_row_thresholds(self, ctx):
        """fast_vote: refresh each row's skip threshold after m_run changed (kept tiles). In the
        keep block, after the exp2s are issued, so ptxas places it in the MUFU shadow (computed
        at the top of the next tile instead, ptxas sinks it next to the vote: SASS).
        """
        if const_expr(self.fast_vote):
            row_max, row_thr, row_floor = ctx["softmax"].row_max, ctx["row_thr"], ctx["row_floor"]
            for r in cutlass.range_constexpr(cute.size(row_thr)):
                if const_expr(self.thr_add_only):
                    row_thr[r] = row_max[r] + row_floor[r]
                else:
                    row_thr[r] = cute.arch.fmax(row_max[r] + ctx["margin"], row_floor[r])

    def _slot(self, n_block):
        """Flag slot (tile parity) of key tile n_block >= 0."""
        if const_expr(self.fast_vote):
            return n_block & 1
        return n_block % 2

    @cute.jit
    def softmax_keep(self, ctx, acc_S: cute.Tensor, m_tile: cute.Tensor, kv_state_v,
                     release_v: Optional[Boolean] = None):
        """Online softmax of a kept tile, then (once the previous PV is done) P and the O rescale."""
        m_tile = self.keep_row_max(ctx["softmax"], m_tile, self.vote_thread_max)
        row_scale = ctx["softmax"].update(acc_S, m_tile, False)
        self.update_row_thresholds(ctx)
        warpgroup.wait_group(0)
        self.release_v_stage(ctx, kv_state_v, release_v)
        convert_f32_to_16bit(acc_as_operand_a(acc_S), ctx["tOrP"])
        if const_expr(self.rescale_o_before_pv):
            ctx["o_scale"].store(row_scale.load())
        else:
            rescale_rows(ctx["acc_O"], row_scale)

    @cute.jit
    def apply_pending_o_scale(self, ctx):
        """rescale_o_before_pv: the previous kept tile's O rescale, just before the next PV."""
        if const_expr(self.rescale_o_before_pv):
            rescale_rows(ctx["acc_O"], ctx["o_scale"])

    # ------------------------------------------------------------------ ping-pong token
    def scheduler_sync(self, wg_idx: Int32):
        if const_expr(self.pingpong):
            cute.arch.barrier(
                barrier_id=int(NamedBarrierSm90.SchedulerWG1) + wg_idx,
                number_of_threads=2 * 128,
            )

    def scheduler_arrive(self, wg_idx: Int32):
        """Pass the token to the next warpgroup (round robin)."""
        if const_expr(self.pingpong):
            next_wg = 1 - wg_idx
            if const_expr(self.num_mma_wg == 3):
                next_wg = (wg_idx + 1) % 3
            cute.arch.barrier_arrive(
                barrier_id=int(NamedBarrierSm90.SchedulerWG1) + next_wg,
                number_of_threads=2 * 128,
            )

    # ------------------------------------------------------------------ epilogue
    @cute.jit
    def epilogue(
        self,
        acc_O: cute.Tensor, lse: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor, sO: cute.Tensor,
        tiled_mma_pv: cute.TiledMma, gmem_copy_O: cute.TiledCopy,
        tidx: Int32, seq: SeqInfo, m_block: Int32, head_idx: Int32, batch_idx: Int32,
    ):
        rO = cute.make_rmem_tensor(acc_O.layout, self.dtype)
        convert_f32_to_16bit(acc_O, rO)
        # sO aliases sQ: every warpgroup must be done with its QK GEMMs.
        cute.arch.barrier(barrier_id=int(NamedBarrierSm90.Epilogue), number_of_threads=self.num_mma_threads)
        st_atom = cute.make_copy_atom(
            cute.nvgpu.warp.StMatrix8x8x16bOp(transpose=False, num_matrices=4), self.dtype
        )
        thr_st = cute.make_tiled_copy_C(st_atom, tiled_mma_pv).get_slice(tidx)
        cute.copy(st_atom, thr_st.retile(rO), thr_st.partition_D(sO))

        rows_left = seq.seqlen_q - m_block * self.tile_m
        # LSE: the thread holding column 0 of each accumulator row writes it.
        cO = cute.make_identity_tensor((self.tile_m, self.head_dim_v))
        tOcO_mn = acc_rows_cols(tiled_mma_pv.get_slice(tidx).partition_C(cO))
        gLSE = seq.lse_slice(mLSE, head_idx, batch_idx)
        if tOcO_mn[0, 0][1] == 0:
            for r in cutlass.range_constexpr(cute.size(lse)):
                row = tOcO_mn[r, 0][0]
                if row < rows_left:
                    gLSE[m_block * self.tile_m + row] = lse[r]

        cute.arch.barrier(barrier_id=int(NamedBarrierSm90.Epilogue), number_of_threads=self.num_mma_threads)
        gO = cute.local_tile(
            seq.q_slice(mO, head_idx, batch_idx), (self.tile_m, self.head_dim_v), (m_block, 0)
        )
        thr_copy = gmem_copy_O.get_slice(tidx)
        tOsO = thr_copy.partition_S(sO)
        tOgO = thr_copy.partition_D(gO)
        tOcO = thr_copy.partition_S(cO)
        tOrO = cute.make_rmem_tensor_like(tOsO, self.dtype)
        cute.autovec_copy(tOsO, tOrO)
        for m in cutlass.range_constexpr(cute.size(tOrO.shape[1])):
            if tOcO[0, m, 0][0] < rows_left:
                cute.copy(gmem_copy_O, tOrO[None, m, None], tOgO[None, m, None])
