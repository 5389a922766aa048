"""blasst_cute: BLASST dynamic block-sparse attention (softmax thresholding) in CuTe DSL.

``prefill`` and ``decode`` take torch tensors; CUDA tensors run the CuTe DSL kernels (Hopper), CPU
tensors run the pure-torch reference. See README.md for the semantics of the threshold.
"""

from .api import decode, decode_mla, prefill, set_content_checks
from .stats import BlasstStats

__version__ = "0.1.0"

__all__ = ["prefill", "decode", "decode_mla", "set_content_checks", "BlasstStats", "__version__"]
