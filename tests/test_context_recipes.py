"""The context recipes end to end at a toy budget: each part of the positional mitigation trains through the Lightning
backend and the context eval reports its grid; a resumed curriculum continues where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.test_cli import run_dirs, run_in_process

RECIPES = sorted((REPO / "recipes" / "context").glob("tiny-*.yaml"))

# Two optimizer steps' worth of tokens and a small eval grid: every code path runs, nothing is measured.
TOY = [
    "data.params.num_examples=96",
    "data.batch_size=8",
    "trainer.max_tokens=1024",  # 2 full 8 x 64 batches (more steps while the warmup shortens rows)
    "trainer.log_every=1",
    "evals.0.lengths=[64,128]",
    "evals.0.depths=[0.0,1.0]",
    "evals.0.examples_per_cell=2",
    "evals.0.batch_size=4",
    "tracking.wandb.mode=disabled",
    "--no-progress",
]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_context_recipe_trains_and_reports(recipe: Path, tmp_path):
    out = run_in_process("train", str(recipe), f"output_dir={tmp_path}", *TOY)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    entry = results["evals"]["context"]
    for phase in ("before", "after"):
        res = entry[phase]
        assert sorted(float(x) for x in res["curve"]) == [64.0, 128.0]
        assert all(0.0 <= v <= 1.0 for v in res["curve"].values())
        grid = res["grids"]["accuracy"]
        assert (grid["x"], grid["y"]) == ([64, 128], [0.0, 1.0]) and len(grid["values"]) == 2
        assert set(res["series"]) >= {"lost_in_the_middle", "attention_mass", "position_loss"}
    assert results["train"]["tokens_seen"] >= 1024
    for png in ("context.png", "context.accuracy.png", "context.lost_in_the_middle.png", "training.png"):
        assert (run_dir / "plots" / png).is_file(), png
    report = (run_dir / "report.md").read_text()
    assert "accuracy, after (niah_acc; rows depth, columns context_len)" in report


def test_warmup_too_short_for_the_needle_rows_is_one_line(tmp_path):
    """min_len 16 cannot hold needle + query + answer (21 tokens): the mitigation's refusal reaches the user as one
    line naming the mitigation and the step, exit 2, not a traceback from inside the training loop."""
    recipe = REPO / "recipes" / "context" / "tiny-curriculum.yaml"
    out = run_in_process("train", str(recipe), f"output_dir={tmp_path}", "mitigations.0.warmup.min_len=16", *TOY)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: mitigations: positional at step 0: row 0: cannot truncate")


@pytest.mark.slow
def test_resumed_curriculum_continues_where_it_stopped(tmp_path):
    """Stop the combined recipe after 4 steps (checkpoint every 2), resume to 6: the mitigation's step counter, its
    generators and histogram come back from the checkpoint, so it has seen exactly 6 batches, not 2 or 10."""
    recipe = REPO / "recipes" / "context" / "tiny-combined.yaml"
    common = [f"output_dir={tmp_path}", "trainer.max_tokens=null", "trainer.checkpoint_every=2",
              "mitigations.0.warmup.count_in=steps", "mitigations.0.warmup.warmup_steps=6",
              "mitigations.0.warmup.warmup_tokens=null", *[t for t in TOY if "max_tokens" not in t]]
    first = run_in_process("train", str(recipe), "trainer.max_steps=4", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path)
    ckpt4 = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    state4 = ckpt4["llm_limits"]["mitigations"]["positional"]
    assert ckpt4["global_step"] == 4 and state4["calls"] == 4
    resumed = run_in_process("train", "--resume", str(run_dir), "trainer.max_steps=6", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt6 = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    state6 = ckpt6["llm_limits"]["mitigations"]["positional"]
    assert ckpt6["global_step"] == 6 and state6["calls"] == 6
    # the position histogram kept counting on top of the first 4 steps instead of starting again
    assert state6["histogram"].sum() > state4["histogram"].sum()
    assert not torch.equal(state6["pose_generator"], state4["pose_generator"])
