"""Pins the BLASST semantics of the reference on hand-built inputs with known skip sets."""

import math

import pytest
import torch
import torch.nn.functional as F

from blasst_cute.reference import (
    Geometry,
    blasst_attention,
    blasst_attention_paged,
    blasst_attention_varlen,
    log_threshold,
)
from blasst_cute.workloads import random_qkv, synthetic_qkv, to_paged

LN_LAM = -2.0  # every hand-built case uses ln λ = -2


def factor_for(lk, ln_lam=LN_LAM):
    return lk * math.exp(ln_lam)


def scored(x_keys, a_rows=None, y_keys=None, heads=1):
    """q, k, v (float64, scale 1) with scores S[i, j] = x_j + a_i * y_j, v = identity.

    The output row is then exactly the attention distribution over keys.
    """
    lk = len(x_keys)
    lq = 4 if a_rows is None else len(a_rows)
    a = torch.zeros(lq) if a_rows is None else torch.tensor(a_rows, dtype=torch.float64)
    y = torch.zeros(lk) if y_keys is None else torch.tensor(y_keys, dtype=torch.float64)
    q = torch.stack([torch.ones(lq, dtype=torch.float64), a], -1)
    k = torch.stack([torch.tensor(x_keys, dtype=torch.float64), y], -1)
    q = q[None, :, None, :].expand(1, lq, heads, 2).contiguous()
    k = k[None, :, None, :]
    v = torch.eye(lk, dtype=torch.float64)[None, :, None, :]
    return q, k, v


def kept_keys(out, eps=0.0):
    """Keys that received weight in each output row (from the identity-V trick)."""
    return out[0, :, 0, :] > eps


# Tile maxima 0, -10, 5, -1 (block_n = 2, every key of a tile equal).
X4 = [0, 0, -10, -10, 5, 5, -1, -1]


def tiles_skipped(out_row, block_n=2):
    w = out_row.view(-1, block_n).sum(-1)
    return [i for i, s in enumerate(w.tolist()) if s == 0.0]


@pytest.mark.parametrize("order,expected", [("forward", [1, 3]), ("reverse", [0, 1])])
def test_order_decides_which_tiles_skip(order, expected):
    q, k, v = scored(X4)
    out, lse, st = blasst_attention(q, k, v, softmax_scale=1.0, threshold_scale_factor=factor_for(8),
                                    block_m=4, block_n=2, order=order)
    for r in range(4):
        assert tiles_skipped(out[0, r, 0]) == expected
    assert st.visited.tolist() == [[4]] and st.skipped.tolist() == [[2]]
    # The output is the softmax over the kept keys only; lse likewise.
    keep = torch.ones(8, dtype=torch.bool)
    for t in expected:
        keep[2 * t:2 * t + 2] = False
    s = torch.tensor(X4, dtype=torch.float64)
    ref = torch.softmax(s.masked_fill(~keep, -math.inf), 0)
    torch.testing.assert_close(out[0, 0, 0], ref, rtol=0, atol=1e-15)
    assert lse[0, 0, 0].item() == pytest.approx(torch.logsumexp(s[keep], 0).item(), abs=1e-6)


def test_threshold_boundary_is_strict():
    # Tile 1 sits exactly ln λ below the running max: not "< ln λ", so it is kept.
    q, k, v = scored([0, 0, -2, -2])
    lam = math.exp(-2.0)
    _, _, st = blasst_attention(q, k, v, softmax_scale=1.0, threshold_scale_factor=lam * 4 * 1.0001,
                                block_m=4, block_n=2)
    assert st.skipped.sum() == 1  # λ slightly larger: -2 < ln λ
    _, _, st = blasst_attention(q, k, v, softmax_scale=1.0, threshold_scale_factor=lam * 4 * 0.9999,
                                block_m=4, block_n=2)
    assert st.skipped.sum() == 0


def test_splits_reset_the_running_state():
    # Forward, one chunk: tiles 2 and 3 fall far below the max set by tile 1.
    x = [0, 0, 5, 5, -4, -4, -1, -1]
    q, k, v = scored(x)
    kw = dict(softmax_scale=1.0, threshold_scale_factor=factor_for(8), block_m=4, block_n=2)
    out, _, st = blasst_attention(q, k, v, **kw)
    assert tiles_skipped(out[0, 0, 0]) == [2, 3]
    # Two chunks [0,1] and [2,3]: tile 2 opens chunk 2 (never skipped), tile 3 is above its max.
    out, lse, st = blasst_attention(q, k, v, num_splits=2, **kw)
    assert tiles_skipped(out[0, 0, 0]) == [] and st.skipped.sum() == 0 and st.visited.sum() == 4
    # split_tiles=3: chunks [0,1,2], [3].
    out, _, _ = blasst_attention(q, k, v, split_tiles=3, **kw)
    assert tiles_skipped(out[0, 0, 0]) == [2]
    # More splits than tiles: every tile opens a chunk.
    _, _, st = blasst_attention(q, k, v, num_splits=8, **kw)
    assert st.skipped.sum() == 0


@pytest.mark.parametrize("num_splits,order,expected", [
    (1, "forward", [2, 3, 5]),  # one chunk: the interleaved and contiguous forms coincide
    (2, "forward", [2, 3, 5]),  # chunks {0, 2, 4} (max 0, then 6) and {1, 3, 5} (max 5)
    (2, "reverse", [0, 2]),     # chunk {4, 2, 0} opens at 6; chunk {5, 3, 1} opens at -2
    (3, "forward", []),         # chunks {0, 3}, {1, 4}, {2, 5}: no tile falls 2 below its max
])
def test_interleaved_splits_deal_tiles_round_robin(num_splits, order, expected):
    # Tile scores 0, 5, -4, -1, 6, -2 with ln λ = -2.
    q, k, v = scored([0, 0, 5, 5, -4, -4, -1, -1, 6, 6, -2, -2])
    kw = dict(softmax_scale=1.0, threshold_scale_factor=factor_for(12), block_m=4, block_n=2)
    out, lse, st = blasst_attention(q, k, v, num_splits=num_splits, interleave_splits=True,
                                    order=order, **kw)
    assert tiles_skipped(out[0, 0, 0]) == expected
    assert st.visited.sum() == 6 and st.skipped.sum() == len(expected)
    with pytest.raises(ValueError, match="split_tiles"):
        blasst_attention(q, k, v, split_tiles=2, interleave_splits=True, **kw)


def test_first_tile_is_never_skipped_even_if_tiny():
    q, k, v = scored([-50, -50, 0, 0])
    out, _, st = blasst_attention(q, k, v, softmax_scale=1.0, threshold_scale_factor=factor_for(4),
                                  block_m=4, block_n=2)
    assert st.skipped.sum() == 0  # tile 1 raises the max: kept; tile 0 is first: kept
    assert out[0, 0, 0, 0] > 0


def test_causal_rows_that_see_nothing_vote_skip():
    # Lq = Lk = 8, block_m = 4, block_n = 2. q-tile 0 (rows 0-3) visits tiles 0, 1; q-tile 1 all 4.
    q, k, v = scored(X4, a_rows=[0] * 8)
    out, _, st = blasst_attention(q, k, v, causal=True, softmax_scale=1.0,
                                  threshold_scale_factor=factor_for(8), block_m=4, block_n=2)
    assert st.visited.tolist() == [[6]] and st.skipped.tolist() == [[3]]
    # Row 6 sees keys 0..6: tiles 1 and 3 skipped (tile 3: rows 4, 5 see none of it, 6, 7 are low).
    assert tiles_skipped(out[0, 6, 0]) == [1, 3]
    # Row 1 sees keys 0, 1 only: its q-tile skipped tile 1 (rows 0, 1 see none of it, 2, 3 low).
    assert kept_keys(out)[1].tolist() == [True, True] + [False] * 6


def test_causal_is_bottom_right_aligned():
    q, k, v = random_qkv(1, 3, 10, 2, 1, 16, dtype=torch.float64)
    out, lse, _ = blasst_attention(q, k, v, causal=True, block_m=4, block_n=4)
    mask = torch.arange(10)[None, :] <= torch.arange(3)[:, None] + 7
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
                                         v.repeat_interleave(2, 2).transpose(1, 2), attn_mask=mask)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_rows_per_decision_decide_independently():
    # Rows 0, 1 score x_j; rows 2, 3 score x_j + y_j, with y lifting tile 1 for them.
    y = [0, 0, 20, 20, 0, 0, 0, 0]
    q, k, v = scored(X4, a_rows=[0, 0, 1, 1], y_keys=y)
    kw = dict(softmax_scale=1.0, threshold_scale_factor=factor_for(8), block_m=4, block_n=2)
    out, _, st = blasst_attention(q, k, v, rows_per_decision=2, **kw)
    assert tiles_skipped(out[0, 0, 0]) == [1, 3]
    assert tiles_skipped(out[0, 2, 0]) == [2, 3]  # tile 1 (10) set the max, tile 2 (5) is then low
    assert st.visited.tolist() == [[8]] and st.skipped.tolist() == [[4]]
    # One decision for the whole tile: rows 2, 3 veto skipping tile 1; tile 2 is kept since rows 0-1
    # see it above their max; tile 3 is low for everyone.
    out, _, st = blasst_attention(q, k, v, **kw)
    assert tiles_skipped(out[0, 0, 0]) == [3] and tiles_skipped(out[0, 2, 0]) == [3]
    assert st.visited.tolist() == [[4]] and st.skipped.tolist() == [[1]]


def test_pv_groups_skip_when_all_their_decision_groups_skip():
    # The rows_per_decision test's case with one 4-row P·V group over the two 2-row decision
    # groups: tile 3 is skipped by both (a P·V skip), tiles 1 and 2 by one group each (no P·V
    # skip); the decisions and outputs are those of the 2-row groups.
    y = [0, 0, 20, 20, 0, 0, 0, 0]
    q, k, v = scored(X4, a_rows=[0, 0, 1, 1], y_keys=y)
    kw = dict(softmax_scale=1.0, threshold_scale_factor=factor_for(8), block_m=4, block_n=2,
              rows_per_decision=2)
    out, _, st = blasst_attention(q, k, v, rows_per_pv=4, **kw)
    out2, _, st2 = blasst_attention(q, k, v, **kw)
    assert torch.equal(out, out2) and st2.pv_visited is None and st2.pv_sparsity is None
    assert st.visited.tolist() == [[8]] and st.skipped.tolist() == [[4]]
    assert st.pv_visited.tolist() == [[4]] and st.pv_skipped.tolist() == [[1]]
    assert st.pv_sparsity == 0.25


def test_pv_group_of_padding_rows_neither_vetoes_nor_counts():
    # Lq = 5, block_m = 8, 2-row decision groups, 4-row P·V groups: the second P·V group holds
    # row 4 and padding rows (its all-padding decision group votes skip and is not counted).
    q, k, v = scored(X4, a_rows=[0] * 5)
    _, _, st = blasst_attention(q, k, v, softmax_scale=1.0, threshold_scale_factor=factor_for(8),
                                block_m=8, block_n=2, rows_per_decision=2, rows_per_pv=4)
    assert st.visited.tolist() == [[3 * 4]] and st.skipped.tolist() == [[3 * 2]]
    assert st.pv_visited.tolist() == [[2 * 4]] and st.pv_skipped.tolist() == [[2 * 2]]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pack_gqa", [False, True])
def test_pv_counts_equal_counts_at_pv_granularity(causal, pack_gqa):
    # A P·V group skips iff each of its decision groups does; a skipping row's tile max is below
    # its running max, so the P·V group's keeps leave it unchanged: the P·V counts are the
    # counts of decisions made per rows_per_pv rows. Ragged Lq (padding), several factors.
    q, k, v = synthetic_qkv(2, 300, 700, 4, 2, 32, dtype=torch.float32, seed=11)
    geom = dict(block_m=64, block_n=32, pack_gqa=pack_gqa, order="reverse")
    skipped_any = 0
    for f in (1.0, 10.0, 100.0, 400.0):
        _, _, st = blasst_attention(q, k, v, causal=causal, threshold_scale_factor=f,
                                    rows_per_decision=8, rows_per_pv=32, **geom)
        _, _, st32 = blasst_attention(q, k, v, causal=causal, threshold_scale_factor=f,
                                      rows_per_decision=32, **geom)
        assert st.pv_visited.tolist() == st32.visited.tolist()
        assert st.pv_skipped.tolist() == st32.skipped.tolist()
        assert int(st.pv_skipped.sum()) * 4 <= int(st.skipped.sum())
        skipped_any += int(st.pv_skipped.sum() > 0)
        assert st.pv_sparsity <= st.sparsity
    assert skipped_any >= 2


def _varlen_case():
    """4 sequences of ragged lengths (one empty query, one 3-key), packed: cu_seqlens, q, k, v."""
    lens_q, lens_k = [5, 0, 130, 64], [70, 3, 130, 300]
    cq = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    ck = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q, _, _ = synthetic_qkv(1, sum(lens_q), sum(lens_q), 4, 2, 32, dtype=torch.float64, seed=1)
    _, k, v = synthetic_qkv(1, sum(lens_k), sum(lens_k), 4, 2, 32, dtype=torch.float64, seed=2)
    return cq, ck, q[0], k[0], v[0]


def test_pv_counts_varlen_and_paged():
    cq, ck, q, k, v = _varlen_case()
    geom = dict(block_m=32, block_n=32, rows_per_decision=8, rows_per_pv=16)
    _, _, st = blasst_attention_varlen(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True,
                                       threshold_scale_factor=20.0, **geom)
    assert st.pv_skipped.sum() > 0
    for b in range(4):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        _, _, s = blasst_attention(q[sq][None], k[sk][None], v[sk][None], causal=True,
                                   threshold_scale_factor=20.0, **geom)
        assert st.pv_visited[b].tolist() == s.pv_visited[0].tolist()
        assert st.pv_skipped[b].tolist() == s.pv_skipped[0].tolist()
    qd, kd, vd = synthetic_qkv(2, 2, 150, 8, 2, 32, dtype=torch.float64, seed=3)
    _, _, sp = blasst_attention_paged(qd, kd, vd, cache_seqlens=torch.tensor([150, 40]),
                                      threshold_scale_factor=3.0, block_m=16, block_n=32,
                                      pack_gqa=True, rows_per_decision=8, rows_per_pv=16)
    assert sp.pv_visited.shape == (2, 2) and int(sp.pv_visited.sum()) > 0


def test_padding_rows_neither_veto_nor_count():
    # Lq = 5 with block_m = 4 and 2-row groups: q-tile 1 holds row 4 and 3 padding rows; the
    # all-padding group (rows 6, 7) is not counted.
    q, k, v = scored(X4, a_rows=[0] * 5)
    _, _, st = blasst_attention(q, k, v, softmax_scale=1.0, threshold_scale_factor=factor_for(8),
                                block_m=4, block_n=2, rows_per_decision=2)
    assert st.visited.tolist() == [[(2 + 1) * 4]]
    assert st.skipped.tolist() == [[(2 + 1) * 2]]


def test_gqa_packing_decides_over_the_whole_group():
    # Hq = 2, Hk = 1: head 0 scores x_j, head 1 scores x_j + y_j (tile 1 high for head 1 only).
    y = [0, 0, 20, 20, 0, 0, 0, 0]
    q, k, v = scored(X4, a_rows=[0, 0], y_keys=y, heads=2)
    q[:, :, 1, 1] = 1.0
    kw = dict(softmax_scale=1.0, threshold_scale_factor=factor_for(8), block_m=4, block_n=2)
    out, _, st = blasst_attention(q, k, v, **kw)  # not packed: per q-head decisions
    assert st.visited.shape == (1, 2) and st.skipped.tolist() == [[2, 2]]
    assert tiles_skipped(out[0, 0, 0]) == [1, 3] and tiles_skipped(out[0, 0, 1]) == [2, 3]
    out, _, st = blasst_attention(q, k, v, pack_gqa=True, **kw)  # rows (pos, g): one decision
    assert st.visited.shape == (1, 1) and st.visited.tolist() == [[4]] and st.skipped.tolist() == [[1]]
    assert tiles_skipped(out[0, 0, 0]) == [3] and tiles_skipped(out[0, 0, 1]) == [3]


@pytest.mark.parametrize("factor", [None, 0, 0.0, 8.0, 100.0])
def test_no_skipping_when_off_or_lambda_at_least_one(factor):
    # Lk = 8: factor 8 gives λ = 1 and 100 gives λ > 1: no skipping, like None and 0.
    q, k, v = scored(X4)
    _, _, st = blasst_attention(q, k, v, softmax_scale=1.0, threshold_scale_factor=factor,
                                block_m=4, block_n=2)
    assert st.skipped.sum() == 0 and st.visited.sum() == 4


def test_log_threshold_per_sequence():
    ln = log_threshold(torch.tensor([0.0, 1.0, 10.0, 4.0]), torch.tensor([8, 8, 8, 0]))
    assert ln[0] == -math.inf and ln[1] == pytest.approx(math.log(1 / 8)) and ln[2] == -math.inf
    assert ln[3] == -math.inf  # Lk = 0


def test_rows_without_visible_keys_give_zero_and_minus_inf():
    q, k, v = random_qkv(1, 6, 3, 2, 2, 8, dtype=torch.float64)
    out, lse, _ = blasst_attention(q, k, v, causal=True, block_m=4, block_n=2)
    assert (out[0, :3] == 0).all() and torch.isinf(lse[0, :, :3]).all() and (lse[0, :, :3] < 0).all()
    assert torch.isfinite(lse[0, :, 3:]).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(1, 1), (37, 37), (100, 517), (517, 100), (1, 700), (256, 256)])
@pytest.mark.parametrize("geom", [Geometry(), Geometry(64, 32, True, "reverse", 3, 16)])
def test_dense_matches_sdpa_float64(causal, lq, lk, geom):
    q, k, v = random_qkv(2, lq, lk, 6, 2, 32, 24, dtype=torch.float64, seed=lq * 1000 + lk)
    out, lse, st = blasst_attention(q, k, v, causal=causal, **geom.kwargs())
    kk, vv = k.repeat_interleave(3, 2), v.repeat_interleave(3, 2)
    mask = None
    if causal:
        mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2),
                                         attn_mask=mask).transpose(1, 2)
    seen = mask.any(-1) if causal else torch.ones(lq, dtype=torch.bool)
    ref = torch.where(seen[None, :, None, None], ref, torch.zeros_like(ref))
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-10
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(32)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).float())
    assert st.skipped.sum() == 0


def test_synthetic_skipping_changes_output_only_slightly():
    q, k, v = synthetic_qkv(1, 512, 512, 4, 2, 64, dtype=torch.float64, seed=3)
    dense, _, _ = blasst_attention(q, k, v, causal=True, block_m=64, block_n=64)
    sparse, _, st = blasst_attention(q, k, v, causal=True, threshold_scale_factor=100.0,
                                     block_m=64, block_n=64)
    assert 0.03 < st.sparsity < 0.5
    assert 0 < ((sparse - dense).norm() / dense.norm()).item() < 0.02


def test_varlen_matches_per_sequence_calls():
    cq, ck, q, k, v = _varlen_case()
    factors = torch.tensor([2.0, 1.0, 0.0, 20.0], dtype=torch.float64)
    geom = dict(block_m=32, block_n=32, rows_per_decision=16)
    out, lse, st = blasst_attention_varlen(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True,
                                           threshold_scale_factor=factors, **geom)
    for b in range(4):
        sq, sk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, l, s = blasst_attention(q[sq][None], k[sk][None], v[sk][None], causal=True,
                                   threshold_scale_factor=float(factors[b]), **geom)
        torch.testing.assert_close(out[sq], o[0])
        torch.testing.assert_close(lse[:, sq], l[0])
        assert st.visited[b].tolist() == s.visited[0].tolist()
        assert st.skipped[b].tolist() == s.skipped[0].tolist()
    assert st.skipped.sum() > 0


@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_matches_contiguous(page_size):
    B, L = 3, 200
    q, k, v = synthetic_qkv(B, L, L, 8, 2, 32, dtype=torch.float64, seed=4)
    q = q[:, -2:]
    lens = torch.tensor([200, 1, 129], dtype=torch.int32)
    k_cache, v_cache, table = to_paged(k, v, page_size, seed=page_size)
    geom = dict(block_m=16, block_n=32, pack_gqa=True)
    out, lse, st = blasst_attention_paged(q, k_cache, v_cache, cache_seqlens=lens, block_table=table,
                                          threshold_scale_factor=3.0, **geom)
    out_c, lse_c, st_c = blasst_attention_paged(q, k, v, cache_seqlens=lens,
                                                threshold_scale_factor=3.0, **geom)
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(lse, lse_c)
    assert st.skipped.tolist() == st_c.skipped.tolist()
    for b in range(B):
        n = int(lens[b])
        o, _, _ = blasst_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True,
                                   threshold_scale_factor=3.0, **geom)
        torch.testing.assert_close(out[b], o[0])


def test_geometry_errors_are_clear():
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="rows_per_decision"):
        blasst_attention(q, k, v, block_m=64, rows_per_decision=48)
    with pytest.raises(ValueError, match="order"):
        blasst_attention(q, k, v, order="sideways")
    with pytest.raises(ValueError, match="num_splits"):
        blasst_attention(q, k, v, num_splits=0)
    for bad in (24, 128, 0, 16.0):  # not a multiple of rows_per_decision dividing block_m
        with pytest.raises(ValueError, match="rows_per_pv"):
            blasst_attention(q, k, v, block_m=64, rows_per_decision=16, rows_per_pv=bad)


@pytest.mark.parametrize("geom", [Geometry(64, 64, False, "forward", 1, 32), Geometry(32, 64, True, "reverse", 2)])
def test_skip_counts_match_attention_stats(geom):
    from blasst_cute.reference import skip_counts
    q, k, v = synthetic_qkv(2, 300, 400, 4, 2, 32, dtype=torch.float32, seed=8)
    factors = [0.0, 3.0, 30.0, 300.0]
    visited, skipped = skip_counts(q, k, factors=factors, causal=True, **geom.kwargs())
    for i, f in enumerate(factors):
        _, _, st = blasst_attention(q, k, v, causal=True, threshold_scale_factor=f, **geom.kwargs())
        assert visited[i].tolist() == st.visited.tolist() and skipped[i].tolist() == st.skipped.tolist()
    assert skipped[0].sum() == 0 and skipped[-1].sum() > skipped[1].sum()
