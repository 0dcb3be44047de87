"""Doctests print floats rounded to what they mean, never 17 digits that change with the CPU's vector unit.

`log(e)` in float32 is 0.99999994 with one kernel and 1.0 with another, so a doctest that prints a float32 result in
full holds on one CPU and fails on the next (a fresh clone's CI went red that way on an AVX-512 machine).
"""
from __future__ import annotations

import ast
import doctest
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mitigations", "evals", "trainers")
MAX_DECIMALS = 6  # 4 is the house style; 7+ digits is a float32 printed in full
LONG_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d{%d,}" % (MAX_DECIMALS + 1))


def doctest_outputs() -> list[tuple[str, int, str]]:
    parser = doctest.DocTestParser()
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(node, clean=False)
                    if not doc:
                        continue
                    for ex in parser.get_examples(doc):
                        found.append((str(path.relative_to(ROOT)), ex.lineno, ex.want))
    return found


def test_the_scan_sees_the_doctests():
    outputs = doctest_outputs()
    assert len(outputs) > 100  # the packages hold a few hundred doctest examples; a scan that finds none proves nothing
    assert LONG_FLOAT.search("[0.0, 0.5, 1.0397207736968994]") and not LONG_FLOAT.search("[0.0, 0.5, 1.0397]")


def test_no_doctest_prints_a_float_in_full():
    long = [f"{path} (example at docstring line {line}): {want.strip()}"
            for path, line, want in doctest_outputs() if LONG_FLOAT.search(want)]
    assert not long, "round these doctest outputs (round(x, 4)):\n" + "\n".join(long)
