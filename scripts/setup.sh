#!/usr/bin/env bash
# Installs vcr1 (editable, with test and benchmark extras) into the active Python environment, and FFmpeg's
# shared libraries when they are missing. On a machine without an NVIDIA GPU it pins the CPU builds
# (torch 2.13.0, torchcodec 0.13.0); on a GPU machine it leaves your CUDA torch alone.
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
  $PY -m pip install -q -e ".[test]"
else
  $PY -m pip install -q -e ".[test]" -c scripts/cpu-constraints.txt
fi
$PY -c "import torch, torchcodec, transformers, deepspeed, vcr1, vcr1_kernels; print('vcr1 ready: torch', torch.__version__)"
