"""Loading what ``llm-limits compare`` puts side by side: run directories (``results.json`` and the resolved
``recipe.yaml``) and ablation directories (``ablation.json``: every arm, the finished ones with their results, the
others with their status and error).

Nothing here computes a number: :func:`load_targets` returns a :class:`Source` (the runs, the default control, notes)
that :func:`llm_limits.trainers.results.compare.stats.summarize` turns into the comparison. :func:`version_warnings`
reads which version of each eval and task the runs were measured with, and says where runs put side by side differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.results.report import PHASES, read_results

ABLATION_FILE = "ablation.json"
RESULTS_FILE = "results.json"
UNVERSIONED = "unversioned"
"""The version of an eval or task in a run made before results.json carried versions (no ``version``, or ``""``: what
``EvalResult.from_dict`` reads from such a run)."""


@dataclass
class Run:
    """One seed of one arm: finished (``results`` loaded) or not (``status`` and ``error`` say why)."""

    label: str
    seed: int | None
    run_dir: str
    status: str = "done"
    """``done``, ``failed`` or ``pending``."""
    error: str | None = None
    results: dict[str, Any] | None = field(default=None, repr=False)
    recipe: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class Source:
    """What was asked for: the runs, the default control, and the ablation they came from (if any)."""

    runs: list[Run]
    control: str
    name: str
    ablation: Path | None = None
    wandb_group: str | None = None
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_results(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable as JSON ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_recipe(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _seed(recipe: dict[str, Any]) -> int | None:
    s = recipe.get("seed")
    return s if isinstance(s, int) and not isinstance(s, bool) else None


def load_run(run_dir: Path) -> Run:
    """A plain run directory: its label is ``results["name"]``, its seed the resolved recipe's ``seed``."""
    results = _read_json(run_dir / RESULTS_FILE)
    recipe = _read_recipe(run_dir)
    label = str(results.get("name") or recipe.get("name") or run_dir.name)
    return Run(label=label, seed=_seed(recipe), run_dir=str(run_dir), results=results, recipe=recipe)


def _arm_dir(root: Path, run_dir: str) -> Path:
    """``run_dir`` as written in ablation.json: absolute, relative to the ablation directory, or to the cwd."""
    p = Path(run_dir)
    if p.is_absolute():
        return p
    if (root / p).exists() or not p.exists():
        return root / p
    return p


def load_ablation(root: Path) -> Source:
    """An ablation directory: every arm of ``ablation.json`` (done ones with their results, the others with their
    status and error)."""
    header = _read_json(root / ABLATION_FILE)
    arms = header.get("arms")
    if not isinstance(arms, list) or not arms:
        raise UserError(f"{root / ABLATION_FILE}: no arms listed")
    runs = []
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict) or "label" not in arm:
            raise UserError(f"{root / ABLATION_FILE}: arms[{i}]: expected an object with a label")
        status = str(arm.get("status", "pending"))
        run_dir = _arm_dir(root, str(arm.get("run_dir", "")))
        seed = arm.get("seed")
        run = Run(label=str(arm["label"]), seed=seed if isinstance(seed, int) else None, run_dir=str(run_dir),
                  status=status, error=arm.get("error"))
        if status == "done":
            if (run_dir / RESULTS_FILE).is_file():
                loaded = load_run(run_dir)
                run.results, run.recipe = loaded.results, loaded.recipe
                run.seed = run.seed if run.seed is not None else loaded.seed
            else:
                run.status, run.error = "failed", f"marked done but {run_dir / RESULTS_FILE} is missing"
        elif status not in ("failed", "pending"):
            run.status, run.error = "failed", f"unknown status {status!r}" + (f": {run.error}" if run.error else "")
        runs.append(run)
    labels = arm_labels(runs)
    control = str(header.get("control") or labels[0])
    notes = []
    if control not in labels:
        notes.append(f"ablation.json names control {control!r}, which is not an arm; using {labels[0]!r}")
        control = labels[0]
    return Source(runs=runs, control=control, name=str(header.get("name") or root.name), ablation=root,
                  wandb_group=header.get("wandb_group") or header.get("name"), notes=notes)


def load_targets(targets: list[Path]) -> Source:
    """Run directories (each has results.json), or exactly one ablation directory (it has ablation.json)."""
    if not targets:
        raise UserError("compare: no runs given: pass run directories or one ablation directory")
    kinds = []
    for t in targets:
        if (t / RESULTS_FILE).is_file():
            kinds.append("run")
        elif (t / ABLATION_FILE).is_file():
            kinds.append("ablation")
        elif not t.exists():
            raise UserError(f"{t}: no such directory")
        else:
            raise UserError(f"{t}: neither a run directory (no {RESULTS_FILE}) nor an ablation directory "
                            f"(no {ABLATION_FILE})")
    if "ablation" in kinds:
        if len(targets) > 1:
            raise UserError(f"compare: give one ablation directory, or run directories, not both or several "
                            f"(got {len(targets)} paths, {kinds.count('ablation')} of them ablations)")
        return load_ablation(targets[0])
    runs = [load_run(t) for t in targets]
    notes = []
    seen: dict[tuple[str, int | None], int] = {}
    for r in runs:
        seen[(r.label, r.seed)] = seen.get((r.label, r.seed), 0) + 1
    for (label, seed), count in seen.items():
        if count > 1:
            notes.append(f"arm {label}: seed {seed} appears in {count} run directories; each counts as one sample")
    return Source(runs=runs, control=runs[0].label, name="compare", notes=notes)


def arm_labels(runs: list[Run]) -> list[str]:
    """Arm labels in order of first appearance."""
    return list(dict.fromkeys(r.label for r in runs))


# ---------------------------------------------------------------------------------------------------------------------
# Versions: what each run was measured with
# ---------------------------------------------------------------------------------------------------------------------


def _version(phase: Any) -> str | None:
    """The version an eval result carries (``None``: no such phase in this run)."""
    if not isinstance(phase, dict):
        return None
    return _or_unversioned(phase.get("version"))


def _or_unversioned(v: Any) -> str:
    return UNVERSIONED if v is None or v == "" else str(v)


def eval_versions(run: Run) -> dict[str, str]:
    """Eval key -> the version its ``before`` and ``after`` were measured with (``results.json``:
    ``evals[key][phase]["version"]``); a run whose two phases differ gets both, e.g. ``1 before, 2 after``.

    >>> evals = {"context": {"before": {"version": 2}, "after": {"version": 2}}, "reasoning": {"before": {}}}
    >>> eval_versions(Run("a", 0, "r", results={"evals": evals}))
    {'context': '2', 'reasoning': 'unversioned'}
    """
    out = {}
    for key, entry in ((run.results or {}).get("evals") or {}).items():
        phases = {p: v for p in PHASES if (v := _version((entry or {}).get(p))) is not None}
        if len(set(phases.values())) > 1:
            out[key] = ", ".join(f"{v} {p}" for p, v in phases.items())
        else:
            out[key] = next(iter(phases.values()), UNVERSIONED)
    return out


def task_versions(run: Run) -> dict[str, str]:
    """Task name -> version, from ``results.json``'s ``versions.tasks`` (empty in runs made before versions)."""
    tasks = ((run.results or {}).get("versions") or {}).get("tasks")
    if not isinstance(tasks, dict):
        return {}
    return {str(name): _or_unversioned(v) for name, v in tasks.items()}


def _who(runs: list[Run], group: list[Run]) -> str:
    """The runs of ``group`` by arm label; an arm split across versions names its seeds (or run directories)."""
    names = []
    for label in arm_labels(group):
        mine = [r for r in group if r.label == label]
        if len(mine) == sum(r.label == label for r in runs):
            names.append(label)
        else:
            names.append(f"{label} ({', '.join(f'seed {r.seed}' if r.seed is not None else r.run_dir for r in mine)})")
    return ", ".join(names)


def version_warnings(runs: list[Run]) -> list[str]:
    """One line for each eval key, then each task, that the finished runs were measured with in different versions
    (a run that lacks the eval, or does not list the task, is left out of that line; no line when versions agree).

    >>> run = lambda label, v: Run(label, 0, label, results={"evals": {"context": {"after": {"version": v}}}})
    >>> print(*version_warnings([run("a", 1), run("b", 1), run("c", 2)]))
    compare: eval context was measured with different versions (1: a, b; 2: c); their numbers may not be comparable
    >>> version_warnings([run("a", 1), run("b", 1)])
    []
    """
    done = [r for r in runs if r.status == "done" and r.results is not None]
    out = []
    for kind, versions, verb in (("eval", eval_versions, "measured"), ("task", task_versions, "used")):
        per_run = [(r, versions(r)) for r in done]
        for name in dict.fromkeys(name for _, vs in per_run for name in vs):
            groups: dict[str, list[Run]] = {}
            for r, vs in per_run:
                if name in vs:
                    groups.setdefault(vs[name], []).append(r)
            if len(groups) > 1:
                having = [r for group in groups.values() for r in group]
                listed = "; ".join(f"{v}: {_who(having, group)}" for v, group in groups.items())
                out.append(f"compare: {kind} {name} was {verb} with different versions ({listed}); their numbers may "
                           f"not be comparable")
    return out
