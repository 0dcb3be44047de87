"""A JSONL file that starts with a UTF-8 byte-order mark (Windows editors write one) reads as the same records.

Every loader of a user's JSONL goes through ``evals/tasks/jsonl.py``; each is checked on its own fixture, re-saved
with a BOM: before the fix the first line was refused as "not valid JSON".
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path

import pytest

from llm_limits.evals.tasks import chains, image_folder, kb, ruler, synthetic_text

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def with_bom(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / src.name
    out.write_bytes(codecs.BOM_UTF8 + src.read_bytes())
    return out


@pytest.mark.parametrize("loader, fixture", [
    (chains.load_jsonl, "reasoning/gsm8k_small.jsonl"),
    (chains.load_jsonl, "reasoning/prm_flat_small.jsonl"),
    (chains.load_jsonl, "reasoning/prm800k_small.jsonl"),
    (kb.load_jsonl, "retrieval/ours.jsonl"),
    (kb.load_jsonl, "retrieval/hotpotqa.jsonl"),
    (kb.load_jsonl, "retrieval/raft.jsonl"),
], ids=lambda v: v if isinstance(v, str) else v.__module__.rsplit(".", 1)[-1])
def test_a_byte_order_mark_reads_as_the_same_records(loader, fixture, tmp_path):
    src = FIXTURES / fixture
    assert loader(with_bom(src, tmp_path)) == loader(src)


def test_text_and_needle_files_with_a_byte_order_mark(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(codecs.BOM_UTF8 + b'{"text": "first document"}\n{"text": "second"}\n')
    assert [r["text"] for r in synthetic_text.load_jsonl(docs)] == ["first document", "second"]
    needle = {"context": "a b #k:1234. c", "query": "#k:", "answer": "1234", "needle_spans": [[4, 12]]}
    f = tmp_path / "needles.jsonl"
    f.write_bytes(codecs.BOM_UTF8 + (json.dumps(needle) + "\n").encode())
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps(needle) + "\n")
    assert ruler.load_jsonl(f) == ruler.load_jsonl(plain)


def test_an_image_folder_file_with_a_byte_order_mark(tmp_path):
    import shutil

    import numpy as np

    root = tmp_path / "images"
    shutil.copytree(FIXTURES / "image_folder", root)
    plain = image_folder.load(root / "data.jsonl", root)
    (root / "data.jsonl").write_bytes(codecs.BOM_UTF8 + (FIXTURES / "image_folder" / "data.jsonl").read_bytes())
    marked = image_folder.load(root / "data.jsonl", root)
    assert len(marked) == len(plain) > 0
    for a, b in zip(marked, plain):
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)
