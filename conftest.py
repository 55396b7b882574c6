"""Fixtures shared by tests/ and bench/: the real data beside the checkout, the GPU marker, Triton on CPU."""
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which has to be switched on before
# any test module imports triton (transformers and liger-kernel do at collection).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("VCR1_SHARED", REPO.parent / "shared"))
# Where benchmarks write their JSON reports; CMake's benchmark smoke points it into the build folder.
BENCH_RESULTS = Path(os.environ.get("VCR1_BENCH_RESULTS", REPO / "bench" / "results"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real annotations and videos); tests using it skip when it is absent."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"real data folder {data} is absent (set VCR1_SHARED to the folder holding data/)")
    return data
