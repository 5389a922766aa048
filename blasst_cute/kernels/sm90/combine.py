# blasst_cute: merge of split-KV decode partials by their log-sum-exp (any arch >= sm_80 code,
# compiled for sm_90a here).
#
# O = sum_s exp(lse_s - lse) * O_s with lse the log-sum-exp of the splits' lse_s. Splits with
# lse = -inf (no key, or no tile in the split) get no weight, so whatever their O slot holds cannot
# leak in; a row whose splits are all empty gets O = 0 and lse = -inf.
#
# Summation order (fixed, so that every merge gives the same bits): the splits are cut into
# groups of MERGE_GROUP consecutive splits; each group's terms are added in split order from 0,
# then the group sums in group order from 0. The combine kernel's default (grouped) form spreads
# the groups of one row over up to MAX_WARPS_PER_ROW warps (one memory round trip for a row's
# partials instead of one per batch of splits) and adds the group sums through shared memory in
# that order; the decode kernel's fused merge (merge_split_rows_pipelined, one warp per row batch)
# walks the same groups in turn. The lse is merged the same way in both (merged_lse).
# merge_split_row / merge_split_rows: the earlier one-warp-per-row loops (split order), kept as an
# A/B option (grouped=False).

import math
from typing import Optional

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
ROWS_PER_CTA = 4  # warps per CTA of the one-warp-per-row forms
COLS_PER_WARP = 128
MERGE_GROUP = 8  # splits per group of the summation order
MAX_WARPS_PER_ROW = 8
LSE_LOADS = 4  # lse loads per lane in flight per pass of merged_lse (128 splits per pass)


def combine_warps_per_row(num_splits: int) -> int:
    """Warps sharing one row (and column chunk) in the grouped combine: one per group of
    MERGE_GROUP splits, as a power of two up to MAX_WARPS_PER_ROW (more groups: several rounds)."""
    groups = -(-int(num_splits) // MERGE_GROUP)
    w = 1
    while w < groups and w < MAX_WARPS_PER_ROW:
        w *= 2
    return w


def _pow2_floor(x: int) -> int:
    p = 1
    while p * 2 <= x:
        p *= 2
    return p


class BlasstDecodeCombineSm90:
    def __init__(self, dtype, head_dim: int, use_pdl: bool = False, grouped: bool = False,
                 warps_per_row: int = 1):
        if dtype not in (cutlass.BFloat16, cutlass.Float16):
            raise NotImplementedError(f"blasst combine: dtype {dtype}")
        if head_dim % 32 != 0:
            raise NotImplementedError(f"blasst combine: head_dim {head_dim} (multiple of 32)")
        if warps_per_row not in (1, 2, 4, 8) or (warps_per_row > 1 and not grouped):
            raise ValueError(f"blasst combine: warps_per_row {warps_per_row} (1, 2, 4 or 8; "
                             "more than 1 needs the grouped form, grouped=True)")
        self.dtype = dtype
        self.head_dim = head_dim
        # Programmatic dependent launch: the grid may start while the split kernel before it
        # drains (launch latency hidden); it reads the partials only after griddepcontrol.wait.
        self.use_pdl = use_pdl
        # True: the grouped merge (module comment); False: the one-warp-per-row loops.
        self.grouped = grouped
        # Column chunks per row: one warp each when head_dim is a multiple of COLS_PER_WARP.
        self.chunks = head_dim // COLS_PER_WARP if head_dim % COLS_PER_WARP == 0 else 1
        self.per_lane = head_dim // self.chunks // 32
        self.warps_per_row = warps_per_row
        self.rows_per_cta = max(1, ROWS_PER_CTA // warps_per_row)  # (row, chunk) items per CTA
        self.num_threads = 32 * warps_per_row * self.rows_per_cta

    @cute.jit
    def launch_ptrs(
        self,
        op_ptr: cute.Pointer,  # fp32 (splits, b, lq, hq, d) contiguous
        lsep_ptr: cute.Pointer,  # fp32 (splits, b, hq, lq) contiguous
        o_ptr: cute.Pointer,  # (b, lq, hq, d) contiguous, q dtype
        lse_ptr: cute.Pointer,  # fp32 (b, hq, lq) contiguous
        num_splits: Int32, batch: Int32, seqlen_q: Int32, num_heads: Int32,
        stream: cuda.CUstream,
    ):
        """Pointer entry point (low host overhead)."""
        d = self.head_dim
        # Strides are multiples of d (a multiple of 32): lets a lane's columns load as vectors.
        row = cute.assume(seqlen_q * num_heads * d, divby=d)
        mOp = cute.make_tensor(op_ptr, cute.make_layout(
            (num_splits, batch, seqlen_q, num_heads, d),
            stride=(cute.assume(batch * row, divby=d), row,
                    cute.assume(num_heads * d, divby=d), d, 1)))
        mLSEp = cute.make_tensor(lsep_ptr, cute.make_layout(
            (num_splits, batch, num_heads, seqlen_q),
            stride=(batch * num_heads * seqlen_q, num_heads * seqlen_q, seqlen_q, 1)))
        mO = cute.make_tensor(o_ptr, cute.make_layout(
            (batch, seqlen_q, num_heads, d),
            stride=(row, cute.assume(num_heads * d, divby=d), d, 1)))
        mLSE = cute.make_tensor(lse_ptr, cute.make_layout(
            (batch, num_heads, seqlen_q), stride=(num_heads * seqlen_q, seqlen_q, 1)))
        self.__call__(mOp, mLSEp, mO, mLSE, stream)

    @cute.jit
    def __call__(
        self,
        mOp: cute.Tensor,  # fp32 (splits, b, lq, hq, d)
        mLSEp: cute.Tensor,  # fp32 (splits, b, hq, lq)
        mO: cute.Tensor,  # (b, lq, hq, d) in the q dtype
        mLSE: cute.Tensor,  # fp32 (b, hq, lq)
        stream: cuda.CUstream,
    ):
        if const_expr(mO.element_type != self.dtype):
            raise TypeError(f"expected {self.dtype}, got {mO.element_type}")
        total = mO.shape[0] * mO.shape[1] * mO.shape[2] * self.chunks
        self.kernel(mOp, mLSEp, mO, mLSE, total).launch(
            grid=[(total + self.rows_per_cta - 1) // self.rows_per_cta, 1, 1],
            block=[self.num_threads, 1, 1],
            stream=stream,
            use_pdl=self.use_pdl,
        )

    @cute.kernel
    def kernel(self, mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
               total: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        if const_expr(self.use_pdl):
            cute.arch.griddepcontrol_wait()  # the partials are complete and visible
            cute.arch.griddepcontrol_launch_dependents()
        W = self.warps_per_row
        lane = tidx % 32
        warp = tidx // 32
        item_local = warp // W
        item = bidx * self.rows_per_cta + item_local
        if const_expr(self.grouped):
            # Items past the end merge a duplicate of the last one, never stored: every warp of
            # the CTA meets the same barriers.
            b, pos, head, chunk = self.item_coords(cutlass.min(item, total - 1), mO)
            sSums = None
            if const_expr(W > 1):
                smem = cutlass.memory.SmemAllocator()
                sAll = smem.allocate_tensor(
                    Float32, cute.make_layout((32 * self.per_lane, W, self.rows_per_cta)), 16)
                sSums = sAll[None, None, item_local]
            merge_row_grouped(mOp, mLSEp, mO, mLSE, b, pos, head, chunk, lane,
                              warp - item_local * W, W, self.per_lane, sSums, item < total)
        elif item < total:
            b, pos, head, chunk = self.item_coords(item, mO)
            if const_expr(self.chunks == 1):
                merge_split_row(mOp, mLSEp, mO, mLSE, b, pos, head, lane)
            else:
                merge_split_rows(mOp, mLSEp, mO, mLSE, b, [pos], [head], None, lane,
                                 per_lane=COLS_PER_WARP // 32, chunk=chunk)

    @cute.jit
    def item_coords(self, item: Int32, mO: cute.Tensor):
        """(b, pos, head, chunk) of work item (b, pos, head) x column chunk, chunks fastest."""
        row = item // self.chunks
        t = row // mO.shape[2]
        return t // mO.shape[1], t % mO.shape[1], row % mO.shape[2], item - row * self.chunks


@cute.jit
def add_weighted_split(acc: cute.Tensor, part: cute.Tensor, ls: Float32, lse: Float32, use,
                       per_lane: cutlass.Constexpr):
    """acc += exp(ls - lse) * part where use (a split past the end or with ls = -inf: += 0).
    The one expression of the weighted sum, shared by every grouped merge (same bits)."""
    w = cute.math.exp2((ls - lse) * LOG2_E, fastmath=True)
    for e in cutlass.range_constexpr(per_lane):
        # the select, not a zero weight, keeps an unused split's NaN or inf partial out
        term = w * part[e]
        acc[e] = acc[e] + (term if use else Float32(0.0))


@cute.jit
def merge_row_grouped(mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
                      b: Int32, pos: Int32, head: Int32, chunk: Int32, lane: Int32, w: Int32,
                      W: cutlass.Constexpr, per_lane: cutlass.Constexpr, sSums,
                      store: cutlass.Boolean):
    """Warp w of the W warps of one output row (b, pos, head) and column chunk merges groups
    w, w + W, ... of MERGE_GROUP splits; round r's W group sums are added to the total in group
    order through sSums ((32 * per_lane, W) floats; None when W == 1). Warp 0 stores (if store).
    The first round's partials are loaded before the lse is merged, so both loads overlap."""
    num_splits = mOp.shape[0]
    n_groups = (num_splits + MERGE_GROUP - 1) // MERGE_GROUP
    rounds = (n_groups + W - 1) // W
    col_tile = chunk * 32 + lane
    total = cute.make_rmem_tensor((per_lane,), Float32)
    total.fill(0.0)
    parts = [cute.make_rmem_tensor((per_lane,), Float32) for _ in range(MERGE_GROUP)]
    lsp = cute.make_rmem_tensor((MERGE_GROUP,), Float32)
    _load_group(mOp, mLSEp, b, pos, head, w * MERGE_GROUP, num_splits, col_tile, parts, lsp,
                per_lane)
    lse = merged_lse(mLSEp, num_splits, b, [pos], [head], lane)[0]
    for r in cutlass.range(rounds, unroll=1):
        g = r * W + w
        if r > 0:
            _load_group(mOp, mLSEp, b, pos, head, g * MERGE_GROUP, num_splits, col_tile, parts,
                        lsp, per_lane)
        acc = cute.make_rmem_tensor((per_lane,), Float32)
        acc.fill(0.0)
        for j in cutlass.range_constexpr(MERGE_GROUP):
            s = g * MERGE_GROUP + j
            add_weighted_split(acc, parts[j], lsp[j], lse, s < num_splits and lsp[j] > -Float32.inf,
                               per_lane)
        if const_expr(W == 1):
            for e in cutlass.range_constexpr(per_lane):
                total[e] = total[e] + acc[e]
        else:
            for e in cutlass.range_constexpr(per_lane):
                sSums[lane * per_lane + e, w] = acc[e]
            cute.arch.barrier()
            if w == 0:
                for k in cutlass.range_constexpr(W):
                    if r * W + k < n_groups:
                        for e in cutlass.range_constexpr(per_lane):
                            total[e] = total[e] + sSums[lane * per_lane + e, k]
            cute.arch.barrier()  # sums read before the next round overwrites them
    if store and w == 0:
        _store_row(mO, mLSE, total, lse, b, pos, head, lane, col_tile, per_lane)


@cute.jit
def _load_group(mOp: cute.Tensor, mLSEp: cute.Tensor, b: Int32, pos: Int32, head: Int32,
                s0: Int32, num_splits: Int32, col_tile: Int32, parts: list, lsp: cute.Tensor,
                per_lane: cutlass.Constexpr):
    """The partials and lse of splits s0 .. s0 + MERGE_GROUP - 1 (past the end: the last split
    again, weighted 0 by the caller), all loads issued before any is used."""
    for j in cutlass.range_constexpr(MERGE_GROUP):
        s = cutlass.min(s0 + j, num_splits - 1)
        src = cute.local_tile(mOp[s, b, pos, head, None], (per_lane,), (col_tile,))
        cute.autovec_copy(src, parts[j])
        lsp[j] = mLSEp[s, b, head, pos]


@cute.jit
def merge_split_row(mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
                    b: Int32, pos: Int32, head: Int32, lane: Int32):
    """One warp merges output row (b, pos, head) from its split partials (see the module comment).

    mOp fp32 (splits, b, lq, hq, d), mLSEp fp32 (splits, b, hq, lq), mO (b, lq, hq, d) in the
    output dtype, mLSE fp32 (b, hq, lq)."""
    merge_split_rows(mOp, mLSEp, mO, mLSE, b, [pos], [head], None, lane)


@cute.jit
def merged_lse(mLSEp: cute.Tensor, num_splits: Int32, b: Int32, pos: list, head: list,
               lane: Int32) -> cute.Tensor:
    """The merged lse of rows (b, pos[i], head[i]) over all splits: per-row max, then the sum of
    exp over the splits' lse (lane l takes splits l, l + 32, ... in that order, up to LSE_LOADS
    of them per pass in flight together; the second pass re-reads what the first brought into
    L1); -inf for a row every split left empty."""
    n = len(pos)
    loads = max(1, min(LSE_LOADS, 16 // n))
    mx = cute.make_rmem_tensor((n,), Float32)
    mx.fill(-Float32.inf)
    vals = cute.make_rmem_tensor((loads, n), Float32)
    for s0 in cutlass.range(0, num_splits, 32 * loads, unroll=1):
        _load_lse(mLSEp, num_splits, b, pos, head, s0 + lane, vals, loads)
        for j in cutlass.range_constexpr(loads):
            for i in cutlass.range_constexpr(n):
                mx[i] = cute.arch.fmax(mx[i], vals[j, i])
    m_safe = cute.make_rmem_tensor((n,), Float32)
    for i in cutlass.range_constexpr(n):
        m = cute.arch.warp_reduction_max(mx[i])
        m_safe[i] = Float32(0.0) if m == -Float32.inf else m
    tot = cute.make_rmem_tensor((n,), Float32)
    tot.fill(0.0)
    for s0 in cutlass.range(0, num_splits, 32 * loads, unroll=1):
        _load_lse(mLSEp, num_splits, b, pos, head, s0 + lane, vals, loads)
        for j in cutlass.range_constexpr(loads):
            for i in cutlass.range_constexpr(n):
                # exp2(-inf) = 0 for a split past the end: tot unchanged, bit for bit
                tot[i] += cute.math.exp2((vals[j, i] - m_safe[i]) * LOG2_E, fastmath=True)
    lse = cute.make_rmem_tensor((n,), Float32)
    for i in cutlass.range_constexpr(n):
        total_w = cute.arch.warp_reduction(tot[i], lambda x, y: x + y)
        lse[i] = -Float32.inf
        if total_w > Float32(0.0):
            lse[i] = m_safe[i] + cute.math.log2(total_w, fastmath=False) * LN_2
    return lse


@cute.jit
def _load_lse(mLSEp: cute.Tensor, num_splits: Int32, b: Int32, pos: list, head: list,
              s_lane: Int32, vals: cute.Tensor, loads: cutlass.Constexpr):
    """vals[j, i] = lse of split s_lane + 32 j for row i, j < loads (-inf past the end)."""
    for j in cutlass.range_constexpr(loads):
        s = s_lane + 32 * j
        sc = cutlass.min(s, num_splits - 1)
        for i in cutlass.range_constexpr(len(pos)):
            v = mLSEp[sc, b, head[i], pos[i]]
            vals[j, i] = v if s < num_splits else -Float32.inf


@cute.jit
def _store_rows(mO: cute.Tensor, mLSE: cute.Tensor, accs: list, lse: cute.Tensor, b: Int32,
                pos: list, head: list, valid: Optional[list], lane: Int32, col_tile: Int32,
                per_lane: cutlass.Constexpr):
    """Store the merged rows (valid[i] False: row i is a duplicate and not written)."""
    for i in cutlass.range_constexpr(len(pos)):
        if const_expr(valid is None):
            _store_row(mO, mLSE, accs[i], lse[i], b, pos[i], head[i], lane, col_tile, per_lane)
        else:
            if valid[i]:
                _store_row(mO, mLSE, accs[i], lse[i], b, pos[i], head[i], lane, col_tile, per_lane)


@cute.jit
def merge_split_rows(mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor, mLSE: cute.Tensor,
                     b: Int32, pos: list, head: list, valid: Optional[list], lane: Int32,
                     per_lane: cutlass.Constexpr = None, chunk: Int32 = 0):
    """One warp merges the output rows (b, pos[i], head[i]) of sequence b together: every load of
    a split serves all of them, so the warp waits for memory once per split batch instead of once
    per row and split (the fused merge of a GQA tile has up to 16 rows per warp's share and up to
    ~130 splits). valid[i] False: row i is not written (a duplicate padding the batch); None: all
    rows are written. Lanes own head_dim / 32 contiguous columns, or, with per_lane, the warp
    covers columns [chunk * 32 * per_lane, (chunk + 1) * 32 * per_lane) (chunk 0 writes lse)."""
    n = len(pos)
    if const_expr(per_lane is None):
        per_lane = mO.shape[3] // 32
    col_tile = chunk * 32 + lane
    num_splits = mOp.shape[0]
    lse = merged_lse(mLSEp, num_splits, b, pos, head, lane)

    accs = [cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)]
    parts = [cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)]
    for i in cutlass.range_constexpr(n):
        accs[i].fill(0.0)
    # Unrolled so that several splits' loads are in flight at once (the loop is latency-bound
    # otherwise); an empty split's O slot is loaded but never used.
    for s in cutlass.range(num_splits, unroll=8 if n * per_lane <= 8 else 4):
        for i in cutlass.range_constexpr(n):
            src = cute.local_tile(mOp[s, b, pos[i], head[i], None], (per_lane,), (col_tile,))
            cute.autovec_copy(src, parts[i])
        for i in cutlass.range_constexpr(n):
            ls = mLSEp[s, b, head[i], pos[i]]
            if ls > -Float32.inf:
                w = cute.math.exp2((ls - lse[i]) * LOG2_E, fastmath=True)
                for j in cutlass.range_constexpr(per_lane):
                    accs[i][j] = accs[i][j] + w * parts[i][j]
    _store_rows(mO, mLSE, accs, lse, b, pos, head, valid, lane, col_tile, per_lane)


@cute.jit
def _store_row(mO: cute.Tensor, mLSE: cute.Tensor, acc: cute.Tensor, lse: Float32, b: Int32,
               pos: Int32, head: Int32, lane: Int32, col_tile: Int32, per_lane: cutlass.Constexpr):
    out = cute.make_rmem_tensor((per_lane,), mO.element_type)
    out.store(acc.load().to(mO.element_type))
    cute.autovec_copy(out, cute.local_tile(mO[b, pos, head, None], (per_lane,), (col_tile,)))
    if col_tile == 0:  # lane 0 of chunk 0
        mLSE[b, head, pos] = lse


@cute.jit
def merge_split_rows_pipelined(mOp: cute.Tensor, mLSEp: cute.Tensor, mO: cute.Tensor,
                               mLSE: cute.Tensor, b: Int32, pos: list, head: list,
                               valid: Optional[list], lane: Int32):
    """The grouped merge (module comment) of rows (b, pos[i], head[i]) by one warp, lanes owning
    head_dim / 32 contiguous columns: the decode kernel's fused merge, where one CTA reads every
    split's partial of its q-tile from L2. Gives the combine kernel's bits. The O loads of a batch
    of splits (all rows) are issued before any is used and the batch has no branch (a split with
    lse = -inf is weighted 0, not skipped), so a batch costs one memory round trip. Splits per
    batch: a power of two up to 2 * MERGE_GROUP and 64 registers of partials per lane; groups
    end inside a batch of two groups (a static split index) or at a batch's end."""
    n = len(pos)
    per_lane = mO.shape[3] // 32
    num_splits = mOp.shape[0]
    batch = _pow2_floor(min(2 * MERGE_GROUP, 64 // (n * per_lane)))
    lse = merged_lse(mLSEp, num_splits, b, pos, head, lane)

    totals = [cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)]
    accs = [cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)]
    for i in cutlass.range_constexpr(n):
        totals[i].fill(0.0)
        accs[i].fill(0.0)
    parts = [[cute.make_rmem_tensor((per_lane,), Float32) for _ in range(n)] for _ in range(batch)]
    lsp = cute.make_rmem_tensor((batch, n), Float32)
    for s0 in cutlass.range(0, num_splits, batch, unroll=1):
        # Loads first (splits past the end re-read the last one and get no weight) ...
        for j in cutlass.range_constexpr(batch):
            s = cutlass.min(s0 + j, num_splits - 1)
            for i in cutlass.range_constexpr(n):
                src = cute.local_tile(mOp[s, b, pos[i], head[i], None], (per_lane,), (lane,))
                cute.autovec_copy(src, parts[j][i])
                lsp[j, i] = mLSEp[s, b, head[i], pos[i]]
        # ... then the weighted sums, each group's sum into the total at the group's end.
        for j in cutlass.range_constexpr(batch):
            for i in cutlass.range_constexpr(n):
                add_weighted_split(accs[i], parts[j][i], lsp[j, i], lse[i],
                                   s0 + j < num_splits and lsp[j, i] > -Float32.inf, per_lane)
            if const_expr(batch >= MERGE_GROUP and (j + 1) % MERGE_GROUP == 0):
                if s0 + j + 1 - MERGE_GROUP < num_splits:  # a group holding a split
                    _fold_group(totals, accs, per_lane)
        if const_expr(batch < MERGE_GROUP):
            s_next = s0 + batch
            if s_next % MERGE_GROUP == 0 or s_next >= num_splits:
                _fold_group(totals, accs, per_lane)
    _store_rows(mO, mLSE, totals, lse, b, pos, head, valid, lane, lane, per_lane)


@cute.jit
def _fold_group(totals: list, accs: list, per_lane: cutlass.Constexpr):
    """totals[i] += accs[i]; accs[i] = 0 (a group's sum into the running total)."""
    for i in cutlass.range_constexpr(len(totals)):
        for e in cutlass.range_constexpr(per_lane):
            totals[i][e] = totals[i][e] + accs[i][e]
        accs[i].fill(0.0)
