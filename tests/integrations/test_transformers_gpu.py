"""attn_implementation="blasst" through the CuTe DSL kernels on a GPU (tiny random-config Llama, bf16)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from blasst_cute.integrations import transformers as bt  # noqa: E402

pytestmark = pytest.mark.gpu


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   pad_token_id=0)  # head dim 64, GQA 2
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model.to(device="cuda", dtype=torch.bfloat16).eval()


def test_kernels_dense_match_sdpa_and_generate():
    bt.register()
    bt.reset()
    model = _model()
    ids = torch.randint(1, 128, (2, 700), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(input_ids=ids).logits.float()
        model.set_attn_implementation("blasst")
        out = model(input_ids=ids).logits.float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    gen = model.generate(input_ids=ids[:, :300], **kw)  # prefill + 7 decode steps on the kernels
    assert gen.shape == (2, 308)


def test_kernels_skip_with_stats():
    bt.register()
    bt.reset()
    model = _model()
    with torch.no_grad():  # random weights attend almost uniformly: sharpen so tiles skip
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 40
    bt.configure(prefill_factor=500.0, decode_factor=50.0, collect_stats=True)
    model.set_attn_implementation("blasst")
    ids = torch.randint(1, 128, (1, 2048), generator=torch.Generator().manual_seed(2)).cuda()
    model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    pre, dec = bt.phase_stats("prefill"), bt.phase_stats("decode")
    assert pre.visited > 0 and dec.visited > 0
    bt.reset()


def test_kernel_decode_reads_the_hf_cache_in_place(monkeypatch):
    """On CUDA too the cache reaches the decode kernel as a strided view (no per-step copy)."""
    from cache_spy import assert_read_in_place, decode_cache_reads
    bt.register()
    bt.reset()
    model = _model()
    model.set_attn_implementation("blasst")
    ids = torch.randint(1, 128, (2, 300), generator=torch.Generator().manual_seed(2)).cuda()
    assert_read_in_place(*decode_cache_reads(model, ids, monkeypatch))
