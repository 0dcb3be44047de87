"""Vision-language runs (issue #6) through the Lightning backend: freeze controls and LLaVA's two stages (frozen parts
unchanged after steps, trainable ones changed), the rows the backend builds, every tiny multimodal recipe running 2
steps with its eval before and after, the saved model loading back, and the one-line errors of bad vision recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from llm_limits.evals import vlm
from llm_limits.trainers.build import vlm as tvlm
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.backends.lightning import CausalLMModule, build_trainer
from llm_limits.trainers.backends.hooks import HookDriver
from llm_limits.trainers.recipe.schema import validate_recipe
from llm_limits.trainers.run import train

from tests.conftest import REPO
from tests.vlm_fixtures import tiny_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

ARMS = sorted(p.stem.removeprefix("tiny-") for p in (REPO / "recipes" / "multimodal").glob("tiny-*.yaml"))


def shrunk(arm: str, tmp_path: Path) -> dict[str, Any]:
    """The arm's recipe at test size: 64 scenes, 2 steps, a small eval."""
    r = yaml.safe_load((REPO / "recipes" / "multimodal" / f"tiny-{arm}.yaml").read_text())
    r["model"]["config"]["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=16)
    r["model"]["config"]["text_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                               num_key_value_heads=2)
    r["data"]["params"]["num_examples"] = 64
    r["data"].update(batch_size=8, val_fraction=0.0)
    r["trainer"].update(max_steps=2, warmup_steps=0, log_every=1)
    if r["trainer"].get("stages"):
        r["trainer"]["max_steps"] = 4  # a step or more in each stage
    ev = r["evals"][0]
    ev.update(num_examples=8, num_retrieval=10, batch_size=16)
    if ev["task"] == "shapes":
        ev.update(trap_examples=4, pair_examples=2)
    r["output_dir"] = str(tmp_path / "runs")
    return r


def r_steps(recipe: Path) -> int:
    return yaml.safe_load(recipe.read_text())["trainer"]["max_steps"]


def _records(n: int = 16) -> list[dict[str, Any]]:
    """Hand-made records in the multimodal schema: a red or blue square, which colour?"""
    out = []
    for i in range(n):
        colour = ("red", "blue")[i % 2]
        img = np.zeros((16, 16, 3), dtype=np.uint8)
        img[4:12, 4:12, 0 if colour == "red" else 2] = 255
        out.append({"task": "test", "id": f"r{i}", "image_id": f"img{i}", "image": img,
                    "caption": f"a {colour} square.", "question": "what colour is it?", "answer": colour,
                    "choices": ["red", "blue"], "kind": "qa", "pair_id": -1, "prior_answer": "",
                    "attributes": {"colour": colour}})
    return out


def _module_and_loader(parts_frozen: list[str], stages: list[dict] | None = None, steps: int = 4):
    model, tok = tiny_vlm("clip")
    model.train()
    tvlm.freeze(model, parts_frozen)
    fmt = vlm.image_format(model, tok)
    rows, skipped = tvlm.vlm_rows(_records(), tok, fmt, seq_len=40, loss_on="answer")
    assert skipped == 0
    loader = torch.utils.data.DataLoader(tvlm.VLMDataset(rows), batch_size=4, shuffle=False)
    recipe = {"name": "t", "model": {"model_type": "llava"}, "data": {"task": "synthetic_text"},
              "trainer": {"max_steps": steps, "lr": 1e-2, "stages": stages or []}}
    spec = validate_recipe(recipe, "t").recipe.trainer
    return CausalLMModule(model, HookDriver([]), spec), loader


def _snapshot(model, part):
    return {n: p.detach().clone() for n, p in tvlm.part_parameters(model, part)}


def _moved(model, part, before) -> list[bool]:
    return [not torch.equal(p, before[n]) for n, p in tvlm.part_parameters(model, part)]


def test_rows_mask_the_image_tokens_and_carry_the_caption(tmp_path):
    model, tok = tiny_vlm("siglip")
    fmt = vlm.image_format(model, tok)
    rows, _ = tvlm.vlm_rows(_records(4), tok, fmt, seq_len=40, loss_on="all")
    r = rows[0]
    n_img = int(r["image_mask"].sum())
    assert n_img == fmt.num_image_tokens == 4
    assert (r["labels"][r["image_mask"].bool()] == -100).all()  # never a loss on image tokens
    assert tok.decode(r["input_ids"][r["labels"] != -100]) == "Q: what colour is it?\nA: red<eos>"
    rows_a, _ = tvlm.vlm_rows(_records(4), tok, fmt, seq_len=40, loss_on="answer")
    assert tok.decode(rows_a[0]["input_ids"][rows_a[0]["labels"] != -100]) == "red<eos>"
    cap = rows[1]["caption_input_ids"][rows[1]["caption_attention_mask"].bool()]
    assert tok.decode(cap) == "<bos>a blue square."
    assert rows[0]["caption_group"] != rows[1]["caption_group"] and rows[0]["caption_group"] == rows[2]["caption_group"]
    assert rows[0]["pixel_values"].shape == (3, 16, 16)


def test_frozen_parts_stay_and_trainable_parts_move(tmp_path):
    module, loader = _module_and_loader(["vision_tower"])
    model = module.model
    before = {p: _snapshot(model, p) for p in tvlm.PARTS}
    assert all(not p.requires_grad for _, p in tvlm.part_parameters(model, "vision_tower"))
    trainer = build_trainer(module.spec, tmp_path, logger=None, has_val=False, progress=False)
    trainer.fit(module, train_dataloaders=loader)
    assert not any(_moved(model, "vision_tower", before["vision_tower"]))
    assert all(_moved(model, "projector", before["projector"]))
    assert all(_moved(model, "language_model", before["language_model"]))


def test_two_stages_train_the_projector_first_then_the_language_model(tmp_path):
    stages = [{"until": 0.5, "train": ["projector"]}, {"until": 1.0, "train": ["projector", "language_model"]}]
    module, loader = _module_and_loader(["vision_tower"], stages, steps=4)
    model = module.model
    before = {p: _snapshot(model, p) for p in tvlm.PARTS}
    mid: dict[str, Any] = {}

    class Probe(__import__("lightning").pytorch.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:  # end of stage 1 (steps 0 and 1)
                mid.update({p: _snapshot(model, p) for p in tvlm.PARTS})

    trainer = build_trainer(module.spec, tmp_path, logger=None, has_val=False, progress=False)
    trainer.callbacks.append(Probe())
    trainer.fit(module, train_dataloaders=loader)
    # stage 1: only the projector moved
    assert all(not torch.equal(mid["projector"][n], before["projector"][n]) for n in before["projector"])
    lm_stage1 = [not torch.equal(mid["language_model"][n], before["language_model"][n]) for n in before["language_model"]]
    assert not any(lm_stage1), "the language model must not move in the projector-only stage"
    # stage 2: the language model moves too, the tower never does
    assert all(_moved(model, "language_model", before["language_model"]))
    assert not any(_moved(model, "vision_tower", before["vision_tower"]))


@pytest.mark.parametrize("arm", ARMS)
def test_each_arm_runs_two_steps_with_its_eval(arm, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(shrunk(arm, tmp_path)))
    run_dir = train(str(recipe), progress=False, echo=lambda _: None)
    results = json.loads((run_dir / "results.json").read_text())
    entry = results["evals"]["multimodal"]
    for phase in ("before", "after"):
        s = entry[phase]["scalars"]
        assert 0.0 <= s["acc_sighted"] <= 1.0 and s["gap"] >= 0.0
        assert entry[phase]["limit_value"] == pytest.approx(s["multimodal_gain"])
    assert results["train"]["steps"] == r_steps(recipe)
    assert (run_dir / "model" / "config.json").is_file()
    if "baseline" not in arm:
        ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"]
        if arm.endswith("gap"):
            assert not any(k.startswith("loss_modules.") for k in state)  # no learnable loss parameters
        else:
            assert any(k.startswith("loss_modules.crossmodal.") for k in state)  # the temperature rides along


def test_a_saved_vision_model_is_evaluated_from_its_run_directory(tmp_path):
    from llm_limits.trainers.run import evaluate

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(shrunk("siglip", tmp_path)))
    run_dir = train(str(recipe), progress=False, echo=lambda _: None)
    out = evaluate(str(run_dir), progress=False, echo=lambda _: None)
    again = json.loads((out / "results.json").read_text())["evals"]["multimodal"]["after"]["scalars"]
    first = json.loads((run_dir / "results.json").read_text())["evals"]["multimodal"]["after"]["scalars"]
    assert again["acc_sighted"] == pytest.approx(first["acc_sighted"])
    assert again["gap"] == pytest.approx(first["gap"], abs=1e-5)


def _bad(tmp_path, mutate) -> str:
    r = shrunk("baseline", tmp_path)
    mutate(r)
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(r))
    with pytest.raises(UserError) as e:
        train(str(recipe), progress=False, echo=lambda _: None)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("results.json"))
    return str(e.value)


def test_bad_vision_recipes_fail_in_one_line_before_any_run_directory(tmp_path):
    def text_task(r):
        r["data"] = {"task": "synthetic_text"}

    assert "has no images" in _bad(tmp_path, text_task)

    def freeze_text_model(r):
        r["model"] = {"model_type": "llama", "config": {"hidden_size": 32, "num_attention_heads": 2}, "freeze": ["projector"]}
        r["data"] = {"task": "synthetic_text"}
        r["evals"] = []

    assert "model.freeze: only vision-language models" in _bad(tmp_path, freeze_text_model)

    def typo(r):
        r["model"]["config"]["vision_config"]["hiden_size"] = 8

    msg = _bad(tmp_path, typo)
    assert "model.config.vision_config.config.hiden_size" in msg or "vision_config" in msg and "hiden_size" in msg

    def stage_frozen(r):
        r["model"]["freeze"] = ["vision_tower"]
        r["trainer"]["stages"] = [{"until": 1.0, "train": ["vision_tower"]}]

    assert "frozen for the whole run" in _bad(tmp_path, stage_frozen)

    def short_rows(r):
        r["data"]["seq_len"] = 12

    assert "data.seq_len" in _bad(tmp_path, short_rows)


def test_stages_must_end_at_one_and_refuse_deepspeed():
    base = {"name": "t", "model": {"model_type": "llava"}, "data": {"task": "synthetic_text"}}
    with pytest.raises(UserError, match="end at 1.0"):
        validate_recipe({**base, "trainer": {"stages": [{"until": 0.5, "train": ["projector"]}]}}, "t")
    with pytest.raises(UserError, match="one recipe per stage"):
        validate_recipe({**base, "trainer": {"strategy": "deepspeed_stage_2", "stages": [{"until": 1.0, "train": ["projector"]}]}},
                        "t", check_hardware=False)


def test_resume_of_a_vision_run_with_a_learnable_temperature_is_exact(tmp_path):
    """A 6-step InfoNCE run stopped after step 3 and resumed ends with the uninterrupted run's weights, the
    contrastive temperature (a loss-module parameter in the checkpoint) included."""
    import shutil

    from tests.test_crash_resume import same

    r = shrunk("infonce", tmp_path)
    r["evals"] = []
    r["trainer"].update(max_steps=6, checkpoint_every=1, keep_last=100)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(r))
    reference = train(str(recipe), progress=False, echo=lambda _: None)
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed, symlinks=True)
    shutil.rmtree(crashed / "model")
    ckpts = crashed / "checkpoints"
    for p in list(ckpts.iterdir()):
        if p.name.startswith(("step-000004", "step-000005", "step-000006", "last")):
            p.unlink()
    resumed = train("unused", resume=str(crashed), progress=False, echo=lambda _: None)
    assert same(reference, resumed)
    scale = [torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
             ["loss_modules.crossmodal.logit_scale"] for d in (reference, resumed)]
    assert torch.equal(scale[0], scale[1])


def test_a_siglip_tower_from_a_recipe_and_a_user_checkpoint_from_model_path(tmp_path):
    """``vision_config.model_type: siglip_vision_model`` builds a SigLIP tower (no CLS: every patch is an image
    token); a saved LLaVA-style directory then trains from ``model.path`` with its own tokenizer."""
    r = shrunk("baseline", tmp_path)
    r["model"]["config"]["vision_config"]["model_type"] = "siglip_vision_model"
    r["evals"] = []
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(r))
    first = train(str(recipe), progress=False, echo=lambda _: None)
    config = json.loads((first / "model" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["vision_feature_select_strategy"] == "full"

    r2 = shrunk("siglip", tmp_path)
    r2["model"] = {"path": str(first / "model"), "tokenizer": {"kind": "pretrained"}, "freeze": ["vision_tower"]}
    r2["name"] = "from-user-checkpoint"
    recipe2 = tmp_path / "r2.yaml"
    recipe2.write_text(yaml.safe_dump(r2))
    second = train(str(recipe2), progress=False, echo=lambda _: None)
    results = json.loads((second / "results.json").read_text())
    assert results["model"]["trainable_params"] < results["model"]["total_params"]  # the tower stayed frozen
    assert results["evals"]["multimodal"]["after"]["scalars"]["num_examples"] > 0
