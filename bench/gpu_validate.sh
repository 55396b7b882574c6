#!/usr/bin/env bash
# Validates every GPU path in one command (docs/gpu_validation.md); bench/gpu_validate.py holds the phases.
#   bash bench/gpu_validate.sh                 on the GPU machine, from a checkout, no network needed
#   bash bench/gpu_validate.sh --smoke [--out DIR]   the same phases at tiny shapes on the CPU (the test suite's CI check)
# Results: --out DIR, else $OUT when set, else bench/results/ (--smoke: a temporary folder).
#
# GPU mode uses the machine's own torch, Triton and transformers. What its image lacks comes as wheels in
# wheels/ ($VCR1_WHEELS; scripts/fetch_gpu_wheels.sh makes them on a machine with PyPI): they are installed
# with --no-index --no-deps into a folder of their own ($VCR1_GPU_SITE) put first on PYTHONPATH, so torch is
# never reinstalled, and the run stops if torch changed anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

smoke=0
for arg in "$@"; do [ "$arg" = --smoke ] && smoke=1; done

if [ "$smoke" = 0 ]; then
  SITE=${VCR1_GPU_SITE:-/tmp/vcr1_site}
  WHEELS=${VCR1_WHEELS:-wheels}
  torch_before=$($PY -c 'import torch; print(torch.__version__, torch.__file__)')
  mkdir -p "$SITE"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if ls "$WHEELS" | grep -qiE '^(torch|triton|nvidia)[-_]'; then
      echo "gpu_validate: $WHEELS holds a torch, triton or nvidia wheel; the machine's own must stay" >&2
      exit 2
    fi
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  else
    echo "gpu_validate: no wheels in $WHEELS/; phases needing deepspeed, liger-kernel or torchcodec say why they skip" >&2
  fi
  # vcr1 itself, from this checkout, without an install (links, so tracebacks point at the repository).
  ln -sfn "$PWD/vcr1" "$SITE/vcr1"
  ln -sfn "$PWD/kernels/vcr1_kernels" "$SITE/vcr1_kernels"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" VCR1_GPU_SITE="$SITE"
  torch_after=$($PY -c 'import torch; print(torch.__version__, torch.__file__)')
  if [ "$torch_before" != "$torch_after" ]; then
    echo "gpu_validate: torch changed ($torch_before -> $torch_after); refusing to go on" >&2
    exit 2
  fi
fi
exec $PY bench/gpu_validate.py "$@"
