"""``llm-limits ablate``: run a recipe over a grid of values x seeds, one ordinary run directory per arm.

Layout (``<output_dir>/<name>/ablation/`` unless ``--out``)::

    ablation.json                       grid, seeds, control label, and every arm's status (rewritten atomically)
    arms/<label>/seed-<s>/              an ordinary run directory (results.json, report.md, plots/, wandb/...)
    arms/<label>/seed-<s>.log           the arm's output

Every arm is validated before any runs, so a bad grid key or value fails at once, naming the key. Arms whose run
directory already holds finished results are skipped: running the same command again continues an interrupted
ablation. An arm that fails is recorded with its error and the others go on. Each arm is a subprocess
(``llm-limits train ... --run-dir``), so a crash in one cannot take the others down, and ``--jobs`` runs several at once.
Each arm is a wandb run in one group (the ablation's name), with the arm label as job type and the varied keys as tags.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import load_recipe
from llm_limits.trainers.results.report import write_atomic

ABLATION_FILE = "ablation.json"


@dataclass
class Arm:
    label: str
    """The varied keys and values, e.g. ``pose.enabled=true``."""
    seed: int
    overrides: list[str]
    """Recipe overrides that make this arm (grid values, seed, wandb group/job type/tags)."""
    run_dir: str
    """Relative to the ablation directory."""
    status: str = "pending"
    """``pending``, ``done`` or ``failed``."""
    error: str | None = None


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["a.b=1,2", "c=true,false"]`` -> ``{"a.b": [1, 2], "c": [True, False]}`` (values parsed as YAML).

    >>> parse_grid(["mitigations.0.pose.enabled=true,false", "trainer.lr=1e-3,3e-3"])
    {'mitigations.0.pose.enabled': [True, False], 'trainer.lr': [0.001, 0.003]}
    """
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or not raw:
            raise UserError(f"--grid {item!r}: expected KEY.PATH=VALUE1,VALUE2,...")
        grid[key] = [_scalar(v) for v in raw.split(",")]
    return grid


def _scalar(raw: str) -> Any:
    """A YAML scalar, with YAML 1.2's numbers: PyYAML (YAML 1.1) reads ``1e-3`` as a string."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def short_key(key: str) -> str:
    """A grid key as it appears in arm labels: ``mitigations.0.pose.enabled`` -> ``pose.enabled``.

    >>> short_key("mitigations.0.pose.enabled"), short_key("trainer.lr")
    ('pose.enabled', 'trainer.lr')
    """
    parts = key.split(".")
    if len(parts) > 2 and parts[0] in ("mitigations", "evals") and parts[1].isdigit():
        return ".".join(parts[2:])
    return key


def _value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def expand(grid: dict[str, list[Any]], seeds: int, group: str) -> list[Arm]:
    """One arm per combination (cartesian product, in grid order) and seed.

    >>> [(a.label, a.seed) for a in expand({"x.y": [1, 2]}, 2, "g")]
    [('x.y=1', 0), ('x.y=1', 1), ('x.y=2', 0), ('x.y=2', 1)]
    """
    keys = list(grid)
    arms = []
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        label = ",".join(f"{short_key(k)}={_value(v)}" for k, v in zip(keys, combo)) or "recipe"
        safe = label.replace("/", "_")
        tags = "[" + ", ".join(short_key(k) for k in keys) + "]"
        for seed in range(seeds):
            overrides = [f"{k}={_value(v)}" for k, v in zip(keys, combo)] + [
                f"seed={seed}",
                f"tracking.wandb.group={group}",
                f"tracking.wandb.job_type={safe}",
                f"tracking.wandb.tags={tags}",
            ]
            arms.append(Arm(label=label, seed=seed, overrides=overrides, run_dir=f"arms/{safe}/seed-{seed}"))
    return arms


def control_label(grid: dict[str, list[Any]], control: dict[str, Any], source: str) -> str:
    """The label of the control arm: the combination named by ``control`` (default: every key's first value)."""
    unknown = sorted(set(control) - set(grid))
    if unknown:
        raise UserError(f"{source}: ablate.control.{unknown[0]}: not a grid key (grid keys: {', '.join(grid)})")
    for k, v in control.items():
        if v not in grid[k]:
            raise UserError(f"{source}: ablate.control.{k}: {v!r} is not one of the grid's values {grid[k]}")
    return ",".join(f"{short_key(k)}={_value(control.get(k, vs[0]))}" for k, vs in grid.items()) or "recipe"


def is_finished(run_dir: Path) -> bool:
    """A run directory whose results.json has training stats and every eval's ``after``."""
    path = run_dir / "results.json"
    if not path.is_file():
        return False
    try:
        results = json.loads(path.read_text())
    except ValueError:
        return False
    return "train" in results and all("after" in e for e in results.get("evals", {}).values())


def plan(
    recipe: str, grid_args: list[str], seeds: int | None, out: str | None
) -> tuple[Path, dict[str, Any], list[Arm]]:
    """Validate the grid and every arm's recipe; return the ablation directory, its header and the arms.

    Nothing is written: a bad key or value in any arm stops here, before any arm runs."""
    resolved = load_recipe(recipe)
    spec = resolved.recipe.ablate
    grid = dict(spec.grid) if spec else {}
    grid.update(parse_grid(grid_args))
    if not grid:
        raise UserError(f"{recipe}: nothing to ablate: give --grid KEY=V1,V2 or an ablate.grid section")
    n_seeds = seeds if seeds is not None else (spec.seeds if spec else 1)
    if n_seeds < 1:
        raise UserError(f"--seeds: expected an integer >= 1 (got {n_seeds})")
    name = resolved.recipe.name
    group = f"{name}-ablation"
    arms = expand(grid, n_seeds, group)
    for arm in arms:  # every arm validated up front; the message names the grid key that broke it
        try:
            load_recipe(recipe, arm.overrides)
        except UserError as e:
            raise UserError(f"ablate arm {arm.label} (seed {arm.seed}): {e}") from None
    root = Path(out) if out else Path(resolved.recipe.output_dir) / name / "ablation"
    header = {
        "name": name,
        "recipe": str(recipe),
        "grid": grid,
        "seeds": list(range(n_seeds)),
        "control": control_label(grid, dict(spec.control) if spec else {}, recipe),
        "wandb_group": group,
    }
    return root, header, arms


def run_ablation(
    recipe: str, grid_args: list[str], *, seeds: int | None = None, jobs: int = 1, out: str | None = None,
    dry_run: bool = False, echo: Callable[[str], None] = print,
) -> Path:
    """Plan, then run every unfinished arm (``jobs`` at a time); returns the ablation directory."""
    root, header, arms = plan(recipe, grid_args, seeds, out)
    for arm in arms:
        if is_finished(root / arm.run_dir):
            arm.status = "done"
    if dry_run:
        for arm in arms:
            echo(f"{arm.status:<8} {arm.label:<40} seed {arm.seed}  {root / arm.run_dir}")
        echo(f"{len(arms)} arms ({sum(a.status == 'done' for a in arms)} done); control: {header['control']}")
        return root
    root.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def save() -> None:
        with lock:
            write_atomic(root / ABLATION_FILE, json.dumps({**header, "arms": [asdict(a) for a in arms]}, indent=2) + "\n")

    save()
    todo = [a for a in arms if a.status != "done"]
    echo(f"ablation: {root} ({len(arms)} arms, {len(arms) - len(todo)} already done, {len(todo)} to run, {jobs} at a time)")

    def one(arm: Arm) -> None:
        run_dir = root / arm.run_dir
        if run_dir.exists():  # an unfinished earlier attempt of this arm: start it again from scratch
            shutil.rmtree(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log = run_dir.with_suffix(".log")
        cmd = [sys.executable, "-m", "llm_limits.trainers.cli", "train", recipe, *arm.overrides, "--run-dir", str(run_dir),
               "--no-progress"]
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc == 0 and is_finished(run_dir):
            arm.status, arm.error = "done", None
        else:
            arm.status, arm.error = "failed", _last_error(log, rc)
        save()
        echo(f"  {arm.status:<6} {arm.label} seed {arm.seed}" + (f": {arm.error}" if arm.error else ""))

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(one, todo))
    failed = [a for a in arms if a.status == "failed"]
    echo(f"done: {len(arms) - len(failed)} of {len(arms)} arms finished" + (f", {len(failed)} failed" if failed else ""))
    return root


def _last_error(log: Path, rc: int) -> str:
    """The arm's own one-line error (``error: ...``), else the last line of its output, with the exit code."""
    lines = [l.strip() for l in log.read_text(errors="replace").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    last = errors[-1].removeprefix("error: ") if errors else (lines[-1] if lines else "no output")
    return f"exit {rc}: {last}"
