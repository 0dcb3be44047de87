"""``model.rope_scaling`` (issue 21): linear, dynamic NTK, YaRN and llama3 written into transformers'
``rope_parameters``; the scaled config reaches the model's rotary embedding (its ``inv_freq`` and
``attention_scaling`` differ from the unscaled model's as each method says), for a model built from a config and for
a loaded checkpoint; the refusals; and PoSE + YaRN trains a few steps and saves a model that keeps its scaling."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from llm_limits.trainers.build.models import apply_rope_scaling, build_model
from llm_limits.trainers.recipe.errors import UserError

from tests.test_cli import run_cli

BASE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 128}


def _model(**scaling):
    torch.manual_seed(0)
    return build_model("llama", BASE, vocab_size=40, rope_scaling=scaling or None)


@pytest.fixture(scope="module")
def plain():
    return _model()


def test_linear_divides_every_frequency_by_the_factor(plain):
    m = _model(type="linear", factor=4.0)
    assert m.config.rope_parameters["rope_type"] == "linear" and m.config.max_position_embeddings == 512
    torch.testing.assert_close(m.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq / 4)
    assert m.model.rotary_emb.attention_scaling == 1.0


def test_yarn_keeps_high_frequencies_interpolates_low_ones_and_scales_attention(plain):
    m = _model(type="yarn", factor=4.0)
    p = m.config.rope_parameters
    assert p["rope_type"] == "yarn" and p["original_max_position_embeddings"] == 128
    assert m.config.max_position_embeddings == 512
    ratio = m.model.rotary_emb.inv_freq / plain.model.rotary_emb.inv_freq
    assert ratio[0] == pytest.approx(1.0)  # the fastest rotation (many turns in the window) is kept
    assert ratio[-1] == pytest.approx(0.25)  # the slowest is interpolated by 1/factor
    scale = m.model.rotary_emb.attention_scaling
    assert scale == pytest.approx(0.1 * math.log(4.0) + 1)  # the paper's sqrt(1/t) = 0.1 ln(s) + 1
    cos, _ = m.model.rotary_emb(torch.zeros(1, 1, 32), torch.zeros(1, 1, dtype=torch.long))
    assert cos[0, 0, 0].item() == pytest.approx(scale)  # the scale reaches what attention multiplies q and k by


def test_llama3_and_dynamic(plain):
    m = _model(type="llama3", factor=8.0)
    assert m.config.rope_parameters["low_freq_factor"] == 1.0 and m.config.rope_parameters["high_freq_factor"] == 4.0
    ratio = m.model.rotary_emb.inv_freq / plain.model.rotary_emb.inv_freq
    assert ratio[0] == pytest.approx(1.0) and ratio[-1] == pytest.approx(1 / 8)
    d = _model(type="dynamic", factor=4.0)
    assert d.config.max_position_embeddings == 128  # where its scaling starts
    rope = d.model.rotary_emb
    torch.testing.assert_close(rope.inv_freq, plain.model.rotary_emb.inv_freq)  # inside the window: unscaled
    rope(torch.zeros(1, 1, 32), torch.arange(400)[None])  # a forward reaching position 399 grows the base
    ratio = rope.inv_freq / plain.model.rotary_emb.inv_freq
    assert ratio[0] == pytest.approx(1.0) and (ratio[1:] < 1).all()


def test_a_loaded_checkpoint_gets_the_scaling_and_its_logits_change(tmp_path, plain):
    plain.save_pretrained(tmp_path / "ckpt")
    m = build_model(path=str(tmp_path / "ckpt"), vocab_size=40, rope_scaling={"type": "yarn", "factor": 2.0})
    assert m.config.rope_parameters["rope_type"] == "yarn" and m.config.max_position_embeddings == 256
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert not torch.allclose(m(ids).logits, plain.eval()(ids).logits, atol=1e-4)
    m.save_pretrained(tmp_path / "scaled")  # saved scaled: loading it with the scaling again would compound it
    with pytest.raises(UserError, match="already scaled"):
        build_model(path=str(tmp_path / "scaled"), vocab_size=40, rope_scaling={"type": "yarn", "factor": 2.0})
    again = build_model(path=str(tmp_path / "scaled"), vocab_size=40)  # ... and it loads scaled by itself
    assert again.config.rope_parameters["rope_type"] == "yarn"


def test_a_model_without_rope_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match="model.rope_scaling: a gpt2 model has no rotary position embeddings") as e:
        build_model("gpt2", {"n_embd": 32, "n_layer": 1, "n_head": 2}, vocab_size=40,
                    rope_scaling={"type": "linear", "factor": 2.0})
    assert "\n" not in str(e.value)
    gpt2 = build_model("gpt2", {"n_embd": 32, "n_layer": 1, "n_head": 2}, vocab_size=40)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="no rotary position embeddings"):  # a local checkpoint, found at build time
        build_model(path=str(tmp_path / "gpt2"), vocab_size=40, rope_scaling={"type": "yarn", "factor": 2.0})


def test_apply_rope_scaling_keeps_theta_and_an_explicit_original_window():
    from transformers import LlamaConfig

    c = apply_rope_scaling(LlamaConfig(max_position_embeddings=512, rope_theta=500000.0),
                           {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 16})
    assert c.rope_parameters == {"rope_type": "yarn", "factor": 4.0, "rope_theta": 500000.0,
                                 "original_max_position_embeddings": 256, "beta_fast": 16.0}
    assert c.max_position_embeddings == 1024


@pytest.mark.slow
def test_pose_with_yarn_trains_and_saves_the_scaled_model(tiny_recipe, write_recipe, tmp_path):
    """PoSE's skipped ids cover 512 positions of a 128-window Llama scaled 4x by YaRN: trains 3 steps (no
    warning about training past the window: the scaled window is 512), and model/ keeps the scaling."""
    r = copy.deepcopy(tiny_recipe)
    r["model"]["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    r["data"]["seq_len"] = 64
    r["trainer"].update(max_steps=3, log_every=1)
    r["mitigations"] = [{"name": "positional", "pose": {"enabled": True, "target_len": 512}}]
    r["evals"] = []
    out = run_cli("train", str(write_recipe(r)), "--no-progress", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
    (run_dir,) = [p for p in (tmp_path / "runs" / r["name"]).iterdir() if p.is_dir() and not p.is_symlink()]
    res = json.loads((run_dir / "results.json").read_text())
    assert math.isfinite(res["train"]["final_loss"])
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "yarn" and saved["max_position_embeddings"] == 512
    # beyond the scaled window: refused in one line before anything is written
    r["mitigations"][0]["pose"]["target_len"] = 1024
    bad = run_cli("train", str(write_recipe(r, "bad.yaml")), "--no-progress")
    assert bad.returncode == 2 and "pose.target_len: 1024 lies beyond the window model.rope_scaling covers" in bad.stderr
