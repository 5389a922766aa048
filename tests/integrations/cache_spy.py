"""Records what the transformers integration hands to blasst_cute.decode (test helper)."""

import transformers

from blasst_cute.integrations import transformers as bt


def decode_cache_reads(model, ids, monkeypatch, max_new_tokens=3):
    """Generate with ``model``; returns ([(k ptr, k strides, v ptr)] per blasst_cute.decode call,
    {data pointers of every K/V tensor the transformers cache returned})."""
    seen, cache_ptrs = [], set()
    real_decode = bt.blasst_cute.decode
    real_update = transformers.cache_utils.DynamicLayer.update

    def decode(q, k, v, **kw):
        seen.append((k.data_ptr(), k.stride(), v.data_ptr()))
        return real_decode(q, k, v, **kw)

    def update(self, key_states, value_states, *a, **kw):
        k, v = real_update(self, key_states, value_states, *a, **kw)
        cache_ptrs.update((k.data_ptr(), v.data_ptr()))
        return k, v

    monkeypatch.setattr(bt.blasst_cute, "decode", decode)
    monkeypatch.setattr(transformers.cache_utils.DynamicLayer, "update", update)
    model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return seen, cache_ptrs


def assert_read_in_place(seen, cache_ptrs):
    assert seen, "decode steps must go through blasst_cute.decode"
    for k_ptr, k_stride, v_ptr in seen:
        assert k_ptr in cache_ptrs and v_ptr in cache_ptrs  # the cache itself, not a copy
        assert k_stride[2] > k_stride[1]  # head-major storage seen as [B, S, H, D]
