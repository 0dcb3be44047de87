"""The crash test: a tiny run killed with SIGKILL at a random checkpoint (twice, possibly mid-save) and resumed each
time with ``--resume`` ends with exactly the weights of the uninterrupted run (bitwise, CPU, fixed seeds), on both
backends. Also an in-process check that a Lightning run resumed mid-epoch and across epochs sees the same batches."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm_limits.trainers.run import train

from tests.conftest import REPO, TINY
from tests.test_trl_backend import trl_recipe, write

pytestmark = pytest.mark.usefixtures("one_thread")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def same(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def lightning_recipe(tmp_path: Path) -> dict:
    r = copy.deepcopy(TINY)
    r.update(output_dir=str(tmp_path / "runs"), evals=[])
    return r


@pytest.mark.parametrize("resume_at", [5, 23, 43])  # inside epoch 0, inside epoch 1, inside epoch 2 (19 batches each)
def test_lightning_resume_mid_epoch_is_exact(tmp_path, resume_at):
    r = lightning_recipe(tmp_path)
    r["trainer"].update(max_steps=48, checkpoint_every=1, keep_last=100)
    reference = train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed, symlinks=True)
    keep = f"step-{resume_at:06d}.ckpt"
    for f in (crashed / "checkpoints").iterdir():
        if f.name != keep:
            f.unlink()
    shutil.copy(crashed / "checkpoints" / keep, crashed / "checkpoints" / "last.ckpt")
    shutil.rmtree(crashed / "model")
    resumed = train("unused", resume=str(crashed), progress=False, echo=lambda s: None)
    assert same(reference, resumed)


def _checkpoint_of(run_dir: Path, backend: str, step: int) -> Path:
    if backend == "trl":
        return run_dir / "checkpoints" / f"checkpoint-{step}"
    return run_dir / "checkpoints" / f"step-{step:06d}.ckpt"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["lightning", "trl"])
def test_killed_twice_and_resumed_gives_the_uninterrupted_weights(tmp_path, backend):
    if backend == "trl":
        r = trl_recipe(tmp_path, "sft")
        r["evals"] = []
    else:
        r = lightning_recipe(tmp_path)
    r["trainer"].update(max_steps=60, checkpoint_every=5, keep_last=2, log_every=1)
    path = write(tmp_path, r)
    reference = train(str(path), progress=False, echo=lambda s: None)

    # Each process gets its own wandb service, as separate shell commands would: a child that inherits this test
    # process's service (WANDB_SERVICE) leaves its run open there when it is killed.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "llm_limits.trainers.cli"]
    root = tmp_path / "runs" / r["name"]
    rng = random.Random(0)
    run_dir = None
    for attempt in range(2):
        args = ["train", "--resume", str(run_dir)] if run_dir else ["train", str(path)]
        log = open(tmp_path / f"attempt{attempt}.log", "w")
        proc = subprocess.Popen([*cli, *args, "--no-progress"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        target = rng.choice([10, 15, 20]) + 20 * attempt  # kill once this checkpoint exists (mid-save is fine too)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            dirs = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and p != reference] if root.exists() else []
            if dirs:
                run_dir = dirs[0]
                if _checkpoint_of(run_dir, backend, target).exists():
                    break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed: {(tmp_path / f'attempt{attempt}.log').read_text()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert run_dir is not None and not (run_dir / "model").exists()  # it really died before finishing
    done = subprocess.run([*cli, "train", "--resume", str(run_dir), "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert same(reference, run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["train"]["steps"] == 60
