"""launch_decode's host side, without a GPU: the one-buffer argument storage of ``_FastCall``
must hold, byte for byte, what the DSL's own argument marshalling produces for the same values
(a wrong slot would launch the kernel on wrong pointers or shapes); the cache size the eager
fused-merge rule reads."""

import ctypes
import os

import pytest
import torch

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

import cutlass  # noqa: E402
from cutlass import Float32, Int32  # noqa: E402
import cutlass.cute as cute  # noqa: E402

from blasst_cute.kernels import launch_decode  # noqa: E402
from blasst_cute.kernels.dtypes import TORCH_TO_CUTLASS  # noqa: E402
from blasst_cute.kernels.launch_common import combine_compile_args, cuda_stream, make_ptr  # noqa: E402

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check")


def distinct_values(sample_args):
    """(DSL arguments, plain values) of the same kinds as sample_args, every value distinct
    (None arguments stay None and have no value)."""
    args, values = [], []
    for i, a in enumerate(sample_args):
        if a is None:
            args.append(None)
            continue
        if isinstance(a, cute.Pointer):
            v = 0x7F0000000000 + 0x1000 * (i + 1)
            args.append(make_ptr(a.dtype, v, a._assumed_align or 1))
        elif isinstance(a, cutlass.Int64):
            v = 2 ** 40 + 3 * i
            args.append(cutlass.Int64(v))
        elif isinstance(a, Int32):
            v = 1000 + 7 * i
            args.append(Int32(v))
        elif isinstance(a, Float32):
            v = 0.5 + 0.25 * i  # exact in float32
            args.append(Float32(v))
        else:  # the stream
            v = 0xABC000 + i
            args.append(cuda_stream(v))
        values.append(v)
    return args, values


def assert_storage_matches_dsl(fn, sample_args, dynamic):
    fast = launch_decode._FastCall(fn, sample_args, dynamic)
    assert fast.ok
    args, values = distinct_values(sample_args)
    static = [i for i in range(len(values)) if i not in dynamic]
    fast.preset(static, [values[i] for i in static])
    fast.dynamic.pack_into(fast.buf, 0, *[values[i] for i in dynamic])  # launch() minus the launch
    exe, _ = fn.execution_args.generate_execution_args(tuple(args), {})
    assert len(exe) == len(fast.addrs)
    present = [a for a in args if a is not None]
    for i, (e, dst) in enumerate(zip(exe, fast.addrs)):
        a = present[i]
        nbytes = 4 if isinstance(a, (Int32, Float32)) else 8
        want = ctypes.string_at(e if isinstance(e, int) else e.value, nbytes)
        assert ctypes.string_at(dst, nbytes) == want, f"parameter {i} ({type(a).__name__})"


@cpu_only
def test_fast_call_storage_combine():
    dt = TORCH_TO_CUTLASS[torch.bfloat16]
    sample = combine_compile_args(dt)
    fn = launch_decode.compile_combine_sm90(torch.bfloat16, 128)
    assert_storage_matches_dsl(fn, sample, list(launch_decode._CPOS))


@cpu_only
@pytest.mark.parametrize("paged,factor_per_batch", [(True, False), (False, True)])
def test_fast_call_storage_decode(paged, factor_per_batch):
    config = dict(dtype=torch.bfloat16, head_dim=128, page_size=64 if paged else None,
                  has_skip=True, factor_per_batch=factor_per_batch)
    fn = launch_decode.compile_decode_sm90(config)
    sample = launch_decode._decode_compile_args(dict(launch_decode._config_key(config)),
                                                cuda_stream(0))
    dynamic = decode_dynamic(sample)
    assert_storage_matches_dsl(fn, sample, dynamic)


def decode_dynamic(sample):
    """The decode launcher's per-call parameters: pointers, scale, factor, stream."""
    n = sum(a is not None for a in sample)
    n_ptr = sum(isinstance(a, cute.Pointer) for a in sample if a is not None)
    return list(range(n_ptr)) + [n - 4, n - 3, n - 1]


@cpu_only
def test_fast_call_float_beyond_float32_is_inf():
    """A factor beyond float32's range reaches the kernel as inf (what a C cast gives), not as
    an exception from the packing."""
    config = dict(dtype=torch.bfloat16, head_dim=128, page_size=64, has_skip=True)
    fn = launch_decode.compile_decode_sm90(config)
    sample = launch_decode._decode_compile_args(dict(launch_decode._config_key(config)),
                                                cuda_stream(0))
    dynamic = decode_dynamic(sample)
    fast = launch_decode._FastCall(fn, sample, dynamic)
    assert fast.ok
    fast._launch = lambda: None  # storage only: no GPU here
    _, values = distinct_values(sample)
    dyn_values = [values[i] for i in dynamic]
    dyn_values[-2] = 1e300  # the factor
    fast.launch(dyn_values)
    factor_addr = fast.addrs[dynamic[-2]]
    assert ctypes.c_float.from_address(factor_addr).value == float("inf")
    assert ctypes.c_uint64.from_address(fast.addrs[0]).value == values[0]


def test_cache_kv_bytes():
    """The eager fused-merge rule's size: B x capacity x Hk x (D + Dv) x element size."""
    q = torch.empty(3, 1, 32, 128, dtype=torch.bfloat16, device="meta")
    kc = torch.empty(40, 64, 8, 128, dtype=torch.bfloat16, device="meta")
    bt = torch.empty(3, 10, dtype=torch.int32, device="meta")
    assert launch_decode.cache_kv_bytes(q, kc, kc, bt) == 3 * 640 * 8 * 256 * 2
    kc = torch.empty(3, 1000, 8, 128, dtype=torch.float16, device="meta")
    assert launch_decode.cache_kv_bytes(q, kc, kc, None) == 3 * 1000 * 8 * 256 * 2
