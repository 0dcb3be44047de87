#!/usr/bin/env bash
# Issues 8 and 20's GPU checks, on the lent GPU machine (the `device` tool's `run`, with `.whl` carried: see
# scripts/device_wheels.sh). Installs the carried wheels into the image's python (pip takes the image's own packages
# where they satisfy the pins and says which requirement is missing otherwise), then runs scripts/bench_mfu.py: the
# MFU, tokens/s and peak memory of a Llama in bf16 through both backends, the DeepSpeed ZeRO-2 baseline and each
# training switch (plain single-GPU, Liger, torch.compile, fused AdamW, all of them at once), each arm in its own
# process, then the host overhead of a tiny step (scripts/bench_overhead.py on the GPU). Output goes to the terminal
# and to $OUT/ (the device tool brings it back).
#
#   SIZES="350m 1b" bash scripts/gpu_checks.sh      # the prepared run: about 9 minutes after the machine starts
#
# Budget (10 minutes a call): installs about 1 min; at 1b every variant (10 arms), at 350m the baseline and the best
# combination (4 arms); bench_mfu starts no arm after DEADLINE_S seconds and says which it left out (run those in a
# second call: SIZES=1b VARIANTS="liger compile fused" bash scripts/gpu_checks.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
PY=${PY:-python3}
START=$(date +%s)
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" --version
    "$PY" -m pip install -q --no-index --find-links .whl \
        transformers==5.23.0 trl==1.16.0 datasets==5.2.0 deepspeed==0.19.8 pydantic==2.14.3 || {
        echo "gpu_checks: installing the carried wheels failed (the line above names the missing requirement:" \
             "add it to scripts/device_wheels.sh)"; exit 2; }
    "$PY" -m pip install -q --no-index --find-links .whl liger-kernel==0.8.5 \
        || echo "gpu_checks: liger-kernel did not install (the line above says why); its arms will say so"
    "$PY" -c "import torch, lightning, transformers, trl, deepspeed, datasets; print('torch', torch.__version__,
'| lightning', lightning.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__,
'| deepspeed', deepspeed.__version__, '| datasets', datasets.__version__)"
    # trainers/build/kernels.py lists the model types Liger patches; check the list against the installed package
    "$PY" -c "
from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN as m
from llm_limits.trainers.build.kernels import LIGER_MODEL_TYPES as ours
import importlib.metadata as md
print('liger-kernel', md.version('liger-kernel'), '| model types we list but it lacks:', sorted(set(ours) - set(m)) or 'none')" \
        || echo "gpu_checks: liger-kernel is not importable"
} 2>&1 | tee "$OUT/setup.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
status=0
SIZES=${SIZES:-350m}
for size in $SIZES; do
    if [ "$size" = 1b ]; then variants=(baseline best plain liger compile fused); else variants=(baseline best); fi
    [ "$(echo $SIZES | wc -w)" -eq 1 ] && variants=(baseline best plain liger compile fused)
    [ -n "${VARIANTS:-}" ] && read -r -a variants <<< "$VARIANTS"   # a second call for the arms a deadline left out
    elapsed=$(( $(date +%s) - START ))
    "$PY" scripts/bench_mfu.py --sizes "$size" --variants "${variants[@]}" --deadline-s $(( ${DEADLINE_S:-440} - elapsed )) \
        --out "$OUT/mfu-$size.json" 2>&1 | tee "$OUT/mfu-$size.txt" || status=1
done
# Host overhead per step on the GPU (issue 20: a tiny recipe was launch-bound at 27 ms/step): the tiny model of the
# CPU measurement, both arms, one repeat.
if [ $(( $(date +%s) - START )) -lt ${OVERHEAD_BEFORE_S:-500} ]; then
    "$PY" scripts/bench_overhead.py --device cuda --hidden 64 --layers 2 --seq-len 64 --steps 200 --warmup 20 \
        --repeats 1 2>&1 | tee "$OUT/overhead.txt" || status=1
fi
echo "gpu_checks: $(( $(date +%s) - START )) s"
exit $status
