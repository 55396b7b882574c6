#!/usr/bin/env bash
# Installs vcr1 (editable, with the test extras) into the active Python environment, with a tested,
# pinned dependency set, and FFmpeg's shared libraries when they are missing.
#   CPU machine: exactly scripts/requirements-cpu.lock (CPU torch 2.13.0, torchcodec 0.13.0).
#   GPU machine: keeps your CUDA torch when scripts/cuda_pins.py supports it (else stops and says which
#   versions it supports; with no torch it installs the default), and pins torchcodec, deepspeed and
#   flash-attn to match it, and every other package at the CPU lock's versions. VCR1_FLASH_ATTN=1 also
#   builds flash-attn.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! command -v ffmpeg >/dev/null 2>&1 || ! ldconfig -p 2>/dev/null | grep -q libavcodec; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "vcr1 setup: install FFmpeg (with its shared libraries) using your package manager" >&2
    exit 1
  fi
fi

$PY -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  if ! $PY -c "import torch" 2>/dev/null; then
    $PY -m pip install -q "torch==$($PY scripts/cuda_pins.py --default-torch)"
  fi
  pins=$(mktemp); trap 'rm -f "$pins"' EXIT
  $PY scripts/cuda_pins.py > "$pins"   # exits 2 with the supported versions when torch is not one
  # Everything else at the CPU lock's tested versions.
  grep -E '^[a-z0-9]' scripts/requirements-cpu.lock | grep -vE '^(torch|torchcodec|triton|deepspeed)==' >> "$pins"
  extras="test"; [ "${VCR1_FLASH_ATTN:-0}" = 1 ] && extras="test,flash"
  $PY -m pip install -q -e ".[$extras]" -c "$pins"
else
  $PY -m pip install -q -r scripts/requirements-cpu.lock
  $PY -m pip install -q --no-deps -e .
fi
$PY -c "import torch, torchcodec, transformers, deepspeed, vcr1, vcr1_kernels; print('vcr1 ready: torch', torch.__version__)"
