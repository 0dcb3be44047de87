"""The statistics of ``llm-limits compare``: bootstrap intervals over seeds, differences from the control arm, and the
comparison they make (a JSON-ready dict).

Functional core first: :func:`mean_ci`, :func:`diff_ci` and :func:`verdict` are pure and test in milliseconds;
:func:`summarize` turns loaded runs (:mod:`.load`) into the comparison that :mod:`.render` writes out, with one line
for each eval or task the runs were measured with in different versions (``version_warnings``).

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

import math
import time
from typing import Any, Iterable, NamedTuple

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.results.compare.load import Run, Source, arm_labels, version_warnings
from llm_limits.trainers.results.report import PHASES, _key, _signed

CONFIDENCE = 0.95
N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
"""Every interval draws from a fresh ``default_rng(BOOTSTRAP_SEED)``: the same data give the same interval whatever
order the statistics are computed in."""
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
    labels = arm_labels(source.runs)
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
        "tradeoff": tradeoff(done, evals),
        "name": source.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "ablation": str(source.ablation) if source.ablation else None,
        "control": control,
        "version_warnings": version_warnings(source.runs),
        "method": {"interval": "percentile bootstrap over seeds", "confidence": CONFIDENCE,
                   "n_resamples": N_RESAMPLES, "random_state": BOOTSTRAP_SEED,
                   "vs_control": "two-sample bootstrap of mean(arm) - mean(control); needs >= 2 seeds per arm"},
        "arms": [_arm_summary(lab, runs, control) for lab, runs in by_label.items()],
        "evals": evals,
        "train": train,
        "notes": notes,
    }


def _retained_of(run: Run, key: str) -> dict[str, Any] | None:
    """The ``compare.retained`` block of one run's eval entry (the ``general`` eval's), or ``None``."""
    kept = (((run.results or {}).get("evals", {}).get(key) or {}).get("compare") or {}).get("retained")
    return kept if isinstance(kept, dict) else None


def tradeoff(done: dict[str, list[Run]], evals: dict[str, Any]) -> dict[str, Any] | None:
    """Per arm, each targeted limit's gain (its limit delta over seeds, from ``evals``) against the general ability
    the arm kept (``retained``, after / before of the ``general`` eval); ``None`` when no run measured general ability.

    The retained interval is the bootstrap over seeds when the arm has 2 or more; with one seed it is that run's own
    paired bootstrap over documents and questions (``interval: items``), so a single-seed comparison still shows how
    sure the cost is.
    """
    general = [k for k in evals if any(_retained_of(r, k) for runs in done.values() for r in runs)]
    if not general:
        return None
    gkey = general[0]
    targets = [k for k in evals if k not in general]
    arms: dict[str, Any] = {}
    for lab, runs in done.items():
        kept = [_retained_of(r, gkey) for r in runs]
        kept = [k for k in kept if k and k.get("retained") is not None]
        if not kept:
            continue
        if len(kept) == 1:
            iv = {"mean": kept[0]["retained"], "low": kept[0].get("low"), "high": kept[0].get("high"), "n": 1,
                  "interval": "items"}
        else:
            iv = {**mean_ci([k["retained"] for k in kept]).to_dict(), "interval": "seeds"}
        gains = {}
        for t in targets:
            arm = evals[t]["arms"].get(lab)
            if arm is not None:
                gains[t] = dict(arm["limit"]["delta"])
        arms[lab] = {"retained": iv, "gains": gains}
    return {"general": gkey, "targets": targets, "arms": arms,
            "units": {t: evals[t]["spec"].get("limit_unit", "") for t in targets}}


def _clean(arm: dict[str, Any]) -> dict[str, Any]:
    """An arm's eval entry without the raw samples (``_after``/``_delta``)."""
    out = dict(arm)
    out["limit"] = _strip(arm["limit"])
    out["curve"] = {x: _strip(v) for x, v in arm["curve"].items()}
    out["scalars"] = {s: _strip(v) for s, v in arm["scalars"].items()}
    return out
