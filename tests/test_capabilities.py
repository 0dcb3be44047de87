"""Capability checks (trainers/recipe/capabilities.py): each mitigation declares what it needs from the model, and the
build refuses a model without it in one line, before the run directory exists; a RoPE model trained past its nominal
window gets a one-line warning instead. The refusals through the CLI are bad-input cases
(``mitigation_pose_learned_positions``, ``mitigation_ssmax_learned_positions``, ``data_seq_len_past_learned_positions``,
``mitigation_crossmodal_text_model``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import GPT2Config, LlamaConfig, LlavaConfig

from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import Need
from llm_limits.mitigations.crossmodal.mitigation import CrossModalConfig
from llm_limits.mitigations.positional.mitigation import LogScalingConfig, PoseConfig, PositionalConfig
from llm_limits.trainers.recipe.capabilities import check_capabilities
from llm_limits.trainers.recipe.errors import UserError

GPT2 = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128)
LLAMA = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=128)


def recipe(seq_len: int = 32) -> SimpleNamespace:
    return SimpleNamespace(data=SimpleNamespace(seq_len=seq_len))


def pose(target_len: int | None = 512, enabled: bool = True):
    return MITIGATIONS["positional"](PositionalConfig(enabled=enabled, pose=PoseConfig(enabled=True, target_len=target_len)))


def test_needs_are_declared_only_for_what_is_enabled():
    assert pose().needs() == (Need("rotary", "pose"), Need("positions", "pose.target_len", 512))
    assert pose(target_len=None).needs() == (Need("rotary", "pose"),)
    assert pose(enabled=False).needs() == ()
    ssmax = MITIGATIONS["positional"](PositionalConfig(log_scaling=LogScalingConfig(enabled=True)))
    assert ssmax.needs() == (Need("rotary", "log_scaling"),)
    assert MITIGATIONS["positional"]().needs() == ()
    assert MITIGATIONS["crossmodal"](CrossModalConfig()).needs() == (Need("vision", ""),)
    assert MITIGATIONS["noop"]().needs() == ()


def test_pose_on_learned_positions_is_refused_naming_mitigation_model_and_what_is_missing():
    with pytest.raises(UserError) as e:
        check_capabilities(recipe(), GPT2, [pose()], vision=False)
    line = str(e.value)
    assert "\n" not in line
    assert line.startswith("mitigations[0].pose: positional: ")
    assert "rotary position embeddings" in line and "'gpt2'" in line and "n_positions=128" in line


def test_a_disabled_mitigation_needs_nothing():
    assert check_capabilities(recipe(), GPT2, [pose(enabled=False)], vision=False) == []


def test_rope_past_its_window_is_a_one_line_warning():
    warnings = check_capabilities(recipe(seq_len=256), LLAMA, [pose(target_len=512)], vision=False)
    assert len(warnings) == 2
    assert warnings[0].startswith("mitigations[0].pose.target_len: positional trains position ids up to 512, past the "
                                  "llama model's max_position_embeddings=128")
    assert warnings[1].startswith("data.seq_len: rows of 256 tokens train past the llama model's")
    assert all("\n" not in w for w in warnings)
    assert check_capabilities(recipe(seq_len=128), LLAMA, [pose(target_len=128)], vision=False) == []


def test_rows_past_a_learned_table_are_refused():
    with pytest.raises(UserError, match=r"^data\.seq_len: rows of 129 tokens, but model type 'gpt2' has 128 learned"):
        check_capabilities(recipe(seq_len=129), GPT2, [], vision=False)
    assert check_capabilities(recipe(seq_len=128), GPT2, [], vision=False) == []


def test_vision_need_and_the_language_model_of_a_vlm():
    crossmodal = MITIGATIONS["crossmodal"](CrossModalConfig())
    with pytest.raises(UserError, match=r"^mitigations\[0\]: crossmodal aligns images with text: .*'llama' has no vision"):
        check_capabilities(recipe(), LLAMA, [crossmodal], vision=False)
    llava = LlavaConfig(text_config=LLAMA.to_dict())
    assert check_capabilities(recipe(), llava, [crossmodal, pose(target_len=64)], vision=True) == []


def test_training_a_rope_model_past_its_window_runs_with_one_warning_line(tiny_recipe, write_recipe, tmp_path, monkeypatch):
    """Through the CLI: PoSE to 512 and 160-token rows on a llama with max_position_embeddings=128 train (exit 0),
    and each excess is one ``warning:`` line; the same PoSE on a gpt2 is refused before any run directory exists."""
    from tests.test_cli import run_in_process

    monkeypatch.chdir(tmp_path)
    tiny_recipe["data"]["seq_len"] = 160
    tiny_recipe["data"]["params"]["doc_chars"] = 400
    tiny_recipe["trainer"].update(max_steps=1, warmup_steps=0)
    tiny_recipe["mitigations"] = [{"name": "positional", "pose": {"enabled": True, "target_len": 512}}]
    tiny_recipe["evals"] = []
    out = run_in_process("train", str(write_recipe(tiny_recipe)), "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    warnings = [l for l in out.stderr.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 2, out.stderr
    assert "mitigations[0].pose.target_len: positional trains position ids up to 512" in warnings[0]
    assert "data.seq_len: rows of 160 tokens train past the llama model's max_position_embeddings=128" in warnings[1]

    tiny_recipe["model"] = {"model_type": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 512},
                            "tokenizer": {"kind": "char"}}
    tiny_recipe["output_dir"] = str(tmp_path / "gpt2-runs")
    path = write_recipe(tiny_recipe, "gpt2.yaml")
    out = run_in_process("train", str(path), "--no-progress")
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert "PoSE's skipped position ids need rotary position embeddings (RoPE); model type 'gpt2'" in out.stderr
    assert not (tmp_path / "gpt2-runs").exists()
