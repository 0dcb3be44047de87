"""The dependency rule of docs/architecture.md, checked on every import statement (lazy ones inside functions too).

- ``mitigations`` imports torch and itself: never ``evals`` or ``trainers``, nor Lightning, TRL, DeepSpeed, pydantic
  or wandb;
- ``evals`` never imports ``trainers`` or ``mitigations`` (nor the training frameworks), and an eval module imports
  no other eval module: shared helpers live in ``evals/base.py``, ``evals/lm.py``, ``evals/vlm.py``;
- inside ``trainers``, each subpackage imports only the ones below it (the table in docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("lightning", "trl", "deepspeed", "pydantic", "wandb", "accelerate")
EVAL_MODULES = {"context", "reasoning", "prm", "retrieval", "hallucination", "multimodal", "positional_loss"}
TRAINERS_MAY_IMPORT = {  # trainers subpackage -> the trainers parts it may import (besides itself)
    # recipe's capability checks read the launch environment (rendezvous variables, in launch.py) and the names in
    # the pretrained registry (build/pretrained.py), and what the machine can run of the training switches
    # (build/kernels.py); all lazily, inside the checks, so no import cycle
    "recipe": {"launch", "build.pretrained", "build.kernels"},
    "build": {"recipe", "backends"},  # backends: build/assemble.py asks the recipe's backend for records and data
    "backends": {"recipe", "build"},
    "results": {"recipe"},
}


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def violations(package: str, rule) -> list[str]:
    found = []
    for path in modules(package):
        rel = path.relative_to(ROOT)
        for line, mod in imports(path):
            why = rule(rel, mod)
            if why:
                found.append(f"{rel}:{line} imports {mod}: {why}")
    return found


def mitigations_rule(rel: Path, mod: str) -> str | None:
    if mod.startswith(("llm_limits.evals", "llm_limits.trainers")):
        return "mitigations stay task-agnostic (domain pieces are injected by trainers)"
    if mod.split(".")[0] in FRAMEWORKS:
        return "mitigations import torch only"
    return None


def evals_rule(rel: Path, mod: str) -> str | None:
    if mod.startswith(("llm_limits.trainers", "llm_limits.mitigations")):
        return "evals run on any model, with no training code"
    if mod.split(".")[0] in FRAMEWORKS:
        return "evals need no training framework"
    parts = mod.split(".")
    if rel.parent.name == "evals" and rel.stem in EVAL_MODULES and parts[:2] == ["llm_limits", "evals"] and \
            len(parts) > 2 and parts[2] in EVAL_MODULES and parts[2] != rel.stem:
        return "an eval shares helpers through evals/lm.py, never another eval's module"
    return None


def trainers_rule(rel: Path, mod: str) -> str | None:
    parts = rel.parts  # ("trainers", sub, ...) or ("trainers", "run.py")
    if len(parts) < 3 or parts[1] not in TRAINERS_MAY_IMPORT or not mod.startswith("llm_limits.trainers."):
        return None  # the face (cli, run, launch, rundir) may import everything
    target = mod.split(".")[2]
    allowed = TRAINERS_MAY_IMPORT[parts[1]]
    if target == parts[1] or target in allowed or any(mod.startswith(f"llm_limits.trainers.{a}.") or
                                                       mod == f"llm_limits.trainers.{a}" for a in allowed):
        return None
    return f"trainers/{parts[1]} may import only {sorted(TRAINERS_MAY_IMPORT[parts[1]]) or 'itself'}"


@pytest.mark.parametrize("package, rule", [("mitigations", mitigations_rule), ("evals", evals_rule),
                                           ("trainers", trainers_rule)])
def test_the_dependency_rule(package, rule):
    assert not violations(package, rule), "\n".join(violations(package, rule))


def test_the_rules_can_fail():
    assert mitigations_rule(Path("mitigations/positional/core.py"), "llm_limits.evals.lm")
    assert mitigations_rule(Path("mitigations/base.py"), "lightning.pytorch")
    assert evals_rule(Path("evals/hallucination.py"), "llm_limits.evals.retrieval")
    assert not evals_rule(Path("evals/hallucination.py"), "llm_limits.evals.lm")
    assert evals_rule(Path("evals/lm.py"), "llm_limits.trainers.run")
    assert trainers_rule(Path("trainers/results/record.py"), "llm_limits.trainers.rundir")
    assert trainers_rule(Path("trainers/recipe/schema.py"), "llm_limits.trainers.build.models")
    assert not trainers_rule(Path("trainers/recipe/schema.py"), "llm_limits.trainers.build.pretrained.known_names")
    assert not trainers_rule(Path("trainers/run.py"), "llm_limits.trainers.build.assemble")
    assert imports(ROOT / "trainers" / "run.py")  # the scan sees imports at all
