"""The tested CUDA dependency set for a given torch: `python scripts/cuda_pins.py [TORCH_VERSION]`.

`--default-torch` prints the torch that setup.sh installs on a GPU machine without one.

Prints pip constraints that keep the installed torch exactly and pin what must match it, or exits with
code 2 and a one-line message naming the supported versions. scripts/setup.sh applies it on GPU machines;
CPU machines use scripts/requirements-cpu.lock instead.

triton is not in the table: each torch wheel requires the exact triton it was built with, so pip installs
that one. torchcodec is built against one torch minor release and must match it.
"""
from __future__ import annotations

import sys

# torch minor release -> (torchcodec, deepspeed, flash-attn) that go with it.
SUPPORTED = {
    "2.10": ("0.10.*", "0.19.8", "2.8.3"),
    "2.11": ("0.11.*", "0.19.8", "2.8.3"),
    "2.12": ("0.12.*", "0.19.8", "2.8.3"),
    "2.13": ("0.13.*", "0.19.8", "2.8.3"),
}
DEFAULT_TORCH = "2.11.*"  # what setup.sh installs on a GPU machine that has no torch yet


class UnsupportedTorch(ValueError):
    pass


def constraints(torch_version: str) -> list[str]:
    """pip constraint lines for `torch_version` (e.g. '2.11.0+cu130'), keeping that torch build."""
    parts = torch_version.split("+")[0].split(".")
    minor = ".".join(parts[:2])
    if len(parts) < 2 or minor not in SUPPORTED:
        raise UnsupportedTorch(
            f"vcr1 supports torch {', '.join(SUPPORTED)} on CUDA machines; found torch {torch_version}. "
            f"Install one of them (e.g. pip install 'torch=={DEFAULT_TORCH}') and rerun scripts/setup.sh")
    torchcodec, deepspeed, flash_attn = SUPPORTED[minor]
    return [f"torch=={torch_version}", f"torchcodec=={torchcodec}", f"deepspeed=={deepspeed}",
            f"flash-attn=={flash_attn}"]


def main(argv: list[str]) -> int:
    if argv == ["--default-torch"]:
        print(DEFAULT_TORCH)
        return 0
    if argv:
        version = argv[0]
    else:
        import torch
        version = torch.__version__
    try:
        print("\n".join(constraints(version)))
    except UnsupportedTorch as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
