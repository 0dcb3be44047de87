"""Per-step host work of the Lightning backend (issue 20: tiny recipes were launch-bound on a GPU): the metrics beyond
the loss are logged on the logger's own logging steps and on the last step, not at every step, and the logger still
receives every metric at every step it writes, the mitigations' metrics of the steps in between included."""

from __future__ import annotations

from typing import Any

import pytest
from lightning.pytorch.loggers.logger import Logger

from llm_limits.trainers.backends.lightning import build_trainer
from tests.test_lightning import Recorder, _built, module_for

pytestmark = pytest.mark.usefixtures("one_thread")


class Capture(Logger):
    """A Lightning logger that keeps what it is asked to write."""

    def __init__(self):
        super().__init__()
        self.writes: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.writes.append((int(step or 0), dict(metrics)))


def test_metrics_reach_the_logger_on_its_steps_with_fewer_log_calls(tmp_path, monkeypatch):
    resolved, built, train_loader, _ = _built()
    rec = Recorder()
    spec = resolved.recipe.trainer.model_copy(update={"max_steps": 6, "log_every": 3})
    module = module_for(built.model, [rec], spec)
    calls: list[str] = []
    original = type(module).log

    def counting_log(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(type(module), "log", counting_log)
    logger = Capture()
    trainer = build_trainer(spec, tmp_path, logger=logger, has_val=False, progress=False)
    trainer.fit(module, train_dataloaders=train_loader)

    written = [m for _, m in logger.writes if "train/loss" in m]
    # Lightning writes every log_every_n_steps = 3 optimizer steps: after steps 2 and 5 (0-based), each with every
    # metric, the mitigation's at that step's value (not a stale one)
    assert [m.get("recorder/step") for m in written] == [2.0, 5.0]
    for m in written:
        assert {"train/loss", "train/lm_loss", "train/lr", "train/tokens_seen", "recorder/step"} <= set(m)
    # the loss at all 6 steps; the other 5 metrics (lm_loss, tokens_seen, lr, recorder/step, recorder/extra_loss) at
    # the 2 logging steps: 16 self.log calls where logging everything at every step made 6 x 6 = 36
    assert calls.count("train/loss") == 6 and calls.count("train/lm_loss") == 2 and len(calls) == 6 + 2 * 5
    assert "train/lm_loss" in trainer.callback_metrics and float(trainer.callback_metrics["recorder/step"]) == 5


def test_without_a_logger_the_last_step_still_fills_callback_metrics(tmp_path):
    resolved, built, train_loader, _ = _built()
    rec = Recorder()
    spec = resolved.recipe.trainer.model_copy(update={"max_steps": 4, "log_every": 50})
    module = module_for(built.model, [rec], spec)
    trainer = build_trainer(spec, tmp_path, logger=None, has_val=False, progress=False)
    trainer.fit(module, train_dataloaders=train_loader)
    logged = trainer.callback_metrics
    assert float(logged["recorder/step"]) == 3 and "train/tokens_seen" in logged and "train/lr" in logged
    assert float(logged["train/loss"]) == pytest.approx(float(logged["train/lm_loss"]) + 0.5, rel=1e-5)
