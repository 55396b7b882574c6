"""Shared fixtures: the real data beside the checkout, and markers for GPU-only tests."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VCR1_SHARED", REPO.parent / "shared"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real annotations and videos); tests using it skip when it is absent."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"real data folder {data} is absent (set VCR1_SHARED to the folder holding data/)")
    return data
