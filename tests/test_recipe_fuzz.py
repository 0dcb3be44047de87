"""The recipe fuzzer (hypothesis): every recipe under recipes/, mutated, must end in exit 0 or exit 2 with ONE line
naming the recipe file, with no traceback and nothing written.

Mutations: drop a key (or a list item), add an unknown key, swap a value's type, push a number out of its range, and
cross the recipe with a model family (llama, qwen2, gpt2, llava), a backend (lightning, trl with each algorithm) and
mitigations and evals taken from the other recipes. Each mutated recipe goes through what ``llm-limits train`` does
before it creates a run directory, in this process (:func:`prepare_like_train`: load and validate with the hardware
check, build with the data, every mitigation's setup); a :class:`UserError` must be one line that names the recipe
file, anything else raised is a failure (the CLI would print its traceback). A few mutations of the cheap recipes also
train one step through the CLI in this process (exit 0, or exit 2 with one stderr line and no run directory).

How many: the ``ci`` profile (the default, what ``make test`` runs) tries a bounded number, derandomized so the suite
is deterministic; ``make fuzz`` sets ``LLM_LIMITS_FUZZ=<n>`` (5000) for the ``fuzz`` profile, random each run. A
failure prints the mutated recipe (hypothesis shrinks it first); each one found became a bad-input case
(docs/reliability.md lists them).

Recipes that name a pretrained model (``model.pretrained``: recipes/real/) and models above
:data:`MAX_BUILD_PARAMS` (a mutation that drops ``hidden_size`` gets transformers' default, a 7B Llama) are validated,
not built: building them would pull a model or allocate gigabytes, which says nothing about the recipe's checks.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO
from tests.test_cli import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

FUZZ = int(os.environ.get("LLM_LIMITS_FUZZ", "0") or 0)
"""``make fuzz`` sets it to the number of mutations to try (the ``fuzz`` profile); 0 = the ``ci`` profile."""

settings.register_profile(
    "ci", max_examples=60, derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "fuzz", max_examples=max(FUZZ, 1), deadline=None, database=None, print_blob=True,
    phases=[Phase.generate, Phase.shrink],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PROFILE = settings.get_profile("fuzz" if FUZZ else "ci")

RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml"))
TRAINABLE = [p for p in RECIPES if "real" not in p.parts and p.name.startswith("tiny-")]
"""Recipes whose models are tiny and local: candidates for the one-step CLI runs."""
MAX_BUILD_PARAMS = 20_000_000
"""Above this, a mutated model is validated but not built (see the module doc)."""

TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "max_position_embeddings": 256}
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", "config": dict(TINY_TEXT), "tokenizer": {"kind": "char"}},
    "qwen2": {"model_type": "qwen2", "config": dict(TINY_TEXT), "tokenizer": {"kind": "char"}},
    "gpt2": {"model_type": "gpt2", "config": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128},
             "tokenizer": {"kind": "char"}},
    "llava": {"model_type": "llava", "tokenizer": {"kind": "char"}, "config": {
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "text_config": {"model_type": "llama", **TINY_TEXT}}},
}
BACKENDS = [{"backend": "lightning"}, {"backend": "trl", "trl": {"algorithm": "sft"}},
            {"backend": "trl", "trl": {"algorithm": "grpo"}}, {"backend": "trl", "trl": {"algorithm": "prm"}}]
EXTRA_MITIGATIONS = [
    {"name": "positional", "pose": {"enabled": True, "target_len": 512}},
    {"name": "positional", "log_scaling": {"enabled": True}},
    {"name": "positional", "warmup": {"enabled": True, "min_len": 16}},
    {"name": "positional", "balanced": {"enabled": True}},
    {"name": "noop"},
]
SHRINK = {"num_examples": 64, "num_docs": 64, "num_facts": 64, "examples_per_cell": 2, "num_chains": 64}
"""Sizes capped in every base recipe, so a build takes a fraction of a second (the checks do not depend on them)."""

# Values a swap may put anywhere, and out-of-range numbers. None above 1000: a number may land on a size (an image
# side, a hidden size, a count of examples), and a valid but huge size is not a bug, only gigabytes on this machine.
ODD_VALUES = [None, "", "x", "12", -1, 0, 1, 0.5, -0.5, 3.7, True, False, [], [1], {}, {"k": 1}, 1e-12, 1000]
OUT_OF_RANGE = [-1, 0, 1, 2, 3, -0.1, 0.0, 1.5, 7, 8, 100, 999, 1000]
UNKNOWN_KEYS = ["foo", "enabled", "seed", "name", "max_len", "lengths", "path", "extra"]


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


BASE = {str(p.relative_to(REPO)): _load(p) for p in RECIPES}
MITIGATION_POOL = [m for d in BASE.values() for m in (d.get("mitigations") or [])] + EXTRA_MITIGATIONS
EVAL_POOL = [e for d in BASE.values() for e in (d.get("evals") or [])]


def shrink(data: Any) -> Any:
    """The recipe with its data and eval sizes capped (:data:`SHRINK`)."""
    if isinstance(data, dict):
        return {k: (min(v, SHRINK[k]) if k in SHRINK and isinstance(v, int) and not isinstance(v, bool) else shrink(v))
                for k, v in data.items()}
    if isinstance(data, list):
        return [shrink(v) for v in data]
    return data


def paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a dict value or list item inside ``data`` (keys and indices)."""
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append(prefix + (k,))
            out += paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.append(prefix + (i,))
            out += paths(v, prefix + (i,))
    return out


def containers(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a dict inside ``data`` (the root included)."""
    out = [prefix] if isinstance(data, dict) else []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for k, v in items:
        out += containers(v, prefix + (k,))
    return out


def get(data: Any, path: tuple) -> Any:
    for k in path:
        data = data[k]
    return data


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@st.composite
def mutated_recipes(draw) -> tuple[str, dict[str, Any], list[str]]:
    """(base recipe, mutated dict, what was done) for one to four mutations of one recipe under recipes/."""
    base = draw(st.sampled_from(sorted(BASE)))
    data = shrink(copy.deepcopy(BASE[base]))
    done: list[str] = []
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "add", "swap", "number", "family", "backend", "mitigations", "evals"]))
        if op == "drop" and (ps := paths(data)):
            p = draw(st.sampled_from(ps))
            parent = get(data, p[:-1])
            del parent[p[-1]]
        elif op == "add":
            p = draw(st.sampled_from(containers(data)))
            key = draw(st.sampled_from(UNKNOWN_KEYS))
            get(data, p)[key] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))  # never the shared {} or []
        elif op == "swap" and (ps := paths(data)):
            p = draw(st.sampled_from(ps))
            get(data, p[:-1])[p[-1]] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))
        elif op == "number" and (ps := [p for p in paths(data) if is_number(get(data, p))]):
            p = draw(st.sampled_from(ps))
            get(data, p[:-1])[p[-1]] = draw(st.sampled_from(OUT_OF_RANGE))
        elif op == "family":
            family = draw(st.sampled_from(sorted(FAMILIES)))
            model = copy.deepcopy(FAMILIES[family])
            old = data.get("model") if isinstance(data.get("model"), dict) else {}
            for k in ("lora", "freeze", "dtype", "gradient_checkpointing"):
                if k in old and draw(st.booleans()):
                    model[k] = old[k]
            data["model"] = model
            p = ("model",)
        elif op == "backend":
            trainer = data.get("trainer") if isinstance(data.get("trainer"), dict) else {}
            trainer = {k: v for k, v in trainer.items() if k not in ("backend", "trl")}
            trainer.update(copy.deepcopy(draw(st.sampled_from(BACKENDS))))
            data["trainer"] = trainer
            p = ("trainer", trainer["backend"], str(trainer.get("trl", {}).get("algorithm", "")))
        elif op == "mitigations":
            data["mitigations"] = copy.deepcopy(draw(st.lists(st.sampled_from(MITIGATION_POOL), max_size=2)))
            p = ("mitigations", *[m.get("name", "?") for m in data["mitigations"]])
        elif op == "evals":
            data["evals"] = shrink(copy.deepcopy(draw(st.lists(st.sampled_from(EVAL_POOL), max_size=2))))
            p = ("evals", *[e.get("name", "?") for e in data["evals"]])
        else:
            continue
        done.append(f"{op} {'.'.join(map(str, p))}")
    return base, data, done


# --- what train does before the run directory exists --------------------------------------------------------------------
def model_params(resolved: Any) -> int:
    """Parameters of the model the recipe would build (on the meta device: nothing allocated); 0 when its config
    cannot be built (the build then refuses it before allocating anything)."""
    import torch
    import transformers

    m = resolved.recipe.model
    if m.model_type is None:
        return 0
    try:
        config = transformers.AutoConfig.for_model(m.model_type, **dict(m.config or {}))
        with torch.device("meta"):
            if m.model_type == "llava":
                model = transformers.LlavaForConditionalGeneration(config)
            else:
                model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:
        return 0
    return sum(p.numel() for p in model.parameters())


def prepare_like_train(path: Path) -> str:
    """What ``llm-limits train`` does before it makes the run directory (trainers/run.py ``_train``: load with the
    hardware check, build with the data, every mitigation's setup). Returns how far it went."""
    from llm_limits.trainers.backends import HookDriver
    from llm_limits.trainers.build.assemble import build
    from llm_limits.trainers.recipe.schema import load_recipe

    resolved = load_recipe(path, [])
    r = resolved.recipe
    if r.model.pretrained is not None or model_params(resolved) > MAX_BUILD_PARAMS:
        return "validated"
    built, _, _ = build(resolved)
    HookDriver.prepare(built.model, built.mitigations, built.tokenizer, max_tokens=r.trainer.max_tokens)
    return "built"


def written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def check_mutation(data: Any, where: str) -> str:
    """Run one mutated recipe in a fresh folder (the working directory while it runs); assert the rule; return the
    outcome (``validated``, ``built`` or ``refused``)."""
    from llm_limits.trainers.recipe.errors import UserError

    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        recipe = root / "recipe.yaml"
        if isinstance(data, dict):
            data["output_dir"] = str(root / "out")
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        cwd = os.getcwd()
        os.chdir(root)
        try:
            outcome = prepare_like_train(recipe)
        except UserError as e:
            line = str(e)
            assert line.strip() and "\n" not in line, f"{where}: a multi-line error:\n{line}"
            assert line.startswith(f"{recipe}: "), f"{where}: the error does not name the recipe file: {line}"
            outcome = "refused"
        finally:
            os.chdir(cwd)
        assert written(root) == ["recipe.yaml"], f"{where}: wrote {written(root)}"
    return outcome


OUTCOMES: dict[str, int] = {}
FAILURES: list[str] = []
"""``make fuzz`` only: every failing mutation, so one long run reports all it found (the ``ci`` profile raises at the
first, and hypothesis shrinks it)."""
STARTED = time.time()


@pytest.mark.timeout(0 if FUZZ else 600)  # make fuzz runs for half an hour; the suite's per-test limit would end it
@PROFILE
@given(case=mutated_recipes())
def test_mutated_recipes_are_refused_in_one_line_or_accepted(case):
    base, data, done = case
    where = f"{base} after {done}"
    try:
        outcome = check_mutation(copy.deepcopy(data), where)
    except Exception as e:  # noqa: BLE001 -- a long fuzz run collects every failure, then reports them all
        if not FUZZ:
            raise
        FAILURES.append(f"{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n"
                        f"{yaml.safe_dump(data, sort_keys=False)}")
        outcome = "failed"
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


def test_the_fuzzer_reaches_the_build_and_the_refusals():
    """The run above was no walk through the schema's first check alone: some mutations were built, some refused
    (run after it, in file order); under ``make fuzz``, none failed."""
    if not OUTCOMES:
        pytest.skip("the fuzz test did not run in this session")
    total = sum(OUTCOMES.values())
    print(f"\nfuzz: {total} mutations in {time.time() - STARTED:.0f} s: {OUTCOMES}")
    for failure in FAILURES:
        print(f"FAILED: {failure}")
    assert not FAILURES, f"{len(FAILURES)} of {total} mutations failed (printed above)"
    assert OUTCOMES.get("built", 0) > 0 and OUTCOMES.get("refused", 0) > 0, OUTCOMES


@settings(PROFILE, max_examples=4 if not FUZZ else max(FUZZ // 250, 4))
@given(base=st.sampled_from([str(p.relative_to(REPO)) for p in TRAINABLE]),
       family=st.sampled_from(sorted(FAMILIES)), mitigation=st.sampled_from(MITIGATION_POOL))
def test_one_step_through_the_cli_exits_0_or_refuses_in_one_line(base, family, mitigation):
    """A tiny recipe crossed with a model family and a mitigation, trained for one step through the CLI: exit 0 with a
    run directory, or exit 2 with one stderr line and no run directory."""
    data = shrink(copy.deepcopy(BASE[base]))
    data["model"] = copy.deepcopy(FAMILIES[family])
    data["mitigations"] = [copy.deepcopy(mitigation)]
    data["evals"] = []
    trainer = data.setdefault("trainer", {})
    trainer.update(max_steps=1, warmup_steps=0, checkpoint_every=0, val_every=1)
    for k in ("max_tokens", "warmup_tokens", "stages"):
        trainer.pop(k, None)
    data.setdefault("tracking", {})["wandb"] = {"mode": "disabled"}
    with tempfile.TemporaryDirectory(prefix="fuzz-step-") as tmp:
        root = Path(tmp)
        data["output_dir"] = str(root / "out")
        recipe = root / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        cwd = os.getcwd()
        os.chdir(root)
        try:
            out = run_in_process("train", str(recipe), "--no-progress")
        finally:
            os.chdir(cwd)
        where = f"{base} x {family} x {mitigation}: rc={out.returncode}\n{out.stderr[-3000:]}"
        assert "Traceback" not in out.stdout + out.stderr, where
        assert out.returncode in (0, 2), where
        if out.returncode == 2:
            lines = [l for l in out.stderr.splitlines() if l.strip()]
            assert len(lines) == 1 and lines[0].startswith(f"error: {recipe}: "), where
            assert written(root) == ["recipe.yaml"], where
        else:
            assert list((root / "out").glob("*/*/model")), where
