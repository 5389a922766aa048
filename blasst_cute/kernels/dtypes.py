"""The element types the kernels take, shared by every launch module."""

import torch

import cutlass

TORCH_TO_CUTLASS = {torch.bfloat16: cutlass.BFloat16, torch.float16: cutlass.Float16}
_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def kernel_dtype(dtype, kernel: str) -> torch.dtype:
    """``dtype`` (a torch dtype or a name such as "bf16") as a torch dtype the kernels take.

    Raises NotImplementedError naming ``kernel`` for anything but bfloat16/float16.
    """
    if isinstance(dtype, str):
        dtype = _NAMES.get(dtype, dtype)
    if dtype not in TORCH_TO_CUTLASS:
        raise NotImplementedError(f"blasst {kernel}: dtype {dtype!r} (bf16/fp16 only)")
    return dtype
