"""FlashAttention-compatible ops on the CPU reference path: layouts, equivalences, loud errors."""

import pytest
import torch

import blasst_cute
from blasst_cute.testing import dense_attention
from blasst_cute.integrations.fa_compat import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
)


def _dense(q, k, v, causal, scale=None):
    """float64 dense attention, [B, S, H, D] layout, GQA, bottom-right causal."""
    return dense_attention(q, k, v, causal=causal, softmax_scale=scale)[0]


def _qkv(B, Lq, Lk, Hq=4, Hk=2, D=32, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, D, generator=g)
    k = torch.randn(B, Lk, Hk, D, generator=g)
    v = torch.randn(B, Lk, Hk, Dv or D, generator=g)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_func_dense_matches_sdpa(causal):
    q, k, v = _qkv(2, 40, 70, Dv=16)
    out = flash_attn_func(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), _dense(q, k, v, causal), atol=1e-5, rtol=1e-5)
    out2, lse = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert lse.shape == (2, 4, 40) and torch.equal(out, out2)


def test_func_factor_matches_prefill_and_returns_stats():
    q, k, v = _qkv(1, 300, 300)
    ref, st_ref = blasst_cute.prefill(q, k, v, causal=True, threshold_scale_factor=50.0, return_stats=True)
    out, st = flash_attn_func(
        q, k, v, causal=True, skip_softmax_threshold_scale_factor=50.0, return_skip_stats=True
    )
    assert torch.equal(out, ref)
    assert torch.equal(st.skipped, st_ref.skipped) and torch.equal(st.visited, st_ref.visited)


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def test_varlen_matches_per_sequence():
    lq, lk = [5, 17, 1], [9, 17, 30]
    seqs = [_qkv(1, a, b, seed=i) for i, (a, b) in enumerate(zip(lq, lk))]
    q = torch.cat([s[0][0] for s in seqs])
    k = torch.cat([s[1][0] for s in seqs])
    v = torch.cat([s[2][0] for s in seqs])
    out = flash_attn_varlen_func(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), causal=True)
    for i, (qq, kk, vv) in enumerate(seqs):
        rows = slice(sum(lq[:i]), sum(lq[: i + 1]))
        torch.testing.assert_close(out[rows].double(), _dense(qq, kk, vv, True)[0], atol=1e-5, rtol=1e-5)


def test_varlen_seqused_and_paged_agree():
    B, Lq, cap, ps = 2, 3, 64, 16
    q, kc, vc = _qkv(B, Lq, cap)
    used = torch.tensor([40, 23], dtype=torch.int32)
    qv = q.reshape(-1, *q.shape[2:])
    cu_q = _cu([Lq] * B)
    out_used = flash_attn_varlen_func(
        qv,
        kc.reshape(-1, 2, 32),
        vc.reshape(-1, 2, 32),
        cu_q,
        _cu([cap] * B),
        seqused_k=used,
        causal=True,
        skip_softmax_threshold_scale_factor=5.0,
    )
    # The same keys in a shuffled page pool.
    perm = torch.randperm(B * cap // ps, generator=torch.Generator().manual_seed(1))
    kp = kc.reshape(B * cap // ps, ps, 2, 32)[perm.argsort()]
    vp = vc.reshape(B * cap // ps, ps, 2, 32)[perm.argsort()]
    table = perm.view(B, cap // ps).to(torch.int32)
    out_paged = flash_attn_varlen_func(
        qv,
        kp,
        vp,
        cu_q,
        page_table=table,
        seqused_k=used,
        causal=True,
        skip_softmax_threshold_scale_factor=5.0,
    )
    torch.testing.assert_close(out_paged, out_used)
    for b in range(B):
        n = int(used[b])
        ref = _dense(q[b : b + 1], kc[b : b + 1, :n], vc[b : b + 1, :n], True)[0]
        torch.testing.assert_close(out_used[b * Lq : (b + 1) * Lq].double(), ref, atol=1e-5, rtol=1e-5)


def test_varlen_seqused_q_zeroes_unused_rows():
    q, k, v = _qkv(1, 6, 6)
    out = flash_attn_varlen_func(
        q[0], k[0], v[0], _cu([6]), _cu([6]), seqused_q=torch.tensor([4], dtype=torch.int32)
    )
    assert torch.all(out[4:] == 0)
    ref = flash_attn_varlen_func(q[0, :4], k[0], v[0], _cu([4]), _cu([6]))
    torch.testing.assert_close(out[:4], ref)


def test_kvcache_matches_decode_contiguous_and_paged():
    B, cap, ps = 2, 256, 32
    q, kc, vc = _qkv(B, 1, cap, Hq=6, Hk=2)
    lens = torch.tensor([200, 131], dtype=torch.int32)
    ref, st_ref = blasst_cute.decode(
        q, kc, vc, cache_seqlens=lens, threshold_scale_factor=20.0, return_stats=True
    )
    out, st = flash_attn_with_kvcache(
        q,
        kc,
        vc,
        cache_seqlens=lens,
        causal=True,
        skip_softmax_threshold_scale_factor=20.0,
        return_skip_stats=True,
    )
    assert torch.equal(out, ref) and torch.equal(st.skipped, st_ref.skipped)
    table = torch.arange(B * cap // ps, dtype=torch.int32).view(B, cap // ps)
    out_p = flash_attn_with_kvcache(
        q,
        kc.reshape(-1, ps, 2, 32),
        vc.reshape(-1, ps, 2, 32),
        cache_seqlens=lens,
        page_table=table,
        skip_softmax_threshold_scale_factor=20.0,
    )
    torch.testing.assert_close(out_p, out)
    out_b = flash_attn_with_kvcache(
        q,
        kc.reshape(-1, ps, 2, 32),
        vc.reshape(-1, ps, 2, 32),
        cache_seqlens=lens,
        block_table=table,
        skip_softmax_threshold_scale_factor=20.0,
    )
    torch.testing.assert_close(out_b, out)


def test_kvcache_appends_new_keys_in_place():
    B, cap = 2, 32
    q, kc, vc = _qkv(B, 2, cap)
    _, knew, vnew = _qkv(B, 2, 2, seed=3)
    lens = torch.tensor([10, 5], dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, knew, vnew, cache_seqlens=lens, causal=True, return_softmax_lse=True
    )
    assert lse.shape == (B, 4, 2)
    for b in range(B):
        n = int(lens[b])
        assert torch.equal(kc[b, n : n + 2], knew[b]) and torch.equal(vc[b, n : n + 2], vnew[b])
        kk = torch.cat([kc0[b : b + 1, :n], knew[b : b + 1]], 1)
        vv = torch.cat([vc0[b : b + 1, :n], vnew[b : b + 1]], 1)
        torch.testing.assert_close(
            out[b : b + 1].double(), _dense(q[b : b + 1], kk, vv, True), atol=1e-5, rtol=1e-5
        )


def test_kvcache_int_seqlens_and_noncausal_multi_query():
    q, kc, vc = _qkv(1, 3, 20)
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=12, causal=False)
    torch.testing.assert_close(out.double(), _dense(q, kc[:, :12], vc[:, :12], False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(window_size=(8, 0)), "window_size"),
        (dict(softcap=30.0), "softcap"),
        (dict(alibi_slopes=torch.ones(4)), "alibi_slopes"),
        (dict(dropout_p=0.1), "dropout_p"),
        (dict(learnable_sink=torch.ones(4)), "learnable_sink"),
    ],
)
def test_unsupported_arguments_raise(kwargs, name):
    q, k, v = _qkv(1, 4, 4)
    with pytest.raises(NotImplementedError, match=name):
        flash_attn_func(q, k, v, **kwargs)
    with pytest.raises(NotImplementedError, match=name):
        flash_attn_varlen_func(q[0], k[0], v[0], _cu([4]), _cu([4]), **kwargs)
    if name in ("window_size", "softcap", "alibi_slopes"):
        with pytest.raises(NotImplementedError, match=name):
            flash_attn_with_kvcache(q, k, v, cache_seqlens=4, **kwargs)


def test_bad_inputs_are_named():
    q, k, v = _qkv(1, 4, 4)
    with pytest.raises(NotImplementedError, match="rotary_cos"):
        flash_attn_with_kvcache(
            q, k, v, cache_seqlens=4, rotary_cos=torch.ones(4, 8), rotary_sin=torch.ones(4, 8)
        )
    with pytest.raises(TypeError):
        flash_attn_func(q, k, v, None, True)  # FA3/FA4 order differ: keyword-only beyond q, k, v
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        flash_attn_varlen_func(q[0], k[0], v[0], torch.tensor([0, 4]), _cu([4]))
    with pytest.raises(ValueError, match="seqused_k"):
        flash_attn_varlen_func(
            q[0],
            k.reshape(1, 4, 2, 32),
            v.reshape(1, 4, 2, 32),
            _cu([4]),
            page_table=torch.zeros(1, 1, dtype=torch.int32),
        )
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k, v)
    with pytest.raises(ValueError, match="threshold_scale_factor"):
        flash_attn_func(q, k, v, skip_softmax_threshold_scale_factor=-1.0)
