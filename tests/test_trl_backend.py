"""The TRL backend: SFT, GRPO (outcome, process, step-level advantages) and PRM from one recipe schema; hooks,
checkpoints, resume; DeepSpeed ZeRO-2 with 2 processes on CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from llm_limits.mitigations.process_rewards import ProcessRewards
from llm_limits.mitigations.process_rewards.core import step_advantages
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import validate_recipe
from llm_limits.trainers.build.rewards import chain_outcome, chain_step_scores, injected_for
from llm_limits.trainers.build.tokenizers import build_char_tokenizer
from llm_limits.trainers.backends.hooks import STATE_FILE, HookDriver, load_state
from llm_limits.trainers.backends.trl import (
    deepspeed_config,
    grpo_rows,
    prm_rows,
    process_advantages,
    training_kwargs,
)
from llm_limits.trainers.run import train

from tests.conftest import REPO, TINY

pytestmark = pytest.mark.usefixtures("one_thread")

CHAINS = {"task": "chains", "params": {"num_examples": 48, "corruptions": {"wrong_step": 0.25, "propagated": 0.25}},
          "seq_len": 64, "batch_size": 8}
REASONING_EVAL = {"name": "reasoning", "lengths": [2, 3], "examples_per_length": 4, "probes": False, "batch_size": 8}


def trl_recipe(tmp_path: Path, algorithm: str, **trl: Any) -> dict[str, Any]:
    r = copy.deepcopy(TINY)
    r.update(name=f"trl-{algorithm}", data=copy.deepcopy(CHAINS), output_dir=str(tmp_path / "runs"))
    r["trainer"] = {"backend": "trl", "trl": {"algorithm": algorithm, **trl}, "max_steps": 2, "lr": 3e-3, "log_every": 1}
    r["mitigations"] = []
    r["evals"] = [] if algorithm == "prm" else [copy.deepcopy(REASONING_EVAL)]
    return r


def backend_recipe(tmp_path: Path, backend: str) -> dict[str, Any]:
    """A tiny recipe without evals on either backend: chains SFT on TRL, synthetic text on Lightning."""
    if backend == "trl":
        r = trl_recipe(tmp_path, "sft")
    else:
        r = copy.deepcopy(TINY)
        r["output_dir"] = str(tmp_path / "runs")
    r["evals"] = []
    return r


def resume_after_crash(run_dir: Path, tmp_path: Path, lost: str) -> Path:
    """A copy of a finished run as a crash would leave it: checkpoint folder ``lost`` and the final model never
    written. Resumes it with ``--resume`` and returns the resumed run's directory."""
    import shutil

    crashed = tmp_path / "crashed"
    shutil.copytree(run_dir, crashed, symlinks=True)
    shutil.rmtree(crashed / "checkpoints" / lost)
    shutil.rmtree(crashed / "model")
    return train("unused", resume=str(crashed), progress=False, echo=lambda s: None)


def write(tmp_path: Path, recipe: dict[str, Any], name: str = "r.yaml") -> Path:
    import yaml

    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


# --- pure pieces ------------------------------------------------------------------------------------------------------
def test_deepspeed_config_and_training_kwargs(tmp_path):
    ds = deepspeed_config("deepspeed_stage_3")
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # one source of truth: the recipe, via the HF integration
    resolved = validate_recipe(trl_recipe(tmp_path, "sft"), "r")
    kw = training_kwargs(resolved.recipe.trainer, resolved.recipe.data, tmp_path, 7, progress=False, has_val=True)
    assert kw["max_steps"] == 2 and kw["learning_rate"] == 3e-3 and kw["per_device_train_batch_size"] == 8
    assert kw["seed"] == kw["data_seed"] == 7 and kw["deepspeed"] is None and kw["eval_strategy"] == "steps"
    assert kw["lr_scheduler_type"] == "cosine" and kw["output_dir"] == str(tmp_path / "checkpoints")
    # TRL's configs default to activation checkpointing (a recomputed forward: +25% step time); the recipe decides
    from trl import GRPOConfig, SFTConfig

    assert not SFTConfig(**kw).activation_checkpointing and not GRPOConfig(**kw).activation_checkpointing


def test_prm_rows_put_labels_at_step_ends():
    tok = build_char_tokenizer()
    rec = {"prompt": "Q:3+4*2\n", "completion": "3+4=7\n7*2=5\nA:4", "labels": [1, 0], "answer_correct": True}
    rows, skipped = prm_rows([rec], tok, "process", 64)
    assert skipped == 0
    targets = rows[0]["labels"]
    p = len(rec["prompt"])
    expected = {p + 5: 1.0, p + 11: 0.0, p + 14: 1.0}  # the two "\n" closing steps, then the answer's last char
    assert {i: y for i, y in enumerate(targets) if y != -100.0} == expected
    outcome, _ = prm_rows([rec], tok, "outcome", 64)
    assert {y for y in outcome[0]["labels"] if y != -100.0} == {1.0}
    assert prm_rows([rec], tok, "process", 10) == ([], 1)  # longer than max_length: skipped, counted


def test_grpo_rows_keep_reward_columns():
    rows = grpo_rows([{"prompt": "Q:1+2\n", "question": "1+2", "gold_answer": "3", "modulus": 10, "task": "arith_chain",
                       "steps": ["1+2=3"]}])
    assert rows == [{"prompt": "Q:1+2\n", "question": "1+2", "gold_answer": "3", "modulus": 10, "task": "arith_chain",
                     "prefix": ""}]


def test_process_advantages_match_deepseekmath_on_hand_made_group():
    """Two completions of one prompt: the verifier scores each step, and every token gets the sum of the normalised
    rewards of the steps ending at or after it."""
    tok = build_char_tokenizer()
    texts = ["1+2=3\nA:3", "1+2=4\nA:3"]  # a valid chain; an invalid step and an answer that does not follow it
    enc = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    n = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (n - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (n - len(e)) for e in enc])
    cols = {"question": ["1+2"] * 2, "gold_answer": ["3"] * 2, "modulus": [10] * 2, "task": ["arith_chain"] * 2}
    pr = ProcessRewards(ProcessRewards.Config(reward="step"), **injected_for("process_rewards", ProcessRewards.Config(reward="step"), where="m", task="arith_chain"))
    adv, flat = process_advantages(tok, ids, mask, ["Q:1+2\n"] * 2, cols, HookDriver([pr]), 2, 0, lambda x: x)
    assert flat == [1.0, 1.0, 0.0, 0.0]
    # step ends: "\n" at char 5 and the answer's last char at 8 (tokens 5 and 8 with a character tokenizer)
    expected = step_advantages([[1.0, 1.0], [0.0, 0.0]], [[5, 8], [5, 8]], n, 2)
    assert torch.allclose(adv, expected * mask)
    assert adv[0, 0] > 0 > adv[1, 0]  # the good chain is pushed up at every token, the bad one down
    assert torch.allclose(adv[0, 6:9], adv[0, 8].expand(3))  # tokens after the step's end share the answer's reward
    # a mitigation without step rewards leaves TRL's sequence-level advantages alone
    outcome = ProcessRewards(ProcessRewards.Config(reward="outcome"), **injected_for("process_rewards", ProcessRewards.Config(reward="outcome"), where="m", task="arith_chain"))
    assert process_advantages(tok, ids, mask, ["Q:1+2\n"] * 2, cols, HookDriver([outcome]), 2, 0, lambda x: x) == (None, [])


def test_verifier_rewards():
    assert chain_outcome(["p"], ["1+2=3\nA:3"], gold_answer=["3"]) == [1.0]
    assert chain_step_scores(["p"], ["1+2=4\nA:3"], question=["1+2"], gold_answer=["3"], modulus=[10]) == [[0.0, 0.0]]
    # the answer line is judged as a step: does it follow from the chain written before it?
    assert chain_step_scores(["p"], ["1+2=4\nA:4"], question=["1+2"], gold_answer=["3"], modulus=[10]) == [[0.0, 1.0]]


# --- recipe rules -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"trainer.max_tokens": 100}, "trainer: max_tokens: the trl backend's grpo counts optimizer steps"),
    ({"data.batch_size": 6}, "data.batch_size: GRPO generates"),
    ({"trainer.trl.algorithm": "ppo"}, "trainer.trl.algorithm: expected one of"),
])
def test_recipe_rules(tmp_path, change, message):
    r = trl_recipe(tmp_path, "grpo", num_generations=4)
    for key, value in change.items():
        node = r
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    with pytest.raises(UserError) as e:
        validate_recipe(r, "r.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_many_devices_launch_torchrun(tmp_path, monkeypatch):
    """Outside a launcher, a 2-device recipe becomes a torchrun command for the same arguments; under one (WORLD_SIZE
    set) the process trains itself."""
    from llm_limits.trainers.run import launch_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    r = trl_recipe(tmp_path, "sft")
    r["trainer"]["devices"] = 2
    path = write(tmp_path, r)
    cmd = launch_command(str(path), [], None, cli_args=["train", str(path)])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert cmd[-4:] == ["-m", "llm_limits.trainers.cli", "train", str(path)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch_command(str(path), [], None, cli_args=["train", str(path)]) is None


def test_text_data_is_refused_with_one_line(tmp_path):
    from tests.test_cli import run_in_process

    r = trl_recipe(tmp_path, "sft")
    r["data"] = {"task": "synthetic_text", "params": {"num_docs": 4, "doc_chars": 64}}
    out = run_in_process("train", str(write(tmp_path, r)))
    assert out.returncode == 2
    assert "data.task: synthetic_text makes no prompt/completion records" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_exact_verifier_needs_chain_data(tmp_path):
    cfg = ProcessRewards.Config(reward="step")
    with pytest.raises(UserError, match=r"mitigations\[0\]\.scorer: the exact verifier checks arith_chain steps only"):
        injected_for("process_rewards", cfg, where="mitigations[0]", task="gsm8k")
    with pytest.raises(UserError, match="prm_path"):
        injected_for("process_rewards", ProcessRewards.Config(scorer="prm", prm_path=str(tmp_path)), where="m", task=None)


# --- 2-step runs of every algorithm --------------------------------------------------------------------------------------
def test_sft_trains_and_resumes_exactly(tmp_path):
    r = trl_recipe(tmp_path, "sft")
    r["trainer"].update(max_steps=4, checkpoint_every=2)
    run_dir = train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["train"]["steps"] == 4 and res["train"]["zero_stage"] == -1
    assert {"before", "after"} <= set(res["evals"]["reasoning"])
    ckpts = sorted((run_dir / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4"]
    assert load_state(ckpts[0] / STATE_FILE)["history"]
    assert (run_dir.parent / "latest").resolve() == run_dir.resolve()
    assert not (run_dir / "model" / "training_args.bin").exists()

    # A crash after step 3: the last checkpoint is step 2. --resume continues from it and ends with the same weights.
    resumed = resume_after_crash(run_dir, tmp_path, lost="checkpoint-4")
    a, b = weights(run_dir), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sft_token_budget_sets_the_steps_and_stops_at_the_budget(tmp_path):
    # chains at 2-4 ops: prompts and completions of a few dozen characters; 8 examples per step.
    r = trl_recipe(tmp_path, "sft")
    r["evals"] = []
    r["trainer"].update(max_steps=1000, max_tokens=3000)
    run_dir = train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)
    stats = json.loads((run_dir / "results.json").read_text())["train"]
    per_example = stats["tokens_seen"] / (stats["steps"] * 8)
    # Steps derived from the mean example length; the budget is reached (or missed by less than one step's tokens).
    assert 3000 - 8 * per_example * 1.5 <= stats["tokens_seen"] <= 3000 + 8 * per_example * 1.5
    assert stats["steps"] < 1000


@pytest.mark.parametrize("reward", ["outcome", "process", "step"])
def test_grpo_arms_run(tmp_path, reward):
    r = trl_recipe(tmp_path, "grpo", num_generations=4, max_completion_length=24)
    r["mitigations"] = [{"name": "process_rewards", "reward": reward}]
    r["evals"][0]["mediation"] = False
    run_dir = train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["train"]["steps"] == 2 and (run_dir / "model" / "model.safetensors").is_file()
    assert res["evals"]["reasoning"]["after"]["spec"]["axis"] == "num_steps"


def test_prm_trains_a_token_classifier(tmp_path):
    r = trl_recipe(tmp_path, "prm")
    r["trainer"]["max_steps"] = 3
    run_dir = train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)
    from llm_limits.evals.lm import PRMScorer

    scorer = PRMScorer(str(run_dir / "model"))
    scores = scorer.score(["Q:3+4*2\n"], ["3+4=7\n7*2=4\nA:4"])
    assert len(scores[0]) == 3 and all(0.0 < s < 1.0 for s in scores[0])
    cfg = json.loads((run_dir / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForTokenClassification"] and len(cfg["id2label"]) == 1


def test_prm_on_monte_carlo_labels(tmp_path):
    """Math-Shepherd labels from a completer model (here an untrained one, saved to disk) feed the PRM trainer."""
    from llm_limits.trainers.build.models import build_model, save_model

    tok = build_char_tokenizer()
    completer = build_model("llama", TINY["model"]["config"], vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)
    save_model(completer, tok, tmp_path / "completer")
    r = trl_recipe(tmp_path, "prm")
    r["data"]["params"]["num_examples"] = 12
    r["mitigations"] = [{"name": "process_rewards", "labels": {
        "kind": "monte_carlo", "rollouts": 2, "completer_path": str(tmp_path / "completer"), "max_new_tokens": 8}}]
    resolved = validate_recipe(r, "r.yaml")
    from llm_limits.trainers.build.assemble import build

    built, train_ds, _ = build(resolved)
    # an untrained completer rarely reaches the gold answer: MC labels are mostly 0, unlike the verifier's
    labels = [y for row in train_ds["labels"] for y in row if y != -100.0]
    assert labels and set(labels) <= {0.0, 1.0}
    run_dir = train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_lightning_refuses_reward_mitigations(tmp_path):
    r = copy.deepcopy(TINY)
    r.update(output_dir=str(tmp_path / "runs"), mitigations=[{"name": "process_rewards", "reward": "outcome"}])
    with pytest.raises(UserError, match="Lightning backend cannot use"):
        train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)


# --- DeepSpeed ZeRO-2, 2 processes on CPU -------------------------------------------------------------------------------
@pytest.mark.slow
def test_zero2_two_processes_on_cpu(tmp_path):
    r = trl_recipe(tmp_path, "sft")
    r["trainer"].update(strategy="deepspeed_stage_2", devices=2, max_steps=3)
    r["evals"] = []
    path = write(tmp_path, r)
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29533", "-m", "llm_limits.trainers.cli", "train", str(path)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs" / "trl-sft").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(runs) == 1, runs  # both ranks wrote into one run directory
    res = json.loads((runs[0] / "results.json").read_text())
    assert res["train"]["world_size"] == 2 and res["train"]["zero_stage"] == 2 and res["train"]["steps"] == 3
    shards = sorted(p.name for p in (runs[0] / "checkpoints").glob("checkpoint-3/global_step3/*"))
    assert [s for s in shards if s.startswith("zero_pp_rank_")] == [  # both ranks' ZeRO shards, in this run's folder
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    from llm_limits.trainers.build.models import build_model

    tok = build_char_tokenizer()
    model = build_model(path=str(runs[0] / "model"), vocab_size=len(tok))  # loads back in a single process
    assert sum(p.numel() for p in model.parameters()) > 0
