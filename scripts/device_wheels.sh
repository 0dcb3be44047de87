#!/usr/bin/env bash
# Wheels for the lent GPU machine (the `device` tool): its image has torch, lightning, accelerate, peft, tokenizers
# and huggingface-hub but not trl, deepspeed, datasets or pydantic, and an older transformers, and it cannot reach a
# package index. Run this here (it downloads for CPython 3.12 on x86-64 linux, the device's python), then carry
# `.whl` in the device call and start it with scripts/gpu_checks.sh, which installs them there:
#
#   bash scripts/device_wheels.sh            # here, once (about 21 MB, gitignored)
#   device run, carry [".whl"]:  bash scripts/gpu_checks.sh
#
# The set is what `scripts/bench_mfu.py` imports that the image lacks (found by running it with the rest blocked),
# plus liger-kernel (the `gpu` extra, issue 20; it needs triton, which the image's CUDA torch brings),
# at this project's pins (pyproject.toml; the rest at the versions the venv had on 2026-11-24). deepspeed publishes
# no wheel: it is built here (pure Python; its CUDA ops compile on first use there, with the image's nvcc).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=.whl
mkdir -p "$DEST"
PINS=(
    transformers==5.23.0 trl==1.16.0 datasets==5.2.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
    typing-inspection==0.4.5 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 fsspec==2026.9.0 regex==2026.11.15
    liger-kernel==0.8.5  # issue 20: trainer.liger (pure Python; its Triton kernels compile there, with the image's triton)
)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${PINS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8 \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
ls "$DEST"
du -sh "$DEST"
