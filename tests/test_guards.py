"""Guards: a NaN or infinite loss stops a run with one line (exit 2) on both backends, and the checkpoints written
before it stay loadable."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

from mitigations import MITIGATIONS
from mitigations.base import Mitigation, MitigationConfig
from trainers.checkpoints import last_good_checkpoint

from tests.conftest import TINY
from tests.test_cli import run_in_process
from tests.test_trl_backend import trl_recipe, write

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
    if backend == "trl":
        r = trl_recipe(tmp_path, "sft")
        r["evals"] = []
    else:
        r = copy.deepcopy(TINY)
        r["output_dir"] = str(tmp_path / "runs")
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
