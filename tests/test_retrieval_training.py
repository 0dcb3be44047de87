"""Bounded-oracle retrieval through the TRL backend: every tiny recipe of recipes/retrieval/ runs 2 steps with both evals, the
data the mitigation builds has the recipe's proportions, the index is saved in the run directory and loaded on
--resume, user data in HotpotQA shape trains, and the Lightning backend refuses the mitigation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llm_limits.evals.tasks import kb
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import load_recipe
from llm_limits.trainers.build.assemble import build
from llm_limits.trainers.run import train

from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

ARMS = ["reader", "baseline", "distractors", "contamination", "abstention"]
FIXTURES = REPO / "tests" / "fixtures" / "retrieval"


def shrunk(arm: str, tmp_path: Path) -> dict[str, Any]:
    """The arm's recipe at test size: a 2-layer model, 96 questions, 2 steps, small evals."""
    r = yaml.safe_load((REPO / "recipes" / "retrieval" / f"tiny-{arm}.yaml").read_text())
    # The arms start from the reader's model (tiny-reader.yaml); here a fresh 2-layer one stands in for it.
    r["model"] = {"model_type": "llama", "tokenizer": {"kind": "char"},
                  "config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                             "num_key_value_heads": 2, "max_position_embeddings": 512}}
    r["data"]["params"].update(num_examples=96, num_entities=40)
    r["data"].update(batch_size=8, val_fraction=0.0)
    r["trainer"] = {**r["trainer"], "max_steps": 2, "log_every": 1, "checkpoint_every": 1}
    r["trainer"].pop("max_tokens"), r["trainer"].pop("warmup_tokens")
    r["evals"] = [
        {"name": "retrieval", "num_entities": 40, "examples": 4, "distractors": [0, 2], "budgets": [32],
         "poison_counts": [0, 1], "position_distractors": 1, "negative_distractors": 1, "batch_size": 8},
        {"name": "hallucination", "num_entities": 40, "rank_buckets": [10, 40], "examples_per_bucket": 2,
         "unanswerable_examples": 2, "train_examples": 96, "batch_size": 8},
    ]
    r["output_dir"] = str(tmp_path / "runs")
    return r


def write(tmp_path: Path, recipe: dict[str, Any], name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


@pytest.mark.slow
@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_runs_two_steps_with_both_evals(arm, tmp_path):
    run_dir = train(str(write(tmp_path, shrunk(arm, tmp_path))), progress=False, echo=lambda s: None)
    res = json.loads((run_dir / "results.json").read_text())
    assert res["train"]["steps"] == 2
    for name in ("retrieval", "hallucination"):
        assert {"before", "after"} <= set(res["evals"][name]), name
    after = res["evals"]["retrieval"]["after"]
    assert {"0", "2"} == set(after["curve"]) and "attack_success_rate" in after["scalars"]
    if arm in ("reader", "baseline"):
        assert "data" not in res and not (run_dir / "index").exists()
    else:
        stats = res["data"]["bounded_retrieval"]
        assert stats["records"] == 96 and stats["oracle"] + stats["oracle_free"] + stats["unanswerable"] + stats["closed_book"] == 96
        assert (run_dir / "index" / "kind.json").is_file()
        assert stats["contaminated"] == (0 if arm == "distractors" else round(0.2 * stats["oracle"]))


def test_the_mitigation_builds_the_recipe_proportions(tmp_path):
    r = shrunk("abstention", tmp_path)
    r["data"]["params"]["num_examples"] = 400
    resolved = load_recipe(write(tmp_path, r))
    built, train_ds, _ = build(resolved)
    stats = built.mitigations[0].stats
    params = r["data"]["params"]
    n_closed = round(params["closed_book_fraction"] * 400)
    n_unans = round(params["unanswerable_fraction"] * 400)
    assert stats["closed_book"] == n_closed
    answerable_open = 400 - stats["closed_book"] - stats["unanswerable"]
    assert stats["oracle"] == round(0.8 * answerable_open) and stats["oracle_free"] == answerable_open - stats["oracle"]
    assert stats["contaminated"] == round(0.2 * stats["oracle"])
    assert stats["unanswerable"] <= n_unans  # closed-book unanswerable records count as closed book
    completions = train_ds["completion"]
    answers = [kb.parse_answer(c) for c in completions]
    # Abstention targets: every oracle-free and every open-book unanswerable record; conflict flags: every contaminated one.
    assert answers.count(kb.CONFLICT) == stats["contaminated"]
    open_unknown = sum(1 for c, a in zip(completions, answers) if a == kb.ABSTAIN and c.startswith("E:none"))
    assert open_unknown == stats["oracle_free"] + stats["unanswerable"]
    # The bounded oracle: no context exceeds k passages.
    assert max(p.count("P:") for p in train_ds["prompt"]) <= 5


@pytest.mark.slow
def test_resume_loads_the_saved_index_and_ends_with_the_same_weights(tmp_path, monkeypatch):
    r = shrunk("contamination", tmp_path)
    run_dir = train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)
    crashed = tmp_path / "crashed"
    shutil.copytree(run_dir, crashed, symlinks=True)
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-2")
    shutil.rmtree(crashed / "model")

    import llm_limits.evals.retrievers as retrievers

    loaded: list[Path] = []
    real_load = retrievers.load_retriever
    monkeypatch.setattr(retrievers, "load_retriever", lambda d: loaded.append(Path(d)) or real_load(d))
    resumed = train("unused", resume=str(crashed), progress=False, echo=lambda s: None)
    assert loaded == [crashed / "index"]  # the training index came from the run directory, not a rebuild
    a = load_file(str(run_dir / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_user_data_in_hotpotqa_shape_trains_with_its_own_passages(tmp_path):
    r = shrunk("contamination", tmp_path)
    r["data"] = {"path": str(FIXTURES / "hotpotqa.jsonl"), "seq_len": 768, "batch_size": 2, "val_fraction": 0.0}
    r["model"]["config"]["max_position_embeddings"] = 1024
    r["model"]["tokenizer"] = {"kind": "char"}
    r["mitigations"][0].update(contamination_rate=1.0, oracle_fraction=1.0, budget_tokens=2000)
    r["evals"] = []
    resolved = load_recipe(write(tmp_path, r))
    built, train_ds, _ = build(resolved)
    records = kb.load_jsonl(FIXTURES / "hotpotqa.jsonl")
    for rec, prompt in zip(records, train_ds["prompt"]):
        for oracle in rec["oracle_passages"]:
            assert f"P:{oracle}\n" in prompt  # every oracle is in its context
    # Poisoned passages replace the answer inside the last oracle by another record's answer.
    assert built.mitigations[0].stats["contaminated"] >= 1


def test_lightning_backend_refuses_a_data_building_mitigation(tmp_path):
    r = shrunk("distractors", tmp_path)
    r["trainer"] = {"max_steps": 2, "lr": 1e-3}
    r["data"] = {"task": "synthetic_text", "params": {"num_docs": 20, "doc_chars": 64}, "seq_len": 32, "batch_size": 4}
    r["evals"] = []
    with pytest.raises(UserError) as e:
        build(load_recipe(write(tmp_path, r)))
    assert "bounded_retrieval builds prompt/completion training data: it needs trainer.backend: trl" in str(e.value)
    assert "\n" not in str(e.value)
