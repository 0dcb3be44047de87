"""``llm-limits compare``: bootstrap intervals against known cases, then reports on hand-made runs and ablations."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from llm_limits.trainers.results.compare import (
    Difference,
    Interval,
    compare,
    diff_ci,
    load_targets,
    mean_ci,
    print_table,
    summarize,
    summary_keys,
    verdict,
)
from llm_limits.trainers.recipe.errors import UserError

# --- statistics ------------------------------------------------------------------------------------------------------


def test_constant_samples_give_a_zero_width_interval():
    assert mean_ci([0.5, 0.5, 0.5, 0.5]) == Interval(0.5, 0.5, 0.5, 4)
    assert diff_ci([3.0, 3.0], [1.0, 1.0, 1.0]) == Difference(2.0, 2.0, 2.0, 2, 3)


def test_one_seed_gives_the_value_and_no_interval():
    assert mean_ci([7.0]) == Interval(7.0, None, None, 1)
    assert mean_ci([7.0, None, float("nan")]) == Interval(7.0, None, None, 1)  # missing values are not samples
    assert mean_ci([]) == Interval(None, None, None, 0)
    d = diff_ci([7.0], [1.0, 2.0, 3.0])
    assert d.diff == pytest.approx(5.0) and d.low is None and d.excludes_zero is None


def test_interval_brackets_the_mean_within_the_data_and_is_deterministic():
    xs = [1.0, 2.0, 3.0, 4.0, 10.0]
    iv = mean_ci(xs)
    assert iv.mean == pytest.approx(4.0) and iv.n == 5
    assert min(xs) <= iv.low < iv.mean < iv.high <= max(xs)  # a percentile interval of means stays in range
    assert mean_ci(xs) == iv  # fixed random state


def test_well_separated_samples_exclude_zero_and_overlapping_ones_do_not():
    d = diff_ci([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    assert d.diff == pytest.approx(9.0) and 7.0 <= d.low < d.high <= 11.0 and d.excludes_zero
    overlap = diff_ci([1.0, 3.0, 2.0], [2.0, 1.0, 3.0])
    assert overlap.low < 0 < overlap.high and overlap.excludes_zero is False


def test_verdict_follows_the_metric_direction():
    assert verdict(Difference(-0.4, -0.6, -0.2, 3, 3), higher_is_better=False).startswith("better than control")
    assert verdict(Difference(-0.4, -0.6, -0.2, 3, 3), higher_is_better=True).startswith("worse than control")
    assert verdict(Difference(0.1, -0.2, 0.3, 3, 3)).startswith("no clear difference")


# --- hand-made runs --------------------------------------------------------------------------------------------------

SPEC = {"metric": "niah_acc", "axis": "context_len", "axis_values": [64.0, 128.0], "higher_is_better": True,
        "threshold": 0.5, "limit": "context", "limit_unit": "tokens"}


def _result(limit: float, curve: dict[str, float], grid: list[list[float]]) -> dict[str, Any]:
    return {
        "eval": "context", "spec": SPEC, "curve": curve, "limit_value": limit, "threshold": 0.5,
        "scalars": {"mean_accuracy": sum(curve.values()) / len(curve), "label": "not a number"}, "notes": [],
        "series": {"lost_in_the_middle": {"axis": "depth", "metric": "niah_acc", "higher_is_better": True,
                                          "points": {"0": curve["64"], "1": curve["128"]}}},
        "grids": {"accuracy": {"x_axis": "context_len", "y_axis": "depth", "metric": "niah_acc", "x": [64.0, 128.0],
                               "y": [0.0, 1.0], "values": grid}},
    }


def write_run(run_dir: Path, name: str, seed: int, after_limit: float, acc64: float, grid_corner: float = 0.0,
              version: Any = None, tasks: dict[str, Any] | None = None) -> Path:
    """A minimal finished run directory: results.json (one eval, before and after) and recipe.yaml; ``version`` is the
    eval's version (``None``: a run made before versions), ``tasks`` the task versions."""
    before = _result(0.0, {"64": 0.0, "128": 0.0}, [[0.0, 0.0], [0.0, 0.0]])
    after = _result(after_limit, {"64": acc64, "128": 0.25}, [[grid_corner, 1.0], [2.0, 3.0]])
    if version is not None:
        before["version"] = after["version"] = version
    results = {
        "name": name, "run_dir": str(run_dir),
        "evals": {"context": {"eval": "context", "limit_key": "context", "before": before, "after": after,
                              "compare": {"limit_before": 0.0, "limit_after": after_limit,
                                          "limit_delta": after_limit}}},
        "train": {"steps": 10.0, "tokens_seen": 640.0, "wall_s": 1.0, "final_loss": 2.0, "val_loss": 2.1},
    }
    if tasks is not None:
        results["versions"] = {"tasks": tasks}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump({"name": name, "seed": seed}))
    return run_dir


CONTROL = "pose.enabled=false"
TREATED = "pose.enabled=true"
BROKEN = "pose.enabled=null"
OOM = "exit 1: CUDA out of memory"


def write_ablation(root: Path) -> Path:
    """Control: 3 seeds, limits 64, 64, 128. Treated: seeds 0-1 at 256, seed 2 failed. Broken: nothing finished
    (one failed, one pending, one marked done without results). Control run dirs relative, treated absolute."""
    arms = []
    for seed, (limit, acc) in enumerate([(64.0, 0.8), (64.0, 0.9), (128.0, 1.0)]):
        rel = f"arms/{CONTROL}/seed-{seed}"
        write_run(root / rel, "ctx", seed, limit, acc, grid_corner=float(seed))
        arms.append({"label": CONTROL, "seed": seed, "run_dir": rel, "status": "done", "error": None})
    for seed in range(3):
        path = root / "arms" / TREATED / f"seed-{seed}"
        if seed < 2:
            write_run(path, "ctx", seed, 256.0, 1.0)
            arms.append({"label": TREATED, "seed": seed, "run_dir": str(path.resolve()), "status": "done",
                         "error": None})
        else:
            arms.append({"label": TREATED, "seed": seed, "run_dir": str(path.resolve()), "status": "failed",
                         "error": OOM})
    for seed, status in enumerate(["failed", "pending", "done"]):
        arms.append({"label": BROKEN, "seed": seed, "run_dir": f"arms/{BROKEN}/seed-{seed}", "status": status,
                     "error": "exit 2: bad value" if status == "failed" else None})
    for a in arms:
        a["overrides"] = [f"seed={a['seed']}"]
    header = {"name": "ctx", "recipe": "r.yaml", "grid": {"mitigations.0.pose.enabled": [False, True, None]},
              "seeds": [0, 1, 2], "control": CONTROL, "wandb_group": "ctx-ablation", "arms": arms}
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablation.json").write_text(json.dumps(header))
    return root


@pytest.fixture(scope="module")
def ablation_report(tmp_path_factory) -> tuple[Path, Path, dict[str, Any]]:
    root = write_ablation(tmp_path_factory.mktemp("abl") / "ablation")
    out = compare([root], wandb_mode="disabled", progress=False)
    return root, out, json.loads((out / "compare.json").read_text())


def test_ablation_report_files(ablation_report):
    root, out, c = ablation_report
    assert out == root / "compare"
    for name in ("compare.json", "compare.md", "compare.html", "plots/limit_delta.png", "plots/context.after.png",
                 "plots/context.accuracy.png"):
        assert (out / name).is_file(), name
    assert c["plots"]["context.accuracy"] == "plots/context.accuracy.png"
    page = (out / "compare.html").read_text()
    assert "data:image/png;base64," in page and "<script" not in page  # self-contained, no JS
    assert c["wandb"] is None
    assert c["version_warnings"] == []  # runs made before versions: all unversioned, nothing to say


def test_ablation_numbers(ablation_report):
    _, _, c = ablation_report
    assert c["control"] == CONTROL
    e = c["evals"]["context"]
    ctl, trt = e["arms"][CONTROL], e["arms"][TREATED]
    assert ctl["limit"]["after"]["mean"] == pytest.approx(256 / 3) and ctl["limit"]["after"]["n"] == 3
    assert 64 <= ctl["limit"]["after"]["low"] < ctl["limit"]["after"]["high"] <= 128
    assert ctl["limit"]["before"] == {"mean": 0.0, "low": 0.0, "high": 0.0, "n": 3}
    assert ctl["limit"]["delta"]["mean"] == pytest.approx(256 / 3)
    assert ctl["curve"]["64"]["after"]["mean"] == pytest.approx(0.9)
    assert ctl["curve"]["64"]["delta"]["mean"] == pytest.approx(0.9)
    assert ctl["scalars"]["mean_accuracy"]["after"]["mean"] == pytest.approx((0.9 + 0.25) / 2)
    assert "label" not in ctl["scalars"]  # strings are not samples
    assert ctl["series"]["lost_in_the_middle"]["points"]["0"]["after"]["mean"] == pytest.approx(0.9)
    assert ctl["grids"]["accuracy"]["after"]["values"] == [[1.0, 1.0], [2.0, 3.0]]  # corner: mean of 0, 1, 2
    assert ctl["grids"]["accuracy"]["after"]["n"] == 3
    # the treated arm uses the 2 seeds that finished
    assert trt["n"] == 2 and trt["limit"]["after"] == {"mean": 256.0, "low": 256.0, "high": 256.0, "n": 2}
    vs = e["vs_control"][TREATED]
    assert vs["limit_after"]["diff"] == pytest.approx(256 - 256 / 3)
    assert 128 <= vs["limit_after"]["low"] <= vs["limit_after"]["high"] <= 192 and vs["limit_after"]["excludes_zero"]
    assert vs["limit_delta"]["excludes_zero"] and vs["verdict_limit_delta"].startswith(f"better than {CONTROL}")
    assert vs["curve_after"]["64"]["diff"] == pytest.approx(0.1)
    assert set(e["vs_control"]) == {TREATED} and BROKEN not in e["arms"]  # nothing finished: no numbers
    assert c["train"][CONTROL]["steps"]["mean"] == 10.0
    keys = summary_keys(c)
    assert keys[f"compare/context/{TREATED}/limit_delta"] == 256.0
    assert keys[f"compare/context/{TREATED}/vs_control/limit_after"] == pytest.approx(256 - 256 / 3)


def test_failed_and_pending_arms_are_listed_with_their_errors(ablation_report):
    _, out, c = ablation_report
    arms = {a["label"]: a for a in c["arms"]}
    assert arms[TREATED]["status"] == "partial" and arms[TREATED]["n"] == 2 and arms[TREATED]["n_total"] == 3
    assert [r["error"] for r in arms[TREATED]["runs"] if r["status"] == "failed"] == [OOM]
    broken = arms[BROKEN]
    assert broken["status"] == "failed" and broken["n"] == 0
    assert [r["status"] for r in broken["runs"]] == ["failed", "pending", "failed"]
    assert "results.json is missing" in broken["runs"][2]["error"]
    for name in ("compare.md", "compare.html"):
        text = (out / name).read_text()
        assert OOM in text and BROKEN in text and "exit 2: bad value" in text, name
    console = Console(record=True, width=250)
    print_table(c, console)
    terminal = console.export_text()
    assert OOM in terminal and BROKEN in terminal and "2 of 3" in terminal


def test_run_directories_control_and_default_out_dir(tmp_path, monkeypatch):
    a0 = write_run(tmp_path / "a" / "r0", "baseline", 0, 64.0, 0.5)
    a1 = write_run(tmp_path / "a" / "r1", "baseline", 1, 64.0, 0.6)
    b0 = write_run(tmp_path / "b" / "r0", "pose", 0, 128.0, 0.9)
    source = load_targets([a0, a1, b0])
    assert [(r.label, r.seed) for r in source.runs] == [("baseline", 0), ("baseline", 1), ("pose", 0)]
    c = summarize(source)
    assert c["control"] == "baseline"  # default: the first run's name
    assert c["evals"]["context"]["vs_control"]["pose"]["limit_after"]["diff"] == 64.0
    c = summarize(source, control="pose")
    assert c["evals"]["context"]["vs_control"]["baseline"]["limit_after"]["diff"] == -64.0
    with pytest.raises(UserError, match=r"--control 'nope': no such arm \(arms: baseline, pose\)"):
        summarize(source, control="nope")
    monkeypatch.chdir(tmp_path)
    out = compare([a0, b0], wandb_mode="disabled", progress=False)
    assert out.parent == Path("runs") and out.name.startswith("compare-") and (out / "compare.md").is_file()


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    run = write_run(tmp_path / "run", "x", 0, 64.0, 0.5)
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "empty"], "neither a run directory"),
        ([tmp_path / "missing"], "no such directory"),
        ([], "no runs given"),
    ]
    abl = write_ablation(tmp_path / "abl")
    cases.append(([abl, run], "one ablation directory"))
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "ablation.json").write_text(json.dumps({"name": "d", "control": "a", "arms": [
        {"label": "a", "seed": 0, "run_dir": "arms/a/seed-0", "status": "failed", "error": "exit 1: boom"}]}))
    cases.append(([dead], r"no finished runs to compare \(1 failed, 0 pending\): first error: exit 1: boom"))
    for targets, message in cases:
        with pytest.raises(UserError, match=message) as err:
            compare(targets, tmp_path / "out", wandb_mode="disabled", progress=False)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="--control 'x': no such arm"):
        compare([abl], tmp_path / "out", control="x", wandb_mode="disabled", progress=False)
    with pytest.raises(UserError, match="--wandb"):
        compare([run], tmp_path / "out", wandb_mode="sometimes", progress=False)


def test_summary_wandb_run_is_written_offline(tmp_path):
    a = write_run(tmp_path / "a", "baseline", 0, 64.0, 0.5)
    b = write_run(tmp_path / "b", "pose", 0, 128.0, 0.9)
    out = compare([a, b], tmp_path / "cmp", wandb_mode="offline", progress=True)
    c = json.loads((out / "compare.json").read_text())
    assert c["wandb"]["mode"] == "offline" and c["wandb"]["group"] == "compare"
    run_dir = Path(c["wandb"]["dir"])
    assert run_dir.parent == out / "wandb" and list(run_dir.glob("*.wandb"))
    assert not math.isnan(c["evals"]["context"]["vs_control"]["pose"]["limit_after"]["diff"])


# --- versions --------------------------------------------------------------------------------------------------------

MIXED = ("compare: eval context was measured with different versions (1: run-a, run-b; 2: run-c); their numbers may "
         "not be comparable")


def _compare_versions(tmp_path: Path, runs: list[tuple[str, Any, Any]]) -> tuple[dict[str, Any], str, str, str]:
    """compare.json, compare.md, compare.html and the terminal view of hand-made runs (name, eval version, tasks)."""
    dirs = [write_run(tmp_path / name, name, 0, 64.0, 0.5, version=v, tasks=tasks) for name, v, tasks in runs]
    out = compare(dirs, tmp_path / "cmp", wandb_mode="disabled", progress=False)
    c = json.loads((out / "compare.json").read_text())
    console = Console(record=True, width=250)
    print_table(c, console)
    return c, (out / "compare.md").read_text(), (out / "compare.html").read_text(), console.export_text()


def test_mixed_eval_versions_give_exactly_one_line_everywhere(tmp_path):
    c, md, page, terminal = _compare_versions(tmp_path, [("run-a", 1, None), ("run-b", 1, None), ("run-c", 2, None)])
    assert c["version_warnings"] == [MIXED]
    assert md.splitlines()[:3] == ["# compare: arms compared", "", MIXED]  # at the top of the report
    assert page.count(MIXED) == 1 and page.index(MIXED) < page.index("<table")
    assert terminal.splitlines()[0] == MIXED and terminal.count("different versions") == 1


def test_matching_versions_give_no_line(tmp_path):
    for i, versions in enumerate(((2, 2), ("1.0", "1.0"), (None, None), ("", None))):  # "": EvalResult's "no version"
        c, md, page, terminal = _compare_versions(tmp_path / str(i),
                                                  [("run-a", versions[0], None), ("run-b", versions[1], None)])
        assert c["version_warnings"] == [], versions
        assert not any("different versions" in text for text in (md, page, terminal)), versions


def test_unversioned_runs_and_task_versions_are_named(tmp_path):
    c, *_ = _compare_versions(tmp_path, [("old", None, None), ("new", 1, {"needle": "2", "kv": 1}),
                                         ("newer", 1, {"needle": "3", "kv": 1})])
    assert c["version_warnings"] == [
        "compare: eval context was measured with different versions (unversioned: old; 1: new, newer); their numbers "
        "may not be comparable",
        # a run that lists no task versions is left out of the task lines (it is named by the eval line)
        "compare: task needle was used with different versions (2: new; 3: newer); their numbers may not be comparable",
    ]


def test_an_arm_split_across_versions_names_its_seeds(tmp_path):
    runs = [write_run(tmp_path / f"a{s}", "arm-a", s, 64.0, 0.5, version=1 + (s == 2)) for s in range(3)]
    runs.append(write_run(tmp_path / "b0", "arm-b", 0, 64.0, 0.5, version=1))
    assert summarize(load_targets(runs))["version_warnings"] == [
        "compare: eval context was measured with different versions (1: arm-a (seed 0, seed 1), arm-b; 2: arm-a "
        "(seed 2)); their numbers may not be comparable"]


def test_long_arm_labels_go_below_the_axes_and_short_ones_beside():
    """An arm whose grid value is a mapping makes a label of 100+ characters; beside the axes it squeezed the plot to
    a sliver, so such legends go below, the figure taller by their lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llm_limits.trainers.results.compare.render import _legend_outside

    heights = {}
    for name, label in (("short", "pose.enabled=true"),
                        ("long", "pose.enabled=true,model.rope_scaling={factor: 8.0, original_max_position_embeddings: 64, type: yarn}")):
        fig, ax = plt.subplots(figsize=(9.0, 3.8))
        ax.plot([0, 1], [0, 1], label=label)
        ax.plot([0, 1], [1, 0], label="control")
        _legend_outside(fig, ax)
        fig.canvas.draw()
        legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
        heights[name] = fig.get_size_inches()[1]
        if name == "short":
            assert legend.x0 >= axes.x1  # beside, to the right
        else:
            assert legend.y1 <= axes.y0  # below the axes
        plt.close(fig)
    assert heights["short"] == pytest.approx(3.8) and heights["long"] > 3.8
