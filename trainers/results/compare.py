"""``llm-limits compare``: arms of an ablation (or any run directories) side by side, with 95% bootstrap intervals
over seeds, and every arm against a control arm.

Functional core first: :func:`mean_ci`, :func:`diff_ci` and :func:`verdict` are pure and test in milliseconds;
:func:`summarize` turns loaded runs into the comparison (a JSON-ready dict); the writers render it as
``compare.json``, ``compare.md``, ``compare.html``, PNG plots and a summary wandb run; :func:`compare` wires them.

What is measured, per eval and per arm (an arm = one label, its seeds the samples): the limit, every curve point, every
scalar and every secondary-series point, each ``before``, ``after`` and ``delta`` (after - before) as a mean over
seeds with a 95% percentile-bootstrap interval (``n=1``: the value, no interval). Against the control arm: the
difference of the means of ``after`` (and of the limit delta), with a two-sample bootstrap interval, and a
plain-language verdict when that interval excludes 0. Failed and pending arms are listed with their error in every
output; an arm with some seeds failed uses those that finished and says ``n``.

Departure: the two-sample interval is given only when both arms have at least 2 seeds. ``scipy.stats.bootstrap``
refuses a one-observation sample, and resampling only the other arm would hide the missing arm's seed variance.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import yaml

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.results.report import PHASES, _key, _num, _save_fig, _signed, plot_grids, read_results, write_atomic

ABLATION_FILE = "ablation.json"
RESULTS_FILE = "results.json"
CONFIDENCE = 0.95
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
"""Every interval draws from a fresh ``default_rng(BOOTSTRAP_SEED)``: the same data give the same interval whatever
order the statistics are computed in."""
WANDB_MODES = ("offline", "online", "disabled")
TRAIN_STATS = ("steps", "tokens_seen", "wall_s", "final_loss", "val_loss")


# ---------------------------------------------------------------------------------------------------------------------
# Statistics (pure)
# ---------------------------------------------------------------------------------------------------------------------


class Interval(NamedTuple):
    """A mean over seeds with its 95% bootstrap interval (``low``/``high`` are ``None`` when ``n < 2``)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


class Difference(NamedTuple):
    """``mean(a) - mean(b)`` with its 95% two-sample bootstrap interval (``None`` unless both ``n >= 2``)."""

    diff: float | None
    low: float | None
    high: float | None
    n: int
    n_control: int

    @property
    def excludes_zero(self) -> bool | None:
        """Whether the interval lies wholly on one side of 0 (``None`` without an interval)."""
        if self.low is None or self.high is None:
            return None
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**self._asdict(), "excludes_zero": self.excludes_zero}


def _finite(values: Iterable[Any]) -> list[float]:
    """The usable samples: numbers that are not NaN/inf (bools and strings are not samples)."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out.append(float(v))
    return out


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs))


def mean_ci(
    values: Iterable[Any], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Interval:
    """Mean of ``values`` (one per seed) with a percentile-bootstrap interval; NaN and missing values are left out.

    >>> mean_ci([2.0, 2.0, 2.0])
    Interval(mean=2.0, low=2.0, high=2.0, n=3)
    >>> mean_ci([5.0, float("nan")])
    Interval(mean=5.0, low=None, high=None, n=1)
    >>> mean_ci([])
    Interval(mean=None, low=None, high=None, n=0)
    """
    xs = _finite(values)
    if not xs:
        return Interval(None, None, None, 0)
    m = _mean(xs)
    if len(xs) == 1:
        return Interval(m, None, None, 1)
    if min(xs) == max(xs):  # every resample is the same sample: a zero-width interval, no resampling needed
        return Interval(m, xs[0], xs[0], len(xs))
    import numpy as np
    from scipy import stats

    res = stats.bootstrap((np.asarray(xs),), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                          method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Interval(m, float(ci.low), float(ci.high), len(xs))


def _mean_diff(a: Any, b: Any, axis: int = -1) -> Any:
    import numpy as np

    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def diff_ci(
    a: Iterable[Any], b: Iterable[Any], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Difference:
    """``mean(a) - mean(b)`` with a two-sample percentile-bootstrap interval (each sample resampled on its own).

    >>> diff_ci([3.0, 3.0], [1.0, 1.0])
    Difference(diff=2.0, low=2.0, high=2.0, n=2, n_control=2)
    >>> diff_ci([3.0], [1.0, 2.0]).excludes_zero is None
    True
    """
    xa, xb = _finite(a), _finite(b)
    if not xa or not xb:
        return Difference(None, None, None, len(xa), len(xb))
    d = _mean(xa) - _mean(xb)
    if len(xa) < 2 or len(xb) < 2:
        return Difference(d, None, None, len(xa), len(xb))
    if min(xa) == max(xa) and min(xb) == max(xb):
        return Difference(d, d, d, len(xa), len(xb))
    import numpy as np
    from scipy import stats

    res = stats.bootstrap((np.asarray(xa), np.asarray(xb)), _mean_diff, n_resamples=n_resamples,
                          confidence_level=confidence, method="percentile", vectorized=True, paired=False,
                          rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Difference(d, float(ci.low), float(ci.high), len(xa), len(xb))


def verdict(d: Difference, *, higher_is_better: bool = True, unit: str = "", control: str = "control") -> str:
    """One arm against the control in plain language; says "better"/"worse" only when the interval excludes 0.

    >>> verdict(Difference(128.0, 64.0, 192.0, 3, 3), unit="tokens")
    'better than control: +128 tokens (95% CI +64 to +192 excludes 0)'
    >>> verdict(Difference(-0.5, -1.0, 0.2, 3, 2))
    'no clear difference from control: -0.5 (95% CI -1 to +0.2 includes 0)'
    >>> verdict(Difference(64.0, None, None, 1, 3), unit="tokens")
    '+64 tokens; too few seeds for an interval (n=1 vs 3)'
    """
    u = f" {unit}" if unit else ""
    if d.diff is None:
        return f"no finished runs to compare (n={d.n} vs {d.n_control})"
    if d.low is None or d.high is None:
        return f"{_signed(d.diff)}{u}; too few seeds for an interval (n={d.n} vs {d.n_control})"
    ci = f"95% CI {_signed(d.low)} to {_signed(d.high)}"
    if d.low == d.high == 0:
        return f"same as {control}: every seed of both arms gives the same value"
    if not d.excludes_zero:
        return f"no clear difference from {control}: {_signed(d.diff)}{u} ({ci} includes 0)"
    better = (d.diff > 0) == higher_is_better
    return f"{'better' if better else 'worse'} than {control}: {_signed(d.diff)}{u} ({ci} excludes 0)"


def fmt_ci(iv: Interval | dict[str, Any] | None) -> str:
    """``256 [192, 320]``, ``256 (n=1)`` or ``-``.

    >>> fmt_ci(Interval(256.0, 192.0, 320.0, 3)), fmt_ci(Interval(0.5, None, None, 1)), fmt_ci(None)
    ('256 [192, 320]', '0.5 (n=1)', '-')
    """
    if iv is None:
        return "-"
    d = iv._asdict() if isinstance(iv, tuple) else iv
    if d["mean"] is None:
        return "-"
    if d["low"] is None:
        return f"{_num(d['mean'])} (n={d['n']})"
    return f"{_num(d['mean'])} [{_num(d['low'])}, {_num(d['high'])}]"


def fmt_diff(d: Difference | dict[str, Any] | None) -> str:
    """``+128 [+64, +192]`` (a trailing ``*`` when the interval excludes 0), ``+64 (n=1 vs 3)`` or ``-``."""
    if d is None:
        return "-"
    d = d.to_dict() if isinstance(d, Difference) else d
    if d["diff"] is None:
        return "-"
    if d["low"] is None:
        return f"{_signed(d['diff'])} (n={d['n']} vs {d['n_control']})"
    return f"{_signed(d['diff'])} [{_signed(d['low'])}, {_signed(d['high'])}]" + (" *" if d["excludes_zero"] else "")


# ---------------------------------------------------------------------------------------------------------------------
# Loading runs and ablations
# ---------------------------------------------------------------------------------------------------------------------


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
    labels = _labels(runs)
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


def _labels(runs: list[Run]) -> list[str]:
    """Arm labels in order of first appearance."""
    return list(dict.fromkeys(r.label for r in runs))


# ---------------------------------------------------------------------------------------------------------------------
# The comparison (a JSON-ready dict)
# ---------------------------------------------------------------------------------------------------------------------


def _phase(run: Run, key: str, phase: str) -> dict[str, Any] | None:
    entry = (run.results or {}).get("evals", {}).get(key) or {}
    res = entry.get(phase)
    return res if isinstance(res, dict) else None


def _triple(runs: list[Run], key: str, get: Any) -> dict[str, dict[str, Any]]:
    """before, after and delta of one quantity (``get(eval_result) -> value | None``) over an arm's seeds."""
    before, after, delta = [], [], []
    for r in runs:
        b = _phase(r, key, "before")
        a = _phase(r, key, "after")
        vb = get(b) if b else None
        va = get(a) if a else None
        before.append(vb)
        after.append(va)
        if _finite([vb]) and _finite([va]):
            delta.append(va - vb)
    return {"before": mean_ci(before).to_dict(), "after": mean_ci(after).to_dict(), "delta": mean_ci(delta).to_dict(),
            "_after": _finite(after), "_delta": _finite(delta)}


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    """Drop the raw samples kept for the control comparison."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _names(runs: list[Run], key: str, get: Any) -> list[str]:
    """Union (in order of appearance) of the names ``get(eval_result)`` yields over runs and phases."""
    out: dict[str, None] = {}
    for r in runs:
        for p in PHASES:
            res = _phase(r, key, p)
            if res:
                out.update(dict.fromkeys(get(res)))
    return list(out)


def _curve_keys(runs: list[Run], key: str, get: Any) -> list[str]:
    """Axis values (JSON keys) of a curve or series, ascending."""
    xs = {float(x) for x in _names(runs, key, get)}
    return [_key(x) for x in sorted(xs)]


def _point(points: dict[str, Any] | None, x: str) -> Any:
    """One point of a curve whose JSON keys may be spelled ``64`` or ``64.0``."""
    if not points:
        return None
    if x in points:
        return points[x]
    for k, v in points.items():
        if float(k) == float(x):
            return v
    return None


def _grid_mean(runs: list[Run], key: str, name: str, phase: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The mean over seeds of one grid (cells averaged over the seeds with a finite value); seeds whose grid has
    other axes than the first are left out, with a note."""
    import numpy as np

    grids = [(r, (_phase(r, key, phase) or {}).get("grids", {}).get(name)) for r in runs]
    grids = [(r, g) for r, g in grids if g]
    if not grids:
        return None, []
    first = grids[0][1]
    notes, arrays = [], []
    for r, g in grids:
        if [float(x) for x in g["x"]] != [float(x) for x in first["x"]] or \
                [float(y) for y in g["y"]] != [float(y) for y in first["y"]]:
            notes.append(f"{key}.{name} ({phase}): seed {r.seed} ({r.run_dir}) has other grid axes; left out")
            continue
        arrays.append(np.asarray(g["values"], dtype=float))
    stack = np.stack(arrays)
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(stack).sum(axis=0)
        mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
    out = {k: first[k] for k in ("x_axis", "y_axis", "metric")}
    out.update(x=list(first["x"]), y=list(first["y"]),
               values=[[float(v) if math.isfinite(v) else None for v in row] for row in mean],  # JSON has no NaN
               n=len(arrays))
    return out, notes


def _spec(runs: list[Run], key: str) -> dict[str, Any]:
    for r in runs:
        for p in ("after", "before"):
            res = _phase(r, key, p)
            if res and res.get("spec"):
                return dict(res["spec"])
    return {}


def _eval_name(runs: list[Run], key: str) -> str:
    for r in runs:
        entry = (r.results or {}).get("evals", {}).get(key)
        if entry:
            return str(entry.get("eval", key))
    return key


def _arm_summary(label: str, runs: list[Run], control: str) -> dict[str, Any]:
    done = [r for r in runs if r.status == "done"]
    if len(done) == len(runs):
        status = "done"
    elif done:
        status = "partial"
    else:
        status = "failed" if any(r.status == "failed" for r in runs) else "pending"
    return {
        "label": label,
        "control": label == control,
        "status": status,
        "n": len(done),
        "n_total": len(runs),
        "seeds": [r.seed for r in done],
        "runs": [{"seed": r.seed, "run_dir": r.run_dir, "status": r.status, "error": r.error} for r in runs],
    }


def _arm_eval(runs: list[Run], key: str) -> dict[str, Any]:
    """Everything measured for one eval over one arm's finished seeds (raw samples kept under ``_`` keys)."""
    arm: dict[str, Any] = {"n": sum(1 for r in runs if _phase(r, key, "after") or _phase(r, key, "before"))}
    arm["limit"] = _triple(runs, key, lambda res: res.get("limit_value"))
    arm["threshold"] = _strip(_triple(runs, key, lambda res: res.get("threshold")))
    arm["curve"] = {x: _triple(runs, key, lambda res, x=x: _point(res.get("curve"), x))
                    for x in _curve_keys(runs, key, lambda res: res.get("curve", {}))}
    arm["scalars"] = {s: _triple(runs, key, lambda res, s=s: res.get("scalars", {}).get(s))
                      for s in _names(runs, key, lambda res: [k for k, v in res.get("scalars", {}).items()
                                                             if _finite([v])])}
    arm["series"] = {}
    for name in _names(runs, key, lambda res: res.get("series", {})):
        meta = next(s for r in runs for p in PHASES
                    if (s := ((_phase(r, key, p) or {}).get("series", {}).get(name))))
        get_pts = lambda res, name=name: (res.get("series", {}).get(name) or {}).get("points", {})  # noqa: E731
        arm["series"][name] = {
            **{k: meta[k] for k in ("axis", "metric", "higher_is_better") if k in meta},
            "points": {x: _strip(_triple(runs, key, lambda res, x=x, g=get_pts: _point(g(res), x)))
                       for x in _curve_keys(runs, key, get_pts)},
        }
    arm["grids"], arm["notes"] = {}, []
    for name in _names(runs, key, lambda res: res.get("grids", {})):
        arm["grids"][name] = {}
        for p in PHASES:
            mean, notes = _grid_mean(runs, key, name, p)
            if mean:
                arm["grids"][name][p] = mean
            arm["notes"] += notes
    return arm


def _vs_control(arm: dict[str, Any], ctl: dict[str, Any], spec: dict[str, Any], control: str) -> dict[str, Any]:
    """One arm's differences from the control: limit after, limit delta, every curve point and scalar after."""
    unit = spec.get("limit_unit", "")
    after = diff_ci(arm["limit"]["_after"], ctl["limit"]["_after"])
    delta = diff_ci(arm["limit"]["_delta"], ctl["limit"]["_delta"])
    return {
        "limit_after": after.to_dict(),
        "limit_delta": delta.to_dict(),
        # limits are "larger is better" whatever the metric's direction (evals.base.compare)
        "verdict_limit_after": verdict(after, higher_is_better=True, unit=unit, control=control),
        "verdict_limit_delta": verdict(delta, higher_is_better=True, unit=unit, control=control),
        "curve_after": {x: diff_ci(v["_after"], ctl["curve"][x]["_after"]).to_dict()
                        for x, v in arm["curve"].items() if x in ctl["curve"]},
        "scalars_after": {s: diff_ci(v["_after"], ctl["scalars"][s]["_after"]).to_dict()
                          for s, v in arm["scalars"].items() if s in ctl["scalars"]},
    }


def summarize(source: Source, control: str | None = None, progress: Any = None) -> dict[str, Any]:
    """The comparison: arms (with failures), per eval and arm the before/after/delta intervals, and each arm against
    the control. ``progress(description)`` is called once per eval x arm when given."""
    labels = _labels(source.runs)
    control = control if control is not None else source.control
    if control not in labels:
        raise UserError(f"--control {control!r}: no such arm (arms: {', '.join(labels)})")
    by_label = {lab: [r for r in source.runs if r.label == lab] for lab in labels}
    done = {lab: [r for r in runs if r.status == "done"] for lab, runs in by_label.items()}
    notes = list(source.notes)
    if not done[control]:
        notes.append(f"the control arm {control} has no finished runs: no arm-vs-control comparisons")
    eval_keys: dict[str, None] = {}
    for r in source.runs:
        eval_keys.update(dict.fromkeys((r.results or {}).get("evals", {})))
    evals: dict[str, Any] = {}
    for key in eval_keys:
        all_done = [r for runs in done.values() for r in runs]
        spec = _spec(all_done, key)
        arms: dict[str, Any] = {}
        for lab in labels:
            if progress:
                progress(f"{key}: {lab}")
            if done[lab]:
                arms[lab] = _arm_eval(done[lab], key)
        vs = {}
        if control in arms:
            for lab, arm in arms.items():
                if lab != control:
                    vs[lab] = _vs_control(arm, arms[control], spec, control)
        for arm in arms.values():
            notes += arm.pop("notes")
        evals[key] = {
            "eval": _eval_name(all_done, key),
            "spec": spec,
            "arms": {lab: _clean(arm) for lab, arm in arms.items()},
            "vs_control": vs,
        }
    train = {}
    for lab, runs in done.items():
        if runs:
            train[lab] = {s: mean_ci([(r.results or {}).get("train", {}).get(s) for r in runs]).to_dict()
                          for s in TRAIN_STATS}
    return {
        "kind": "compare",
        "name": source.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "ablation": str(source.ablation) if source.ablation else None,
        "control": control,
        "method": {"interval": "percentile bootstrap over seeds", "confidence": CONFIDENCE,
                   "n_resamples": N_RESAMPLES, "random_state": BOOTSTRAP_SEED,
                   "vs_control": "two-sample bootstrap of mean(arm) - mean(control); needs >= 2 seeds per arm"},
        "arms": [_arm_summary(lab, runs, control) for lab, runs in by_label.items()],
        "evals": evals,
        "train": train,
        "notes": notes,
    }


def _clean(arm: dict[str, Any]) -> dict[str, Any]:
    """An arm's eval entry without the raw samples (``_after``/``_delta``)."""
    out = dict(arm)
    out["limit"] = _strip(arm["limit"])
    out["curve"] = {x: _strip(v) for x, v in arm["curve"].items()}
    out["scalars"] = {s: _strip(v) for s, v in arm["scalars"].items()}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tables (one neutral form, rendered to markdown, HTML, rich and wandb)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Table:
    key: str
    """A stable id (``arms``, ``context/limits``...): the wandb key and the HTML anchor."""
    title: str
    columns: list[str]
    rows: list[list[str]]
    right: list[bool]
    """Which columns hold numbers (right-aligned)."""


def _failures(arm: dict[str, Any]) -> str:
    bad = [r for r in arm["runs"] if r["status"] != "done"]
    return "; ".join(f"seed {r['seed']} {r['status']}" + (f": {r['error']}" if r.get("error") else "") for r in bad)


def arms_table(c: dict[str, Any]) -> Table:
    rows = []
    for a in c["arms"]:
        rows.append([a["label"] + (" (control)" if a["control"] else ""), a["status"], f"{a['n']} of {a['n_total']}",
                     ", ".join(str(s) for s in a["seeds"]) or "-", _failures(a) or "-"])
    return Table("arms", "Arms", ["arm", "status", "seeds finished", "seeds", "failed / pending"], rows,
                 [False, False, True, False, False])


def limit_table(c: dict[str, Any], key: str) -> Table:
    """One row per arm: n, limit before/after/delta, the differences from the control and the verdict; arms with no
    finished seed are rows too, with their errors."""
    e = c["evals"][key]
    unit = e["spec"].get("limit_unit", "")
    rows = []
    for a in c["arms"]:
        lab = a["label"]
        name = lab + (" (control)" if a["control"] else "")
        arm = e["arms"].get(lab)
        if arm is None:
            why = f"{a['status']}: {_failures(a)}" if a["n"] == 0 else "not measured: this arm's runs have no such eval"
            rows.append([name, f"0 of {a['n_total']}", "-", "-", "-", "-", "-", why])
            continue
        vs = e["vs_control"].get(lab)
        n = f"{arm['limit']['after']['n']} of {a['n_total']}"
        rows.append([
            name, n, fmt_ci(arm["limit"]["before"]), fmt_ci(arm["limit"]["after"]), fmt_ci(arm["limit"]["delta"]),
            fmt_diff(vs["limit_after"]) if vs else "-", fmt_diff(vs["limit_delta"]) if vs else "-",
            (vs["verdict_limit_delta"] if vs else ("control" if a["control"] else "-"))
            + (f" ({_failures(a)})" if a["status"] == "partial" else ""),
        ])
    u = f" ({unit})" if unit else ""
    return Table(f"{key}/limits", f"{key}: limit {e['spec'].get('limit', '')}{u}",
                 ["arm", "n", "before", "after", "delta", "after - control", "delta - control", "vs control (delta)"],
                 rows, [False, True, True, True, True, True, True, False])


def curve_table(c: dict[str, Any], key: str, phase: str = "after") -> Table:
    """Rows: axis values; columns: arms; cells: the mean over seeds with its interval."""
    e = c["evals"][key]
    labels = list(e["arms"])
    xs = sorted({float(x) for arm in e["arms"].values() for x in arm["curve"]})
    rows = []
    for x in xs:
        rows.append([_num(x)] + [fmt_ci(e["arms"][lab]["curve"].get(_key(x), {}).get(phase)) for lab in labels])
    spec = e["spec"]
    return Table(f"{key}/curve_{phase}", f"{key}: {spec.get('metric', '')} per {spec.get('axis', '')}, {phase}",
                 [spec.get("axis", "x")] + labels, rows, [True] * (len(labels) + 1))


def scalars_table(c: dict[str, Any], key: str, phase: str = "after") -> Table:
    e = c["evals"][key]
    labels = list(e["arms"])
    names = list(dict.fromkeys(s for arm in e["arms"].values() for s in arm["scalars"]))
    rows = [[s] + [fmt_ci(e["arms"][lab]["scalars"].get(s, {}).get(phase)) for lab in labels] for s in names]
    return Table(f"{key}/scalars_{phase}", f"{key}: scalars, {phase}", ["scalar"] + labels, rows,
                 [False] + [True] * len(labels))


def train_table(c: dict[str, Any]) -> Table:
    rows = [[lab] + [fmt_ci(stats.get(s)) for s in TRAIN_STATS] for lab, stats in c["train"].items()]
    return Table("train", "Training", ["arm", *TRAIN_STATS], rows, [False] + [True] * len(TRAIN_STATS))


def tables(c: dict[str, Any]) -> list[Table]:
    """Every table of the report, in report order."""
    out = [arms_table(c)]
    for key in c["evals"]:
        out += [limit_table(c, key), curve_table(c, key, "after"), curve_table(c, key, "delta"), scalars_table(c, key)]
    if c["train"]:
        out.append(train_table(c))
    return out


def print_table(comparison: dict[str, Any], console: Any) -> None:
    """The terminal view: the arms (with failures) and each eval's limit table, as ``rich`` tables."""
    from rich.table import Table as RichTable

    for t in [arms_table(comparison)] + [limit_table(comparison, k) for k in comparison["evals"]]:
        rt = RichTable(title=t.title, title_justify="left")
        for col, right in zip(t.columns, t.right):
            rt.add_column(col, justify="right" if right else "left", overflow="fold")
        for row in t.rows:
            rt.add_row(*row)
        console.print(rt)
    for key, e in comparison["evals"].items():
        for lab, vs in e["vs_control"].items():
            console.print(f"{key} {lab}: {vs['verdict_limit_delta']}", markup=False, soft_wrap=True)


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def _colours(labels: list[str], control: str) -> dict[str, Any]:
    """The control in black, the other arms in tab10 order."""
    others = [lab for lab in labels if lab != control]
    out: dict[str, Any] = {lab: f"C{i % 10}" for i, lab in enumerate(others)}
    out[control] = "black"
    return out


def _failed_note(c: dict[str, Any]) -> str:
    bad = [a for a in c["arms"] if a["status"] in ("failed", "pending")]
    return "no finished runs: " + ", ".join(f"{a['label']} ({a['status']})" for a in bad) if bad else ""


def plot_curves(c: dict[str, Any], key: str, path: Path, phase: str = "after") -> None:
    """One line per arm (mean over seeds) with its 95% interval as a band; the control in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = c["evals"][key]
    spec = e["spec"]
    colours = _colours([a["label"] for a in c["arms"]], c["control"])
    fig, ax = plt.subplots(figsize=(9.0, 3.8), dpi=110)
    for lab, arm in e["arms"].items():
        pts = sorted((float(x), v[phase]) for x, v in arm["curve"].items() if v[phase]["mean"] is not None)
        if not pts:
            continue
        xs = [x for x, _ in pts]
        lim = arm["limit"][phase]
        name = f"{lab}{' (control)' if lab == c['control'] else ''}: n={arm['n']}, limit {fmt_ci(lim)}"
        ax.plot(xs, [v["mean"] for _, v in pts], marker="o", ms=3, color=colours.get(lab), label=name)
        band = [(x, v) for x, v in pts if v["low"] is not None]
        if band:
            ax.fill_between([x for x, _ in band], [v["low"] for _, v in band], [v["high"] for _, v in band],
                            color=colours.get(lab), alpha=0.18, lw=0)
    if spec.get("threshold") is not None:
        ax.axhline(spec["threshold"], color="gray", ls=":", lw=1)  # the pass mark
    ax.set_xlabel(spec.get("axis", ""))
    better = " (higher is better)" if spec.get("higher_is_better", True) else " (lower is better)"
    ax.set_ylabel(spec.get("metric", "") + better)
    ax.set_title(f"{key}, {phase}: mean over seeds, 95% bootstrap band", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the bands stay visible
    note = _failed_note(c)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="tab:red")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    _save_fig(fig, path)


def plot_limit_deltas(c: dict[str, Any], path: Path) -> None:
    """Bars of each arm's mean limit delta (after - before) with 95% interval error bars, one panel per eval; arms
    without finished runs keep their place, marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(c["evals"])
    labels = [a["label"] for a in c["arms"]]
    status = {a["label"]: a["status"] for a in c["arms"]}
    colours = _colours(labels, c["control"])
    fig, axes = plt.subplots(1, len(keys), figsize=(max(4.0, 0.9 * len(labels) + 2) * len(keys), 3.8), dpi=110,
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        e = c["evals"][key]
        for i, lab in enumerate(labels):
            arm = e["arms"].get(lab)
            d = arm["limit"]["delta"] if arm else None
            if not d or d["mean"] is None:
                why = status[lab] if status[lab] in ("failed", "pending") else "not measured"
                ax.text(i, 0, why, ha="center", va="bottom", fontsize=7, color="tab:red", rotation=90)
                continue
            err = None if d["low"] is None else [[d["mean"] - d["low"]], [d["high"] - d["mean"]]]
            ax.bar(i, d["mean"], color=colours[lab], yerr=err, capsize=4, alpha=0.85)
            if d["low"] is None:
                ax.text(i, d["mean"], f"n={d['n']}", ha="center", va="bottom", fontsize=7)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlim(-0.6, len(labels) - 0.4)  # arms with no bar keep their slot
        ax.set_xticks(range(len(labels)), [lab + (" (control)" if lab == c["control"] else "") for lab in labels],
                      rotation=30, ha="right", fontsize=7)
        unit = e["spec"].get("limit_unit", "")
        ax.set_ylabel(f"limit delta{f' ({unit})' if unit else ''}")
        ax.set_title(f"{key}: {e['spec'].get('limit', '')} limit, after - before", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save_fig(fig, path)


def write_plots(c: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """All PNGs under ``out_dir/plots``; returns plot key -> path relative to ``out_dir``."""
    plots: dict[str, str] = {}
    plot_dir = out_dir / "plots"
    if any(arm["limit"]["delta"]["mean"] is not None for e in c["evals"].values() for arm in e["arms"].values()):
        plot_limit_deltas(c, plot_dir / "limit_delta.png")
        plots["limit_delta"] = "plots/limit_delta.png"
    for key, e in c["evals"].items():
        if any(v["after"]["mean"] is not None for arm in e["arms"].values() for v in arm["curve"].values()):
            plot_curves(c, key, plot_dir / f"{key}.after.png")
            plots[key] = f"plots/{key}.after.png"
        names = list(dict.fromkeys(n for arm in e["arms"].values() for n in arm["grids"]))
        for name in names:
            panels = {f"{lab} (n={arm['grids'][name]['after']['n']})": arm["grids"][name]["after"]
                      for lab, arm in e["arms"].items() if "after" in arm["grids"].get(name, {})}
            if panels:  # the run report's heatmaps, one panel per arm instead of per phase, one colour scale
                plot_grids(f"{key}: {name}, after (mean over seeds)", panels, plot_dir / f"{key}.{name}.png")
                plots[f"{key}.{name}"] = f"plots/{key}.{name}.png"
    return plots


# ---------------------------------------------------------------------------------------------------------------------
# Markdown and HTML (one list of blocks, two renderers)
# ---------------------------------------------------------------------------------------------------------------------


def _blocks(c: dict[str, Any]) -> list[tuple[str, Any]]:
    """The report as blocks: (``h1``|``h2``|``h3``|``p``|``ul``|``table``|``img``, content)."""
    plots = c.get("plots", {})
    m = c["method"]
    b: list[tuple[str, Any]] = [("h1", f"{c['name']}: arms compared")]
    src = f"Ablation: `{c['ablation']}`. " if c.get("ablation") else ""
    b.append(("p", f"{src}Control arm: `{c['control']}`. Each cell is the mean over seeds with its "
                   f"{m['confidence']:.0%} percentile-bootstrap interval [low, high] ({m['n_resamples']} resamples, "
                   f"random_state {m['random_state']}); `(n=1)` means one seed, no interval. Differences from the "
                   f"control use a two-sample bootstrap and need 2 seeds per arm; `*` marks an interval that excludes "
                   f"0. With few seeds a percentile interval is narrow: read it as a lower bound on the spread."))
    b.append(("table", arms_table(c)))
    bad = [a for a in c["arms"] if a["status"] != "done"]
    if bad:
        b.append(("ul", [f"{a['label']} ({a['status']}, {a['n']} of {a['n_total']} seeds finished): {_failures(a)}"
                         for a in bad]))
    if c["notes"]:
        b += [("p", "Notes:"), ("ul", list(c["notes"]))]
    if "limit_delta" in plots:
        b += [("h2", "Limit deltas"), ("img", ("limit deltas", plots["limit_delta"]))]
    for key, e in c["evals"].items():
        spec = e["spec"]
        better = "higher" if spec.get("higher_is_better", True) else "lower"
        b += [("h2", key), ("p", f"Eval `{e['eval']}`: {spec.get('metric', '')} per {spec.get('axis', '')} "
                                 f"({better} is better); the {spec.get('limit', '')} limit in "
                                 f"{spec.get('limit_unit', '') or 'axis units'} (larger is better).")]
        b.append(("table", limit_table(c, key)))
        verdicts = [f"{lab}: limit after {vs['verdict_limit_after']}; limit delta {vs['verdict_limit_delta']}"
                    for lab, vs in e["vs_control"].items()]
        if verdicts:
            b.append(("ul", verdicts))
        if key in plots:
            b.append(("img", (f"{key} after", plots[key])))
        b += [("table", curve_table(c, key, "after")), ("table", curve_table(c, key, "delta"))]
        sc = scalars_table(c, key)
        if sc.rows:
            b.append(("table", sc))
        for name in dict.fromkeys(n for arm in e["arms"].values() for n in arm["grids"]):
            if f"{key}.{name}" in plots:
                b += [("h3", f"{key}: {name}"), ("img", (f"{key}.{name}", plots[f"{key}.{name}"]))]
    if c["train"]:
        b += [("h2", "Training"), ("table", train_table(c))]
    wb = c.get("wandb") or {}
    if wb.get("dir"):
        b.append(("p", f"wandb ({wb['mode']}): `{wb['dir']}`"
                       + (" (sync with `wandb sync` on that folder)" if wb["mode"] == "offline" else "")))
    return b


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(c: dict[str, Any]) -> str:
    lines: list[str] = []
    for kind, x in _blocks(c):
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + x, ""]
        elif kind == "p":
            lines += [x, ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in x] + [""]
        elif kind == "img":
            lines += [f"![{x[0]}]({x[1]})", ""]
        elif kind == "table":
            lines += [f"**{x.title}**", "", "| " + " | ".join(_md_cell(h) for h in x.columns) + " |",
                      "|" + "".join("---:|" if r else "---|" for r in x.right)]
            lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in x.rows]
            lines.append("")
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { text-align: left; font-weight: bold; padding: 0.3em 0; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f6f6f6; padding: 0 0.2em; }
li.bad { color: #b00; }
"""


def _inline(s: str) -> str:
    """Markdown backticks -> <code>, everything escaped."""
    parts = html.escape(s).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def render_html(c: dict[str, Any], out_dir: Path) -> str:
    """The same blocks as the markdown, as one self-contained page (PNGs embedded as base64, no scripts)."""
    body: list[str] = []
    for kind, x in _blocks(c):
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{html.escape(x)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(x)}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in x) + "</ul>")
        elif kind == "img":
            data = base64.b64encode((out_dir / x[1]).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(x[0])}" src="data:image/png;base64,{data}"></p>')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in x.columns)
            rows = "".join("<tr>" + "".join(f'<td{" class=num" if r else ""}>{html.escape(v)}</td>'
                                            for v, r in zip(row, x.right)) + "</tr>" for row in x.rows)
            body.append(f'<table id="{html.escape(x.key)}"><caption>{html.escape(x.title)}</caption>'
                        f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(c['name'])}: compare</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------------------------------
# wandb summary run
# ---------------------------------------------------------------------------------------------------------------------


def summary_keys(c: dict[str, Any]) -> dict[str, float | int]:
    """``compare/<eval>/<arm>/limit_{before,after,delta}`` (+ ``_low``/``_high``, ``n``) and
    ``compare/<eval>/<arm>/vs_control/limit_{after,delta}`` (+ ``_low``/``_high``)."""
    out: dict[str, float | int] = {}
    for key, e in c["evals"].items():
        for lab, arm in e["arms"].items():
            p = f"compare/{key}/{lab}"
            out[f"{p}/n"] = arm["n"]
            for phase in ("before", "after", "delta"):
                iv = arm["limit"][phase]
                for suffix, v in (("", iv["mean"]), ("_low", iv["low"]), ("_high", iv["high"])):
                    if v is not None:
                        out[f"{p}/limit_{phase}{suffix}"] = v
        for lab, vs in e["vs_control"].items():
            for what in ("limit_after", "limit_delta"):
                d = vs[what]
                for suffix, v in (("", d["diff"]), ("_low", d["low"]), ("_high", d["high"])):
                    if v is not None:
                        out[f"compare/{key}/{lab}/vs_control/{what}{suffix}"] = v
    return out


def _wandb_project(runs: list[Run]) -> tuple[str, str | None]:
    for r in runs:
        wb = ((r.recipe.get("tracking") or {}).get("wandb") or {})
        if wb.get("project"):
            return str(wb["project"]), wb.get("entity")
    return "llm-limits", None


def log_wandb(c: dict[str, Any], out_dir: Path, mode: str, source: Source) -> dict[str, Any] | None:
    """A summary wandb run (job type ``compare``, the ablation's group) with the tables, the PNGs and the summary
    keys; ``None`` when ``mode`` is ``disabled``."""
    if mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    project, entity = _wandb_project(source.runs)
    kwargs = dict(project=project, entity=entity, group=source.wandb_group or source.name, job_type="compare",
                  name=f"compare-{source.name}", dir=str(out_dir),
                  config={"control": c["control"], "arms": [a["label"] for a in c["arms"]],
                          "ablation": c.get("ablation"), "method": c["method"]},
                  settings=wandb.Settings(console="off", x_disable_stats=True))
    (out_dir / "wandb").mkdir(parents=True, exist_ok=True)  # wandb.init(dir=D) writes under D/wandb
    try:
        run = wandb.init(mode=mode, **kwargs)
    except Exception as e:  # online with no key or no network: keep the report, log offline
        if mode != "online":
            raise
        import logging

        logging.getLogger(__name__).warning("wandb online failed (%s); logging offline: sync later", e)
        mode = "offline"
        run = wandb.init(mode=mode, **kwargs)
    data: dict[str, Any] = {f"tables/{t.key}": wandb.Table(columns=t.columns, data=t.rows) for t in tables(c)}
    data.update({f"plots/{k}": wandb.Image(str(out_dir / p)) for k, p in c.get("plots", {}).items()})
    run.log(data)
    for k, v in summary_keys(c).items():
        run.summary[k] = v
    files_dir = str(Path(run.dir).parent)
    run.finish()
    return {"mode": mode, "dir": files_dir, "project": project, "group": kwargs["group"]}


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def compare(
    targets: list[Path], out_dir: Path | None = None, control: str | None = None, wandb_mode: str = "offline",
    progress: bool = True,
) -> Path:
    """Compare run directories, or the arms of one ablation directory; returns the directory holding the report
    (default ``<ablation>/compare`` for an ablation, else ``runs/compare-<time>``)."""
    if wandb_mode not in WANDB_MODES:
        raise UserError(f"--wandb {wandb_mode!r}: expected one of {', '.join(WANDB_MODES)}")
    targets = [Path(t) for t in targets]
    source = load_targets(targets)
    if not any(r.status == "done" for r in source.runs):
        counts = {s: sum(r.status == s for r in source.runs) for s in ("failed", "pending")}
        first = next((f": first error: {r.error}" for r in source.runs if r.error), "")
        where = source.ablation or ", ".join(map(str, targets))
        raise UserError(f"{where}: no finished runs to compare ({counts['failed']} failed, {counts['pending']} "
                        f"pending){first}")
    if out_dir is None:
        out_dir = source.ablation / "compare" if source.ablation else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        bar.start()
        n_evals = len({k for r in source.runs for k in (r.results or {}).get("evals", {})})
        task = bar.add_task("compare", total=n_evals * len(_labels(source.runs)) + 2)
    step = (lambda d: bar.update(task, advance=1, description=d)) if bar else None
    try:
        comparison = summarize(source, control, progress=step)
        if step:
            step("plots")
        comparison["plots"] = write_plots(comparison, out_dir)
        if step:
            step("wandb")
        comparison["wandb"] = log_wandb(comparison, out_dir, wandb_mode, source)
    finally:
        if bar:
            bar.stop()
    write_atomic(out_dir / "compare.json", json.dumps(comparison, indent=2) + "\n")
    write_atomic(out_dir / "compare.md", render_markdown(comparison))
    write_atomic(out_dir / "compare.html", render_html(comparison, out_dir))
    return out_dir
