#!/usr/bin/env bash
# A short Nsight Systems profile of the embedded default (GPU machine): NVTX ranges per phase, then the
# time per range. Extra arguments go to vcr1/train.py. CMake's `profile` target runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nsys >/dev/null 2>&1 || { echo "vcr1 profile: nsys (Nsight Systems) is not on PATH" >&2; exit 1; }
nsys profile -o outputs/profile/vcr1_profile --trace cuda,nvtx,osrt --capture-range none --force-overwrite true \
    torchrun vcr1/train.py --engine.nvtx true --sft.steps 2 --max_steps 5 --output_dir outputs/profile "$@"
nsys stats --report nvtx_sum outputs/profile/vcr1_profile.nsys-rep
