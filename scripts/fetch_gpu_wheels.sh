#!/usr/bin/env bash
# Fetches, on a machine with PyPI, the wheels the GPU machine's image lacks into wheels/ (ignored by git),
# for bench/gpu_validate.sh to install there without a network (docs/gpu_validation.md, "What to carry"):
#   bash scripts/fetch_gpu_wheels.sh [DEST]        DEST defaults to wheels/
# The image (torch 2.11 + CUDA 13.0, Triton 3.6, transformers 5.17, Python 3.12) has everything else.
# Never torch, triton or nvidia-* wheels: the machine's CUDA torch stays. Stops when the folder passes
# 64 MiB, the most the GPU machine takes beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-wheels}
PY=${PYTHON:-python3}
GPU_PYTHON=${VCR1_GPU_PYTHON:-3.12}  # the image's Python
LIMIT_BYTES=$((64 * 1024 * 1024))

rm -rf "$DEST"
mkdir -p "$DEST"
# Binary wheels for the image's Python on x86-64 Linux, one exact version each (the CPU lock's, where it
# has one), without dependencies: each dependency the image lacks is named here too.
download() {
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$@"
}
download \
  liger-kernel==0.8.5 \
  torchcodec==0.11.1 \
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0  # pydantic needs >= 4.16, newer than images usually hold
# torchcodec 0.11 is the release built for torch 2.11; PyPI's build decodes on the CPU only (NVDEC needs
# the CUDA build from PyTorch's own index) and loads the machine's FFmpeg libraries, if it has them.

# DeepSpeed ships only a source archive: build a pure-Python wheel with no compiled ops (the trainer uses
# none; its optimizer is torch's AdamW). The build imports torch, so it runs in this environment.
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8

if ls "$DEST" | grep -qiE '^(torch|triton|nvidia)[-_]'; then
  echo "fetch_gpu_wheels: a torch, triton or nvidia wheel got in; it would replace the machine's own" >&2
  exit 1
fi
size=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"
echo "fetch_gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((size / 1024)) KiB in $DEST"
if [ "$size" -gt "$LIMIT_BYTES" ]; then
  echo "fetch_gpu_wheels: over the 64 MiB the GPU machine takes" >&2
  exit 1
fi
