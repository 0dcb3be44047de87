"""Our import names are ours alone (ARCHITECTURE.md, "Import names").

Installed, mitigations/, evals/ and trainers/ are ``llm_limits.mitigations``, ``llm_limits.evals`` and
``llm_limits.trainers`` (pyproject.toml's package-dir); nothing of ours claims the generic top-level names
``evals``, ``trainers`` or ``mitigations``, and no launch depends on the working directory.

a. A foreign distribution that ships a top-level ``evals`` package (as openai's ``evals`` does), first on the import
   path: our CLI and our modules still import our code, never the foreign one, and ``import evals`` in the same
   process still gives the foreign package.
b. A working directory holding unrelated ``evals/``, ``trainers/`` and ``mitigations/`` packages that raise on import
   (``python -m`` and torchrun ``-m`` put the working directory first on ``sys.path``): training and validation still
   run our code.
c. pyproject.toml's explicit package list names every package folder under the three, so none is left out of a wheel.
d. No Python file of the repository imports the bare names (import statements, ``import_module`` and patch targets,
   ``-m`` argument lists), nor does a launch script or recipe line run ``-m trainers...``.

Each check can fail, and a canary test beside it shows how (its comment says what trips it).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BARE = ("evals", "trainers", "mitigations")
"""The top-level folders, and the generic names we must never claim or import."""

FOREIGN_MARKER = "foreign stand-in for openai's evals"
FOREIGN_INIT = f'''"""A foreign top-level package (not ours): records that it was imported."""
import os

FOREIGN = {FOREIGN_MARKER!r}
if os.environ.get("FOREIGN_IMPORT_LOG"):
    with open(os.environ["FOREIGN_IMPORT_LOG"], "a") as f:
        f.write(__name__ + "\\n")
'''

PROBE = '''"""Import the modules named on the command line, report where each came from, then `import evals`."""
import importlib, json, sys

ours = {name: importlib.import_module(name).__file__ for name in sys.argv[1:]}
bare_loaded = sorted(n for n in ("evals", "trainers", "mitigations") if n in sys.modules)
import evals

print(json.dumps({"ours": ours, "bare_loaded": bare_loaded, "evals_marker": getattr(evals, "FOREIGN", None),
                  "evals_file": evals.__file__}))
'''

OUR_MODULES = ["llm_limits.evals", "llm_limits.trainers.run", "llm_limits.trainers.cli", "llm_limits.mitigations"]


def cli_command() -> list[str]:
    script = Path(sys.executable).with_name("llm-limits")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "llm_limits.trainers.cli"]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**base, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "WANDB_SILENT": "true", **extra}


def run(argv: list[str], cwd: Path, timeout: int = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout)


def failed(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"


# --- a. a foreign `evals` distribution first on the import path -----------------------------------------------------
@pytest.fixture(scope="module")
def foreign_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site directory as pip would leave it after installing a distribution named ``evals`` with a top-level
    ``evals/`` package (plus foreign ``trainers/`` and ``mitigations/`` packages: any of the three names)."""
    site = tmp_path_factory.mktemp("foreign-site")
    for name in BARE:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(FOREIGN_INIT)
    info = site / "evals-3.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: evals\nVersion: 3.0.1\n")
    (info / "top_level.txt").write_text("evals\n")
    (info / "RECORD").write_text("")
    return site


def probe(modules: list[str], pythonpath: list[Path], cwd: Path, **extra: str) -> dict[str, Any]:
    """Run :data:`PROBE` in a fresh interpreter; ``cwd`` must not be the repository (``python script`` puts the
    script's folder first on sys.path, and the probe sits in ``cwd``)."""
    script = cwd / "probe.py"
    script.write_text(PROBE)
    proc = run([sys.executable, str(script), *modules], cwd, PYTHONPATH=os.pathsep.join(map(str, pythonpath)), **extra)
    assert proc.returncode == 0, failed(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def problems(report: dict[str, Any]) -> list[str]:
    """What is wrong with a probe's report: a module that did not come from our folder, a bare name our imports
    pulled in, or an ``import evals`` that did not reach the foreign package."""
    out = []
    for name, file in report["ours"].items():
        parts = name.split(".")
        folder = REPO / (parts[1] if parts[0] == "llm_limits" else parts[0])
        if not Path(file).resolve().is_relative_to(folder):
            out.append(f"{name} was imported from {file}, not from {folder}")
    if report["bare_loaded"]:
        out.append(f"importing {sorted(report['ours'])} loaded the bare name(s) {report['bare_loaded']}")
    if report["evals_marker"] != FOREIGN_MARKER:
        out.append(f"`import evals` gave {report['evals_file']}, not the foreign distribution: we claim the name")
    return out


def test_foreign_evals_beside_ours_python(foreign_site: Path, tmp_path: Path):
    """``python -c "import llm_limits.evals, llm_limits.trainers.run"`` with the foreign site first on PYTHONPATH:
    our modules come from this repository's folders, and ``evals`` is still the foreign package."""
    log = tmp_path / "foreign-imports.log"
    report = probe(OUR_MODULES, [foreign_site], tmp_path, FOREIGN_IMPORT_LOG=str(log))
    assert problems(report) == []
    # the foreign package logs its import: exactly once, by the probe's own `import evals` (so an empty log in the
    # CLI test below means that nothing imported it)
    assert log.read_text().split() == ["evals"]


def test_foreign_evals_beside_ours_cli(foreign_site: Path, tmp_path: Path):
    """``llm-limits validate recipes/baseline/tiny-lm.yaml`` (the schema check imports every eval and mitigation)
    with the foreign site first on PYTHONPATH: it passes, and never imports the foreign packages."""
    log = tmp_path / "foreign-imports.log"
    proc = run([*cli_command(), "validate", "recipes/baseline/tiny-lm.yaml"], REPO, PYTHONPATH=str(foreign_site),
               FOREIGN_IMPORT_LOG=str(log))
    assert proc.returncode == 0, failed(proc)
    assert "ok: recipes/baseline/tiny-lm.yaml" in proc.stdout
    assert not log.exists(), f"the CLI imported foreign packages: {log.read_text().split()}"


def test_foreign_evals_canary_bare_import_is_caught(foreign_site: Path, tmp_path: Path):
    """The checks above can fail: code that imported the bare name ``evals`` is caught either way round.

    - foreign site first, the repository root after it: the bare ``import evals`` gets the FOREIGN package (its file
      is not under our evals/), and it counts as a bare name loaded;
    - the repository root first: the bare import gets our folder as a second, bare-named copy of our package (a
      bare name loaded), and the foreign distribution is shadowed (``import evals`` is not the foreign package).
    """
    shadowed = problems(probe(["evals"], [foreign_site, REPO], tmp_path))
    assert any("not from" in p for p in shadowed) and any("bare name" in p for p in shadowed), shadowed
    claimed = problems(probe(["evals"], [REPO, foreign_site], tmp_path))
    assert any("bare name" in p for p in claimed) and any("we claim the name" in p for p in claimed), claimed


# --- b. unrelated evals/, trainers/, mitigations/ in the working directory ------------------------------------------
@pytest.fixture
def shadow_cwd(tmp_path: Path) -> Path:
    """A user's project folder that happens to hold packages named like our folders; importing any raises."""
    work = tmp_path / "work"
    for name in BARE:
        (work / name).mkdir(parents=True)
        (work / name / "__init__.py").write_text(
            f'raise ImportError("an unrelated {name}/ in the working directory was imported")\n')
    return work


@pytest.fixture
def tiny_lm(tmp_path: Path) -> Path:
    """recipes/baseline/tiny-lm.yaml with small data and evals, its runs under tmp_path/runs (the command line adds
    ``trainer.max_steps=2``)."""
    data = yaml.safe_load((REPO / "recipes/baseline/tiny-lm.yaml").read_text())
    data["data"]["params"]["num_docs"] = 40
    data["trainer"].update(warmup_steps=1, log_every=1)
    data["evals"][0].update(num_examples=8)
    data["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tiny-lm.yaml"
    path.write_text(f"# llm-limits train {path} trainer.max_steps=2\n" + yaml.safe_dump(data, sort_keys=False))
    return path


def test_shadow_cwd_canary_packages_raise(shadow_cwd: Path):
    """The trap is armed: ``python -c`` (like ``python -m`` and torchrun ``-m``) puts the working directory first, so
    a bare ``import evals`` there raises. This is what fails the two tests below if our code imports a bare name."""
    for name in BARE:
        proc = run([sys.executable, "-c", f"import {name}"], shadow_cwd)
        assert proc.returncode != 0 and f"unrelated {name}/" in proc.stderr, failed(proc)


def test_shadow_cwd_python_m_validate(shadow_cwd: Path, tiny_lm: Path):
    proc = run([sys.executable, "-m", "llm_limits.trainers.cli", "validate", str(tiny_lm)], shadow_cwd)
    assert proc.returncode == 0, failed(proc)
    assert f"ok: {tiny_lm}" in proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["llm-limits", "python -m"])
def test_shadow_cwd_train(launcher: str, shadow_cwd: Path, tiny_lm: Path, tmp_path: Path):
    """A 2-step run of the tiny LM from that folder, evals before and after included. ``python -m`` is the stronger
    of the two launches (the working directory is first on sys.path for the whole run, as under torchrun ``-m`` and
    in the processes ``llm-limits ablate`` starts); the console script checks that the run needs nothing from it."""
    cli = cli_command() if launcher == "llm-limits" else [sys.executable, "-m", "llm_limits.trainers.cli"]
    proc = run([*cli, "train", str(tiny_lm), "trainer.max_steps=2", "--no-progress"], shadow_cwd)
    assert proc.returncode == 0, failed(proc)
    results = json.loads((tmp_path / "runs" / "tiny-lm" / "latest" / "results.json").read_text())
    assert results, "the run wrote an empty results.json"
    assert not (shadow_cwd / "runs").exists(), "the run wrote into the working directory despite output_dir"


# --- c. the wheel's package list ------------------------------------------------------------------------------------
def package_folders(root: Path) -> set[str]:
    """``llm_limits.<dotted folder>`` for every folder under the three top-level folders that has an __init__.py."""
    out = set()
    for top in BARE:
        for init in (root / top).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                out.add(".".join(["llm_limits", *init.parent.relative_to(root).parts]))
    return out


def folders_without_init(root: Path) -> list[str]:
    """Folders holding Python files but no __init__.py: setuptools' explicit list cannot ship them as packages."""
    out = []
    for top in BARE:
        for folder in [root / top, *(p for p in (root / top).rglob("*") if p.is_dir())]:
            if "__pycache__" in folder.parts:
                continue
            if any(folder.glob("*.py")) and not (folder / "__init__.py").is_file():
                out.append(folder.relative_to(root).as_posix())
    return out


def package_list_problems(root: Path, pyproject: dict[str, Any]) -> list[str]:
    setuptools = pyproject["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = package_folders(root)
    out = [f"{p} is a package folder but not in [tool.setuptools] packages (a wheel would leave it out)"
           for p in sorted(found - listed)]
    out += [f"{p} is listed in [tool.setuptools] packages but has no folder with an __init__.py"
            for p in sorted(listed - found)]
    out += [f"{f}/ holds .py files but no __init__.py" for f in folders_without_init(root)]
    want_dirs = {f"llm_limits.{top}": top for top in BARE}
    if setuptools.get("package-dir") != want_dirs:
        out.append(f"[tool.setuptools.package-dir] is {setuptools.get('package-dir')}, expected {want_dirs}")
    return out


def test_pyproject_lists_every_package():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert package_list_problems(REPO, pyproject) == []


def test_package_list_canary(tmp_path: Path):
    """A new subpackage left out of the list, and a folder of modules without an __init__.py, are both reported."""
    for rel in ("mitigations", "evals", "trainers", "trainers/new_part"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "__init__.py").write_text("")
    (tmp_path / "evals/loose").mkdir()
    (tmp_path / "evals/loose/mod.py").write_text("")
    pyproject = {"tool": {"setuptools": {
        "packages": ["llm_limits.mitigations", "llm_limits.evals", "llm_limits.trainers"],
        "package-dir": {f"llm_limits.{t}": t for t in BARE},
    }}}  # fmt: skip
    found = package_list_problems(tmp_path, pyproject)
    assert any("llm_limits.trainers.new_part is a package folder" in p for p in found), found
    assert any("evals/loose/ holds .py files" in p for p in found), found


# --- d. no bare imports in the repository's Python files ------------------------------------------------------------
IMPORTERS = {"import_module", "__import__", "find_spec", "setattr", "delattr", "patch", "setitem", "delitem"}
"""Calls whose first string argument names a module (``importlib.import_module("evals.base")``,
``monkeypatch.setattr("trainers.run.fit", ...)``, ``mock.patch("evals.vlm.x")``): importing it runs a bare import."""


def _bare(dotted: str, *, needs_dot: bool = False) -> bool:
    head = dotted.split(".")[0]
    return head in BARE and (not needs_dot or "." in dotted)


def bare_imports(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: what`` for each place that imports one of the bare names."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if _bare(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and _bare(node.module):
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in IMPORTERS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                # import_module("evals") imports a bare name; setattr("evals", ...) is an attribute name, not a module
                if _bare(first.value, needs_dot=name not in ("import_module", "__import__", "find_spec")):
                    found.append(f"{where}: {name}({first.value!r})")
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = node.elts
            for a, b in zip(items, items[1:]):
                if (isinstance(a, ast.Constant) and a.value == "-m" and isinstance(b, ast.Constant)
                        and isinstance(b.value, str) and _bare(b.value)):
                    found.append(f"{where}: -m {b.value}")
    return found


LAUNCH_M = re.compile(r"-m\s+[\"']?((?:evals|trainers|mitigations)(?:\.[\w.]+)?)\b")


def python_files() -> list[Path]:
    files = [p for top in (*BARE, "tests", "scripts") for p in (REPO / top).rglob("*.py")]
    files += REPO.glob("*.py")  # conftest.py
    return sorted(p for p in files if "__pycache__" not in p.parts)


def launch_files() -> list[Path]:
    """Shell scripts, the Makefile and the recipes (their first line is a launch command)."""
    files = [*(REPO / "scripts").glob("*.sh"), *(REPO / "scripts").glob("*.sbatch"), REPO / "Makefile"]
    files += (REPO / "recipes").rglob("*.yaml")
    return sorted(p for p in files if p.is_file())


def test_no_python_file_imports_a_bare_name():
    files = python_files()
    assert len(files) > 50 and REPO / "conftest.py" in files
    found = [hit for p in files for hit in bare_imports(p.read_text(), p.relative_to(REPO).as_posix())]
    assert not found, "bare imports (use llm_limits.<name>):\n" + "\n".join(found)


def test_no_launch_line_runs_a_bare_module():
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in launch_files()
             for i, line in enumerate(p.read_text().splitlines(), 1) if LAUNCH_M.search(line)]
    assert not found, "launch lines that run a bare module (use -m llm_limits.trainers.cli):\n" + "\n".join(found)


def test_bare_import_canary():
    """Every form the scan looks for is found, and our own spellings (and prose naming the folders) are not."""
    bad = '''
import evals
import trainers.run as run
from mitigations.base import StepContext
from evals import EVALS
import importlib; importlib.import_module("trainers.cli")
__import__("evals")
def test(monkeypatch): monkeypatch.setattr("trainers.run.fit", None)
from unittest import mock; mock.patch("evals.vlm.embed_texts")
cmd = [sys.executable, "-m", "trainers.cli", "train"]
'''
    assert len(bare_imports(bad)) == 9, bare_imports(bad)
    good = '''
"""The math lives in :mod:`mitigations.positional.core` (evals.base.read_limit reads the limit)."""
import llm_limits.evals
from llm_limits import evals
from llm_limits.trainers.run import train
from . import vlm_fixtures
importlib.import_module("llm_limits.evals.base")
setattr(module, "evals", None)
monkeypatch.setattr("llm_limits.trainers.run.fit", None)
cmd = [sys.executable, "-m", "llm_limits.trainers.cli", "train"]
'''
    assert bare_imports(good) == []
    assert LAUNCH_M.search("# torchrun --nproc_per_node 8 -m trainers.cli train r.yaml")
    assert not LAUNCH_M.search("# torchrun --nproc_per_node 8 -m llm_limits.trainers.cli train r.yaml")
