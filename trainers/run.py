"""The run lifecycle: validate -> build -> eval before -> train -> eval after -> report.

Everything that can fail on the user's input (recipe, data, model, eval/model fit) fails in :func:`build`, before the
run directory exists, so a bad recipe never writes into a run directory. Under DDP every rank builds the same model
and data; only rank 0 creates the run directory, runs the evals and writes the report (evals are never duplicated).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from llm_limits.evals.base import EvalResult, compare
from llm_limits.mitigations.base import Mitigation
from llm_limits.trainers.backends import HookDriver
from llm_limits.trainers.backends.base import MODEL_DIR, is_rank_zero
from llm_limits.trainers.build.assemble import Built, build, restore_mitigations
from llm_limits.trainers.build.models import count_parameters
from llm_limits.trainers.build.retrieval import INDEX_DIR
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import load_recipe
from llm_limits.trainers.results.record import finish_report, jsonable, limit_key, new_results, phase_limits, recipe_text
from llm_limits.trainers.results.report import read_results, write_atomic, write_results
from llm_limits.trainers.results.tracking import Tracker
from llm_limits.trainers.rundir import (
    RECIPE_FILE, RESULTS_FILE, RUN_DIR_ENV, announce_run_dir, await_run_dir, launch_file, new_run_dir, point_latest,
)


def run_evals(
    built: Built, model: torch.nn.Module, phase: str, *, progress: bool, on_result: Callable[[str, EvalResult], None]
) -> dict[str, EvalResult]:
    """Run every eval whose ``when`` includes ``phase`` on ``model``; ``on_result`` sees each result as it lands."""
    out = {}
    device = str(next(model.parameters()).device)
    for key, ev, when in built.evals:
        if phase not in when:
            continue
        res = ev.run(model, built.tokenizer, device=device, progress=progress)
        out[key] = res
        on_result(key, res)
    return out


def launch_command(recipe_path: str | None, overrides: list[str], resume: str | None, *, cli_args: list[str]) -> list[str] | None:
    """The launcher command that re-runs this ``train`` in ``trainer.devices x trainer.num_nodes`` processes, or
    ``None`` to train in this process (:mod:`trainers.launch`). Validates the recipe (schema and this machine's
    devices) first, so a bad recipe or too many devices fail here, before any process starts."""
    from llm_limits.trainers import launch

    if launch.under_launcher():
        return None
    source = Path(resume) / RECIPE_FILE if resume is not None else recipe_path
    if resume is not None and not Path(source).is_file():
        return None  # train() names the problem
    resolved = load_recipe(source, overrides)
    return launch.command(resolved.recipe.trainer, cli_args)


def train(
    recipe_path: str, overrides: list[str] | None = None, *, resume: str | None = None, progress: bool = True,
    echo: Callable[[str], None] = print, run_dir: str | None = None,
) -> Path:
    """``llm-limits train``: the whole lifecycle. Returns the run directory (``run_dir`` when given: it must not hold
    a run yet; an ablation uses it to put each arm where it will look for it).

    ``LLM_LIMITS_RUN_DIR`` (set while the run trains, for the ranks Lightning's launcher starts) is restored when the
    run ends: left behind in a process that trains again or launches torchrun (a test suite, a notebook), it sent
    rank 1 of the next launch into the previous run's directory, where its ZeRO shards were lost to the new run."""
    previous = os.environ.get(RUN_DIR_ENV)
    try:
        return _train(recipe_path, overrides, resume=resume, progress=progress, echo=echo, run_dir=run_dir)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def _train(
    recipe_path: str, overrides: list[str] | None, *, resume: str | None, progress: bool,
    echo: Callable[[str], None], run_dir: str | None,
) -> Path:
    fixed_dir = run_dir
    # --- validate -----------------------------------------------------------------------------------------------
    if fixed_dir is not None and is_rank_zero() and Path(fixed_dir).exists() and any(Path(fixed_dir).iterdir()):
        raise UserError(f"--run-dir {fixed_dir}: already holds files (use --resume to continue a run there)")
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / RECIPE_FILE).is_file():
            raise UserError(f"--resume {resume}: not a run directory (expected {RECIPE_FILE} inside)")
        resolved = load_recipe(run_dir / RECIPE_FILE, overrides)
        resolved.source = str(run_dir / RECIPE_FILE)
    else:
        resolved = load_recipe(recipe_path, overrides)
        run_dir = None  # made below, once everything has been built
    r = resolved.recipe
    # --- build (all user errors surface here, before anything is written) ----------------------------------------
    built, train_data, val_data = build(resolved, index_dir=(run_dir / INDEX_DIR) if run_dir is not None else None)
    # Every mitigation's setup, exactly once, before the optimizer exists and before the evals measure the model.
    try:
        model, hooks = HookDriver.prepare(built.model, built.mitigations, built.tokenizer, max_tokens=r.trainer.max_tokens)
    except UserError as e:  # a mitigation that cannot patch this model: named with the recipe, like build's errors
        raise UserError(f"{resolved.source}: {e}") from None
    built.model = model
    rank0 = is_rank_zero()
    for line in built.warnings if rank0 else []:  # allowed, but outside the model's nominal range (RoPE past its window)
        print(f"warning: {line}", file=sys.stderr, flush=True)  # one line on stderr: never wrapped to the terminal

    if run_dir is None:
        env_dir = os.environ.get(RUN_DIR_ENV)
        if env_dir and not rank0:
            run_dir = Path(env_dir)
        elif fixed_dir is not None:
            run_dir = Path(fixed_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        elif rank0:
            run_dir = new_run_dir(r.output_dir, r.name)
            announce_run_dir(Path(r.output_dir) / r.name, run_dir)
        else:
            run_dir = await_run_dir(Path(r.output_dir) / r.name)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # ranks that Lightning launches later inherit it
    results_path = run_dir / RESULTS_FILE
    results = read_results(results_path) if (resume and results_path.exists()) else new_results(resolved, run_dir)

    tracker = None
    if rank0:
        write_atomic(run_dir / RECIPE_FILE, recipe_text(resolved))
        save_artifacts(built.mitigations, run_dir)
        tracker = Tracker(r.tracking.wandb, run_dir, r.name, resolved.to_dict())
        results["wandb"] = {"mode": tracker.mode, "dir": tracker.files_dir}
        trainable, total = count_parameters(model)
        results["model"] = {"trainable_params": trainable, "total_params": total, "type": type(model).__name__}
        echo(f"run directory: {run_dir}")
        echo(f"model: {type(model).__name__}, {total:,} parameters ({trainable:,} trainable)")
        for m in built.mitigations:  # what a data-building mitigation made of the records (kinds, tokens)
            if m.enabled and getattr(m, "stats", None):
                results.setdefault("data", {})[m.name] = dict(m.stats)
                echo(f"data: {m.name}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.stats.items()))
    limits = [ev.spec().limit for _, ev, _ in built.evals]

    # --- eval before ----------------------------------------------------------------------------------------------
    if rank0 and not any(e.get("before") for e in results["evals"].values()):
        def on_before(key: str, res: EvalResult) -> None:
            results["evals"].setdefault(key, {"eval": res.eval, "limit_key": limit_key(res.spec.limit, key, limits)})
            results["evals"][key]["before"] = res.to_dict()
            tracker.log_eval(key, res, "before", step=0)
            echo(f"eval before: {key}: limit {res.limit_value:g} {res.spec.limit_unit}")

        run_evals(built, model, "before", progress=progress, on_result=on_before)
        write_results(results_path, results)

    # --- train, save ----------------------------------------------------------------------------------------------
    fitted = built.backend.fit(built, hooks, (train_data, val_data), run_dir, tracker, resume=bool(resume),
                               progress=progress, echo=echo)
    model = built.backend.save(fitted, built, run_dir)  # every rank saves its part; rank 0 gets the whole model back
    if model is None:
        return run_dir
    stats, history = fitted.stats, fitted.history

    # --- eval after, report -----------------------------------------------------------------------------------------
    results["train"] = stats
    model.eval()
    step = int(stats["steps"])

    def on_after(key: str, res: EvalResult) -> None:
        entry = results["evals"].setdefault(key, {"eval": res.eval, "limit_key": limit_key(res.spec.limit, key, limits)})
        entry["after"] = res.to_dict()
        if entry.get("before"):
            entry["compare"] = jsonable(compare(EvalResult.from_dict(entry["before"]), res))
        tracker.log_eval(key, res, "after", step=step)
        echo(f"eval after:  {key}: limit {res.limit_value:g} {res.spec.limit_unit}")

    run_evals(built, model, "after", progress=progress, on_result=on_after)
    finish_report(results, run_dir, history=history)
    tracker.summarize(
        {e["limit_key"]: e.get("compare", phase_limits(e)) for e in results["evals"].values()},
        {"train/wall_s": stats["wall_s"], "train/tokens_seen": stats["tokens_seen"]},
    )
    tracker.finish()
    if fixed_dir is None:
        point_latest(run_dir)
        f = launch_file(Path(r.output_dir) / r.name)
        if f is not None:
            f.unlink(missing_ok=True)
    return run_dir


def save_artifacts(mitigations: list[Mitigation], run_dir: Path) -> None:
    """Write what the trainer built for the mitigations (a retrieval index: ``artifacts`` name -> ``save(dir)``) into
    the run directory, once; a resumed run already has them and loads them (:func:`build`'s ``index_dir``)."""
    for m in mitigations:
        for name, save in (m.injected.get("artifacts") or {}).items():
            target = run_dir / name
            if not target.exists():
                save(target)


def evaluate(
    target: str, overrides: list[str] | None = None, *, checkpoint: str | None = None, progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """``llm-limits eval``: the recipe's evals alone, on a fresh model, a run's trained model or a checkpoint.

    ``target`` is a recipe file or a run directory; for a run directory the model defaults to its trained ``model/``.
    Results go to ``<run_dir>/evals/<time>/`` (a run directory) or ``<output_dir>/<name>/eval-<time>/`` (a recipe).
    """
    tpath = Path(target)
    if tpath.is_dir():
        if not (tpath / RECIPE_FILE).is_file():
            raise UserError(f"{target}: not a run directory (expected {RECIPE_FILE} inside) nor a recipe file")
        resolved = load_recipe(tpath / RECIPE_FILE, overrides)
        if checkpoint is None and (tpath / MODEL_DIR).is_dir():
            checkpoint = str(tpath / MODEL_DIR)
        out_root = tpath / "evals"
    else:
        resolved = load_recipe(target, overrides)
        out_root = Path(resolved.recipe.output_dir) / resolved.recipe.name
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise UserError(f"--checkpoint {checkpoint}: expected a model directory saved by a run (its model/ folder)")
    built, _, _ = build(resolved, checkpoint=checkpoint, with_data=False)
    if not built.evals:
        raise UserError(f"{resolved.source}: evals: the recipe lists no evals to run")
    out_dir = out_root / f"eval-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    while out_dir.exists():
        out_dir = out_dir.with_name(out_dir.name + "-b")
    results = new_results(resolved, out_dir)
    results["checkpoint"] = checkpoint
    limits = [ev.spec().limit for _, ev, _ in built.evals]
    phase = "after" if checkpoint else "before"

    def on_result(key: str, res: EvalResult) -> None:
        results["evals"][key] = {"eval": res.eval, "limit_key": limit_key(res.spec.limit, key, limits), phase: res.to_dict()}
        echo(f"eval: {key}: limit {res.limit_value:g} {res.spec.limit_unit}")

    if checkpoint is not None:
        restore_mitigations(built, checkpoint)
    built.model.eval()
    # Every eval runs here whatever its `when`: `eval` is the command for measuring, and says which model it measured.
    for key, ev, _ in built.evals:
        on_result(key, ev.run(built.model, built.tokenizer, device=str(next(built.model.parameters()).device), progress=progress))
    out_dir.mkdir(parents=True)
    finish_report(results, out_dir, history=None)
    return out_dir


