"""Fixtures shared by tests/ and bench/ (their shared constants are in tests/support/vcr1_testing.py)."""
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, which has to be switched on before
# any test module imports triton (transformers and liger-kernel do at collection).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vcr1_testing import SHARED  # noqa: E402  (after the switch above, which must precede any triton import)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real annotations and videos); tests using it skip when it is absent."""
    data = SHARED / "data"
    if not data.is_dir():
        pytest.skip(f"real data folder {data} is absent (set VCR1_SHARED to the folder holding data/)")
    return data


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """A small synthetic set (4 training and 2 held-out examples per task) for short trainer runs."""
    from vcr1.data.synthetic import generate
    from vcr1_testing import synthetic_tasks

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, tasks=synthetic_tasks(), seed=0, n_train=4, n_test=2)
    return root
