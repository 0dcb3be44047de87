"""The synthetic text task: a seeded, deterministic generator and the JSONL loader that yields the same records."""

from __future__ import annotations

import importlib
import json
import re

import pytest

from llm_limits.evals.tasks import TASK_VERSIONS, TASKS, TaskDataError, image_folder
from llm_limits.evals.tasks.synthetic_text import ALPHABET, SyntheticTextConfig, generate, load_jsonl


# --- generator ---------------------------------------------------------------------------------------------------
def test_same_config_same_text_and_different_seed_different_text():
    a = generate(SyntheticTextConfig(num_docs=20, doc_chars=128, seed=0))
    b = generate(SyntheticTextConfig(num_docs=20, doc_chars=128, seed=0))
    c = generate(SyntheticTextConfig(num_docs=20, doc_chars=128, seed=1))
    assert a == b
    assert all(ra["text"] != rc["text"] for ra, rc in zip(a, c))


def test_records_have_the_configured_count_and_exact_length():
    records = generate(SyntheticTextConfig(num_docs=7, doc_chars=93, seed=3))
    assert len(records) == 7
    assert all(set(r) == {"text"} and len(r["text"]) == 93 for r in records)
    assert generate(SyntheticTextConfig(num_docs=0)) == []


def test_generator_uses_no_global_rng():
    import random

    random.seed(0)
    a = generate(SyntheticTextConfig(num_docs=3, seed=5))
    random.seed(99)
    b = generate(SyntheticTextConfig(num_docs=3, seed=5))
    assert a == b


def test_alphabet_is_exactly_the_characters_emitted():
    text = "".join(r["text"] for r in generate(SyntheticTextConfig(num_docs=64, doc_chars=512)))
    assert set(text) == set(ALPHABET)
    assert len(ALPHABET) == len(set(ALPHABET)) == 30


def test_vocabulary_has_a_few_hundred_words_and_grammar_holds():
    text = "".join(r["text"] for r in generate(SyntheticTextConfig(num_docs=512, doc_chars=256)))
    words = set(re.findall(r"[a-z]+", text))
    assert len(words) >= 300
    assert not re.search(r"\ba [aeiou]", text)  # "an old tree", never "a old tree"
    assert not re.search(r"\ban [^aeiou]", text)
    # punctuation is always followed by a separator, a paragraph break always follows a full stop, no double spaces
    assert not re.search(r"\.[^ \n]|,[^ ]|[^.]\n|  ", text[:-1])


def test_documents_are_consecutive_cuts_of_one_stream():
    two = generate(SyntheticTextConfig(num_docs=2, doc_chars=50, seed=4))
    one = generate(SyntheticTextConfig(num_docs=1, doc_chars=100, seed=4))
    assert two[0]["text"] + two[1]["text"] == one[0]["text"]


@pytest.mark.parametrize("field,value", [("doc_chars", 0), ("num_docs", -1)])
def test_invalid_config_is_a_value_error(field, value):
    with pytest.raises(ValueError, match=field):
        generate(SyntheticTextConfig(**{field: value}))


def test_task_registry():
    assert TASKS["synthetic_text"] == (SyntheticTextConfig, generate)


# --- loader ------------------------------------------------------------------------------------------------------
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_yields_the_generator_records(tmp_path):
    records = generate(SyntheticTextConfig(num_docs=5, doc_chars=64))
    path = _write(tmp_path / "data.jsonl", [json.dumps(r) for r in records[:2]] + ["", "   "]
                  + [json.dumps(r) for r in records[2:]])
    assert load_jsonl(path) == records
    assert load_jsonl(str(path)) == records


def test_load_jsonl_custom_field(tmp_path):
    path = _write(tmp_path / "data.jsonl", ['{"body": "hello world.", "id": 1}'])
    assert load_jsonl(path, text_field="body") == [{"text": "hello world."}]


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"text": "a"}', '{"text": "b"}', '{"text": "c" "d"}'], ":3: not valid JSON (Expecting ',' delimiter)"),
        (['{"text": "a"}', "", "", "", '{"txt": "b"}'],
         ':5: missing field "text" (expected a JSON object with a string "text")'),
        (['["text"]'], ':1: got a JSON array (expected a JSON object with a string "text")'),
        (['{"text": 3}'], ':1: field "text" is a JSON number (expected a JSON object with a string "text")'),
        (["", "  "], ": no records (expected at least one JSON line)"),
    ],
)
def test_load_jsonl_errors_name_file_line_and_expectation(tmp_path, lines, message):
    path = _write(tmp_path / "data.jsonl", lines)
    with pytest.raises(TaskDataError) as info:
        load_jsonl(path)
    assert str(info.value) == f"{path}{message}"
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_jsonl_empty_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("")
    with pytest.raises(TaskDataError, match=r"data\.jsonl: no records \(expected at least one JSON line\)$"):
        load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path):
    path = tmp_path / "data.jsonl"
    with pytest.raises(TaskDataError) as info:
        load_jsonl(path)
    assert str(info.value) == f"{path}: file not found"


def test_load_jsonl_not_utf8(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(TaskDataError, match=r"data\.jsonl:2: not UTF-8 text"):
        load_jsonl(path)


def test_load_jsonl_directory(tmp_path):
    with pytest.raises(TaskDataError, match="is a directory"):
        load_jsonl(tmp_path)


def test_every_task_has_a_version():
    """Each registered task has a non-empty version, its module's ``VERSION`` (the loader-only image_folder too)."""
    assert set(TASK_VERSIONS) == set(TASKS)
    for name, (_, task_generate) in TASKS.items():
        module = importlib.import_module(task_generate.__module__)
        assert isinstance(TASK_VERSIONS[name], str) and TASK_VERSIONS[name] == module.VERSION != ""
    assert isinstance(image_folder.VERSION, str) and image_folder.VERSION
