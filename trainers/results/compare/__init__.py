"""``llm-limits compare``: arms of an ablation (or any run directories) side by side, with 95% bootstrap intervals
over seeds, and every arm against a control arm.

One module per job, read in this order:

- :mod:`.load`: finding and reading run directories and ablation directories (``results.json``, ``ablation.json``),
  and the versions of the evals and tasks each run was measured with;
- :mod:`.stats`: the bootstrap intervals and differences (pure functions) and :func:`summarize`, which turns the loaded
  runs into the comparison (a JSON-ready dict);
- :mod:`.render`: that dict written out (``compare.json`` is the dict itself): ``compare.md``, ``compare.html``, PNG
  plots, ``rich`` tables in the terminal and a summary wandb run.

:func:`compare` below wires them; the names other code uses are re-exported here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.results.compare.load import (
    ABLATION_FILE,
    RESULTS_FILE,
    UNVERSIONED,
    Run,
    Source,
    arm_labels,
    eval_versions,
    load_ablation,
    load_run,
    load_targets,
    task_versions,
    version_warnings,
)
from llm_limits.trainers.results.compare.render import (
    WANDB_MODES,
    Table,
    fmt_ci,
    fmt_diff,
    log_wandb,
    print_table,
    render_html,
    render_markdown,
    summary_keys,
    tables,
    write_plots,
)
from llm_limits.trainers.results.compare.stats import (
    BOOTSTRAP_SEED,
    CONFIDENCE,
    N_RESAMPLES,
    TRAIN_STATS,
    Difference,
    Interval,
    diff_ci,
    mean_ci,
    summarize,
    verdict,
)
from llm_limits.trainers.results.report import write_atomic

__all__ = [
    "ABLATION_FILE", "BOOTSTRAP_SEED", "CONFIDENCE", "N_RESAMPLES", "RESULTS_FILE", "TRAIN_STATS", "UNVERSIONED",
    "WANDB_MODES", "Difference", "Interval", "Run", "Source", "Table", "arm_labels", "compare", "diff_ci",
    "eval_versions", "fmt_ci", "fmt_diff", "load_ablation", "load_run", "load_targets", "log_wandb", "mean_ci",
    "print_table", "render_html", "render_markdown", "summarize", "summary_keys", "tables", "task_versions", "verdict",
    "version_warnings", "write_plots",
]


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
        task = bar.add_task("compare", total=n_evals * len(arm_labels(source.runs)) + 2)
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
