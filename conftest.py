"""Collect the doctests of mitigations/, evals/ and trainers/ under their installed import names.

Installed, the three folders are the packages ``llm_limits.mitigations``, ``llm_limits.evals`` and
``llm_limits.trainers`` (pyproject.toml's package-dir). pytest's own ``--doctest-modules`` would import each file a
second time under a name made from its folder (``evals.context``), a copy beside the real module with its own
registries and classes. Here each file is imported by its ``llm_limits`` name, once.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from _pytest.doctest import DoctestModule

ROOT = Path(__file__).resolve().parent
PACKAGES = ("mitigations", "evals", "trainers")


class InstalledDoctestModule(DoctestModule):
    def _getobj(self):
        rel = self.path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        return importlib.import_module(".".join(["llm_limits", *parts]))


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if file_path.suffix != ".py" or file_path.name == "conftest.py":
        return None
    try:
        rel = file_path.resolve().relative_to(ROOT)
    except ValueError:
        return None
    if rel.parts[0] in PACKAGES:
        return InstalledDoctestModule.from_parent(parent, path=file_path)
    return None
