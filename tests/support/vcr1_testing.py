"""What tests/ and bench/ share besides fixtures: the checkout's paths and the GPU and torchcodec marks.

pytest puts this folder (not the repository root) on sys.path (`pythonpath` in pyproject.toml), so the
tests import it by name while the checkout's folders never stand in front of installed packages.
"""
import functools
import importlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("VCR1_SHARED", REPO.parent / "shared"))
# Where benchmarks write their JSON reports; CMake's benchmark smoke points it into the build folder.
BENCH_RESULTS = Path(os.environ.get("VCR1_BENCH_RESULTS", REPO / "bench" / "results"))



def synthetic_tasks():
    """The Task objects the synthetic default generates, in its order (vcr1.data.synthetic.generate's `tasks`)."""
    from vcr1.tasks import SYNTHETIC, get_task

    return [get_task(name) for name in SYNTHETIC]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@functools.cache
def torchcodec_missing() -> str | None:
    """Why torchcodec cannot decode here (not installed, or FFmpeg's libraries not loadable), or None:
    a GPU image may have neither (docs/gpu_validation.md, "The test suite on such a machine"), and only
    decoding video files needs it."""
    try:
        importlib.import_module("torchcodec.decoders")
    except (ImportError, OSError, RuntimeError) as e:  # torchcodec raises RuntimeError when FFmpeg won't load
        return f"needs torchcodec with FFmpeg's shared libraries ({type(e).__name__}: {str(e).splitlines()[0]})"
    return None


requires_torchcodec = pytest.mark.skipif(torchcodec_missing() is not None, reason=str(torchcodec_missing()))
