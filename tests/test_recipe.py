"""The recipe schema, overrides and their one-line errors; every recipe under recipes/ validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_limits.mitigations.noop import NoOpConfig
from llm_limits.evals.positional_loss import PositionalLossConfig
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import apply_overrides, load_recipe, validate_recipe

from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_tiny_recipe_resolves_typed_entries(tiny_recipe):
    r = validate_recipe(tiny_recipe, "t.yaml")
    assert r.recipe.trainer.max_steps == 6
    assert r.recipe.trainer.lr_schedule == "cosine"  # default filled in
    (name, cfg), = r.mitigations
    assert name == "noop" and isinstance(cfg, NoOpConfig) and cfg.enabled is True
    (ename, ecfg, when), = r.evals
    assert ename == "positional_loss" and isinstance(ecfg, PositionalLossConfig)
    assert ecfg.seq_len == 64 and ecfg.tolerance == pytest.approx(0.10)
    assert when == ["before", "after"]
    # the resolved dict round-trips through validation unchanged
    again = validate_recipe(r.to_dict(), "again")
    assert again.to_dict() == r.to_dict()


def test_overrides_set_nested_keys_and_list_items():
    data = {"trainer": {"max_steps": 5}, "mitigations": [{"name": "noop", "enabled": True}]}
    out = apply_overrides(data, ["trainer.max_steps=50", "model.config.hidden_size=128", "mitigations.0.enabled=false",
                                 "tracking.wandb.tags=[a, b]", "name=x=y"])
    assert out["trainer"]["max_steps"] == 50
    assert out["model"]["config"]["hidden_size"] == 128
    assert out["mitigations"][0]["enabled"] is False
    assert out["tracking"]["wandb"]["tags"] == ["a", "b"]
    assert out["name"] == "x=y"  # only the first '=' splits
    assert data["trainer"]["max_steps"] == 5  # the input is not modified


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps", "expected KEY.PATH=VALUE"),
        ("=3", "expected KEY.PATH=VALUE"),
        ("mitigations.7.enabled=false", "mitigations.7: expected a list index < 1"),
        ("trainer.max_steps.x=1", "trainer.max_steps is a int, not a section"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        apply_overrides({"trainer": {"max_steps": 5}, "mitigations": [{"name": "noop"}]}, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_step=5", "t.yaml: trainer.max_step: unknown key (did you mean max_steps?)"),
        ("trainer.max_steps=-5", "t.yaml: trainer.max_steps: expected an integer >= 1 (got -5)"),
        ("trainer.max_steps=abc", "t.yaml: trainer.max_steps: expected an integer (got 'abc')"),
        ("trainer.lr=0", "t.yaml: trainer.lr: expected a number > 0 (got 0)"),
        ("trainer.strategy=fsdp", "t.yaml: trainer.strategy: expected one of 'auto', 'ddp'"),
        ("trainer.warmup_steps=6", "t.yaml: trainer: warmup_steps must be < max_steps (got 6 >= 6)"),
        ("modle.x=1", "t.yaml: modle: unknown key (did you mean model?)"),
        ("model.path=/some/dir", "t.yaml: model: set exactly one of model_type"),
        ("data.task=synthetic_txt", "t.yaml: data: unknown task 'synthetic_txt' (did you mean synthetic_text?)"),
        ("mitigations.0.name=nop", "t.yaml: mitigations[0].name: unknown mitigation 'nop' (did you mean noop?)"),
        ("mitigations.0.log_evry=3", "t.yaml: mitigations[0].log_evry: unknown key (did you mean log_every?)"),
        ("mitigations.0.log_every=often", "t.yaml: mitigations[0].log_every: expected an integer (got 'often')"),
        ("evals.0.name=positional", "t.yaml: evals[0].name: unknown eval 'positional' (did you mean positional_loss?)"),
        ("evals.0.tolerence=0.2", "t.yaml: evals[0].tolerence: unknown key (did you mean tolerance?)"),
        ("evals.0.when=[during]", "t.yaml: evals[0].when[0]: expected one of 'before' or 'after' (got 'during')"),
        ("evals.0.seq_len=60", "t.yaml: evals[0]: positional_loss: seq_len must be a multiple of bucket_size"),
        ("tracking.wandb.mode=cloud", "t.yaml: tracking.wandb.mode: expected one of 'offline', 'online' or 'disabled'"),
        ("name=has space", "t.yaml: name: expected letters, digits"),
        ("trainer.strategy=deepspeed_stage_2", "t.yaml: trainer.strategy: deepspeed_stage_2 needs CUDA GPUs"),
    ],
)
def test_schema_errors_name_the_field(tiny_recipe, override, message):
    data = apply_overrides(tiny_recipe, [override])
    with pytest.raises(UserError) as info:
        validate_recipe(data, "t.yaml")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_missing_required_section(tiny_recipe):
    del tiny_recipe["model"]
    with pytest.raises(UserError, match=r"^t\.yaml: model: required field is missing$"):
        validate_recipe(tiny_recipe, "t.yaml")


def test_yaml_syntax_error_names_line(write_recipe):
    path = write_recipe("name: x\nmodel: [unclosed\n")
    with pytest.raises(UserError, match=rf"^{path}:\d+:\d+: YAML syntax error"):
        load_recipe(path)


def test_missing_file_and_non_mapping(tmp_path, write_recipe):
    with pytest.raises(UserError, match=r"nope\.yaml: file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match=r"expected a mapping of recipe sections at the top level \(got list\)"):
        load_recipe(write_recipe("- a\n- b\n"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_validates_and_opens_with_its_launch_line(path: Path):
    first = path.read_text().splitlines()[0]
    launch = first.startswith("# llm-limits ") or (first.startswith("# torchrun ") and "-m llm_limits.trainers.cli train" in first)
    assert launch, f"{path}: first line must be its launch command"
    assert str(path.relative_to(REPO)) in first, f"{path}: the launch line must name this file"
    load_recipe(path, check_hardware=False)


def test_there_are_recipes():
    assert any(p.name == "tiny-lm.yaml" for p in RECIPES)
