"""What tests/ and bench/ share besides fixtures: the checkout's paths and the GPU and torchcodec marks.

pytest puts this folder (not the repository root) on sys.path (`pythonpath` in pyproject.toml), so the
tests import it by name while the checkout's folders never stand in front of installed packages.
"""
import functools
import importlib
import os
import subprocess
import sys
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


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every call that copies a tensor's value to the host: on a GPU each one waits for the GPU."""
    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.nonzero}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def run_triton_tests_in_fresh_process(test_file: str):
    """Reruns a file's Triton tests in a process that switches Triton's interpreter on before importing it (a
    process that imported Triton first cannot run them on the CPU)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider",
                             "-k", "triton and not fresh_process"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
