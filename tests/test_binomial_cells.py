"""scripts/binomial_cells.py: per-cell binomial intervals for one-seed arms (the real-model fine-tunes)."""

from __future__ import annotations

import doctest
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "binomial_cells.py"


def _module():
    spec = importlib.util.spec_from_file_location("binomial_cells", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_doctests_match_newcombes_published_examples():
    failed, tried = doctest.testmod(_module())
    assert tried >= 2 and failed == 0


def _run(root: Path, name: str, acc: float, n: int = 48) -> Path:
    run = root / name / "20261204-000000"
    run.mkdir(parents=True)
    ev = {"scalars": {"num_questions": float(n), "accuracy@2": acc}}
    (run / "results.json").write_text(json.dumps({"evals": {"retrieval": {"before": ev, "after": ev}}}))
    return run


def test_table_flags_a_difference_outside_its_interval_and_not_one_inside(tmp_path: Path, capsys):
    mod = _module()
    control = _run(tmp_path, "oracle", 4 / 48)
    far, near = _run(tmp_path, "raft", 40 / 48), _run(tmp_path, "same", 6 / 48)
    assert mod.main([str(far), str(near), "--control", str(control), "--metric", "retrieval:accuracy@2"]) == 0
    rows = {line.split("|")[2].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| retrieval")}
    assert "**outside 0**" in rows["raft"] and "+0.750" in rows["raft"]
    assert "outside" not in rows["same"]


def test_n_per_metric_beats_the_eval_count_and_a_scalars_own_count_is_read(tmp_path: Path):
    mod = _module()
    run = tmp_path / "grpo" / "20261205-000000"
    run.mkdir(parents=True)
    ev = {"scalars": {"accuracy@2": 0.5, "accuracy": 0.4, "mediation": 0.6, "mediation_n": 148.0}}
    (run / "results.json").write_text(json.dumps({"evals": {"reasoning": {"before": ev, "after": ev}}}))
    given = {"reasoning": 32, "reasoning:accuracy": 160}
    assert mod.n_of(run, "reasoning", "accuracy@2", given) == 32
    assert mod.n_of(run, "reasoning", "accuracy", given) == 160
    assert mod.n_of(run, "reasoning", "mediation", given) == 148
    with pytest.raises(SystemExit, match="--n reasoning=N"):
        mod.n_of(run, "reasoning", "accuracy@2", {})
