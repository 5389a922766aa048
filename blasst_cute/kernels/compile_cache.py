"""Compiled-kernel caches: in memory per process, and on disk across processes.

A configuration is compiled once per process (``cute.compile`` takes ~1-3 s); the disk cache lets a
new process load the exported object instead (``export_to_c`` / ``cute.runtime.load_module``).
The disk namespace is a hash of this package's kernel sources, the CuTe DSL version, the Python
version and the target architecture, so a code or toolchain change never loads a stale kernel.

Environment: ``BLASST_CUTE_CACHE_DIR`` (default ``~/.cache/blasst_cute``), and
``BLASST_CUTE_DISK_CACHE=0`` to turn the disk cache off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Hashable

_memory: dict = {}
_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _namespace() -> str:
    import cutlass

    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    h.update(getattr(cutlass, "__version__", "?").encode())
    h.update(sys.version.split()[0].encode())
    h.update(os.environ.get("CUTE_DSL_ARCH", "").encode())
    return h.hexdigest()[:20]


def disk_cache_dir() -> Path | None:
    if os.environ.get("BLASST_CUTE_DISK_CACHE", "1") == "0":
        return None
    base = os.environ.get("BLASST_CUTE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "blasst_cute")
    return Path(base) / _namespace()


def _entry_name(key: Hashable) -> str:
    return "k" + hashlib.sha256(repr(key).encode()).hexdigest()[:24]


def _load(path: Path, name: str):
    import cutlass.cute as cute

    module = cute.runtime.load_module(str(path))
    fn = getattr(module, name)
    fn._blasst_module = module  # keep the loaded module alive as long as the function
    return fn


def _store(fn, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        fn.export_to_c(tmp, name, function_prefix=name)
        os.replace(os.path.join(tmp, name + ".o"), directory / (name + ".o"))  # atomic publish


def get_or_compile(key: Hashable, compile_fn: Callable[[], object], disk: bool = True):
    """The compiled function for ``key``: from memory, else from disk, else ``compile_fn()``.

    ``disk=False`` keeps the entry in memory only (for callers that rely on attributes of a freshly
    compiled function). A disk entry that cannot be written or read only costs a recompilation
    (with a warning).
    """
    fn = _memory.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _memory.get(key)
        if fn is not None:
            return fn
        directory = disk_cache_dir() if disk else None
        name = _entry_name(key)
        if directory is not None and (directory / (name + ".o")).exists():
            try:
                fn = _load(directory / (name + ".o"), name)
            except Exception as exc:  # corrupt or incompatible entry: rebuild it
                warnings.warn(f"blasst_cute: ignoring unreadable cached kernel {name}: {exc}")
        if fn is None:
            fn = compile_fn()
            if directory is not None:
                try:
                    _store(fn, directory, name)
                except Exception as exc:
                    warnings.warn(f"blasst_cute: could not write the kernel disk cache: {exc}")
        _memory[key] = fn
        return fn


def clear_memory() -> None:
    _memory.clear()
