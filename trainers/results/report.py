"""The run report: ``results.json`` (curves, limits, deltas), ``report.md`` (before/after tables) and PNG plots.

All writes go through :func:`write_atomic`, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from llm_limits.evals.base import EvalResult

PHASES = ("before", "after")


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(path: Path, results: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(results, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _json_default(o: Any) -> Any:
    if isinstance(o, EvalResult):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e9:
        return str(int(x))
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _signed(x: Any) -> str:
    if x is None:
        return "-"
    s = _num(x)
    return s if s.startswith("-") or s in ("0", "nan") else f"+{s}"


def limit_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per eval: key, metric, limit before, after and delta (the table both the terminal and the markdown
    report print)."""
    rows = []
    for key, entry in results.get("evals", {}).items():
        before = entry.get("before")
        after = entry.get("after")
        spec = (after or before or {}).get("spec", {})
        rows.append(
            {
                "key": key,
                "eval": entry.get("eval", key),
                "limit": f"{spec.get('limit', '')} ({spec.get('limit_unit', '')})".replace(" ()", ""),
                "read_off": f"{spec.get('metric', '')} vs {spec.get('axis', '')}",
                "before": before["limit_value"] if before else None,
                "after": after["limit_value"] if after else None,
                "delta": entry.get("compare", {}).get("limit_delta"),
            }
        )
    return rows


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def tradeoff_lines(results: dict[str, Any]) -> list[str]:
    """The targeted limits' deltas and the general ability retained, one line each (empty unless the run measured
    cost side: an eval with ``compare.retained``, the ``general`` eval).

    >>> r = {"evals": {"retrieval": {"compare": {"limit": "retrieval", "limit_before": 0.0, "limit_after": 4.0,
    ...                                          "limit_delta": 4.0}, "after": {"spec": {"limit_unit": "distractors"}}},
    ...                "general": {"compare": {"retained": {"retained": 0.97, "low": 0.94, "high": 1.0, "components": {
    ...                    "perplexity": {"before": 0.1, "after": 0.09}}}}, "after": {"scalars": {}}}}}
    >>> for line in tradeoff_lines(r): print(line)
    targeted limit retrieval: 0 -> 4 distractors (+4)
    general ability retained: 97.0% (95% CI 94.0% to 100.0%; perplexity 10 -> 11.11)
    """
    targeted, general = [], []
    for key, entry in results.get("evals", {}).items():
        cmp = entry.get("compare") or {}
        if cmp.get("retained"):
            kept = cmp["retained"]
            parts = []
            for name, c in kept.get("components", {}).items():
                if name == "perplexity":  # the component's score is 1 / perplexity
                    b, a = c.get("before"), c.get("after")
                    parts.append(f"perplexity {_num(1 / b if b else None)} -> {_num(1 / a if a else None)}")
                else:
                    parts.append(f"{name} {_num(c.get('before'), 3)} -> {_num(c.get('after'), 3)}")
            ci = f"95% CI {_pct(kept.get('low'))} to {_pct(kept.get('high'))}"
            label = "general ability retained" + (f" ({key})" if key != "general" else "")
            general.append(f"{label}: {_pct(kept.get('retained'))} ({'; '.join([ci] + parts)})")
        elif "limit_delta" in cmp:
            unit = ((entry.get("after") or entry.get("before") or {}).get("spec") or {}).get("limit_unit", "")
            targeted.append(f"targeted limit {key}: {_num(cmp.get('limit_before'))} -> {_num(cmp.get('limit_after'))}"
                            f"{' ' + unit if unit else ''} ({_signed(cmp.get('limit_delta'))})")
    return targeted + general if general else []


def render_markdown(results: dict[str, Any], plots: dict[str, str]) -> str:
    """The human report of a run: headline table, then one section per eval with its curve table and plot."""
    lines = [f"# {results['name']}: limits before and after", ""]
    lines += [f"Run directory: `{results['run_dir']}`  ", f"Recipe: `{results.get('recipe_source', '')}`", ""]
    train = results.get("train")
    if train:
        lines += [
            f"Training: {_num(train.get('steps'))} steps, {_num(train.get('tokens_seen'))} tokens, "
            f"{_num(train.get('wall_s'), 3)} s; final train loss {_num(train.get('final_loss'))}, "
            f"val loss {_num(train.get('val_loss'))}.",
            "",
        ]
    mits = results.get("mitigations", [])
    lines += [f"Mitigations: {', '.join(m['name'] for m in mits if m.get('enabled', True)) or 'none'}.", ""]
    lines += ["| eval | limit | read off | before | after | delta |", "|---|---|---|---:|---:|---:|"]
    for r in limit_rows(results):
        lines.append(
            f"| {r['key']} | {r['limit']} | {r['read_off']} | {_num(r['before'])} | {_num(r['after'])} | {_signed(r['delta'])} |"
        )
    lines.append("")
    tradeoff = tradeoff_lines(results)
    if tradeoff:
        lines += ["**Gain and cost**", ""] + [f"- {t}" for t in tradeoff] + [""]
    for key, entry in results.get("evals", {}).items():
        phases = [p for p in PHASES if entry.get(p)]
        if not phases:
            continue
        first = entry[phases[0]]
        spec = first["spec"]
        better = "higher" if spec["higher_is_better"] else "lower"
        lines += [f"## {key}", "", f"{spec['metric']} per {spec['axis']} ({better} is better).", ""]
        header = f"| {spec['axis']} | " + " | ".join(phases) + (" | delta |" if len(phases) == 2 else " |")
        lines += [header, "|---:|" + "---:|" * (len(phases) + (1 if len(phases) == 2 else 0))]
        xs = sorted({float(x) for p in phases for x in entry[p]["curve"]})
        for x in xs:
            vals = [entry[p]["curve"].get(_key(x)) for p in phases]
            row = f"| {_num(x)} | " + " | ".join(_num(v) for v in vals)
            if len(phases) == 2:
                row += f" | {_signed(vals[1] - vals[0]) if None not in vals else '-'}"
            lines.append(row + " |")
        lines.append("")
        for p in phases:
            res = entry[p]
            lines.append(
                f"- {p}: limit {_num(res['limit_value'])} {spec.get('limit_unit', '')} "
                f"(threshold {_num(res['threshold'])}); "
                + ", ".join(f"{k} {_num(v)}" for k, v in res.get("scalars", {}).items())
            )
            if res.get("prompt_format"):  # chat: each prompt one user turn of the tokenizer's chat template
                lines.append(f"  - prompt format: {res['prompt_format']}")
            lines += [f"  - note: {n}" for n in res.get("notes", [])]
        if key in plots:
            lines += ["", f"![{key}]({plots[key]})"]
        for kind in ("series", "grids"):
            names = sorted({n for p in phases for n in entry[p].get(kind, {})})
            for n in names:
                plot_key = f"{key}.{n}"
                if plot_key in plots:
                    lines += ["", f"**{n}**", "", f"![{plot_key}]({plots[plot_key]})"]
                if kind == "grids":
                    lines += _grid_tables(n, {p: entry[p]["grids"][n] for p in phases if n in entry[p].get("grids", {})})
        lines.append("")
    if "training" in plots:
        lines += ["## Training", "", f"![training loss]({plots['training']})", ""]
    wb = results.get("wandb") or {}
    if wb.get("dir"):
        lines += [f"wandb ({wb.get('mode')}): `{wb['dir']}`" + (" (sync with `wandb sync` on that folder)" if wb.get("mode") == "offline" else ""), ""]
    return "\n".join(lines)


def _grid_tables(name: str, phases: dict[str, dict[str, Any]]) -> list[str]:
    """A grid as markdown: one table per phase, rows = y values, columns = x values."""
    out = []
    for phase, g in phases.items():
        out += ["", f"{name}, {phase} ({g['metric']}; rows {g['y_axis']}, columns {g['x_axis']}):", ""]
        out.append(f"| {g['y_axis']} \\ {g['x_axis']} | " + " | ".join(_num(float(x)) for x in g["x"]) + " |")
        out.append("|---:|" + "---:|" * len(g["x"]))
        for y, row in zip(g["y"], g["values"]):
            out.append(f"| {_num(float(y))} | " + " | ".join(_num(float(v), 3) for v in row) + " |")
    return out


def _key(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def plot_eval(key: str, entry: dict[str, Any], path: Path) -> None:
    """Overlay the before and after curves, with each phase's threshold and limit marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    colours = {"before": "tab:gray", "after": "tab:blue"}
    spec = None
    for phase in PHASES:
        res = entry.get(phase)
        if not res:
            continue
        spec = res["spec"]
        pts = sorted((float(x), v) for x, v in res["curve"].items())
        label = f"{phase} (limit {_num(res['limit_value'])})"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colours[phase], label=label)
        ax.axhline(res["threshold"], color=colours[phase], ls=":", lw=1)  # the pass mark
        if res["limit_value"] > 0 and spec.get("limit_on_axis", True):
            ax.axvline(res["limit_value"], color=colours[phase], ls="--", lw=1)
    if spec:
        ax.set_xlabel(spec["axis"])
        ax.set_ylabel(spec["metric"] + (" (higher is better)" if spec["higher_is_better"] else " (lower is better)"))
    ax.set_title(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_series(title: str, phases: dict[str, dict[str, Any]], path: Path) -> None:
    """Overlay one named secondary curve (a ``Series`` dict) before vs after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    colours = {"before": "tab:gray", "after": "tab:blue"}
    series = None
    for phase, series in phases.items():
        pts = sorted((float(x), v) for x, v in series["points"].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colours.get(phase), label=phase)
    if series:
        ax.set_xlabel(series["axis"])
        ax.set_ylabel(series["metric"] + (" (higher is better)" if series["higher_is_better"] else " (lower is better)"))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_grids(title: str, phases: dict[str, dict[str, Any]], path: Path) -> None:
    """Heatmaps of one named ``Grid`` side by side (before | after) on a shared colour scale, values printed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arrays = {p: np.asarray(g["values"], dtype=float) for p, g in phases.items()}
    finite = [a[np.isfinite(a)] for a in arrays.values() if np.isfinite(a).any()]
    vmin = min(float(a.min()) for a in finite) if finite else 0.0
    vmax = max(float(a.max()) for a in finite) if finite else 1.0
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    fig, axes = plt.subplots(1, len(phases), figsize=(4.4 * len(phases), 3.6), dpi=110, squeeze=False,
                             layout="constrained")
    im = None
    for n, (ax, (phase, g)) in enumerate(zip(axes[0], phases.items())):
        a = arrays[phase]
        im = ax.imshow(a, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(g["x"])), [_num(float(x)) for x in g["x"]], fontsize=7)
        ax.set_yticks(range(len(g["y"])), [_num(float(y)) for y in g["y"]], fontsize=7)
        ax.set_xlabel(g["x_axis"])
        if n == 0:  # the panels share their axes: one y label
            ax.set_ylabel(g["y_axis"])
        ax.set_title(f"{phase}: {g['metric']}", fontsize=9)
        for j in range(a.shape[0]):
            for i in range(a.shape[1]):
                ax.text(i, j, _num(float(a[j, i]), 2), ha="center", va="center", fontsize=6,
                        color="white" if a[j, i] < (vmin + vmax) / 2 else "black")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    _save_fig(fig, path)


def plot_training(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
    ax.plot([x for x, _ in loss], [y for _, y in loss], color="tab:blue", label="train loss")
    val = [(h["step"], h["val/loss"]) for h in history if "val/loss" in h]
    if val:
        ax.plot([x for x, _ in val], [y for _, y in val], "o--", color="tab:green", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    reward = [(h["step"], h["reward"]) for h in history if "reward" in h]
    if reward:  # RL runs: the mean reward is what moves; its own axis on the right
        ax2 = ax.twinx()
        ax2.plot([x for x, _ in reward], [y for _, y in reward], color="tab:orange", label="mean reward")
        ax2.set_ylabel("mean reward")
        ax2.legend(loc="upper right", fontsize=8)
    if val:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())
