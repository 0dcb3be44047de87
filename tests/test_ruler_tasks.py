"""The RULER tasks: seeded needle-in-a-haystack and variable-tracking records, and their JSONL loader."""

from __future__ import annotations

import json
import re

import pytest

from llm_limits.evals.tasks import TASKS, TaskDataError
from llm_limits.evals.tasks import synthetic_text as st
from llm_limits.evals.tasks.ruler import (
    ALPHABET,
    TASK_NAMES,
    RulerConfig,
    generate,
    load_jsonl,
    min_context_chars,
    prompt_text,
    training_text,
)

NIAH = re.compile(r"#([a-z]+):([0-9]+)\.")
VT = re.compile(r"(?<![a-z])([a-z]+)=([a-z]+|[0-9]+)\.")
FIELDS = {"task", "context", "query", "answer", "needle_spans", "depth", "context_chars"}
VOCAB = {w for group in (st.DETERMINERS, st.ADJECTIVES, st.NOUNS, st.TRANSITIVE, st.INTRANSITIVE, st.ADVERBS,
                         st.PREPOSITIONS, st.CONJUNCTIONS, st.OPENERS) for phrase in group for w in phrase.split()}
VOCAB |= {"an", "is"}
EXTRA = {
    "niah_single": {},
    "niah_multikey": {"num_distractors": 3},
    "niah_multivalue": {"num_values": 3, "num_distractors": 1},
    "variable_tracking": {"num_hops": 2, "num_distractors": 1},
}
"""Sub-task -> config fields that make each one non-trivial."""


def _config(task: str, **kw) -> RulerConfig:
    return RulerConfig(task=task, **{**EXTRA[task], **kw})


def _haystack(record: dict) -> str:
    """The context with every needle and its one separating space taken out: the haystack it was inserted into."""
    needle = r"(?:#[a-z]+:[0-9]+\.|[a-z]+=[a-z0-9]+\.)"
    return re.sub(" " + needle, "", re.sub(f"^(?:{needle} )+", "", record["context"]))


# --- generator ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASK_NAMES)
def test_same_seed_same_records_and_other_seed_other_records(task):
    a = generate(_config(task, num_examples=10, seed=0))
    assert a == generate(_config(task, num_examples=10, seed=0))
    b = generate(_config(task, num_examples=10, seed=1))
    assert all(ra["context"] != rb["context"] and ra["query"] != rb["query"] for ra, rb in zip(a, b))


def test_generator_uses_no_global_rng():
    import random

    random.seed(0)
    a = generate(RulerConfig(num_examples=3, seed=5))
    random.seed(99)
    assert a == generate(RulerConfig(num_examples=3, seed=5))


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("chars", [None, 97, 256, 1000])  # None: the minimum, no haystack at all
def test_records_have_the_schema_and_exact_context_length(task, chars):
    config = _config(task, num_examples=8)
    config = _config(task, num_examples=8, context_chars=chars or min_context_chars(config))
    records = generate(config)
    assert len(records) == 8
    for r in records:
        assert set(r) == FIELDS
        assert r["task"] == task and len(r["context"]) == r["context_chars"] == config.context_chars
        assert isinstance(r["depth"], float) and r["depth"] == r["needle_spans"][0][0] / len(r["context"])
        assert set(training_text(r)) <= set(ALPHABET)


@pytest.mark.parametrize("task", TASK_NAMES)
def test_spans_are_the_answer_needles_and_hold_the_answer(task):
    for r in generate(_config(task, num_examples=20, context_chars=300)):
        spans = r["needle_spans"]
        assert spans == sorted(spans) and all(e0 <= s1 for (_, e0), (s1, _) in zip(spans, spans[1:]))
        needles = [r["context"][s:e] for s, e in spans]
        if task == "variable_tracking":
            assert r["query"] == f"\n?={needles[0].split('=')[1][:-1]}:"
            assert [VT.fullmatch(n).group(1) for n in needles] == r["answer"].split(",")
        else:
            key = r["query"][2:-1]
            assert r["query"] == f"\n#{key}:" and all(NIAH.fullmatch(n).group(1) == key for n in needles)
            assert [NIAH.fullmatch(n).group(2) for n in needles] == r["answer"].split(",")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_needles_sit_at_word_boundaries_and_never_split_a_word(task):
    for r in generate(_config(task, num_examples=20, context_chars=400)):
        ctx = r["context"]
        needles = [m.span() for m in (NIAH if task != "variable_tracking" else VT).finditer(ctx)]
        assert len(needles) >= len(r["needle_spans"])
        for s, e in needles:
            assert (s == 0 or ctx[s - 1] == " ") and (e == len(ctx) or ctx[e].isspace())
        haystack = _haystack(r)
        assert len(haystack) == len(ctx) - sum(e - s + 1 for s, e in needles)
        # every haystack word is a whole grammar word, except the last one, which the length cut may shorten
        assert all(w.strip(".,") in VOCAB for w in haystack.split()[:-1])


def test_configs_that_differ_only_in_depth_move_only_the_answer():
    by_depth = [generate(_config("niah_multikey", num_examples=5, depth=d)) for d in (0.0, 0.5, 1.0)]
    for rs in zip(*by_depth):
        assert len({(r["query"], r["answer"]) for r in rs}) == 1
        assert len({_haystack(r) for r in rs}) == 1
        assert len({r["depth"] for r in rs}) == 3


@pytest.mark.parametrize("task", TASK_NAMES)
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_answer_lands_within_half_a_word_of_the_requested_depth(task, depth):
    for r in generate(_config(task, num_examples=10, context_chars=512, depth=depth)):
        (start, _), (_, last_end) = r["needle_spans"][0], r["needle_spans"][-1]
        block = sum(e - s + 1 for s, e in r["needle_spans"]) - 1
        target = depth * (len(r["context"]) - block)
        longest_word = max(len(w) for w in r["context"].split())
        assert abs(start - target) <= (longest_word + 1) / 2 + 1e-9  # the closest boundary: at most half a gap away
        if depth == 0.0:
            assert start == 0
        if depth == 1.0:  # flush with the end, or one space short when the haystack's cut ends on a space
            assert last_end >= len(r["context"]) - 1


def test_random_depth_spreads_over_the_whole_context():
    depths = [r["depth"] for r in generate(RulerConfig(num_examples=200, context_chars=256))]
    assert min(depths) < 0.05 and max(depths) > 0.9
    assert 0.35 < sum(depths) / len(depths) < 0.6
    assert sum(0.25 <= d < 0.5 for d in depths) > 30


def test_multikey_distractors_have_other_keys_and_values():
    for r in generate(RulerConfig(task="niah_multikey", num_distractors=5, num_examples=30, context_chars=400)):
        needles = NIAH.findall(r["context"])
        keys, values = [k for k, _ in needles], [v for _, v in needles]
        assert len(needles) == 6 and len(set(keys)) == 6 and len(set(values)) == 6
        assert [v for k, v in needles if k == r["query"][2:-1]] == [r["answer"]]


def test_multivalue_answer_is_the_keys_values_in_order_of_appearance():
    for r in generate(RulerConfig(task="niah_multivalue", num_values=4, num_distractors=2, num_examples=30,
                                  context_chars=400)):
        needles = NIAH.findall(r["context"])
        assert len(needles) == 6
        assert ",".join(v for k, v in needles if k == r["query"][2:-1]) == r["answer"]


def test_variable_tracking_answer_is_derivable_from_the_context():
    for r in generate(RulerConfig(task="variable_tracking", num_hops=3, num_distractors=2, num_examples=30,
                                  context_chars=500)):
        bindings = VT.findall(r["context"])
        assert len(bindings) == 3 * 4 and len({v for v, _ in bindings}) == 12
        held, order = {r["query"][3:-1]}, []
        for var, source in bindings:  # chain order is the order of appearance
            if source in held:
                held.add(var)
                order.append(var)
        assert ",".join(order) == r["answer"] and len(order) == 4


def test_prose_file_haystack(tmp_path):
    prose = ("It was the best of times, it was the worst of times;\r\nit was the age of wisdom.\n\n"
             "It was the epoch of belief — and of incredulity.\n")
    path = tmp_path / "prose.txt"
    path.write_text(prose, encoding="utf-8")
    words = set(prose.split())
    for task in TASK_NAMES:
        records = generate(_config(task, num_examples=10, context_chars=700, haystack=str(path), depth=0.5))
        assert records == generate(_config(task, num_examples=10, context_chars=700, haystack=str(path), depth=0.5))
        for r in records:
            assert len(r["context"]) == 700 and "  " not in r["context"] and "\n" not in r["context"]
            assert all(w in words for w in _haystack(r).split()[:-1])  # the last word may be cut short
            assert r["answer"] in training_text(r)


@pytest.mark.parametrize("content,message", [
    (None, "{p}: file not found (expected a UTF-8 text file as haystack)"),
    (b" \n\t\n", "{p}: no text (expected prose to use as haystack)"),
    (b"caf\xe9 au lait", "{p}: not UTF-8 text (invalid continuation byte at byte 3)"),
])
def test_bad_haystack_file_is_a_task_data_error(tmp_path, content, message):
    path = tmp_path / "hay.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TaskDataError) as err:
        generate(RulerConfig(haystack=str(path), num_examples=1))
    assert str(err.value) == message.format(p=path)


@pytest.mark.parametrize("kwargs,message", [
    ({"task": "niah"}, "ruler: unknown task 'niah' (known: niah_single, niah_multikey, niah_multivalue, "
                       "variable_tracking)"),
    ({"depth": 1.5}, "ruler: depth must be within [0, 1], or None for a random depth (got 1.5)"),
    ({"depth": float("nan")}, "ruler: depth must be within [0, 1], or None for a random depth (got nan)"),
    ({"num_examples": -1}, "ruler: num_examples must be >= 0 (got -1)"),
    ({"key_len": 0}, "ruler: key_len must be >= 1 (got 0)"),
    ({"num_distractors": 2}, "ruler: niah_single has no distractors (got num_distractors=2); use niah_multikey"),
    ({"task": "niah_multikey"}, "ruler: niah_multikey needs num_distractors >= 1 (got 0); with none it is "
                                "niah_single"),
    ({"task": "niah_multivalue", "num_values": 1}, "ruler: niah_multivalue needs num_values >= 2 (got 1); with one "
                                                   "it is niah_single"),
    ({"task": "niah_multikey", "num_distractors": 30, "key_len": 1, "context_chars": 4096},
     "ruler: key_len=1 gives 26 distinct keys, fewer than the 31 an example of niah_multikey needs; raise key_len"),
    ({"task": "niah_multivalue", "num_values": 11, "value_len": 1, "context_chars": 4096},
     "ruler: value_len=1 gives 10 distinct values, fewer than the 11 an example of niah_multivalue needs; raise "
     "value_len"),
    ({"context_chars": 10}, "ruler: context_chars=10 is too short for the needles of niah_single; the minimum "
                            "context_chars is 11"),
    ({"task": "variable_tracking", "context_chars": 27}, "ruler: context_chars=27 is too short for the needles of "
                                                         "variable_tracking; the minimum context_chars is 28"),
    ({"haystack": ""}, "ruler: haystack must be \"generated\" or the path of a text file (got '')"),
])
def test_invalid_config_is_a_one_line_value_error(kwargs, message):
    with pytest.raises(ValueError) as err:
        RulerConfig(**kwargs)
    assert str(err.value) == message


def test_zero_examples_and_the_task_registry():
    assert generate(RulerConfig(num_examples=0)) == []
    assert TASKS["ruler"] == (RulerConfig, generate)


def test_training_text_is_the_prompt_followed_by_the_answer():
    for task in TASK_NAMES:
        for r in generate(_config(task, num_examples=3)):
            assert prompt_text(r) == r["context"] + r["query"]
            assert training_text(r) == prompt_text(r) + r["answer"]


# --- loader ------------------------------------------------------------------------------------------------------
def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_yields_the_generator_records(tmp_path):
    records = [r for task in TASK_NAMES for r in generate(_config(task, num_examples=2))]
    path = _write(tmp_path / "data.jsonl", [json.dumps(r) for r in records] + ["", "  "])
    assert load_jsonl(path) == records


def test_load_jsonl_fills_the_optional_fields(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"context": "abc #k:1. def", "query": "\n#k:", "answer": "1", "id": 7}),
        json.dumps({"context": "xy", "query": "?", "answer": "y", "task": "mine", "depth": 0, "context_chars": 1000,
                    "needle_spans": [[0, 1], [1, 2]]}),
    ])
    assert load_jsonl(path) == [
        {"task": "custom", "context": "abc #k:1. def", "query": "\n#k:", "answer": "1", "needle_spans": [],
         "depth": -1.0, "context_chars": 13},
        {"task": "mine", "context": "xy", "query": "?", "answer": "y", "needle_spans": [[0, 1], [1, 2]],
         "depth": 0.0, "context_chars": 1000},
    ]


OK = {"context": "abcdef", "query": "?", "answer": "x"}
EXPECTED = 'expected a JSON object with strings "context", "query" and "answer"'
SPANS = "expected ascending [start, end] pairs with 0 <= start < end <= 6, the context's length"


@pytest.mark.parametrize("line,message", [
    ('{"context": "a", ', "{p}:2: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("[1, 2]", f"{{p}}:2: got a JSON array ({EXPECTED})"),
    (json.dumps({"context": "a", "query": "?"}), f'{{p}}:2: missing field "answer" ({EXPECTED})'),
    (json.dumps({**OK, "query": 3}), f'{{p}}:2: field "query" is a JSON number ({EXPECTED})'),
    (json.dumps({**OK, "context": None}), f'{{p}}:2: field "context" is a JSON null ({EXPECTED})'),
    (json.dumps({**OK, "task": ["a"]}), '{p}:2: field "task" is a JSON array (expected a string)'),
    (json.dumps({**OK, "depth": "0.5"}), '{p}:2: field "depth" is a JSON string (expected a number)'),
    (json.dumps({**OK, "depth": True}), '{p}:2: field "depth" is a JSON boolean (expected a number)'),
    (json.dumps({**OK, "depth": 1.5}), '{p}:2: field "depth" is 1.5 (expected a number within [0, 1], or -1 for '
                                      'unknown)'),
    (json.dumps({**OK, "context_chars": 2.5}), '{p}:2: field "context_chars" is a JSON number (expected an integer '
                                              '>= 0)'),
    (json.dumps({**OK, "context_chars": -3}), '{p}:2: field "context_chars" is -3 (expected an integer >= 0)'),
    (json.dumps({**OK, "needle_spans": {"a": 1}}), f'{{p}}:2: field "needle_spans" is a JSON object ({SPANS})'),
    (json.dumps({**OK, "needle_spans": [[1, 2, 3]]}), f"{{p}}:2: needle_spans[0] is [1, 2, 3], not a pair of "
                                                      f"integers ({SPANS})"),
    (json.dumps({**OK, "needle_spans": [[0, 1], [2, 7]]}), f"{{p}}:2: needle_spans[1] = [2, 7] is out of range "
                                                           f"({SPANS})"),
    (json.dumps({**OK, "needle_spans": [[3, 3]]}), f"{{p}}:2: needle_spans[0] = [3, 3] is out of range ({SPANS})"),
    (json.dumps({**OK, "needle_spans": [[2, 4], [3, 5]]}), f"{{p}}:2: needle_spans[1] = [3, 5] starts before "
                                                           f"needle_spans[0] ends ({SPANS}, not overlapping)"),
])
def test_load_jsonl_errors_name_the_file_line_and_expectation(tmp_path, line, message):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(OK), line])
    with pytest.raises(TaskDataError) as err:
        load_jsonl(path)
    assert str(err.value) == message.format(p=path)
    assert "\n" not in str(err.value)


def test_load_jsonl_file_level_errors(tmp_path):
    cases = [
        (tmp_path / "missing.jsonl", "{p}: file not found"),
        (_write(tmp_path / "empty.jsonl", ["", " "]), "{p}: no records (expected at least one JSON line)"),
        (tmp_path, "{p}: is a directory (expected a JSONL file)"),
    ]
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(json.dumps(OK).encode() + b'\n{"context": "caf\xe9"}\n')
    cases.append((bad_utf8, "{p}:2: not UTF-8 text (invalid continuation byte at byte 16)"))
    for path, message in cases:
        with pytest.raises(TaskDataError) as err:
            load_jsonl(path)
        assert str(err.value) == message.format(p=path)
