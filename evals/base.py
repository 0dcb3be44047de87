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
    return {
        "eval": after.eval,
        "limit": after.spec.limit,
        "metric": after.spec.metric,
        "limit_before": before.limit_value,
        "limit_after": after.limit_value,
        "limit_delta": limit_delta,
        "improved": limit_delta > 0,
        "curve_delta": curve_delta,
    }


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
