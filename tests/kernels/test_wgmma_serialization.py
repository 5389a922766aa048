"""CPU: ptxas keeps the wgmma pipeline asynchronous in every kernel build checked here.

When ptxas cannot prove the asynchronous wgmma pipeline safe (a wait on some runtime branches, a
wgmma under one, accumulators touched while in flight), it serializes every wgmma of the kernel:
each HGMMA then gets its own ``WARPGROUP.ARRIVE`` / ``WARPGROUP.DEPBAR`` pair, the build still
gives the right answers, and it runs far slower. The seventh session met five such causes in
the prefill kernel; the twenty-sixth met one in the MLA decode kernel's early-release skip build
(an unconditional wait). The test compiles each build for sm_90a, disassembles the cubin with
``cuobjdump`` (CUDA toolkit, or the ``nvidia-cuda-cuobjdump`` and ``nvidia-cuda-nvdisasm``
wheels of the ``test`` extra; the test skips without them) and requires far fewer warpgroup
waits than wgmmas.
"""

import os
import shutil
import subprocess

import pytest
import torch

os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")

cutlass = pytest.importorskip("cutlass")

from blasst_cute.kernels import launch, launch_decode, launch_mla  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU compile check")


def _cuobjdump():
    """cuobjdump from PATH or the nvidia-cuda-cuobjdump wheel, with the nvdisasm it runs for
    -sass beside it or on PATH, else None."""
    found = shutil.which("cuobjdump")
    if found is None:
        try:
            import nvidia
        except ImportError:
            return None
        cands = [os.path.join(root, sub, "bin", "cuobjdump") for root in nvidia.__path__
                 for sub in ("cu13", "cuda_cuobjdump")]
        found = next((c for c in cands if os.path.exists(c)), None)
        if found is None:
            return None
    if not (shutil.which("nvdisasm")
            or os.path.exists(os.path.join(os.path.dirname(found), "nvdisasm"))):
        return None
    return found


BF16 = torch.bfloat16
MLA = dict(dtype=BF16, page_size=64, interleave_splits=True, use_pdl=True)
BUILDS = {
    "mla-dense": (launch_mla.compile_mla_decode_sm90, dict(MLA)),
    "mla-skip": (launch_mla.compile_mla_decode_sm90, dict(MLA, has_skip=True, has_stats=True)),
    # the default is the early K-stage release (launch_mla.EARLY_RELEASE); the late one too
    "mla-skip-late-release": (launch_mla.compile_mla_decode_sm90,
                              dict(MLA, has_skip=True, has_stats=True, early_release=False)),
}
for _c in launch_decode.supported_configs():  # page 64, split (combine) epilogue
    if _c["page_size"] == 64 and not _c.get("direct_out") and _c.get("tile_n") is None \
            and _c["has_skip"] == _c["has_stats"]:
        BUILDS[f"decode-{'skip' if _c['has_skip'] else 'dense'}"] = (
            launch_decode.compile_decode_sm90, _c)
for _d, _dv, _causal in ((128, 128, False), (128, 128, True), (64, 64, False), (256, 256, False),
                         (192, 128, True)):
    BUILDS[f"prefill-d{_d}{'-causal' if _causal else ''}-skip"] = (
        launch.compile_prefill_sm90,
        dict(dtype=BF16, head_dim=_d, head_dim_v=_dv, causal=_causal, varlen=False,
             has_skip=True, has_stats=True, factor_per_batch=False))
BUILDS["prefill-d128-dense"] = (launch.compile_prefill_sm90,
                                dict(dtype=BF16, head_dim=128, head_dim_v=128, causal=False,
                                     varlen=False, has_skip=False, has_stats=False,
                                     factor_per_batch=False))


@pytest.mark.parametrize("name", list(BUILDS))
def test_wgmma_not_serialized(name, tmp_path):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump / nvdisasm not installed")
    compile_fn, cfg = BUILDS[name]
    compile_fn(cfg, options=f"--dump-dir={tmp_path} --keep-cubin")
    cubins = list(tmp_path.glob("*.cubin"))
    assert cubins, "--keep-cubin wrote no cubin"
    env = dict(os.environ)  # cuobjdump -sass runs nvdisasm: the wheels put it beside cuobjdump
    env["PATH"] = os.path.dirname(tool) + os.pathsep + env.get("PATH", "")
    sass = subprocess.run([tool, "-sass", str(cubins[0])], capture_output=True, text=True,
                          check=True, env=env).stdout
    n_mma, n_depbar = sass.count("HGMMA"), sass.count("WARPGROUP.DEPBAR")
    assert n_mma > 0
    assert 2 * n_depbar < n_mma, f"{n_depbar} warpgroup waits for {n_mma} wgmmas: serialized"
