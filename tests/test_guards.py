"""Guards: a NaN or infinite loss stops a run with one line (exit 2) on both backends, and the checkpoints written
before it stay loadable."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import Mitigation, MitigationConfig
from llm_limits.trainers.backends.checkpoints import last_good_checkpoint

from tests.conftest import TINY
from tests.test_cli import run_in_process
from tests.test_trl_backend import backend_recipe, write

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class PoisonConfig(MitigationConfig):
    at_step: int = 3
    """The step whose loss becomes NaN."""


class Poison(Mitigation):
    """Test double: from ``at_step`` on, adds NaN to the loss (what an overflow or a bad batch does)."""

    name = "poison"
    Config = PoisonConfig

    def extra_loss(self, outputs, batch, ctx):
        return torch.tensor(float("nan")) if ctx.step >= self.config.at_step else None


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setitem(MITIGATIONS, "poison", Poison)


@pytest.mark.parametrize("backend", ["lightning", "trl"])
def test_nan_loss_stops_the_run_and_keeps_the_checkpoints(tmp_path, poison, backend):
    r = backend_recipe(tmp_path, backend)
    r["trainer"].update(max_steps=8, checkpoint_every=2)
    r["mitigations"] = [{"name": "poison", "at_step": 3}]
    out = run_in_process("train", str(write(tmp_path, r)), "--no-progress")
    assert out.returncode == 2, out.stderr
    line = out.stderr.strip()
    assert "\n" not in line and "the loss is nan at step 3; stopped before applying it" in line
    (run_dir,) = [p for p in (tmp_path / "runs").glob("*/*") if p.is_dir() and not p.is_symlink()]
    assert not (run_dir / "model").exists()  # no "trained" model from a poisoned run
    if backend == "trl":
        good = last_good_checkpoint(run_dir / "checkpoints", warn=lambda s: None)
        assert good is not None and good.name == "checkpoint-2"
    else:
        assert (run_dir / "checkpoints" / "step-000002.ckpt").is_file()
        state = torch.load(run_dir / "checkpoints" / "step-000002.ckpt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_a_full_disk_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    import errno

    import llm_limits.trainers.run

    def full(path, results):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(llm_limits.trainers.run, "write_results", full)
    r = copy.deepcopy(TINY)
    r["output_dir"] = str(tmp_path / "runs")
    out = run_in_process("train", str(write(tmp_path, r)), "--no-progress")
    assert out.returncode == 2
    line = out.stderr.strip()
    assert "\n" not in line and "results.json: no space left on device" in line and "--resume" in line


def test_secrets_in_the_environment_never_reach_the_run_directory(tmp_path, monkeypatch):
    """The resolved recipe, results, reports and the offline wandb run hold recipe fields only: tokens in the
    environment (WANDB_API_KEY, HF_TOKEN, anything else) appear in no file of the run directory."""
    secrets = {"WANDB_API_KEY": "wandbsecret" + "0" * 29, "HF_TOKEN": "hf_secrettokenvalue123", "MY_PASSWORD": "pw-7f3a9c"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    r = copy.deepcopy(TINY)
    r["output_dir"] = str(tmp_path / "runs")
    r["trainer"]["max_steps"] = 2
    out = run_in_process("train", str(write(tmp_path, r)), "--no-progress")
    assert out.returncode == 0, out.stderr
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)  # the offline wandb run is among the files searched
    for p in files:
        data = p.read_bytes()
        for name, value in secrets.items():
            assert value.encode() not in data, f"{name} leaked into {p}"
