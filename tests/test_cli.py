"""The CLI end to end, as a user runs it: `llm-limits train/eval/validate/ls` in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

CLI = [sys.executable, "-m", "llm_limits.trainers.cli"]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=timeout)


def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (Typer's runner): the same exit code and stderr as a subprocess, without paying the
    torch/transformers import again for every bad-input case."""
    from typer.testing import CliRunner

    from llm_limits.trainers.cli import app

    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.is_dir() and not p.is_symlink())


def test_help_lists_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for cmd in ("train", "eval", "validate", "ls"):
        assert cmd in out.stdout


def test_ls_lists_recipes_mitigations_evals():
    out = run_cli("ls")
    assert out.returncode == 0, out.stderr
    assert "recipes/baseline/tiny-lm.yaml" in out.stdout
    assert "noop" in out.stdout and "positional_loss" in out.stdout


def test_validate_all_recipes_and_a_bad_one(write_recipe, tiny_recipe):
    recipes = [str(p) for p in sorted((REPO / "recipes").rglob("*.yaml"))]
    ok = run_cli("validate", *recipes)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("ok: ") == len(recipes)
    tiny_recipe["trainer"]["max_stepz"] = 3
    bad = write_recipe(tiny_recipe, "bad.yaml")
    out = run_cli("validate", recipes[0], str(bad))
    assert out.returncode == 2
    assert f"error: {bad}: trainer.max_stepz: unknown key (did you mean max_steps?)" in out.stderr


@pytest.mark.slow
def test_train_end_to_end_writes_results_report_plots_and_wandb(write_recipe, tiny_recipe, tmp_path):
    path = write_recipe(tiny_recipe)
    out = run_cli("train", str(path), "trainer.max_steps=8", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path / "runs")
    # results.json: curves, limits and deltas before and after
    results = json.loads((run_dir / "results.json").read_text())
    entry = results["evals"]["positional_loss"]
    for phase in ("before", "after"):
        curve = entry[phase]["curve"]
        assert sorted(int(k) for k in curve) == [16, 32, 48, 64]
        assert all(v > 0 for v in curve.values())
    assert entry["compare"]["limit_delta"] == entry["after"]["limit_value"] - entry["before"]["limit_value"]
    assert entry["limit_key"] == "context"
    assert results["train"]["steps"] == 8
    # training moved the model: held-out loss fell at every bucket
    assert all(d < 0 for d in entry["compare"]["curve_delta"].values())
    # the resolved recipe (with the override) and the trained model in safetensors
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["trainer"]["max_steps"] == 8 and resolved["trainer"]["lr_schedule"] == "cosine"
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # report and plots
    report = (run_dir / "report.md").read_text()
    assert "| positional_loss | context (tokens) | loss vs position |" in report
    for png in ("plots/positional_loss.png", "plots/training.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in report
    # offline wandb files, with the eval curves and limits in them
    (wb,) = list((run_dir / "wandb").glob("offline-run-*"))
    assert list(wb.glob("*.wandb")), "no offline wandb log"
    assert results["wandb"] == {"mode": "offline", "dir": str(wb)}
    # the terminal table
    assert "limits before and after" in out.stdout and "report:" in out.stdout

    # `eval` on the run directory measures its trained model and matches the run's own after-numbers
    ev = run_cli("eval", str(run_dir), "--no-progress")
    assert ev.returncode == 0, ev.stderr[-3000:]
    (eval_dir,) = list((run_dir / "evals").iterdir())
    again = json.loads((eval_dir / "results.json").read_text())["evals"]["positional_loss"]["after"]
    assert again["curve"] == pytest.approx(entry["after"]["curve"], rel=1e-5)

    # `--resume` of a finished run trains no further steps and reports the same limits
    res = run_cli("train", "--resume", str(run_dir), "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["train"]["steps"] == 8
    assert resumed["evals"]["positional_loss"]["before"] == entry["before"]


def test_eval_on_a_recipe_measures_the_untrained_model(write_recipe, tiny_recipe, tmp_path):
    out = run_in_process("eval", str(write_recipe(tiny_recipe)), "--no-progress")
    assert out.returncode == 0, out.stderr
    (eval_dir,) = list((tmp_path / "runs" / "tiny-test").glob("eval-*"))
    res = json.loads((eval_dir / "results.json").read_text())["evals"]["positional_loss"]
    assert set(res) == {"eval", "limit_key", "before"}  # an untrained model is a "before" measurement
    assert res["before"]["limit_value"] == 0  # random weights: nothing learned, so no context is used
    assert (eval_dir / "report.md").is_file() and (eval_dir / "plots" / "positional_loss.png").is_file()


@pytest.mark.slow
def test_resume_continues_from_checkpoint(write_recipe, tiny_recipe, tmp_path):
    """Train 4 of 8 steps (checkpoint every 2), then resume to 8 with a raised max_steps: the step count and the
    mitigation's hook counters continue from the checkpoint instead of restarting."""
    tiny_recipe["trainer"].update(max_steps=4, checkpoint_every=2)
    path = write_recipe(tiny_recipe)
    first = run_cli("train", str(path), "--no-progress")
    assert first.returncode == 0, first.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path / "runs")
    # wandb's own debug logs (wandb/*/logs/) are appended by its wandb-core service, which can outlive the first run
    # by a moment (seen once in CI under load: "connection closed" written 2 s later); they are not the resume's.
    def files() -> dict:
        return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and not {"wandb", "logs"} <= set(p.relative_to(run_dir).parts)}

    snapshot = files()
    bad = run_in_process("train", "--resume", str(run_dir), "trainer.max_steps=zero")
    assert bad.returncode == 2 and "trainer.max_steps: expected an integer (got 'zero')" in bad.stderr
    assert files() == snapshot, "a bad resume wrote files"
    out = run_cli("train", "--resume", str(run_dir), "trainer.max_steps=8", "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["steps"] == 8
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 8
    assert ckpt["llm_limits"]["mitigations"]["noop"]["calls"]["transform_batch"] == 8


BAD_RECIPES = {
    "yaml-syntax": ("name: x\nmodel: {model_type: llama\n", r":\d+:\d+: YAML syntax error"),
    "unknown-key": ({"trainer": {"max_stepss": 3}}, "trainer.max_stepss: unknown key (did you mean max_steps?)"),
    "wrong-type": ({"trainer": {"lr": "fast"}}, "trainer.lr: expected a number (got 'fast')"),
    "out-of-range": ({"data": {"val_fraction": 0.9}}, "data.val_fraction: expected a number < 0.5 (got 0.9)"),
    "missing-data-file": ({"data": {"path": "/nonexistent/train.jsonl"}}, "data.path: "),
    "bad-model-key": ({"model": {"config": {"hidden_sise": 32}}}, "model.config.hidden_sise: unknown key"),
    "unknown-mitigation": ({"mitigations": [{"name": "posittional"}]}, "mitigations[0].name: unknown mitigation"),
    "eval-too-long": ({"evals": [{"name": "positional_loss", "seq_len": 512}]}, "evals[0]"),
    "uncached-hub-id": (lambda r: r["model"].update(model_type=None, config={}, path="nobody/not-a-model"),
                        "model.path: 'nobody/not-a-model' is not a local directory"),
}


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, write_recipe, tiny_recipe, tmp_path):
    content, expected = BAD_RECIPES[case]
    if callable(content):
        content(tiny_recipe)
        content = tiny_recipe
    path = write_recipe(content if isinstance(content, str) else _merge(tiny_recipe, content))
    out = run_in_process("train", str(path))
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:"), lines
    assert "Traceback" not in out.stderr
    import re

    assert re.search(expected, lines[0]) or expected in lines[0], lines[0]
    assert not (tmp_path / "runs").exists(), "a bad recipe must not create a run directory"


def test_bad_resume_dir_and_override_syntax(tmp_path, write_recipe, tiny_recipe):
    out = run_cli("train", "--resume", str(tmp_path))
    assert out.returncode == 2 and "not a run directory" in out.stderr and "Traceback" not in out.stderr
    path = write_recipe(tiny_recipe)
    out = run_cli("train", str(path), "trainer.max_steps")
    assert out.returncode == 2 and "expected KEY.PATH=VALUE" in out.stderr
    out = run_cli("train", "trainer.max_steps=3")
    assert out.returncode == 2 and "must be a recipe file" in out.stderr
