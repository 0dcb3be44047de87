"""build_model (from a config, from a local directory, from the HF cache), its one-line user errors, LoRA, saving."""

from __future__ import annotations

import copy
import logging
import time
import warnings

import pytest
import torch

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.build.models import apply_lora, build_model, count_parameters, save_model
from llm_limits.trainers.build.tokenizers import build_char_tokenizer

TINY = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64),
    # gpt2 through its aliases (n_embd, n_layer, n_head, n_positions)
    "gpt2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64),
}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny(tok, model_type="llama", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(model_type, {**TINY[model_type], **overrides}, vocab_size=len(tok),
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def batch(tok, texts=("hello world", "abc\ndef ok")):
    enc = tok(list(texts), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}


@pytest.fixture(scope="module")
def saved_llama(tok, tmp_path_factory):
    """A tiny llama saved with save_model; returns (dir, its logits on batch(tok)) — logits: [batch, seq, vocab]."""
    out = tmp_path_factory.mktemp("llama")
    model = tiny(tok).eval()
    save_model(model, tok, out)
    with torch.no_grad():
        logits = model(input_ids=batch(tok)["input_ids"]).logits
    return out, logits


# --- from a config -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_forward_gives_logits_batch_seq_vocab(tok, model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # gpt2's default ids (50256) must not leak in and warn
        model = tiny(tok, model_type)
    b = batch(tok)
    out = model(**b)
    assert out.logits.shape == (2, b["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)
    assert model.training
    cfg = model.config
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (len(tok), 0, 2, 3)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 32
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in set(model.parameters()))


def test_special_ids_not_given_are_none_not_class_defaults(tok):
    model = build_model("gpt2", TINY["gpt2"], vocab_size=len(tok))
    assert (model.config.bos_token_id, model.config.eos_token_id) == (None, None)  # not 50256


def test_dtype(tok):
    model = build_model("llama", TINY["llama"], vocab_size=len(tok), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(UserError, match=r"^model\.dtype: 'float64' is not one of float32, bfloat16, float16$"):
        build_model("llama", TINY["llama"], vocab_size=len(tok), dtype="float64")


def test_config_vocab_size_may_pad_but_not_shrink(tok):
    model = build_model("llama", {**TINY["llama"], "vocab_size": 128}, vocab_size=len(tok))
    assert model.get_input_embeddings().weight.shape == (128, 32)
    with pytest.raises(UserError, match=r"^model\.config\.vocab_size: 10 is smaller than the tokenizer's 100 tokens"):
        build_model("llama", {**TINY["llama"], "vocab_size": 10}, vocab_size=len(tok))


def test_unknown_config_key_suggests_the_right_one(tok):
    with pytest.raises(UserError) as err:
        build_model("llama", {"hidden_sise": 32}, vocab_size=len(tok))
    assert str(err.value) == "model.config.hidden_sise: unknown key for llama config (did you mean hidden_size?)"
    with pytest.raises(UserError, match=r"^model\.config\.n_layers: unknown key for gpt2 config \(did you mean n_layer\?\)$"):
        build_model("gpt2", {"n_layers": 2}, vocab_size=len(tok))
    with pytest.raises(UserError, match=r"^model\.config\.dtype: set by model\.dtype instead"):
        build_model("llama", {"dtype": "float16"}, vocab_size=len(tok))


def test_legacy_rope_theta_is_accepted(tok):
    model = build_model("llama", {**TINY["llama"], "rope_theta": 5000.0}, vocab_size=len(tok))
    assert model.config.rope_parameters["rope_theta"] == 5000.0


def test_unknown_model_type_says_did_you_mean(tok):
    with pytest.raises(UserError) as err:
        build_model("lamma", {}, vocab_size=len(tok))
    msg = str(err.value)
    assert msg.startswith("model.model_type: unknown model type 'lamma' (did you mean llama")
    assert "qwen2" in msg and "\n" not in msg
    with pytest.raises(UserError, match=r"^model\.model_type: 'vit' has no causal LM head"):
        build_model("vit", {}, vocab_size=len(tok))


def test_transformers_rejections_become_one_line_user_errors(tok):
    with pytest.raises(UserError) as err:
        build_model("llama", {"hidden_size": 33, "num_attention_heads": 2}, vocab_size=len(tok))
    assert str(err.value) == (
        "model.config: The hidden size (33) is not a multiple of the number of attention heads (2)."
    )
    with pytest.raises(UserError, match=r"^model\.config\.hidden_size: Field 'hidden_size' expected int, got str"):
        build_model("llama", {"hidden_size": "big"}, vocab_size=len(tok))
    with pytest.raises(UserError, match=r"^model\.config: `embed_dim` must be divisible by num_heads"):  # from the model
        build_model("gpt2", {"n_embd": 33, "n_head": 2}, vocab_size=len(tok))


def test_exactly_one_of_type_or_path(tok, saved_llama):
    with pytest.raises(UserError, match=r"^model: set exactly one of model_type .* or path"):
        build_model(None, {}, None, vocab_size=len(tok))
    with pytest.raises(UserError, match=r"^model: set exactly one of model_type"):
        build_model("llama", {}, str(saved_llama[0]), vocab_size=len(tok))


def test_trust_remote_code_is_off_unless_asked_and_warns(tok, caplog):
    with caplog.at_level(logging.WARNING, logger="llm_limits.trainers.build.models"):
        build_model("llama", TINY["llama"], vocab_size=len(tok))
        assert not caplog.records
        build_model("llama", TINY["llama"], vocab_size=len(tok), trust_remote_code=True)
    assert any("trusting remote code" in r.getMessage() for r in caplog.records)


def test_attn_implementation_is_passed_through(tok):
    model = build_model("llama", TINY["llama"], vocab_size=len(tok), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


# --- from a directory or the cache ---------------------------------------------------------------------------------
def test_save_and_load_round_trip_gives_identical_logits(tok, saved_llama):
    out, logits = saved_llama
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    loaded = build_model(None, {}, path=str(out), vocab_size=len(tok))
    assert loaded.training  # built to be trained
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=batch(tok)["input_ids"]).logits, logits)
    assert loaded.config.pad_token_id == 0


def test_path_config_overrides_are_checked_and_applied(tok, saved_llama):
    out, _ = saved_llama
    model = build_model(None, {"attention_dropout": 0.1}, str(out), vocab_size=len(tok), dtype="bfloat16")
    assert model.config.attention_dropout == 0.1 and model.dtype == torch.bfloat16
    with pytest.raises(UserError, match=r"^model\.config\.attention_dropuot: unknown key for llama config"):
        build_model(None, {"attention_dropuot": 0.1}, str(out), vocab_size=len(tok))


def test_tokenizer_larger_than_embeddings_is_a_user_error(tok, saved_llama):
    out, _ = saved_llama
    with pytest.raises(UserError) as err:
        build_model(None, {}, str(out), vocab_size=len(tok) + 5)
    assert str(err.value).startswith("model.tokenizer: vocab of 105 tokens but the model's embeddings have 100 rows")
    smaller = build_model(None, {}, str(out), vocab_size=50)  # a smaller tokenizer is fine
    assert smaller.get_input_embeddings().weight.shape[0] == 100


def test_uncached_hub_id_fails_fast_without_network(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        build_model(None, {}, "no-such-org/no-such-model", vocab_size=len(tok))
    assert time.monotonic() - start < 2.0
    assert str(err.value) == (
        "model.path: 'no-such-org/no-such-model' is not a local directory and is not in the Hugging Face cache "
        "(no network here; download it elsewhere or pass a local path)"
    )


def test_cached_hub_id_loads_from_the_cache(tok, saved_llama, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    out, logits = saved_llama
    commit = "0" * 40  # the layout huggingface_hub writes: refs/main -> snapshots/<commit>/<files>
    repo = tmp_path / "models--tiny-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (snapshot / name).write_bytes((out / name).read_bytes())
    start = time.monotonic()
    model = build_model(None, {}, "tiny-org/tiny-llama", vocab_size=len(tok)).eval()
    assert time.monotonic() - start < 5.0  # no network retries (transformers 5.23 would HEAD adapter_config.json)
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch(tok)["input_ids"]).logits, logits)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p / "missing", "{p}/missing does not exist (expected a local Hugging Face model directory"),
        (lambda p: p, "{p} is not a directory with a config.json (expected a local Hugging Face model directory)"),
    ],
)
def test_bad_local_paths(tok, tmp_path, make, expected):
    with pytest.raises(UserError) as err:
        build_model(None, {}, str(make(tmp_path)), vocab_size=len(tok))
    assert str(err.value).startswith("model.path: " + expected.format(p=tmp_path))


def test_config_without_weights_is_a_user_error(tok, saved_llama, tmp_path):
    (tmp_path / "config.json").write_bytes((saved_llama[0] / "config.json").read_bytes())
    with pytest.raises(UserError, match=r"^model\.path: could not load a causal LM from "):
        build_model(None, {}, str(tmp_path), vocab_size=len(tok))


# --- LoRA ----------------------------------------------------------------------------------------------------------
def test_lora_trains_adapters_only(tok):
    model = apply_lora(tiny(tok), r=4, alpha=8, dropout=0.0)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any("q_proj.lora_A" in n for n in trainable) and any("down_proj.lora_B" in n for n in trainable)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)  # all-linear skips the LM head
    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(named[n].numel() for n in trainable) and n_trainable < n_total

    before = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss = model(**batch(tok)).loss
    loss.backward()
    opt.step()
    for n, p in named.items():
        if n in trainable and ".lora_B." in n:
            assert not torch.equal(p, before[n]), n  # B starts at zero and gets the whole first update
        elif n not in trainable:
            assert torch.equal(p, before[n]), n


def test_lora_on_gpt2_conv1d_without_warnings(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = apply_lora(tiny(tok, "gpt2"), r=2, alpha=4, target_modules=["c_attn"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all("c_attn.lora_" in n for n in trainable)  # 2 layers x (A, B)
    assert model(**batch(tok)).logits.shape[-1] == len(tok)


def test_lora_user_errors(tok):
    with pytest.raises(UserError, match=r"^model\.lora\.target_modules: Target modules \{'q_prj'\} not found"):
        apply_lora(tiny(tok), target_modules=["q_prj"])
    with pytest.raises(UserError, match=r"^model\.lora\.r: expected a positive int \(got 0\)$"):
        apply_lora(tiny(tok), r=0)
    with pytest.raises(UserError, match=r"^model\.lora\.dropout: expected a probability in \[0, 1\)"):
        apply_lora(tiny(tok), dropout=1.5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 on transformers 5
def test_save_lora_writes_the_adapter_and_loads_on_its_base(tok, saved_llama, tmp_path):
    import peft

    base_dir, _ = saved_llama
    model = apply_lora(build_model(None, {}, str(base_dir), vocab_size=len(tok)), r=4, alpha=8)
    with torch.no_grad():  # make the adapter do something, so the reload check means something
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    model.eval()
    ids = batch(tok)["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_model(model, tok, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # base weights are not duplicated

    with pytest.raises(UserError, match=r"^model\.path: .* holds a LoRA adapter only, not a full model"):
        build_model(None, {}, str(tmp_path), vocab_size=len(tok))
    base = build_model(None, {}, str(base_dir), vocab_size=len(tok))
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-6)


def test_count_parameters_counts_tied_weights_once(tok):
    model = tiny(tok, "gpt2")  # gpt2 ties lm_head to the token embedding
    assert model.lm_head.weight is model.get_input_embeddings().weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model) == (sum(unique.values()), sum(unique.values()))
    frozen = copy.deepcopy(model).requires_grad_(False)
    assert count_parameters(frozen) == (0, sum(unique.values()))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    """``model.gradient_checkpointing: true`` recomputes activations in the backward: the loss and every gradient are
    those of the plain model (same seed, same batch), and a run with it trains."""
    import copy
    import json

    from tests.conftest import TINY
    from llm_limits.trainers.recipe.schema import validate_recipe
    from llm_limits.trainers.build.assemble import build
    from llm_limits.trainers.run import train

    grads, losses = [], []
    for on in (False, True):
        r = copy.deepcopy(TINY)
        r["model"]["gradient_checkpointing"] = on
        built, loader, _ = build(validate_recipe(r, "r.yaml"))
        assert bool(getattr(built.model, "is_gradient_checkpointing", False)) == on
        batch = next(iter(loader))
        out = built.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        out.loss.backward()
        losses.append(float(out.loss))
        grads.append({n: p.grad.clone() for n, p in built.model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)
    r = copy.deepcopy(TINY)
    r["model"]["gradient_checkpointing"] = True
    r.update(output_dir=str(tmp_path / "runs"), evals=[])
    r["trainer"]["max_steps"] = 2
    (tmp_path / "r.yaml").write_text(json.dumps(r))
    run_dir = train(str(tmp_path / "r.yaml"), progress=False, echo=lambda s: None)
    assert json.loads((run_dir / "results.json").read_text())["train"]["steps"] == 2
