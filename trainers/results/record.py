"""A run's record: ``results.json`` as the run fills it in (eval entries before and after, their comparison and the
limit keys), then the report written from it (:mod:`llm_limits.trainers.results.report`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
from pathlib import Path
from typing import Any

import yaml

from llm_limits.evals import EVALS
from llm_limits.evals.tasks import TASK_VERSIONS
from llm_limits.trainers.recipe.schema import ResolvedRecipe
from llm_limits.trainers.results.report import plot_eval, plot_grids, plot_series, plot_training, render_markdown, write_atomic, write_results


RESULTS_FILE = "results.json"
"""A run's record: curves, limits, deltas, training stats, versions (what ``llm-limits compare`` reads)."""
REPORT_FILE = "report.md"
"""The run's before/after tables and plots, rendered from results.json."""

def limit_key(spec_limit: str, eval_key: str, all_limits: list[str]) -> str:
    """The summary key of an eval's limit: the limit's name (``context``) when one eval measures it, else
    ``context.<eval>``."""
    if not spec_limit:
        return eval_key
    return spec_limit if all_limits.count(spec_limit) == 1 else f"{spec_limit}.{eval_key}"


def finish_report(results: dict[str, Any], out_dir: Path, history: list[dict[str, float]] | None) -> None:
    """results.json, one PNG per eval (+ the training loss), report.md."""
    plots: dict[str, str] = {}
    for key, entry in results["evals"].items():
        name = f"{key}.png"
        plot_eval(key, entry, out_dir / "plots" / name)
        plots[key] = f"plots/{name}"
        phases = [p for p in ("before", "after") if entry.get(p)]
        for kind, draw in (("series", plot_series), ("grids", plot_grids)):
            for n in sorted({n for p in phases for n in entry[p].get(kind, {})}):
                per_phase = {p: entry[p][kind][n] for p in phases if n in entry[p].get(kind, {})}
                draw(f"{key}: {n}", per_phase, out_dir / "plots" / f"{key}.{n}.png")
                plots[f"{key}.{n}"] = f"plots/{key}.{n}.png"
    if history:
        plot_training(history, out_dir / "plots" / "training.png")
        plots["training"] = "plots/training.png"
    results["plots"] = plots
    write_results(out_dir / RESULTS_FILE, results)
    write_atomic(out_dir / REPORT_FILE, render_markdown(results, plots))


def new_results(resolved: ResolvedRecipe, run_dir: Path) -> dict[str, Any]:
    return {
        "name": resolved.recipe.name,
        "run_dir": str(run_dir),
        "recipe_source": resolved.source,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "mitigations": [{"name": n, **dataclasses.asdict(c)} for n, c in resolved.mitigations],
        "versions": versions(resolved),
        "evals": {},
    }


def versions(resolved: ResolvedRecipe) -> dict[str, Any]:
    """What the run was measured with, lm-evaluation-harness style: the package, the training data's task (a task
    generator's ``VERSION``; a user's file has none) and each eval's ``version``. ``llm-limits compare`` says so when
    it puts runs of different versions side by side."""
    r = resolved.recipe
    tasks = {r.data.task: TASK_VERSIONS[r.data.task]} if r.data.path is None and r.data.task in TASK_VERSIONS else {}
    return {"llm_limits": importlib.metadata.version("llm-limits"), "tasks": tasks,
            "evals": {name: EVALS[name].version for name, _, _ in resolved.evals}}


def recipe_text(resolved: ResolvedRecipe) -> str:
    head = f"# llm-limits train --resume <this run directory>   (resolved from {resolved.source})\n"
    return head + yaml.safe_dump(resolved.to_dict(), sort_keys=False)


def phase_limits(entry: dict[str, Any]) -> dict[str, Any]:
    out = {}
    if entry.get("before"):
        out["limit_before"] = entry["before"]["limit_value"]
    if entry.get("after"):
        out["limit_after"] = entry["after"]["limit_value"]
    return out


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    out["curve_delta"] = {(str(int(x)) if float(x).is_integer() else str(x)): v for x, v in d["curve_delta"].items()}
    return out
