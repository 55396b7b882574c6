"""What tests/ and bench/ share besides fixtures: the checkout's paths and the GPU marker.

pytest puts this folder (not the repository root) on sys.path (`pythonpath` in pyproject.toml), so the
tests import it by name while the checkout's folders never stand in front of installed packages.
"""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("VCR1_SHARED", REPO.parent / "shared"))
# Where benchmarks write their JSON reports; CMake's benchmark smoke points it into the build folder.
BENCH_RESULTS = Path(os.environ.get("VCR1_BENCH_RESULTS", REPO / "bench" / "results"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
