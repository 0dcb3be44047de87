#!/usr/bin/env bash
# Issue 8's GPU checks, on the lent GPU machine (the `device` tool's `run`, with `.whl` carried: see
# scripts/device_wheels.sh). Installs the carried wheels into the image's python (pip takes the image's own packages
# where they satisfy the pins and says which requirement is missing otherwise), then runs scripts/bench_mfu.py:
# the MFU of a Llama in bf16 through the Lightning backend's DeepSpeed ZeRO-2 strategy (the path the CPU cannot run)
# and through the TRL backend. Output goes to the terminal and to $OUT/ (the device tool brings it back).
#
#   SIZES="350m 1b" bash scripts/gpu_checks.sh      # default: 350m; each size about 2-4 minutes after the installs
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
PY=${PY:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" --version
    "$PY" -m pip install -q --no-index --find-links .whl \
        transformers==5.23.0 trl==1.16.0 datasets==5.2.0 deepspeed==0.19.8 pydantic==2.14.3 || {
        echo "gpu_checks: installing the carried wheels failed (the line above names the missing requirement:" \
             "add it to scripts/device_wheels.sh)"; exit 2; }
    "$PY" -c "import torch, lightning, transformers, trl, deepspeed, datasets; print('torch', torch.__version__,
'| lightning', lightning.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__,
'| deepspeed', deepspeed.__version__, '| datasets', datasets.__version__)"
} 2>&1 | tee "$OUT/setup.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
status=0
for size in ${SIZES:-350m}; do
    extra=()
    [ "$size" = 1b ] && extra=(--batch 4)
    "$PY" scripts/bench_mfu.py --size "$size" "${extra[@]}" 2>&1 | tee "$OUT/mfu-$size.txt" || status=1
done
exit $status
