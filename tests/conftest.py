import os

import pytest
import torch

# Without a GPU, kernels are compiled for Hopper (sm_90a) so CPU tests catch DSL errors. The DSL
# reads this once, at its first import: set it before any test module imports cutlass.
if not torch.cuda.is_available():
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
