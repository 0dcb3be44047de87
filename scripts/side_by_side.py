"""Print the limits of several runs side by side (used by `make demo`).

Usage: python scripts/side_by_side.py RUN_DIR_OR_RUNS_NAME...
A run name (e.g. ``runs/context-tiny-pose``) stands for its newest run directory. The ablation issue's
``llm-limits compare`` will supersede this with intervals over seeds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llm_limits.trainers.results.compare import load_run, version_warnings


def newest_run(path: Path) -> Path:
    if (path / "results.json").is_file():
        return path
    runs = sorted(p for p in path.glob("*/") if (p / "results.json").is_file())
    if not runs:
        raise SystemExit(f"error: {path}: no finished run (expected results.json in it or a sub-directory)")
    return runs[-1]


def main(args: list[str]) -> None:
    if not args:
        raise SystemExit(__doc__)
    table = Table(title="limits side by side", box=None)
    for col in ("run", "eval", "limit", "before", "after", "delta", "after curve"):
        # run names are what the reader compares: never cut them
        table.add_column(col, justify="right" if col in ("before", "after", "delta") else "left", no_wrap=col == "run")
    runs = []
    for arg in args:
        run = newest_run(Path(arg))
        runs.append(load_run(run))
        results = json.loads((run / "results.json").read_text())
        for key, e in results["evals"].items():
            before, after = e.get("before"), e.get("after")
            spec = (after or before)["spec"]
            curve = (after or before)["curve"]
            pts = " ".join(f"{k}:{v:.2f}" for k, v in sorted(curve.items(), key=lambda kv: float(kv[0])))
            delta = e.get("compare", {}).get("limit_delta")
            table.add_row(
                results["name"], key, f"{spec['limit']} ({spec['limit_unit']})",
                "-" if before is None else f"{before['limit_value']:g}", "-" if after is None else f"{after['limit_value']:g}",
                "-" if delta is None else f"{delta:+g}", f"{spec['metric']} {pts}",
            )
    console = Console()
    for line in version_warnings(runs):  # the same line `llm-limits compare` prints
        console.print(line, markup=False, soft_wrap=True)
    Console(width=max(console.width, 132)).print(table)  # a log or pipe gets the whole row, not 80 columns


if __name__ == "__main__":
    main(sys.argv[1:])
