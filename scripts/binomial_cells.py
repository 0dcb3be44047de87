"""95% binomial intervals per cell for one-seed arms: each arm's rate, and each arm minus the control.

`llm-limits compare` gives intervals over seeds (a bootstrap); a real-model fine-tune on the 2-core CPU is one seed
per arm, so its interval is the cell's own sampling error. This reads `results.json` of each run, takes the rate of
every point of an eval's curve or named scalar after training, the number of questions behind it, and prints:

- the Wilson score interval of each rate (Wilson 1927);
- the difference from the control arm with Newcombe's hybrid score interval (Newcombe 1998, method 10), which treats
  the arms as independent samples. The arms answer the same eval questions, so this is conservative: a paired
  interval would be narrower.

    python scripts/binomial_cells.py --control runs/real-retrieval-oracle/latest \
        runs/real-retrieval-raft/latest runs/real-retrieval-abstain/latest \
        --metric retrieval:accuracy@0 --metric retrieval:accuracy@2 --metric retrieval:accuracy@4 \
        --metric hallucination:hallucination_rate

`--n EVAL=N` sets the questions per cell where the scalars do not say (retrieval: `num_questions`, every point);
`--n EVAL:SCALAR=N` one metric's (reasoning: `accuracy@k` is over `examples_per_length`, `accuracy` over all lengths),
and a scalar's own count `SCALAR_n` (reasoning's `mediation_n`) is used when there is one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

Z = 1.959963984540054  # the 97.5% normal quantile


def wilson(k: float, n: float, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of k successes in n.

    Newcombe (1998, Statistics in Medicine 17:857, table I) gives 0.2553-0.3662 for 81/263:

    >>> [round(x, 4) for x in wilson(81, 263)]
    [0.2553, 0.3662]
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe(k1: float, n1: float, k2: float, n2: float) -> tuple[float, float, float]:
    """``(p1 - p2, low, high)``: Newcombe's hybrid score interval for the difference of two independent proportions.

    Newcombe (1998, Statistics in Medicine 17:873, method 10) gives +0.0524 to +0.3339 for 56/70 minus 48/80:

    >>> [round(x, 4) for x in newcombe(56, 70, 48, 80)]
    [0.2, 0.0524, 0.3339]
    """
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    return (d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2))


def rate_of(run: Path, eval_name: str, metric: str, phase: str) -> float:
    res = json.loads((run / "results.json").read_text())
    e = res["evals"][eval_name][phase]
    if metric in e.get("scalars", {}):
        return float(e["scalars"][metric])
    raise SystemExit(f"{run}: evals.{eval_name}.{phase}.scalars has no {metric!r} "
                     f"(has: {', '.join(sorted(e.get('scalars', {})))})")


def n_of(run: Path, eval_name: str, metric: str, given: dict[str, int]) -> int:
    """Questions behind one rate: ``--n EVAL:SCALAR=N``, else the eval's own ``SCALAR_n`` scalar (the reasoning
    eval's ``mediation_n``), else ``--n EVAL=N``, else the eval's ``num_questions``."""
    if f"{eval_name}:{metric}" in given:
        return given[f"{eval_name}:{metric}"]
    scalars = json.loads((run / "results.json").read_text())["evals"][eval_name]["after"].get("scalars", {})
    if f"{metric}_n" in scalars:
        return int(scalars[f"{metric}_n"])
    if eval_name in given:
        return given[eval_name]
    if "num_questions" in scalars:
        return int(scalars["num_questions"])
    raise SystemExit(f"{run}: how many questions stand behind {eval_name}:{metric}? pass --n {eval_name}=N "
                     f"(or --n {eval_name}:{metric}=N)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories of the arms")
    ap.add_argument("--control", type=Path, required=True, help="the control arm's run directory")
    ap.add_argument("--metric", action="append", required=True, help="EVAL:SCALAR, e.g. retrieval:accuracy@2")
    ap.add_argument("--n", action="append", default=[],
                    help="EVAL=N or EVAL:SCALAR=N questions per cell where the scalars do not say")
    ap.add_argument("--phase", default="after", choices=["before", "after"])
    a = ap.parse_args(argv)
    given = {k: int(v) for k, v in (x.split("=", 1) for x in a.n)}
    print(f"| metric | arm | rate [95% Wilson] | minus {a.control.parent.name} [95% Newcombe] |")
    print("|---|---|---|---|")
    for m in a.metric:
        ev, metric = m.split(":", 1)
        n0 = n_of(a.control, ev, metric, given)
        p0 = rate_of(a.control, ev, metric, a.phase)
        lo, hi = wilson(p0 * n0, n0)
        print(f"| {m} | {a.control.parent.name} (control) | {p0:.3f} [{lo:.3f}, {hi:.3f}] (n={n0}) | |")
        for run in a.runs:
            n = n_of(run, ev, metric, given)
            p = rate_of(run, ev, metric, a.phase)
            lo, hi = wilson(p * n, n)
            d, dl, dh = newcombe(p * n, n, p0 * n0, n0)
            flag = " **outside 0**" if dl > 0 or dh < 0 else ""
            print(f"| {m} | {run.parent.name} | {p:.3f} [{lo:.3f}, {hi:.3f}] (n={n}) | {d:+.3f} [{dl:+.3f}, {dh:+.3f}]{flag} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
