"""The bad-input catalogue (tests/bad_inputs/): every mistake a user can make in a recipe, a data file or on the
command line is answered with exit code 2 and ONE line on stderr that names the file (and the field or line) and
says what was expected; no traceback, nothing written, and an existing run directory left exactly as it was.

The cases and their expected messages are listed in ``tests/bad_inputs/cases.yaml`` (the placeholders are explained
there) and, as a table, in ``tests/bad_inputs/CASES.md``. Every case is copied into a tmp folder, its placeholders
filled in, and run in this process (Typer's runner); one case also runs as a real subprocess for the exit code.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, TINY
from tests.test_cli import run_in_process

pytestmark = pytest.mark.usefixtures("one_thread")

CATALOGUE = REPO / "tests" / "bad_inputs"
INDEX = CATALOGUE / "cases.yaml"
TABLE = CATALOGUE / "CASES.md"
NAME = "bad-input"
"""The ``name`` of every recipe in the catalogue (and of the existing run): a run they made would land beside it."""
TINY_ALPHABET = "abc"
"""The saved tiny model's tokenizer: 4 special tokens + 3 characters = 7 embedding rows."""
WANDB_NOTICE = "[INFO] Running in WANDB offline mode"
"""Printed to stdout by ``transformers.integrations`` when it is first imported with ``WANDB_MODE=offline`` in the
environment, as this suite has it (conftest.py). Not the CLI's own output: the in-process runs tolerate this one line
on stdout, and the subprocess test runs without ``WANDB_MODE`` (as a user does), where stdout must be empty."""

CASES: list[dict[str, Any]] = yaml.safe_load(INDEX.read_text())
BY_ID = {c["case"]: c for c in CASES}


# --- fixtures ----------------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, Any]:
    """Every entry under ``root``: file contents, symlink targets, and directories (empty ones included)."""
    out: dict[str, Any] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", str(p.readlink()))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = ("file", p.read_bytes())
    return out


@pytest.fixture(scope="module")
def out_root(tmp_path_factory) -> dict[str, Any]:
    """The ``output_dir`` of every case, holding one existing run ``<out>/bad-input/existing-run/`` (a valid resolved
    recipe, results, a marker file and a model folder) and its snapshot."""
    out = tmp_path_factory.mktemp("out")
    run = out / NAME / "existing-run"
    (run / "model").mkdir(parents=True)
    recipe = copy.deepcopy(TINY)
    recipe.update(name=NAME, output_dir=str(out))
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (run / "results.json").write_text('{"name": "bad-input", "evals": {}}\n')
    (run / "MARKER").write_text("an existing run: no bad input may touch it\n")
    (run / "model" / "config.json").write_text("{}\n")
    return {"out": out, "run": run, "snapshot": snapshot(out)}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama saved with a 3-character tokenizer (7 embedding rows)."""
    import torch

    from llm_limits.trainers.build.models import build_model, save_model
    from llm_limits.trainers.build.tokenizers import build_char_tokenizer

    torch.manual_seed(0)
    tok = build_char_tokenizer(TINY_ALPHABET)
    model = build_model("llama", TINY["model"]["config"], vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-model") / "model"
    save_model(model, tok, path)
    return path


def prepare(case: dict[str, Any], tmp_path: Path, out_root: dict[str, Any], request) -> dict[str, str]:
    """Copy the case into ``tmp_path/case/``, fill in its placeholders, and return the placeholder values."""
    src = CATALOGUE / case["case"]
    dest_root = tmp_path / "case"
    dest_root.mkdir()
    if src.is_dir():
        case_dir = dest_root / src.name
        shutil.copytree(src, case_dir)
        recipe = case_dir / "recipe.yaml"
    else:
        case_dir = dest_root
        recipe = case_dir / src.name
        shutil.copy2(src, recipe)
    values = {"@RECIPE@": str(recipe), "@CASE_DIR@": str(case_dir), "@OUT@": str(out_root["out"]),
              "@RUN@": str(out_root["run"])}
    uses_model = "@TINY_MODEL@" in yaml.safe_dump(case) or any(
        b"@TINY_MODEL@" in f.read_bytes() for f in case_dir.rglob("*") if f.is_file())
    if uses_model:
        values["@TINY_MODEL@"] = str(request.getfixturevalue("tiny_model"))
    for f in case_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for key, value in values.items():
                data = data.replace(key.encode(), value.encode())
            f.write_bytes(data)
    return values


def fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    assert not re.search(r"@[A-Z_]+@", text), f"unfilled placeholder: {text}"
    return text


def check_one_line_error(out, case: dict[str, Any], values: dict[str, str]) -> str:
    """The rule every bad input obeys; returns the error line."""
    where = f"{case['case']}: rc={out.returncode}\nstdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-3000:]}"
    assert "Traceback" not in out.stdout + out.stderr, where
    assert out.returncode == 2, where
    assert [l for l in out.stdout.splitlines() if l.strip() and l.strip() != WANDB_NOTICE] == [], where
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), where
    line = lines[0]
    assert line.startswith("error: "), where
    expect = fill(case["expect"], values)
    assert expect in line, f"{where}\nexpected fragment: {expect}"
    for name in case.get("names", ["@RECIPE@"]):
        assert fill(name, values) in line, f"{where}\nshould name: {fill(name, values)}"
    return line


# --- the catalogue -------------------------------------------------------------------------------------------------------
def test_catalogue_is_complete_and_documented():
    assert len(CASES) >= 30
    assert len(BY_ID) == len(CASES), "duplicate case"
    on_disk = {p.name for p in CATALOGUE.iterdir()} - {"cases.yaml", "CASES.md", "__pycache__"}
    assert on_disk == set(BY_ID), f"files without a case: {on_disk - set(BY_ID)}; cases without files: {set(BY_ID) - on_disk}"
    for case in CASES:
        assert set(case) <= {"case", "args", "expect", "names", "why"} and {"case", "args", "expect", "why"} <= set(case)
        assert case["args"][0] in ("train", "eval", "ablate", "compare", "validate"), case
    # CASES.md: one table row per case, with its command and its expected fragment
    rows: dict[str, str] = {}
    in_table = False
    for line in TABLE.read_text().splitlines():
        if line.startswith("| case |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table and (m := re.match(r"^\| `([^`]+)` \|", line)):
            assert m.group(1) not in rows, f"CASES.md lists {m.group(1)} twice"
            rows[m.group(1)] = line
    assert set(rows) == set(BY_ID), f"CASES.md rows differ from cases.yaml: {set(rows) ^ set(BY_ID)}"
    for cid, case in BY_ID.items():
        assert f"`{case['args'][0]}" in rows[cid], cid
        assert case["expect"].replace("|", "\\|") in rows[cid], f"CASES.md row of {cid} lacks its fragment"


@pytest.mark.parametrize("cid", list(BY_ID))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cid, tmp_path, out_root, request, monkeypatch):
    case = BY_ID[cid]
    values = prepare(case, tmp_path, out_root, request)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working directory either
    case_before = snapshot(tmp_path / "case")
    out = run_in_process(*[fill(a, values) for a in case["args"]])
    check_one_line_error(out, case, values)
    assert snapshot(out_root["out"]) == out_root["snapshot"], f"{cid} wrote into the output_dir"
    assert snapshot(tmp_path / "case") == case_before, f"{cid} wrote beside its inputs"
    assert not any(cwd.iterdir()), f"{cid} wrote into the working directory: {list(cwd.iterdir())}"


def test_real_process_exit_code(tmp_path, out_root, request):
    """One case as a user runs it: the installed ``llm-limits`` in its own process, without WANDB_MODE in the
    environment; its own exit code, one stderr line and an empty stdout."""
    case = BY_ID["recipe_unknown_nested_key.yaml"]
    values = prepare(case, tmp_path, out_root, request)
    script = Path(sys.executable).with_name("llm-limits")
    cli = [str(script)] if script.is_file() else [sys.executable, "-m", "llm_limits.trainers.cli"]
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    env.update(HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    out = subprocess.run([*cli, *[fill(a, values) for a in case["args"]]], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    check_one_line_error(out, case, values)
    assert out.stdout == ""
    assert snapshot(out_root["out"]) == out_root["snapshot"]


def test_existing_run_is_untouched_after_the_catalogue(out_root):
    """After every case above: the existing run has the same files and bytes, and no run directory was added."""
    assert snapshot(out_root["out"]) == out_root["snapshot"]
    assert sorted(p.name for p in (out_root["out"] / NAME).iterdir()) == ["existing-run"]
    assert sorted(p.name for p in out_root["out"].iterdir()) == [NAME]
