"""wandb tracking: one wandb run per training run, offline by default.

Metric names say who owns them (docs/architecture.md): ``train/loss``, ``<mitigation>/<knob>``,
``eval/<limit>/<metric>@<axis value>`` (logged at step 0 before training and at the last step after it, so a wandb
chart shows the move), and in the summary ``limit_before/<key>``, ``limit/<key>``, ``limit_delta/<key>``.
Curves also go in as wandb Tables with a line plot per eval and phase.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from llm_limits.evals.base import EvalResult
from llm_limits.trainers.recipe.schema import WandbSpec

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id"


class Tracker:
    """A thin owner of the wandb run (or of nothing, when tracking is disabled)."""

    def __init__(self, spec: WandbSpec, run_dir: Path, name: str, config: dict[str, Any]) -> None:
        self.spec = spec
        self.run_dir = run_dir
        self.run: Any = None
        self.mode = spec.mode
        if spec.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        if wandb.run is not None:  # a run that failed earlier in this process never finished: close it as failed
            log.warning("closing wandb run %s left open by an earlier run that failed in this process", wandb.run.id)
            wandb.run.finish(exit_code=1)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        kwargs = dict(
            project=spec.project,
            entity=spec.entity,
            group=spec.group,
            job_type=spec.job_type,
            tags=spec.tags or None,
            name=f"{name}-{run_dir.name}",
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        try:
            self.run = _init(wandb, mode=spec.mode, **kwargs)
        except Exception as e:  # online with no key or no network: keep training, keep the numbers
            if spec.mode != "online":
                raise
            log.warning("wandb online failed (%s); falling back to offline: sync later with `wandb sync`",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.mode = "offline"
            # The failed online attempt's wandb service still holds the run id ("run ID ... is in use"): shut it
            # down, so the offline run starts on a fresh service with the same id (a later `wandb sync` matches it).
            wandb.teardown()
            self.run = _init(wandb, mode="offline", **kwargs)
        id_file.write_text(run_id)

    @property
    def files_dir(self) -> str | None:
        """Where wandb wrote this run's files (``wandb sync`` takes this folder)."""
        if self.run is None:
            return None
        return str(Path(self.run.dir).parent)

    def lightning_logger(self) -> Any:
        """A Lightning WandbLogger writing into this same run, or ``None``."""
        if self.run is None:
            return None
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self.run, log_model=False)

    def log_eval(self, key: str, result: EvalResult, phase: str, step: int) -> None:
        """Scalars per axis value, a Table and a line plot of the curve."""
        if self.run is None:
            return
        import wandb

        spec = result.spec
        data: dict[str, Any] = {
            f"eval/{key}/{spec.metric}@{_fmt(x)}": v for x, v in sorted(result.curve.items())
        }
        data[f"eval/{key}/limit"] = result.limit_value
        table = wandb.Table(columns=[spec.axis, spec.metric], data=[[x, v] for x, v in sorted(result.curve.items())])
        data[f"curves/{key}/{phase}"] = wandb.plot.line(
            table, spec.axis, spec.metric, title=f"{result.eval} ({phase}): {spec.metric} vs {spec.axis}"
        )
        for name, series in result.series.items():
            t = wandb.Table(columns=[series.axis, series.metric], data=[[x, v] for x, v in sorted(series.points.items())])
            data[f"curves/{key}/{name}/{phase}"] = wandb.plot.line(t, series.axis, series.metric, title=f"{name} ({phase})")
        for name, grid in result.grids.items():
            rows = [[x, y, grid.values[j][i]] for j, y in enumerate(grid.y) for i, x in enumerate(grid.x)]
            data[f"grids/{key}/{name}/{phase}"] = wandb.Table(columns=[grid.x_axis, grid.y_axis, grid.metric], data=rows)
        self.run.log(data, step=step)

    def summarize(self, comparisons: dict[str, dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
        """``limit_before/*``, ``limit/*``, ``limit_delta/*``, ``retained/*`` (+ ``_low``/``_high``: general ability
        after / before) and the run's other headline numbers in the summary."""
        if self.run is None:
            return
        for key, c in comparisons.items():
            if "limit_before" in c:
                self.run.summary[f"limit_before/{key}"] = c["limit_before"]
            if "limit_after" in c:
                self.run.summary[f"limit/{key}"] = c["limit_after"]
            if "limit_delta" in c:
                self.run.summary[f"limit_delta/{key}"] = c["limit_delta"]
            kept = c.get("retained") or {}  # the general eval's after / before, with its paired interval
            for suffix, name in (("", "retained"), ("_low", "low"), ("_high", "high")):
                if kept.get(name) is not None:
                    self.run.summary[f"retained/{key}{suffix}"] = kept[name]
        for k, v in (extra or {}).items():
            self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


IN_USE_WAIT_S = 60.0
"""How long a resumed run waits for a killed predecessor's wandb service to let go of the run id."""


def _init(wandb: Any, **kwargs: Any) -> Any:
    """``wandb.init``, waiting while the run id is still held: after ``kill -9`` the dead run's wandb service lives on
    for a few seconds and refuses the same id ("run ID ... is in use"), which ``--resume`` reuses on purpose."""
    import time

    deadline = time.monotonic() + IN_USE_WAIT_S
    while True:
        try:
            return wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 -- wandb raises its own types from its service
            if "in use" not in str(e) or time.monotonic() > deadline:
                raise
            log.warning("wandb run %s is still held by a previous process; waiting for it to exit", kwargs.get("id"))
            time.sleep(1.0)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
