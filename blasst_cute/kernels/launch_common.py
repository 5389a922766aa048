"""Host-side launch helpers shared by the sm90 decode and MLA decode glue (launch_decode.py,
launch_mla.py): raw pointers, streams, the SM count, the threshold-factor argument, memory-only
compilation and the combine kernel (its compile-time arguments and compiled form)."""

from __future__ import annotations

from typing import Optional

import cutlass.cute as cute
import torch
from cutlass import Float32, Int32

from blasst_cute.kernels import compile_cache
from blasst_cute.kernels.dtypes import TORCH_TO_CUTLASS
from blasst_cute.kernels.sm90.combine import BlasstDecodeCombineSm90, combine_warps_per_row

GMEM = cute.AddressSpace.gmem
_num_sms: dict = {}


def fake_ptr(dtype, align: int = 16):
    """A placeholder gmem pointer (compilation only)."""
    return cute.runtime.make_ptr(dtype, 0, GMEM, assumed_align=align)


def make_ptr(dtype, addr: int, align: int):
    """A gmem pointer at device address ``addr``."""
    return cute.runtime.make_ptr(dtype, addr, GMEM, assumed_align=align)


def cuda_stream(h: int):
    """``cuda.CUstream`` of the raw handle ``h`` (0: placeholder for compilation)."""
    import cuda.bindings.driver as cuda

    return cuda.CUstream(h)


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of ``device`` (cached per device index)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _num_sms.get(idx)
    if n is None:
        n = _num_sms[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def factor_kind(threshold_scale_factor, has_stats: bool):
    """(has_skip, factor tensor or None, scalar factor)."""
    if isinstance(threshold_scale_factor, torch.Tensor):
        return True, threshold_scale_factor, 0.0
    if threshold_scale_factor is None:
        return has_stats, None, 0.0
    factor = float(threshold_scale_factor)
    return factor > 0.0 or has_stats, None, factor


def factor_tensor(factor_t: Optional[torch.Tensor], batch: int, device) -> Optional[torch.Tensor]:
    """The per-sequence factor as the kernels read it: float32 [batch], contiguous (a single
    value is broadcast); returned as is when it already is one."""
    if factor_t is not None and (factor_t.dtype != torch.float32 or factor_t.numel() != batch
                                 or not factor_t.is_contiguous()):
        factor_t = factor_t.to(device=device, dtype=torch.float32).reshape(-1)
        factor_t = factor_t.expand(batch).contiguous() if factor_t.numel() == 1 \
            else factor_t.contiguous()
    return factor_t


def combine_compile_args(dt):
    """Arguments of ``BlasstDecodeCombineSm90.launch_ptrs`` for compilation (placeholders)."""
    return (fake_ptr(Float32, 16), fake_ptr(Float32, 4), fake_ptr(dt), fake_ptr(Float32, 4),
            Int32(1), Int32(1), Int32(1), Int32(1), cuda_stream(0))


def compiled(namespace: str, key: tuple, maker, compile_args):
    """``cute.compile(maker(), *compile_args)``, cached in memory under (namespace, *key).

    Memory only: the decode fast launch path reads attributes of a freshly compiled function,
    which a kernel loaded from the disk cache has not been checked to carry."""
    return compile_cache.get_or_compile((namespace,) + tuple(key),
                                        lambda: cute.compile(maker(), *compile_args), disk=False)


def compiled_combine(dtype: torch.dtype, head_dim: int, num_splits: int, use_pdl: bool,
                     grouped: bool):
    """The split-KV combine kernel's compiled ``launch_ptrs`` for these outputs (dtype, head
    dim) and launch mode; grouped: the grouped merge, its warps per row set by the split count.
    Compiled once per process, shared by the decode and MLA decode launchers."""
    dt = TORCH_TO_CUTLASS[dtype]
    use_pdl, grouped = bool(use_pdl), bool(grouped)
    warps = combine_warps_per_row(num_splits) if grouped else 1
    return compiled("sm90-combine", (dtype, head_dim, use_pdl, grouped, warps),
                    lambda: BlasstDecodeCombineSm90(dt, head_dim, use_pdl=use_pdl, grouped=grouped,
                                                    warps_per_row=warps).launch_ptrs,
                    combine_compile_args(dt))
