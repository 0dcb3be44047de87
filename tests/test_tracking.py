"""wandb tracking (offline): eval curves, limits and deltas land in the run and its summary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llm_limits.evals.base import EvalResult, LimitSpec, compare
from llm_limits.trainers.recipe.schema import WandbSpec
from llm_limits.trainers.results.tracking import RUN_ID_FILE, Tracker

from tests.conftest import REPO


def _result(curve, limit):
    spec = LimitSpec(metric="loss", axis="position", axis_values=tuple(curve), higher_is_better=False, limit="context",
                     limit_unit="tokens")
    return EvalResult(eval="positional_loss", spec=spec, curve=curve, limit_value=limit, threshold=2.2)


def test_offline_run_gets_eval_curves_and_limit_summary(tmp_path):
    tracker = Tracker(WandbSpec(mode="offline", tags=["t"]), tmp_path, "unit", {"seed": 3})
    assert tracker.mode == "offline" and tracker.run is not None
    before = _result({16.0: 4.6, 32.0: 4.6}, 0.0)
    after = _result({16.0: 2.0, 32.0: 2.1}, 32.0)
    tracker.log_eval("context", before, "before", step=0)
    tracker.log_eval("context", after, "after", step=10)
    tracker.summarize({"context": compare(before, after)}, {"train/wall_s": 1.5})
    summary = dict(tracker.run.summary)
    assert summary["limit_before/context"] == 0.0
    assert summary["limit/context"] == 32.0
    assert summary["limit_delta/context"] == 32.0
    assert tracker.run.config["seed"] == 3
    run_id = tracker.run.id
    tracker.finish()
    assert (tmp_path / RUN_ID_FILE).read_text() == run_id  # a resumed run reuses it
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/*.wandb"))


def test_disabled_tracking_writes_nothing(tmp_path):
    tracker = Tracker(WandbSpec(mode="disabled"), tmp_path, "unit", {})
    tracker.log_eval("context", _result({16.0: 1.0}, 16.0), "after", step=1)
    tracker.summarize({"context": {"limit_after": 16.0}})
    tracker.finish()
    assert tracker.files_dir is None and tracker.lightning_logger() is None
    assert list(tmp_path.iterdir()) == []


_ONLINE = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
from llm_limits.trainers.recipe.schema import WandbSpec
from llm_limits.trainers.results.tracking import Tracker
from llm_limits.evals.base import EvalResult, LimitSpec
tracker = Tracker(WandbSpec(mode="online"), Path(sys.argv[1]), "unit", {"seed": 1})
spec = LimitSpec(metric="loss", axis="position", axis_values=(16.0,), higher_is_better=False, limit="context")
tracker.log_eval("context", EvalResult(eval="positional_loss", spec=spec, curve={16.0: 2.0}, limit_value=16.0,
                                       threshold=2.2), "after", step=3)
tracker.finish()
print("MODE", tracker.mode)
"""


@pytest.mark.slow
@pytest.mark.parametrize("key", [None, "0" * 40], ids=["no-key", "no-network"])
def test_online_without_key_or_network_falls_back_to_offline(tmp_path, key):
    # No network: a key, and a server address nothing listens on. wandb's own init timeout bounds the wait.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="10", PYTHONPATH=str(REPO))
    if key:
        env["WANDB_API_KEY"] = key
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = subprocess.run([sys.executable, "-c", _ONLINE, str(run_dir)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MODE offline" in out.stdout
    assert "falling back to offline" in out.stdout
    run_id = (run_dir / RUN_ID_FILE).read_text()
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/*.wandb"))  # the numbers are kept for `wandb sync`
