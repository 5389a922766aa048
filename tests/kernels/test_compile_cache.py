"""The disk cache of compiled kernels round-trips without a GPU (export, then load in place)."""

import pytest

cute = pytest.importorskip("cutlass.cute")
import cutlass  # noqa: E402
from cutlass.cute.runtime import make_fake_tensor  # noqa: E402

from blasst_cute.kernels import compile_cache  # noqa: E402


@cute.kernel
def _double(x: cute.Tensor):
    tidx, _, _ = cute.arch.thread_idx()
    x[tidx] = x[tidx] * 2.0


@cute.jit
def _launch(x: cute.Tensor):
    _double(x).launch(grid=[1, 1, 1], block=[32, 1, 1])


def test_disk_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("BLASST_CUTE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BLASST_CUTE_DISK_CACHE", raising=False)  # on for this test
    x = make_fake_tensor(cutlass.Float32, (32,), stride=(1,))
    calls = []

    def build():
        calls.append(1)
        return cute.compile(_launch, x)

    key = ("test-double", 32)
    compile_cache.clear_memory()
    first = compile_cache.get_or_compile(key, build)
    assert calls == [1] and list(compile_cache.disk_cache_dir().glob("*.o"))
    assert compile_cache.get_or_compile(key, build) is first  # memory hit
    compile_cache.clear_memory()
    loaded = compile_cache.get_or_compile(key, build)  # a "new process": loads from disk
    assert calls == [1] and loaded is not first
    compile_cache.clear_memory()


def test_disk_cache_can_be_disabled(monkeypatch):
    monkeypatch.setenv("BLASST_CUTE_DISK_CACHE", "0")
    assert compile_cache.disk_cache_dir() is None
