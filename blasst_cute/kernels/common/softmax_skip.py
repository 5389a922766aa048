"""Online softmax in the exp2 domain plus the BLASST skip rule.

One definition of the device-side skip rule, shared by every kernel:

    a row votes "skip" for a key tile  iff  the row is padding (beyond Lq),
        or it sees no key of the tile (tile row max is -inf),
        or (m_tile - m_run) * scale * log2(e) < log2(lambda)
    a decision group skips the tile  iff  every row of the group votes skip
    (and skipping is enabled: factor > 0 and lambda = factor / Lk < 1).

Scores stay unscaled in the accumulator; ``scale_log2 = softmax_scale * log2(e)`` is folded into
the exponent, so m_tile / m_run are raw (unscaled) row maxima.
A skipped tile leaves m, l and O untouched.
"""

import math

import cutlass
import cutlass.cute as cute
from cutlass import Boolean, Float32, Int32, const_expr
from cutlass.cutlass_dsl import T, dsl_user_op
from cutlass._mlir.dialects import llvm

from blasst_cute.kernels.common.layout import acc_rows_cols

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


@dsl_user_op
def _cvt_pair_f32_to_16(a: Float32, b: Float32, to_bf16: bool, *, loc=None, ip=None) -> Int32:
    # cvt.rn.{bf16x2,f16x2}.f32 d, hi, lo  packs (lo, hi) into one 32-bit register.
    op = "bf16x2" if to_bf16 else "f16x2"
    return Int32(
        llvm.inline_asm(
            T.i32(),
            [Float32(a).ir_value(loc=loc, ip=ip), Float32(b).ir_value(loc=loc, ip=ip)],
            f"cvt.rn.{op}.f32 $0, $2, $1;",
            "=r,f,f",
            has_side_effects=False,
            is_align_stack=False,
            asm_dialect=llvm.AsmDialect.AD_ATT,
        )
    )


@cute.jit
def convert_f32_to_16bit(src: cute.Tensor, dst: cute.Tensor):
    """Element-wise fp32 -> bf16/fp16 conversion, two values per instruction.

    (``TensorSSA.to`` does not always vectorize for non-square tiles.)
    """
    to_bf16 = const_expr(dst.element_type is cutlass.BFloat16)
    dst_pairs = cute.recast_tensor(dst, Int32)
    for i in cutlass.range_constexpr(cute.size(dst_pairs)):
        dst_pairs[i] = _cvt_pair_f32_to_16(src[2 * i], src[2 * i + 1], to_bf16)


@cute.jit
def quad_allreduce_max(x: Float32) -> Float32:
    # The 4 threads of a quad hold the columns of the same accumulator row.
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=2))
    x = cute.arch.fmax(x, cute.arch.shuffle_sync_bfly(x, offset=1))
    return x


@cute.jit
def quad_allreduce_sum(x: Float32) -> Float32:
    x = x + cute.arch.shuffle_sync_bfly(x, offset=2)
    x = x + cute.arch.shuffle_sync_bfly(x, offset=1)
    return x


class OnlineSoftmax:
    """Per-thread online-softmax state for the accumulator rows a thread owns.

    ``row_max`` is the running max m_run (raw score units, -inf before any key was seen);
    ``row_sum`` holds per-thread partial sums, quad-reduced only in ``finalize``.
    """

    def __init__(self, scale_log2: Float32, num_rows: int):
        self.scale_log2 = scale_log2
        self.num_rows = num_rows
        self.row_max = cute.make_rmem_tensor(num_rows, Float32)
        self.row_sum = cute.make_rmem_tensor(num_rows, Float32)

    # Carried through dynamic control flow (the DSL rebuilds it from its MLIR values).
    def __extract_mlir_values__(self):
        vals = []
        self._counts = []
        for obj in (self.scale_log2, self.row_max, self.row_sum):
            v = cutlass.extract_mlir_values(obj)
            self._counts.append(len(v))
            vals += v
        return vals

    def __new_from_mlir_values__(self, values):
        objs, pos = [], 0
        for obj, n in zip((self.scale_log2, self.row_max, self.row_sum), self._counts):
            objs.append(cutlass.new_from_mlir_values(obj, values[pos:pos + n]))
            pos += n
        new = object.__new__(OnlineSoftmax)
        new.scale_log2, new.row_max, new.row_sum = objs
        new.num_rows = self.num_rows
        new._counts = self._counts
        return new

    def reset(self):
        self.row_max.fill(-Float32.inf)
        self.row_sum.fill(0.0)

    @cute.jit
    def tile_row_max(self, acc_S: cute.Tensor) -> cute.Tensor:
        """m_tile per owned row (quad-reduced), over the tile's (masked) scores."""
        return self.quad_row_max(self.thread_row_max(acc_S))

    @cute.jit
    def thread_row_max(self, acc_S: cute.Tensor) -> cute.Tensor:
        """Per owned row, the max over this thread's columns only (no shuffle).

        A warp-wide AND of ``thread max < t`` over the 4 threads of a row's quad equals
        ``row max < t`` (the row max is one of them), so a warp vote needs no quad reduction.
        """
        s_mn = acc_rows_cols(acc_S)
        m_thr = cute.make_rmem_tensor(self.num_rows, Float32)
        ncol = cute.size(s_mn, mode=[1])
        for r in cutlass.range_constexpr(self.num_rows):
            # 4 independent max chains for ILP.
            m = [s_mn[r, 0], s_mn[r, 1], s_mn[r, 2], s_mn[r, 3]]
            for c in cutlass.range_constexpr(4, ncol, 4):
                for j in cutlass.range_constexpr(4):
                    m[j] = cute.arch.fmax(m[j], s_mn[r, c + j])
            m_thr[r] = cute.arch.fmax(cute.arch.fmax(m[0], m[1]), cute.arch.fmax(m[2], m[3]))
        return m_thr

    @cute.jit
    def quad_row_max(self, m_thr: cute.Tensor) -> cute.Tensor:
        """Quad-reduce per-thread row maxima to the row maxima."""
        m_tile = cute.make_rmem_tensor(self.num_rows, Float32)
        for r in cutlass.range_constexpr(self.num_rows):
            m_tile[r] = quad_allreduce_max(m_thr[r])
        return m_tile

    @cute.jit
    def rows_vote_skip(
        self,
        m_tile: cute.Tensor,
        row_valid: cute.Tensor,
        log2_lambda: Float32,
    ) -> Boolean:
        """AND over this thread's rows of the per-row BLASST skip vote."""
        vote = Boolean(True)
        for r in cutlass.range_constexpr(self.num_rows):
            m_t = m_tile[r]
            sees_nothing = m_t == -Float32.inf
            # m_run = -inf with a finite m_t gives +inf: never below log2(lambda).
            below = (m_t - self.row_max[r]) * self.scale_log2 < log2_lambda
            row_skip = (not row_valid[r]) or sees_nothing or below
            vote = vote and row_skip
        return vote

    @cute.jit
    def update(self, acc_S: cute.Tensor, m_tile: cute.Tensor, is_first: cutlass.Constexpr[bool]):
        """Online-softmax step for a kept tile: P = exp2(S*s - m_new*s) in place in acc_S.

        Returns the per-row factor exp2((m_old - m_new) * s) to rescale O with.
        """
        s_mn = acc_rows_cols(acc_S)
        row_scale = cute.make_rmem_tensor(self.num_rows, Float32)
        scale_log2 = self.scale_log2
        for r in cutlass.range_constexpr(self.num_rows):
            m_old = self.row_max[r]
            m_new = m_tile[r] if const_expr(is_first) else cute.arch.fmax(m_old, m_tile[r])
            self.row_max[r] = m_new
            # Rows that have seen no key keep m = -inf; use 0 so exp2 gives 0, not NaN.
            m_safe = Float32(0.0) if m_new == -Float32.inf else m_new
            m_scaled = m_safe * scale_log2
            row = s_mn[r, None].load()
            p = cute.math.exp2(row * scale_log2 - m_scaled, fastmath=True)
            s_mn[r, None].store(p)
            p_sum = p.reduce(cute.ReductionOp.ADD, Float32.zero, 0)
            if const_expr(is_first):
                row_scale[r] = Float32(1.0)
                self.row_sum[r] = p_sum
            else:
                sc = cute.math.exp2(m_old * scale_log2 - m_scaled, fastmath=True)
                row_scale[r] = sc
                self.row_sum[r] = self.row_sum[r] * sc + p_sum
        return row_scale

    @cute.jit
    def absorb_max(self, m_new: cute.Tensor):
        """Move to a running max that a kept tile of another thread group produced (its P is
        summed by that group): rescale the row sums, adopt m_new. Returns the O factor per row,
        the same value ``update`` returned to the tile's owner."""
        row_scale = cute.make_rmem_tensor(self.num_rows, Float32)
        for r in cutlass.range_constexpr(self.num_rows):
            m_safe = Float32(0.0) if m_new[r] == -Float32.inf else m_new[r]
            sc = cute.math.exp2(
                self.row_max[r] * self.scale_log2 - m_safe * self.scale_log2, fastmath=True)
            row_scale[r] = sc
            self.row_sum[r] = self.row_sum[r] * sc
            self.row_max[r] = m_new[r]
        return row_scale

    @cute.jit
    def finalize(self):
        """Returns (1/l per row, lse per row in natural log). Empty rows: scale 1, lse -inf."""
        inv = cute.make_rmem_tensor(self.num_rows, Float32)
        lse = cute.make_rmem_tensor(self.num_rows, Float32)
        for r in cutlass.range_constexpr(self.num_rows):
            l = quad_allreduce_sum(self.row_sum[r])
            empty = l == 0.0 or l != l
            inv[r] = cute.arch.rcp_approx(Float32(1.0) if empty else l)
            lse[r] = (
                -Float32.inf
                if empty
                else (self.row_max[r] * self.scale_log2 + cute.math.log2(l, fastmath=True)) * LN_2
            )
        return inv, lse


@cute.jit
def rescale_rows(acc: cute.Tensor, row_scale: cute.Tensor):
    acc_mn = acc_rows_cols(acc)
    for r in cutlass.range_constexpr(cute.size(row_scale)):
        acc_mn[r, None].store(acc_mn[r, None].load() * row_scale[r])


@cute.jit
def threshold_log2(factor: Float32, seqlen_k: Int32):
    """log2(lambda) with lambda = factor / Lk, and whether skipping is enabled at all."""
    lam = factor / Float32(seqlen_k)
    enabled = factor > Float32(0.0) and lam < Float32(1.0)
    log2_lambda = Float32(0.0)
    if enabled:
        log2_lambda = cute.math.log2(lam, fastmath=False)
    return log2_lambda, enabled


def sequence_threshold_log2(has_skip: bool, factor_per_batch: bool, threshold_scale_factor,
                            mFactor, batch_idx, seqlen_k):
    """(log2(lambda), skip enabled) of one sequence: the scalar factor, or the sequence's entry
    of mFactor with factor_per_batch; (0, False) without skipping (plain Python, traced inline)."""
    log2_lambda = Float32(0.0)
    skip_enabled = Boolean(False)
    if has_skip:
        factor = threshold_scale_factor
        if factor_per_batch:
            factor = mFactor[batch_idx]
        log2_lambda, skip_enabled = threshold_log2(factor, seqlen_k)
    return log2_lambda, skip_enabled


@dsl_user_op
def _bar_red_and(pred: Int32, barrier_id: Int32, num_threads: int, *, loc=None, ip=None) -> Int32:
    return Int32(
        llvm.inline_asm(
            T.i32(),
            [Int32(pred).ir_value(loc=loc, ip=ip), Int32(barrier_id).ir_value(loc=loc, ip=ip)],
            "{\n.reg .pred p, q;\nsetp.ne.b32 p, $1, 0;\n"
            f"bar.red.and.pred q, $2, {num_threads}, p;\n"
            "selp.b32 $0, 1, 0, q;\n}",
            "=r,r,r",
            has_side_effects=True,
            is_align_stack=False,
            asm_dialect=llvm.AsmDialect.AD_ATT,
        )
    )


@cute.jit
def group_all(pred: Boolean, barrier_id: Int32, num_threads: cutlass.Constexpr[int] = 128,
              warp_uniform: cutlass.Constexpr[bool] = False) -> Boolean:
    """AND of a predicate over the ``num_threads`` threads (whole warps) meeting at a named barrier.

    One ``bar.red.and.pred``: the barrier and the reduction in a single instruction.
    warp_uniform: pass the result through ``make_warp_uniform`` (a lane-0 shuffle: every thread
    holds the same value anyway), so that ptxas knows a branch on it is uniform. Without it, code
    under such a branch, and every loop-carried value it updates, lives on the vector datapath:
    TMA coordinates and wgmma descriptors then go through R2UR moves (SASS: the decode loop had
    ~100 more instructions than the dense build's, with 46 R2UR).
    """
    res = _bar_red_and(Int32(1) if pred else Int32(0), barrier_id, num_threads)
    if const_expr(warp_uniform):
        res = cute.arch.make_warp_uniform(res)
    return res != 0


@cute.jit
def warpgroup_vote_all(
    pred: Boolean,
    sVote: cute.Tensor,
    parity: Int32,
    group_idx: Int32,
    barrier_id: Int32,
    num_threads: cutlass.Constexpr[int] = 128,
) -> Boolean:
    """All-reduce a predicate over a warpgroup: warp vote, one smem word per warp, named barrier.

    ``sVote`` is an Int32 smem tensor indexed (parity, group, warp_in_group); alternating the parity
    between consecutive votes makes one barrier per vote sufficient (a warp can only overwrite a
    slot after every warp of the group passed the next barrier).
    """
    num_warps = const_expr(num_threads // 32)
    warp_all = cute.arch.vote_all_sync(pred)
    lane = cute.arch.lane_idx()
    warp_in_group = cute.arch.make_warp_uniform(cute.arch.warp_idx()) % num_warps
    if lane == 0:
        sVote[parity, group_idx, warp_in_group] = Int32(1) if warp_all else Int32(0)
    cute.arch.barrier(barrier_id=barrier_id, number_of_threads=num_threads)
    agree = sVote[parity, group_idx, 0]
    for w in cutlass.range_constexpr(1, num_warps):
        agree = agree & sVote[parity, group_idx, w]
    return agree != 0


# ---------------------------------------------------------------------------------------------
# Per-warp decisions (rows_per_decision = 16 on an SM90 m64 accumulator: a warp owns 16 rows).
# ---------------------------------------------------------------------------------------------

@cute.jit
def warp_vote_all(pred: Boolean) -> Boolean:
    """AND of a predicate over the 32 lanes of a warp (no shared memory, no barrier)."""
    return cute.arch.vote_all_sync(pred)


@cute.jit
def publish_warp_flag(flag: Boolean, sFlags: cute.Tensor, slot: Int32, group_idx: Int32):
    """Lane 0 of each warp writes its warp-uniform flag as one byte of ``sFlags``.

    ``sFlags`` is an Int8 smem tensor (warp_in_group [4], group, slot): the 4 bytes of one
    (group, slot) form one 32-bit word that ``group_all_published`` reads. The writes become
    visible to the group's warps at the next barrier they all pass (e.g. the ping-pong bar.sync).
    """
    warp_in_group = cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4
    if cute.arch.lane_idx() == 0:
        sFlags[warp_in_group, group_idx, slot] = cutlass.Int8(1) if flag else cutlass.Int8(0)


@cute.jit
def group_flag_word(sFlags: cute.Tensor, slot: Int32, group_idx: Int32) -> cute.Tensor:
    """The 32-bit word of the 4 warp flags of ``group_idx`` in ``slot``, as a 1-element view
    (its address can be formed before the barrier after which the word is read)."""
    words = cute.recast_tensor(sFlags, Int32)  # (1, group, slot)
    return words[None, group_idx, slot]


@cute.jit
def all_published(flag_word: cute.Tensor) -> Boolean:
    """True iff all 4 warps published a true flag in ``flag_word`` (one 32-bit load)."""
    return flag_word[0] == Int32(0x01010101)


@cute.jit
def group_all_published(sFlags: cute.Tensor, slot: Int32, group_idx: Int32) -> Boolean:
    """True iff the 4 warps of ``group_idx`` published a true flag in ``slot``."""
    return all_published(group_flag_word(sFlags, slot, group_idx))
