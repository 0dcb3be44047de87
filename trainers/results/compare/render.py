"""Rendering the comparison of ``llm-limits compare``: one neutral form of tables, written as markdown, a
self-contained HTML page, ``rich`` tables in the terminal and wandb tables, plus PNG plots and a summary wandb run.

Everything here reads the JSON-ready dict that :func:`llm_limits.trainers.results.compare.stats.summarize` returns (the
same dict ``compare.json`` holds) and computes no statistic of its own.
"""

from __future__ import annotations

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_limits.trainers.results.compare.load import Run, Source
from llm_limits.trainers.results.compare.stats import TRAIN_STATS, Difference, Interval
from llm_limits.trainers.results.report import _key, _num, _save_fig, _signed, plot_grids

WANDB_MODES = ("offline", "online", "disabled")


# ---------------------------------------------------------------------------------------------------------------------
# Intervals as text
# ---------------------------------------------------------------------------------------------------------------------


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


def _pct_ci(iv: dict[str, Any] | None) -> str:
    """A retained share as ``97.1% [94.0%, 99.9%]`` (``(n=1)`` without an interval)."""
    if not iv or iv.get("mean") is None:
        return "-"
    if iv.get("low") is None:
        return f"{100 * iv['mean']:.1f}% (n={iv.get('n', 1)})"
    return f"{100 * iv['mean']:.1f}% [{100 * iv['low']:.1f}%, {100 * iv['high']:.1f}%]"


def tradeoff_table(c: dict[str, Any]) -> Table | None:
    """Per arm and targeted limit: the limit's gain (delta over seeds) beside the general ability retained, each with
    its interval; ``None`` when no run measured general ability.

    >>> c = {"tradeoff": {"general": "general", "targets": ["retrieval"], "units": {"retrieval": "distractors"},
    ...      "arms": {"raft": {"retained": {"mean": 0.97, "low": 0.94, "high": 0.99, "n": 1, "interval": "items"},
    ...                        "gains": {"retrieval": {"mean": 2.0, "low": None, "high": None, "n": 1}}}}},
    ...      "control": "oracle"}
    >>> tradeoff_table(c).rows
    [['raft', 'retrieval (distractors)', '2 (n=1)', '97.0% [94.0%, 99.0%]', 'items (1 seed)']]
    """
    t = c.get("tradeoff")
    if not t:
        return None
    rows = []
    for lab, arm in t["arms"].items():
        name = lab + (" (control)" if lab == c.get("control") else "")
        iv = arm["retained"]
        how = "items (1 seed)" if iv.get("interval") == "items" else f"seeds (n={iv.get('n')})"
        targets = t["targets"] or [None]
        for key in targets:
            unit = t["units"].get(key, "") if key else ""
            gain = arm["gains"].get(key) if key else None
            rows.append([name, f"{key} ({unit})" if key and unit else (key or "-"), fmt_ci(gain), _pct_ci(iv), how])
    return Table("tradeoff", f"Gain vs general ability ({t['general']}: retained = after / before)",
                 ["arm", "targeted limit", "limit gain (after - before)", "general ability retained",
                  "retained interval over"], rows, [False, False, True, True, False])


def train_table(c: dict[str, Any]) -> Table:
    rows = [[lab] + [fmt_ci(stats.get(s)) for s in TRAIN_STATS] for lab, stats in c["train"].items()]
    return Table("train", "Training", ["arm", *TRAIN_STATS], rows, [False] + [True] * len(TRAIN_STATS))


def tables(c: dict[str, Any]) -> list[Table]:
    """Every table of the report, in report order."""
    out = [arms_table(c)]
    trade = tradeoff_table(c)
    if trade is not None:
        out.append(trade)
    for key in c["evals"]:
        out += [limit_table(c, key), curve_table(c, key, "after"), curve_table(c, key, "delta"), scalars_table(c, key)]
    if c["train"]:
        out.append(train_table(c))
    return out


def print_table(comparison: dict[str, Any], console: Any) -> None:
    """The terminal view: version warnings, the arms (with failures) and each eval's limit table, as ``rich`` tables."""
    from rich.table import Table as RichTable

    for line in comparison.get("version_warnings", []):
        console.print(line, markup=False, soft_wrap=True)
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
    _legend_outside(fig, ax)
    note = _failed_note(c)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="tab:red")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    _save_fig(fig, path)


LONG_LABEL = 60
"""Characters above which the arm labels go below the axes: an arm whose grid value is a mapping (``model.rope_scaling=
{factor: 8.0, ...}``) makes a label of 100 or more, which, beside the axes, squeezed them to a sliver."""


def _legend_outside(fig: Any, ax: Any) -> None:
    """The legend outside the axes, so the bands stay visible: to the right, or, with a label longer than
    :data:`LONG_LABEL`, below them, one arm per line, the figure taller by those lines."""
    handles, labels = ax.get_legend_handles_labels()
    if not labels or max(len(lab) for lab in labels) <= LONG_LABEL:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + 0.16 * len(labels) + 0.3)
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)


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


def plot_tradeoff(c: dict[str, Any], path: Path) -> None:
    """One panel per targeted limit: each arm a point at (general ability retained, limit gain), with 95% interval
    bars on both axes; the control in black. Up is a larger gain, right is less general ability lost (1.0 = none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = c["tradeoff"]
    targets = t["targets"] or [None]
    colours = _colours([a["label"] for a in c["arms"]], c["control"])
    fig, axes = plt.subplots(1, len(targets), figsize=(5.2 * len(targets), 4.0), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], targets):
        for lab, arm in t["arms"].items():
            r = arm["retained"]
            g = (arm["gains"].get(key) if key else None) or {"mean": 0.0, "low": None, "high": None}
            if r["mean"] is None or g.get("mean") is None:
                continue
            x, y = 100 * r["mean"], g["mean"]
            xerr = None if r["low"] is None else [[x - 100 * r["low"]], [100 * r["high"] - x]]
            yerr = None if g["low"] is None else [[y - g["low"]], [g["high"] - y]]
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", ms=6, capsize=4, color=colours.get(lab),
                        label=lab + (" (control)" if lab == c["control"] else ""))
            ax.annotate(lab, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=7)
        ax.axvline(100, color="gray", ls=":", lw=1)  # nothing lost
        ax.axhline(0, color="gray", ls=":", lw=1)  # no gain
        unit = t["units"].get(key, "") if key else ""
        ax.set_xlabel(f"general ability retained, % ({t['general']}: after / before)")
        ax.set_ylabel(f"{key} limit gain{f' ({unit})' if unit else ''}" if key else "no targeted limit")
        ax.set_title(f"{key or t['general']}: gain vs general ability, 95% intervals", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)


def write_plots(c: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """All PNGs under ``out_dir/plots``; returns plot key -> path relative to ``out_dir``."""
    plots: dict[str, str] = {}
    plot_dir = out_dir / "plots"
    if (c.get("tradeoff") or {}).get("arms"):
        plot_tradeoff(c, plot_dir / "tradeoff.png")
        plots["tradeoff"] = "plots/tradeoff.png"
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
    b += [("p", line) for line in c.get("version_warnings", [])]  # first: it qualifies every number below
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
    trade = tradeoff_table(c)
    if trade is not None:
        b += [("h2", "Gain vs general ability"),
              ("p", "Per arm, each targeted limit's gain (after - before, mean over seeds with its interval) against "
                    "the general ability it kept (the general eval's score after / before: 100% = nothing lost). "
                    "With one seed the retained interval is that run's paired bootstrap over documents and "
                    "questions; with more, the bootstrap over seeds.")]
        if "tradeoff" in plots:
            b.append(("img", ("gain vs general ability", plots["tradeoff"])))
        b.append(("table", trade))
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
    ``compare/<eval>/<arm>/vs_control/limit_{after,delta}`` (+ ``_low``/``_high``) and, when the runs measured general
    ability, ``compare/general_retained/<arm>`` (+ ``_low``/``_high``)."""
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
    for lab, arm in ((c.get("tradeoff") or {}).get("arms") or {}).items():
        iv = arm["retained"]
        for suffix, v in (("", iv["mean"]), ("_low", iv["low"]), ("_high", iv["high"])):
            if v is not None:
                out[f"compare/general_retained/{lab}{suffix}"] = v
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
