"""Multi-process resume is exact: a 2-process Lightning DDP run (gloo, CPU) resumed from a mid-epoch checkpoint, and a
2-process DeepSpeed ZeRO-2 run of the TRL backend (torchrun, CPU) resumed from a middle checkpoint, each end with
exactly the uninterrupted run's weights. Before the fix the DDP resume replayed the epoch from its start: Lightning
swapped the train sampler for a DistributedSampler that cannot restart mid-epoch (trainers/build/data.py now splits the
epoch across ranks itself)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from llm_limits.trainers.launch import free_port
from tests.test_cli import run_cli
from tests.test_crash_resume import lightning_recipe, same
from tests.test_trl_backend import trl_recipe, write

pytestmark = pytest.mark.slow

PER_RANK_EPOCH = 9
"""Train batches per rank and epoch of the tiny recipe under 2 ranks (152 blocks / 2 ranks / batch 8, whole batches)."""


def _only_checkpoint(run_dir: Path, name: str, last: str) -> None:
    """Keep the checkpoint ``name`` only (and its manifest), copied to ``last`` as a crash after it would leave it."""
    ckpts = run_dir / "checkpoints"
    keep = {name, name + ".manifest.json", f"{Path(name).stem}.manifest.json"}
    for f in ckpts.iterdir():
        if f.name not in keep and not f.name.startswith(name):
            (shutil.rmtree if f.is_dir() else Path.unlink)(f)
    if last:
        shutil.copy(ckpts / name, ckpts / last)
    shutil.rmtree(run_dir / "model", ignore_errors=True)


def _run_dir(out: subprocess.CompletedProcess, runs: Path) -> Path:
    assert out.returncode == 0, out.stderr[-4000:]
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink()]
    return run_dir


@pytest.mark.parametrize("resume_at", [4, 13])  # inside epoch 0 and inside epoch 1 of each rank
def test_lightning_ddp_two_processes_resume_mid_epoch_exactly(tmp_path, resume_at):
    r = lightning_recipe(tmp_path)
    r["trainer"].update(max_steps=16, checkpoint_every=1, keep_last=100, strategy="ddp", devices=2)
    path = write(tmp_path, r)
    reference = _run_dir(run_cli("train", str(path), "--no-progress", timeout=600), tmp_path / "runs" / r["name"])
    assert int(sum(1 for _ in (reference / "checkpoints").glob("step-*.ckpt"))) == 16
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed, symlinks=True)
    _only_checkpoint(crashed, f"step-{resume_at:06d}.ckpt", "last.ckpt")
    from llm_limits.trainers.backends.checkpoints import write_manifest

    write_manifest(crashed / "checkpoints" / "last.ckpt", resume_at)
    out = run_cli("train", "--resume", str(crashed), "--no-progress", timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "--resume: continuing from" in out.stdout and "last.ckpt" in out.stdout
    assert same(reference, crashed)


def test_trl_zero2_two_processes_resume_exactly(tmp_path):
    r = trl_recipe(tmp_path, "sft")
    r["trainer"].update(strategy="deepspeed_stage_2", devices=2, max_steps=6, checkpoint_every=1, keep_last=100)
    r["evals"] = []
    path = write(tmp_path, r)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(free_port()),
                "-m", "llm_limits.trainers.cli", "train"]

    def launch(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*torchrun, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        errors = [s for s in proc.stderr.splitlines() if "Error" in s or "error:" in s]
        assert proc.returncode == 0, "\n".join(errors[:20]) + "\n" + proc.stderr[-2000:]
        return proc

    launch(str(path))
    (reference,) = [p for p in (tmp_path / "runs" / "trl-sft").iterdir() if p.is_dir() and not p.is_symlink()]
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed, symlinks=True)
    for ckpt in (crashed / "checkpoints").iterdir():
        if ckpt.name.startswith("checkpoint-") and int(ckpt.name.split("-")[1]) > 3:
            shutil.rmtree(ckpt)
    shutil.rmtree(crashed / "model")
    launch("--resume", str(crashed))
    assert same(reference, crashed)
