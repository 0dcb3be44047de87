"""Scale on CPU, as subprocesses: ``llm-limits train`` launches torchrun itself for a multi-device TRL recipe (ZeRO-1,
2 and 3, 2 processes), which follows one process's loss trajectory on the same global batch and whose saved model
(ZeRO-3's too) loads back in one process; Lightning DDP on 2 processes ends with the weights of one process on the
same global batch; and the launch checks that fail before any process starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import validate_recipe

from tests.conftest import REPO, TINY
from tests.test_cli import run_cli
from tests.test_crash_resume import lightning_recipe, weights
from tests.test_trl_backend import trl_recipe, write


def _only_run(runs: Path) -> Path:
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir() and not p.is_symlink()]
    return run_dir


def _trajectory(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad norm) of every logged step, from the last checkpoint's HF ``trainer_state.json``."""
    (state,) = sorted(run_dir.glob("checkpoints/checkpoint-*/trainer_state.json"))[-1:]
    return [(e["step"], e["loss"], e["grad_norm"]) for e in json.loads(state.read_text())["log_history"] if "loss" in e]


@pytest.fixture(scope="module")
def one_process_sft(tmp_path_factory) -> tuple[dict, Path]:
    """The reference: the TRL backend's SFT in one process, 3 steps of a global batch of 8 rows."""
    where = tmp_path_factory.mktemp("one")
    r = trl_recipe(where, "sft")
    r["trainer"].update(max_steps=3)
    r["data"]["batch_size"] = 8
    r["evals"] = []
    out = run_cli("train", str(write(where, r)), "--no-progress", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return r, _only_run(where / "runs" / r["name"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_trl_recipe_with_two_devices_launches_torchrun_itself(tmp_path, stage, one_process_sft):
    """ZeRO-1/2/3 with 2 processes x 4 rows: the same global batch of 8 as the one-process run (HF's seedable sampler
    gives rank r the r-th half of each batch of the one shuffled order; losses are token sums over the global token
    count), so the same loss and gradient-norm trajectory and the same final weights, up to float summation order;
    the saved ZeRO-3 model is whole weights that load in one process."""
    one, one_dir = one_process_sft
    r = json.loads(json.dumps(one))
    r["trainer"].update(strategy=f"deepspeed_stage_{stage}", devices=2)
    r["data"]["batch_size"] = 4
    r["output_dir"] = str(tmp_path / "runs")
    out = run_cli("train", str(write(tmp_path, r)), "--no-progress", timeout=900)
    errors = [s for s in out.stderr.splitlines() if "Error" in s or "error:" in s]
    assert out.returncode == 0, "\n".join(errors[:20]) + "\n" + out.stderr[-2000:]
    assert "launching: -m torch.distributed.run --nproc_per_node 2" in out.stdout
    run_dir = _only_run(tmp_path / "runs" / r["name"])  # both ranks wrote into one run directory
    res = json.loads((run_dir / "results.json").read_text())
    assert res["train"]["world_size"] == 2 and res["train"]["zero_stage"] == stage and res["train"]["steps"] == 3
    ref, got = _trajectory(one_dir), _trajectory(run_dir)
    assert [s for s, _, _ in got] == [s for s, _, _ in ref] == [1, 2, 3]
    assert len({loss for _, loss, _ in ref}) == 3  # the reference really trains (a flat trajectory would match anything)
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(got, ref):
        assert loss == pytest.approx(ref_loss, rel=1e-5), f"step {step}: loss {loss} vs one process {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=1e-5), f"step {step}: grad norm {norm} vs one process {ref_norm}"
    from llm_limits.trainers.build.models import build_model
    from llm_limits.trainers.build.tokenizers import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_model(path=str(run_dir / "model"), vocab_size=len(tok))  # whole weights, one process
    assert all(p.numel() > 0 for p in model.parameters())  # ZeRO-3 shards would be empty tensors
    a, b = weights(one_dir), weights(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.mark.slow
def test_lightning_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """2 ranks x 4 rows serve exactly the rows of one process's batch of 8 (the sampler splits each batch's indices
    across the ranks), DDP averages the two equal-size halves: the same updates up to float summation order."""
    one = lightning_recipe(tmp_path / "one")
    one["trainer"].update(max_steps=6, checkpoint_every=6)
    one["data"]["batch_size"] = 8
    two = json.loads(json.dumps(one))
    two["trainer"].update(strategy="ddp", devices=2)
    two["data"]["batch_size"] = 4
    two["output_dir"] = str(tmp_path / "two" / "runs")
    for r, where in ((one, tmp_path / "one"), (two, tmp_path / "two")):
        where.mkdir(parents=True, exist_ok=True)
        out = run_cli("train", str(write(where, r)), "--no-progress", timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
    a = weights(_only_run(tmp_path / "one" / "runs" / one["name"]))
    b = weights(_only_run(tmp_path / "two" / "runs" / two["name"]))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    res = [json.loads((_only_run(d / "runs" / one["name"]) / "results.json").read_text())["train"]
           for d in (tmp_path / "one", tmp_path / "two")]
    assert res[0]["tokens_seen"] == res[1]["tokens_seen"] == 6 * 8 * 32
    assert res[0]["final_loss"] == pytest.approx(res[1]["final_loss"], rel=1e-4)  # the logged loss is the ranks' mean
    # validation is sharded across the ranks and reduced exactly: the same loss over the same validation tokens
    assert res[0]["val_loss"] == res[0]["val_loss"] and res[0]["val_loss"] == pytest.approx(res[1]["val_loss"], rel=1e-5)


def _recipe(**trainer) -> dict:
    r = json.loads(json.dumps(TINY))
    r["trainer"].update(trainer)
    return r


def test_launch_checks_fail_before_any_process_starts(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cores = os.cpu_count() or 1
    with pytest.raises(UserError, match=rf"trainer.devices: {cores + 1} processes asked for but this machine has {cores} CPU cores"):
        validate_recipe(_recipe(devices=cores + 1, strategy="ddp"), "r.yaml")
    with pytest.raises(UserError, match=r"trainer.num_nodes: 2 nodes need a rendezvous address, but MASTER_ADDR, MASTER_PORT, NODE_RANK is not set"):
        validate_recipe(_recipe(num_nodes=2, strategy="ddp"), "r.yaml")
    with pytest.raises(UserError, match=r"offload: optimizer needs a DeepSpeed strategy"):
        validate_recipe(_recipe(offload="optimizer", strategy="ddp"), "r.yaml")
    with pytest.raises(UserError, match=r"offload: optimizer_and_params offloads parameters, which only ZeRO-3"):
        validate_recipe(_recipe(backend="trl", offload="optimizer_and_params", strategy="deepspeed_stage_2"), "r.yaml")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", "1")
    resolved = validate_recipe(_recipe(backend="trl", num_nodes=2, devices=2, strategy="deepspeed_stage_2"), "r.yaml")
    from llm_limits.trainers.launch import command

    cmd = command(resolved.recipe.trainer, ["train", "r.yaml"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "2", "--node_rank", "1",
                       "--master_addr", "10.0.0.1", "--master_port", "29500", "-m", "llm_limits.trainers.cli", "train", "r.yaml"]
    monkeypatch.setenv("WORLD_SIZE", "4")  # already under a launcher: nothing is re-launched
    assert command(resolved.recipe.trainer, ["train", "r.yaml"]) is None


def test_flash_attention_is_checked_before_anything_is_built(monkeypatch):
    """flash_attention_2 needs a CUDA GPU and the flash-attn package; transformers would say so only after the
    run's evals and data were built, with a traceback. On a GPU without the package: a one-line error naming it."""
    import llm_limits.trainers.recipe.schema as recipe_module

    r = _recipe(accelerator="auto")
    r["model"]["attn_implementation"] = "flash_attention_2"
    with pytest.raises(UserError, match=r"r.yaml: model.attn_implementation: flash_attention_2 runs on CUDA GPUs only"):
        validate_recipe(r, "r.yaml")
    monkeypatch.setattr(recipe_module, "_cuda_available", lambda: True)
    monkeypatch.setattr(recipe_module, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(recipe_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"r.yaml: model.attn_implementation: flash_attention_2 needs the flash-attn "
                                        r"package, which is not installed here"):
        validate_recipe(r, "r.yaml")
    validate_recipe(r, "r.yaml", check_hardware=False)  # llm-limits validate: a GPU recipe validates anywhere


def test_offload_goes_into_the_deepspeed_config():
    from llm_limits.trainers.backends.trl import deepspeed_config

    zero = deepspeed_config("deepspeed_stage_2", "optimizer")["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True} and "offload_param" not in zero
    assert "offload_optimizer" not in deepspeed_config("deepspeed_stage_2")["zero_optimization"]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "offload"), [(2, "optimizer"), (3, "optimizer_and_params")])
def test_zero_offload_runs_with_two_processes(tmp_path, stage, offload):
    """ZeRO-Offload on CPU: DeepSpeed keeps the optimizer state (and with ZeRO-3 the parameters) in host memory, which
    on a CPU machine is where they already are, but the engine takes its offload code paths: the run trains, the engine
    reports the offload it ran with, and the saved model loads in one process."""
    r = trl_recipe(tmp_path, "sft")
    r["trainer"].update(strategy=f"deepspeed_stage_{stage}", offload=offload, devices=2, max_steps=3)
    r["evals"] = []
    out = run_cli("train", str(write(tmp_path, r)), "--no-progress", timeout=900)
    errors = [s for s in out.stderr.splitlines() if "Error" in s or "error:" in s]
    assert out.returncode == 0, "\n".join(errors[:20]) + "\n" + out.stderr[-2000:]
    run_dir = _only_run(tmp_path / "runs" / r["name"])
    train = json.loads((run_dir / "results.json").read_text())["train"]
    assert train["zero_stage"] == stage and train["steps"] == 3
    assert train["zero_offload"] == {"optimizer": 1.0, "optimizer_and_params": 2.0}[offload]
    from llm_limits.trainers.build.models import build_model
    from llm_limits.trainers.build.tokenizers import build_char_tokenizer

    model = build_model(path=str(run_dir / "model"), vocab_size=len(build_char_tokenizer()))
    assert all(p.numel() > 0 for p in model.parameters())


def test_mfu_benchmark_script_runs_both_backends_on_cpu():
    """scripts/bench_mfu.py is for a GPU; its --smoke mode runs the same code on the CPU with a 2-layer model, so a
    session that is lent a GPU finds a working script."""
    import subprocess
    import sys

    from tests.conftest import REPO

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_mfu.py"), "--smoke"], cwd=REPO,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [s for s in out.stdout.splitlines() if " backend (" in s]
    assert [s.split()[0] for s in lines] == ["lightning", "trl"] and all("MFU" in s for s in lines), out.stdout[-2000:]
    assert out.stdout.count("command: ") == 1 and out.stdout.count("device: ") == 2  # one process per arm


def test_device_wheels_follow_the_project_pins():
    """scripts/device_wheels.sh and scripts/gpu_checks.sh carry this project's versions to the lent GPU machine: a pin
    changed in pyproject.toml and not there would benchmark another version than the one tested here."""
    import re
    import tomllib

    pins = dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", d).groups()
                for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    pins = {k.lower().replace("_", "-"): v for k, v in pins.items()}
    installed = {}
    for script in ("device_wheels.sh", "gpu_checks.sh"):
        found = re.findall(r"\b([a-z][a-z0-9_-]*)==([0-9][0-9A-Za-z.]*)", (REPO / "scripts" / script).read_text())
        assert found, script
        installed.update(found)
        for name, version in found:
            if name in pins:
                assert version == pins[name], f"scripts/{script}: {name}=={version}, pyproject.toml pins {pins[name]}"
    # the ones pyproject leaves to pip (pydantic-core, dill, regex, ...) float with the index: no exact check here
    assert {"transformers", "trl", "datasets", "deepspeed", "pydantic"} <= set(installed)
