"""The eval interface: each eval declares its limit up front, measures a curve, and reads the limit off it.

An eval runs on any Hugging Face causal LM and its tokenizer, batched, with no training code. It never imports
``trainers`` or ``mitigations`` (docs/architecture.md). The limit is read off the curve by one pure function,
:func:`read_limit` (RULER's effective context length is the model case: the largest length whose score still clears the
threshold), and a before/after pair becomes deltas through :func:`compare`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

AxisValue = float
"""Axis values are stored as floats (JSON keys become strings; :meth:`EvalResult.from_dict` turns them back)."""


@dataclass(frozen=True)
class LimitSpec:
    """What an eval measures and how its limit is read, declared before anything runs."""

    metric: str
    """Name of the metric on the curve, e.g. ``loss`` or ``niah_acc``."""
    axis: str
    """Name of the axis the curve runs along, e.g. ``position`` or ``context_len``."""
    axis_values: tuple[AxisValue, ...]
    """The axis values measured, ascending."""
    higher_is_better: bool
    """Direction of the metric."""
    threshold: float | None = None
    """Absolute pass mark for :func:`read_limit`; ``None`` when the eval derives it from the curve (then
    :attr:`EvalResult.threshold` holds the value used)."""
    limit: str = ""
    """The limit family this eval measures (``context``, ``reasoning``, ...), shared with its mitigation."""
    limit_unit: str = ""
    """Unit of the limit value (``tokens``, ``steps``, ...)."""
    limit_on_axis: bool = True
    """Whether the limit is a value of the axis (an effective length, drawn as a line on the curve); ``False`` when it
    is a number derived otherwise (the multimodal gain: sighted minus blind accuracy)."""


def passes(value: float, threshold: float, higher_is_better: bool) -> bool:
    """Whether one metric value clears the threshold (NaN never does)."""
    if value is None or math.isnan(value):
        return False
    return value >= threshold if higher_is_better else value <= threshold


def read_limit(
    curve: Mapping[AxisValue, float], threshold: float, higher_is_better: bool, floor: AxisValue = 0.0
) -> AxisValue:
    """The largest axis value up to which every point of the curve clears ``threshold``.

    Points are taken in ascending axis order; the first failing point ends the run (a curve that recovers later does
    not extend the limit). If the very first point fails, the limit is ``floor``.

    >>> read_limit({1024: 0.98, 2048: 0.91, 4096: 0.80, 8192: 0.9}, threshold=0.85, higher_is_better=True)
    2048
    >>> read_limit({16: 2.0, 32: 2.1, 48: 3.5}, threshold=2.2, higher_is_better=False)
    32
    >>> read_limit({16: 0.1}, threshold=0.5, higher_is_better=True)
    0.0
    """
    limit = floor
    for x in sorted(curve):
        if not passes(curve[x], threshold, higher_is_better):
            break
        limit = x
    return limit


@dataclass
class Series:
    """A secondary curve of a measurement (e.g. accuracy by needle depth, attention mass by context length)."""

    axis: str
    metric: str
    points: dict[AxisValue, float]
    """Axis value -> metric."""
    higher_is_better: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"axis": self.axis, "metric": self.metric, "higher_is_better": self.higher_is_better,
                "points": {_key(x): v for x, v in self.points.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Series":
        return cls(axis=d["axis"], metric=d["metric"], higher_is_better=bool(d.get("higher_is_better", True)),
                   points={float(x): float(v) for x, v in d["points"].items()})


@dataclass
class Grid:
    """A metric over two axes (e.g. accuracy over context length x needle depth), drawn as a heatmap."""

    x_axis: str
    y_axis: str
    metric: str
    x: list[AxisValue]
    y: list[AxisValue]
    values: list[list[float]]
    """``values[j][i]`` is the metric at ``(x[i], y[j])``: one row per y value."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Grid":
        return cls(**{k: d[k] for k in ("x_axis", "y_axis", "metric", "x", "y", "values")})


@dataclass
class EvalResult:
    """One eval's measurement of one model."""

    eval: str
    """Registry name of the eval that produced it."""
    spec: LimitSpec
    curve: dict[AxisValue, float]
    """Axis value -> metric, one point per ``spec.axis_values``."""
    limit_value: AxisValue
    """The limit read off :attr:`curve` by :func:`read_limit`."""
    threshold: float
    """The threshold actually used (``spec.threshold`` or the one derived from the curve)."""
    version: str = ""
    """Version of the eval that measured it (:attr:`Eval.version`); results of different versions measure different
    things. ``""`` in a result written before evals had versions."""
    prompt_format: str = ""
    """How the eval wrote its prompts: ``chat`` (each prompt one user turn of the tokenizer's chat template) or
    ``plain`` (the task's text as it is), the :attr:`EvalConfig.prompt_format` resolved for the tokenizer. ``""`` in a
    result written before evals had prompt formats."""
    scalars: dict[str, float] = field(default_factory=dict)
    """Other named numbers of the measurement (reference loss, chance loss, token counts...)."""
    notes: list[str] = field(default_factory=list)
    """Plain-language caveats for the report (e.g. why the limit is 0)."""
    series: dict[str, Series] = field(default_factory=dict)
    """Named secondary curves; the report overlays each one before vs after."""
    grids: dict[str, Grid] = field(default_factory=dict)
    """Named 2-D measurements; the report draws each as heatmaps before | after."""
    item_scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-item scores of named components (the ``general`` eval's: one per document or question, in a fixed order),
    ``{"values": [...], "weights": [...] | None, "transform": "mean" | "exp_neg_mean"}``: the component's score is the
    (weighted) mean of ``values``, or ``exp(-mean)`` for per-token losses (1 / perplexity). Kept so that a before/after
    pair gets a paired interval (:func:`retained`); empty for evals that read a limit off a curve."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["spec"]["axis_values"] = list(self.spec.axis_values)
        d["curve"] = {_key(x): v for x, v in self.curve.items()}
        d["series"] = {k: v.to_dict() for k, v in self.series.items()}
        d["grids"] = {k: v.to_dict() for k, v in self.grids.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalResult":
        spec = dict(d["spec"])
        spec["axis_values"] = tuple(float(x) for x in spec["axis_values"])
        return cls(
            eval=d["eval"],
            spec=LimitSpec(**spec),
            curve={float(x): float(v) for x, v in d["curve"].items()},
            limit_value=float(d["limit_value"]),
            threshold=float(d["threshold"]),
            version=str(d.get("version", "")),
            prompt_format=str(d.get("prompt_format", "")),
            scalars=dict(d.get("scalars", {})),
            notes=list(d.get("notes", [])),
            series={k: Series.from_dict(v) for k, v in d.get("series", {}).items()},
            grids={k: Grid.from_dict(v) for k, v in d.get("grids", {}).items()},
            item_scores={k: dict(v) for k, v in d.get("item_scores", {}).items()},
        )


def _key(x: AxisValue) -> str:
    """JSON key for an axis value: ``64`` rather than ``64.0`` when it is whole."""
    return str(int(x)) if float(x).is_integer() else str(x)


def compare(before: EvalResult, after: EvalResult) -> dict[str, Any]:
    """Before/after deltas of one eval: the limit's and the curve's at every shared axis value.

    ``improved`` says whether the limit moved the good way; limits are "larger is better" (a longer effective context,
    more reasoning steps), so a positive ``limit_delta`` is an improvement.
    """
    if before.eval != after.eval:
        raise ValueError(f"cannot compare results of different evals: {before.eval!r} vs {after.eval!r}")
    shared = sorted(set(before.curve) & set(after.curve))
    curve_delta = {x: after.curve[x] - before.curve[x] for x in shared}
    limit_delta = after.limit_value - before.limit_value
    out = {
        "eval": after.eval,
        "limit": after.spec.limit,
        "metric": after.spec.metric,
        "limit_before": before.limit_value,
        "limit_after": after.limit_value,
        "limit_delta": limit_delta,
        "improved": limit_delta > 0,
        "curve_delta": curve_delta,
    }
    kept = retained(before, after)
    if kept is not None:
        out["retained"] = kept
    return out


RETAINED_CONFIDENCE = 0.95
RETAINED_RESAMPLES = 2000


def component_score(values: Any, weights: Any, transform: str) -> Any:
    """A component's score from its per-item values along the last axis: the weighted mean, or ``exp(-mean)`` when
    the values are per-token losses (``transform="exp_neg_mean"``, weights = token counts: 1 / perplexity).

    >>> import numpy as np
    >>> float(component_score(np.array([1.0, 0.0, 1.0, 1.0]), None, "mean"))
    0.75
    >>> losses, tokens = np.array([1.0, 3.0]), np.array([3.0, 1.0])  # per-document mean loss, its token count
    >>> round(float(component_score(losses, tokens, "exp_neg_mean")), 4)  # exp(-(3 * 1 + 1 * 3) / 4)
    0.2231
    """
    import numpy as np

    w = np.ones_like(values) if weights is None else weights
    m = (values * w).sum(axis=-1) / w.sum(axis=-1)
    return np.exp(-m) if transform == "exp_neg_mean" else m


def retained(
    before: EvalResult, after: EvalResult, confidence: float = RETAINED_CONFIDENCE,
    n_resamples: int = RETAINED_RESAMPLES, seed: int = 0,
) -> dict[str, Any] | None:
    """How much of the before-training score the trained model keeps, ``after / before``, with a paired percentile
    bootstrap interval: the same items are resampled for both phases (a question the model got right before and
    wrong after counts against it in every resample). One ratio per component of :attr:`EvalResult.item_scores`
    (1 / perplexity, an lm-eval task's accuracy), and ``retained`` their mean; components are resampled
    independently. ``None`` when the two results share no component with the same items.

    >>> b = EvalResult("g", LimitSpec("score", "component", (0.0,), True), {0.0: 0.5}, 0.5, 0.0,
    ...                item_scores={"qa": {"values": [1, 1, 0, 0], "weights": None, "transform": "mean"}})
    >>> a = EvalResult("g", LimitSpec("score", "component", (0.0,), True), {0.0: 0.5}, 0.5, 0.0,
    ...                item_scores={"qa": {"values": [1, 0, 0, 0], "weights": None, "transform": "mean"}})
    >>> r = retained(b, a)
    >>> r["retained"], r["components"]["qa"]["before"], r["components"]["qa"]["after"]
    (0.5, 0.5, 0.25)
    >>> 0.0 <= r["low"] <= 0.5 <= r["high"] <= 1.0
    True
    """
    import numpy as np

    shared = [k for k in before.item_scores if k in after.item_scores
              and len(before.item_scores[k]["values"]) == len(after.item_scores[k]["values"]) > 0]
    if not shared:
        return None
    rng = np.random.default_rng(seed)
    components, boots, skipped = {}, [], 0
    for k in shared:
        b, a = before.item_scores[k], after.item_scores[k]
        vb, va = np.asarray(b["values"], dtype=float), np.asarray(a["values"], dtype=float)
        wb = None if b.get("weights") is None else np.asarray(b["weights"], dtype=float)
        wa = None if a.get("weights") is None else np.asarray(a["weights"], dtype=float)
        t = a.get("transform", "mean")
        sb, sa = float(component_score(vb, wb, t)), float(component_score(va, wa, t))
        idx = rng.integers(0, len(vb), size=(n_resamples, len(vb)))  # [resamples, items], one draw for both phases
        bb = component_score(vb[idx], None if wb is None else wb[idx], t)
        ba = component_score(va[idx], None if wa is None else wa[idx], t)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bb > 0, ba / bb, np.nan)  # [resamples]
        skipped += int(np.isnan(ratio).sum())
        boots.append(ratio)
        components[k] = {"before": sb, "after": sa, "delta": sa - sb, "retained": sa / sb if sb > 0 else None,
                         "n": int(len(vb))}
    points = [c["retained"] for c in components.values()]
    overall = float(np.mean(points)) if None not in points else None
    mean_boot = np.mean(np.stack(boots), axis=0)  # [resamples]
    finite = mean_boot[np.isfinite(mean_boot)]
    alpha = (1.0 - confidence) / 2
    low, high = (float(np.quantile(finite, alpha)), float(np.quantile(finite, 1 - alpha))) if finite.size else (None, None)
    for k, ratio in zip(shared, boots):
        fin = ratio[np.isfinite(ratio)]
        components[k]["low"] = float(np.quantile(fin, alpha)) if fin.size else None
        components[k]["high"] = float(np.quantile(fin, 1 - alpha)) if fin.size else None
    return {"retained": overall, "low": low, "high": high, "confidence": confidence, "n_resamples": n_resamples,
            "method": "paired percentile bootstrap over items", "resamples_undefined": skipped,
            "components": components}


@dataclass
class EvalConfig:
    """Fields every eval's config has. An eval's own ``Config`` subclasses this dataclass."""

    batch_size: int = 16
    """Examples per forward pass."""
    seed: int = 1234
    """Seed of the held-out data the eval generates (kept apart from the training seed)."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How the eval writes the prompts the model answers: ``chat`` wraps each prompt (the question or context the
    model must answer) as one user turn of the tokenizer's chat template, with the generation prompt after it, and the
    answer follows that (how an instruct model was trained); ``plain`` gives the task's text as it is; ``auto``:
    ``chat`` when the tokenizer has a chat template, else ``plain``. Evals whose input is not a prompt
    (``positional_loss``: raw text; ``multimodal``: the LLaVA rows' own format) are always ``plain`` and refuse
    ``chat``. The result says which was used (:attr:`EvalResult.prompt_format`)."""


class FieldError(ValueError):
    """A ``ValueError`` about one field of an eval's config, found when the eval meets the model (``check``): its
    message starts with the field's name (``prompt_format: ...``), so the recipe check names it ``evals[i].<field>``.
    """

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class Eval:
    """Base class of an eval. Subclasses set the class attributes and implement :meth:`spec` and :meth:`run`."""

    name: ClassVar[str] = "base"
    """Registry key, the ``name:`` of the recipe entry."""
    version: ClassVar[str] = "1"
    """Version of what the eval measures, written into every result it returns (lm-evaluation-harness style): bump
    it when what the eval measures changes (its data, its scoring, its limit rule), so that ``compare`` can say when
    it puts two versions side by side."""
    summary: ClassVar[str] = ""
    """One line for ``llm-limits ls``."""
    limit: ClassVar[str] = ""
    """Limit family measured (matches the paired mitigation's ``limit``)."""
    Config: ClassVar[type[EvalConfig]] = EvalConfig

    def __init__(self, config: EvalConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def spec(self) -> LimitSpec:
        """The :class:`LimitSpec` this eval will measure under its config (before running anything)."""
        raise NotImplementedError

    def check(self, model: Any, tokenizer: Any) -> None:
        """Raise ``ValueError`` with a one-line reason when this eval cannot run on this model (too short a position
        range, a tokenizer that cannot spell the task...). Called before training starts, so a run fails early."""
        return None

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Measure ``model`` (a ``transformers`` causal LM, in eval mode) and return the curve and its limit, built by
        :meth:`result`."""
        raise NotImplementedError

    def result(self, **fields: Any) -> EvalResult:
        """The :class:`EvalResult` of a measurement (``spec``, ``curve``, ``limit_value``, ``threshold``, ...), stamped
        with this eval's ``name`` and ``version``: every eval's :meth:`run` returns one built here.

        >>> Eval().result(spec=LimitSpec("loss", "position", (16.0,), False), curve={16.0: 1.0}, limit_value=16.0,
        ...               threshold=1.5).version
        '1'
        """
        return EvalResult(eval=self.name, version=self.version, **fields)
