"""`llm-limits ablate`: grid expansion, validation before any arm runs, skip-finished/resume, failed arms, wandb."""

from __future__ import annotations

import json

import pytest
import yaml

from llm_limits.trainers.results.ablate import control_label, expand, parse_grid
from llm_limits.trainers.recipe.errors import UserError

from tests.test_cli import run_in_process


def test_grid_expansion_is_the_cartesian_product_times_seeds():
    arms = expand({"mitigations.0.pose.enabled": [False, True], "trainer.lr": [0.001, 0.003]}, 2, "g")
    assert len(arms) == 8
    labels = sorted({a.label for a in arms})
    assert labels == ["pose.enabled=false,trainer.lr=0.001", "pose.enabled=false,trainer.lr=0.003",
                      "pose.enabled=true,trainer.lr=0.001", "pose.enabled=true,trainer.lr=0.003"]
    arm = arms[1]
    assert arm.seed == 1 and arm.run_dir == "arms/pose.enabled=false,trainer.lr=0.001/seed-1"
    assert arm.overrides[:3] == ["mitigations.0.pose.enabled=false", "trainer.lr=0.001", "seed=1"]
    assert "tracking.wandb.group=g" in arm.overrides
    assert "tracking.wandb.job_type=pose.enabled=false,trainer.lr=0.001" in arm.overrides
    assert "tracking.wandb.tags=[pose.enabled, trainer.lr]" in arm.overrides


def test_control_label_and_grid_parsing():
    grid = {"mitigations.0.pose.enabled": [False, True]}
    assert control_label(grid, {}, "r") == "pose.enabled=false"  # default: the first value of every key
    assert control_label(grid, {"mitigations.0.pose.enabled": True}, "r") == "pose.enabled=true"
    with pytest.raises(UserError, match=r"ablate\.control\.x: not a grid key"):
        control_label(grid, {"x": 1}, "r")
    with pytest.raises(UserError, match="is not one of the grid's values"):
        control_label(grid, {"mitigations.0.pose.enabled": "maybe"}, "r")
    with pytest.raises(UserError, match="expected KEY.PATH=VALUE1,VALUE2"):
        parse_grid(["trainer.lr"])


def _recipe(write_recipe, tiny_recipe, **ablate):
    tiny_recipe["trainer"].update(max_steps=2, warmup_steps=0)
    tiny_recipe["data"]["params"]["num_docs"] = 16
    tiny_recipe["evals"][0].update(num_examples=4, batch_size=4)
    if ablate:
        tiny_recipe["ablate"] = ablate
    return write_recipe(tiny_recipe)


@pytest.mark.parametrize(
    "grid, message",
    [
        ("trainer.max_stepz=1,2", "trainer.max_stepz: unknown key (did you mean max_steps?)"),
        ("trainer.lr=0.001,fast", "trainer.lr: expected a number (got 'fast')"),
        ("mitigations.3.enabled=true", "mitigations.3: expected a list index < 1"),
    ],
)
def test_bad_grid_is_rejected_before_any_arm_runs(grid, message, write_recipe, tiny_recipe, tmp_path):
    path = _recipe(write_recipe, tiny_recipe)
    out = run_in_process("ablate", str(path), "--grid", grid)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ablation_runs_skips_finished_arms_and_records_failures(write_recipe, tiny_recipe, tmp_path):
    """Two arms: one fails at build time (an eval longer than the model's position range, which the schema cannot
    know), one trains. The failure is recorded with its error; a second invocation skips the finished arm and retries
    only the failed one."""
    path = _recipe(write_recipe, tiny_recipe, grid={"evals.0.seq_len": [64, 512]}, seeds=1)
    out = run_in_process("ablate", str(path))
    assert out.returncode == 0, out.stderr
    root = tmp_path / "runs" / "tiny-test" / "ablation"
    ablation = json.loads((root / "ablation.json").read_text())
    status = {a["label"]: a for a in ablation["arms"]}
    assert status["seq_len=64"]["status"] == "done" and status["seq_len=64"]["error"] is None
    assert status["seq_len=512"]["status"] == "failed"
    assert "exceeds the model's position range" in status["seq_len=512"]["error"]
    assert ablation["control"] == "seq_len=64" and ablation["grid"] == {"evals.0.seq_len": [64, 512]}
    done_dir = root / "arms" / "seq_len=64" / "seed-0"
    results = json.loads((done_dir / "results.json").read_text())
    assert results["evals"]["positional_loss"]["after"]["spec"]["axis_values"][-1] == 64
    # each arm is a wandb run in the ablation's group, labelled by job type and tagged by the varied keys
    resolved = yaml.safe_load((done_dir / "recipe.yaml").read_text())
    assert resolved["tracking"]["wandb"]["group"] == "tiny-test-ablation"
    assert resolved["tracking"]["wandb"]["job_type"] == "seq_len=64"
    assert resolved["tracking"]["wandb"]["tags"] == ["seq_len"]
    assert list((done_dir / "wandb").glob("offline-run-*/*.wandb"))
    stamp = (done_dir / "results.json").stat().st_mtime_ns

    again = run_in_process("ablate", str(path))
    assert again.returncode == 0
    assert "1 already done, 1 to run" in again.stdout
    assert (done_dir / "results.json").stat().st_mtime_ns == stamp  # the finished arm was not run again
    dry = run_in_process("ablate", str(path), "--dry-run")
    assert "2 arms (1 done)" in dry.stdout
