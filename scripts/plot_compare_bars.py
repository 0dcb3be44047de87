"""Bar charts of chosen scalars from a ``llm-limits compare`` result: one panel per scalar, one bar per arm (the mean
after training over seeds, with its 95% bootstrap interval), and the arms' mean before training as a dashed line.

    python scripts/plot_compare_bars.py runs/compare/compare.json multimodal gap multimodal_gain pair_accuracy \\
        --out docs/img/multimodal-arms.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compare_json", type=Path, help="compare.json written by `llm-limits compare --out DIR`")
    ap.add_argument("eval", help="the eval key in compare.json (e.g. multimodal)")
    ap.add_argument("scalars", nargs="+", help="scalar names of that eval, one panel each")
    ap.add_argument("--out", type=Path, required=True, help="PNG to write")
    ap.add_argument("--strip", default="", help="prefix to drop from arm labels (e.g. multimodal-tiny-)")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(args.compare_json.read_text())
    if args.eval not in data.get("evals", {}):
        raise SystemExit(f"{args.compare_json}: no eval {args.eval!r} (has: {', '.join(data.get('evals', {}))})")
    for line in data.get("version_warnings", []):  # the bars may mix versions of an eval
        print(line)
    arms = data["evals"][args.eval]["arms"]
    labels = [a.removeprefix(args.strip) for a in arms]
    fig, axes = plt.subplots(1, len(args.scalars), figsize=(3.2 * len(args.scalars), 3.2), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], args.scalars):
        missing = [a for a in arms if name not in arms[a]["scalars"]]
        if missing:
            raise SystemExit(f"{args.compare_json}: arm {missing[0]} has no scalar {name!r}")
        after = [arms[a]["scalars"][name]["after"] for a in arms]
        means = [s["mean"] for s in after]
        err = [[m - s["low"] for m, s in zip(means, after)], [s["high"] - m for m, s in zip(means, after)]]
        ax.bar(range(len(arms)), means, yerr=err, capsize=3, color="tab:blue", alpha=0.8, label="after")
        before = [arms[a]["scalars"][name]["before"]["mean"] for a in arms]
        ax.axhline(sum(before) / len(before), color="tab:gray", ls="--", lw=1, label="before (all arms)")
        n = min(s["n"] for s in after)
        ax.set_title(f"{name} (n={n} seeds)", fontsize=9)
        ax.set_xticks(range(len(arms)), labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
