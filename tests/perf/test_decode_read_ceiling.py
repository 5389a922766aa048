"""perf/diag/decode_read_ceiling.py (GPU script): its helpers without a GPU or Triton."""

import numpy as np
import pytest


@pytest.fixture
def mod(perf_script):
    return perf_script("diag/decode_read_ceiling.py")


def test_kv_bytes_is_decode_matrix_count(mod):
    # B=1 L=8k Hk=4, d128 bf16: K and V of 8192 x 4 x 128 x 2 bytes each = 16.8 MB
    assert mod.kv_bytes(1, 8192, 4) == 16_777_216
    assert mod.kv_bytes(8, 8192, 4) == 8 * mod.kv_bytes(1, 8192, 4)
    assert mod.kv_bytes(1, 8192, 8, head_dim=64) == mod.kv_bytes(1, 8192, 4)


def test_share(mod):
    assert mod.share(3_000, 1e-6, 3e9) == pytest.approx(1.0)  # 3 GB/s of a 3 GB/s card
    assert mod.share(16_777_216, 7.0e-6, 3.028e12) == pytest.approx(0.7915, abs=1e-3)


def test_xor_check_sees_a_word_not_read(mod):
    """The per-program XORs combine to the input's XOR; a block read twice or left out does not."""
    rng = np.random.default_rng(0)
    words = rng.integers(-2**31, 2**31 - 1, size=4096 * 3 + 100, dtype=np.int64).astype(np.int32)
    block = 4096
    partials = np.array([np.bitwise_xor.reduce(words[i:i + block])
                         for i in range(0, words.size, block)], dtype=np.int32)
    assert mod.xor_all(partials) == mod.xor_all(words)
    assert mod.xor_all(partials[:-1]) != mod.xor_all(words)  # the tail left unread
    assert mod._programs(words.size, (1024, 4, 8)) == partials.size


def test_configs_are_triton_shapes(mod):
    for words, loads, warps in mod.CONFIGS:
        assert words & (words - 1) == 0 and words >= 32 * warps  # power of two, a word a lane
        assert loads >= 1 and warps in (1, 2, 4, 8, 16)
    for shape in mod.SHAPES:
        B, L, hq, hk = (int(x) for x in shape.split(","))
        assert hq % hk == 0 and mod.kv_bytes(B, L, hk) % 4 == 0  # whole int32 words
