"""Arithmetic chains: the step verifier, corruptions, the seeded generator and the GSM8K / PRM800K loaders."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from llm_limits.evals.tasks import TASKS, TaskDataError
from llm_limits.evals.tasks.chains import (
    ALPHABET,
    CORRUPTIONS,
    ChainsConfig,
    check_answer,
    corrupt,
    first_error,
    format_completion,
    format_prompt,
    generate,
    gold_steps,
    intervene,
    load_gsm8k_jsonl,
    load_jsonl,
    load_prm800k_jsonl,
    parse_completion,
    parse_question,
    recompute_from,
    step_end_offsets,
    verify_steps,
)

FIXTURES = Path(__file__).parent / "fixtures" / "reasoning"
FIELDS = {"task", "question", "prompt", "completion", "steps", "answer", "gold_answer", "num_steps", "modulus",
          "labels", "answer_correct", "corruption", "prefix_steps"}
Q = "3+4*2-5"  # 3+4=7, 7*2=14->4, 4-5=-1->9
GOLD = ["3+4=7", "7*2=4", "4-5=9"]


# --- format and verifier (hand-made chains) -----------------------------------------------------------------------
def test_gold_chain_and_its_format():
    assert gold_steps(Q) == (GOLD, "9")
    assert format_prompt(Q) == "Q:3+4*2-5\n"
    assert format_completion(GOLD, "9") == "3+4=7\n7*2=4\n4-5=9\nA:9"
    assert parse_question(Q) == (3, [("+", 4), ("*", 2), ("-", 5)])
    assert verify_steps(Q, GOLD) == [True, True, True]
    assert first_error(Q, GOLD) == -1


@pytest.mark.parametrize("kind,k,value,steps,answer,verdicts", [
    # step 0 says 8: step 1 still starts from 7, so it no longer continues the written chain
    ("wrong_step", 0, 8, ["3+4=8", "7*2=4", "4-5=9"], "9", [False, False, True]),
    ("wrong_step", 1, 5, ["3+4=7", "7*2=5", "4-5=9"], "9", [True, False, False]),
    ("propagated", 0, 8, ["3+4=8", "8*2=6", "6-5=1"], "1", [False, True, True]),
    ("propagated", 1, 0, ["3+4=7", "7*2=0", "0-5=5"], "5", [True, False, True]),
    ("wrong_answer", 0, 3, GOLD, "3", [True, True, True]),
    # skipping step 0 misaligns every later step with the question's operations
    ("skipped_step", 0, 0, ["7*2=4", "4-5=9"], "9", [False, False]),
    ("skipped_step", 1, 0, ["3+4=7", "4-5=9"], "9", [True, False]),
])
def test_each_corruption_and_its_exact_verdicts(kind, k, value, steps, answer, verdicts):
    assert corrupt(Q, kind, k, value) == (steps, answer)
    assert verify_steps(Q, steps) == verdicts
    assert first_error(Q, steps) == (verdicts.index(False) if False in verdicts else -1)


def test_wrong_format_and_extra_steps_are_invalid():
    # a format slip costs only its own step: the next continues from the result it should have written
    assert verify_steps(Q, ["3+4=7", "7 * 2 = 4", "4-5=9"]) == [True, False, True]
    assert verify_steps(Q, ["3+4=7", "7*2=4", "4-5=9 "]) == [True, True, False]
    assert verify_steps(Q, ["3+4=07", "07*2=4"]) == [True, True]  # numbers compare as integers
    assert verify_steps(Q, ["3+4=7", "7*2=4", "4-5=9", "9+0=9"]) == [True, True, True, False]
    assert verify_steps(Q, ["3+4=7", "7+2=9"]) == [True, False]  # wrong operation
    assert verify_steps(Q, ["3+4=7", "7*3=1"]) == [True, False]  # wrong operand
    assert verify_steps(Q, []) == [] and first_error(Q, []) == -1
    assert first_error(Q, ["3+4=7", "x", "4-5=9"]) == 1


def test_modulus_100_and_malformed_questions():
    assert gold_steps("57*3+50", 100) == (["57*3=71", "71+50=21"], "21")
    # forgetting the modulus once is one error: the next step continues correctly from the written 171
    assert verify_steps("57*3+50", ["57*3=171", "171+50=21"], 100) == [False, True]
    for bad in ("", "3", "3+", "+4", "3+4*", "3 + 4", "3/4", "a+1"):
        with pytest.raises(ValueError, match="malformed question"):
            parse_question(bad)
    with pytest.raises(ValueError, match="out of range for modulus 10"):
        verify_steps("3+12", ["3+12=5"])


def test_parse_completion_edge_cases():
    assert parse_completion("3+4=7\n7*2=4\n4-5=9\nA:9") == (GOLD, "9")
    assert parse_completion("3+4=7\n7*2=4") == (["3+4=7", "7*2=4"], None)  # no answer line
    assert parse_completion("\n 3+4=7 \n\n\n7*2=4\n") == (["3+4=7", "7*2=4"], None)  # blank lines
    assert parse_completion("3+4=7\nA: 7 \nA:8\n9+9=8") == (["3+4=7"], "7")  # text after the answer ignored
    assert parse_completion("A:") == ([], "")
    assert parse_completion("") == ([], None)


def test_step_end_offsets():
    assert step_end_offsets("3+4=7\n7*2=4\nA:9") == [5, 11, 14]
    text = "3+4=7\n\n7*2=4\nA:9\nmore\n"
    assert step_end_offsets(text) == [5, 12, 15]
    assert [text[i] for i in step_end_offsets(text)] == ["\n", "\n", "9"]
    assert step_end_offsets("3+4=7\n7*2=4\n") == [5, 11]
    assert step_end_offsets("3+4=7\n7*2=4") == [5, 10]  # an unterminated last step ends at its last character
    assert step_end_offsets("A:12") == [3]
    assert step_end_offsets("") == []
    for r in generate(ChainsConfig(num_examples=30, corruptions={"skipped_step": 0.5})):
        steps, answer = parse_completion(r["completion"])
        assert len(step_end_offsets(r["completion"])) == len(steps) + 1


def test_intervene_and_recompute_from():
    assert recompute_from(Q, 0, 8) == "1"  # 8*2=16->6, 6-5=1
    assert recompute_from(Q, 1, 0) == "5"
    assert recompute_from(Q, 2, 3) == "3"  # the last operation: the value is the answer
    assert intervene(Q, GOLD, 0, 8) == (["3+4=8"], "1")
    assert intervene(Q, GOLD, 1, 0) == (["3+4=7", "7*2=0"], "5")
    assert intervene(Q, ["3+4=1", "1*2=2", "2-5=7"], 1, 9) == (["3+4=1", "1*2=9"], "4")  # keeps the written a
    with pytest.raises(ValueError, match="k must be"):
        recompute_from(Q, 3, 1)
    with pytest.raises(ValueError, match="value must be"):
        recompute_from(Q, 0, 10)
    with pytest.raises(ValueError, match="not of the form"):
        intervene(Q, ["3+4=7", "oops"], 1, 3)


def test_check_answer():
    assert check_answer("9", "9") and check_answer(" 9\n", "9")
    assert not check_answer("09", "9") and not check_answer(None, "9") and not check_answer("", "9")


# --- generator ------------------------------------------------------------------------------------------------------
MIXED = {"wrong_step": 0.25, "wrong_answer": 0.1, "propagated": 0.15, "skipped_step": 0.05}


def test_same_seed_same_records_and_other_seed_other_records():
    a = generate(ChainsConfig(num_examples=50, corruptions=MIXED, seed=0))
    assert a == generate(ChainsConfig(num_examples=50, corruptions=MIXED, seed=0))
    b = generate(ChainsConfig(num_examples=50, corruptions=MIXED, seed=1))
    assert [r["question"] for r in a] != [r["question"] for r in b]
    assert [r["corruption"] for r in a] != [r["corruption"] for r in b]


def test_configs_differing_only_in_corruptions_share_questions():
    clean = generate(ChainsConfig(num_examples=40, seed=3))
    dirty = generate(ChainsConfig(num_examples=40, seed=3, corruptions=MIXED))
    assert [r["question"] for r in clean] == [r["question"] for r in dirty]


def test_corruption_counts_are_exact():
    records = generate(ChainsConfig(num_examples=200, corruptions=MIXED, seed=7))
    counts = Counter(r["corruption"] for r in records)
    assert counts == {"wrong_step": 50, "wrong_answer": 20, "propagated": 30, "skipped_step": 10, "none": 90}
    kinds = [r["corruption"] for r in records]
    assert kinds[:50] != ["wrong_step"] * 50  # shuffled, not blocked
    over = generate(ChainsConfig(num_examples=3, corruptions={"wrong_step": 0.5, "wrong_answer": 0.5}))
    assert len(over) == 3 and all(r["corruption"] != "none" for r in over)  # rounding capped at num_examples


def test_records_match_the_verifier_and_their_kind():
    for r in generate(ChainsConfig(num_examples=200, corruptions=MIXED, min_steps=2, max_steps=5, seed=11)):
        assert set(r) == FIELDS and r["task"] == "arith_chain" and r["modulus"] == 10
        q, steps = r["question"], r["steps"]
        assert r["labels"] == [int(v) for v in verify_steps(q, steps)]
        assert r["prompt"] == format_prompt(q) and r["completion"] == format_completion(steps, r["answer"])
        assert parse_completion(r["completion"]) == (steps, r["answer"])
        gold, gold_answer = gold_steps(q)
        assert r["gold_answer"] == gold_answer and r["num_steps"] == len(gold) == len(parse_question(q)[1])
        assert r["answer_correct"] == (r["answer"] == gold_answer)
        assert 2 <= r["num_steps"] <= 5 and set(r["prompt"] + r["completion"]) <= set(ALPHABET)
        kind = r["corruption"]
        if kind == "none":
            assert steps == gold and r["labels"] == [1] * len(gold) and r["answer_correct"]
        elif kind == "wrong_answer":
            assert steps == gold and not r["answer_correct"]
        elif kind == "wrong_step":
            diff = [i for i, (s, g) in enumerate(zip(steps, gold)) if s != g]
            assert len(diff) == 1 and diff[0] < len(gold) - 1 and r["answer_correct"]
            assert r["labels"][diff[0]] == 0
        elif kind == "propagated":
            k = first_error(q, steps)
            assert 0 <= k < len(gold) - 1 and r["labels"] == [1] * k + [0] + [1] * (len(gold) - k - 1)
        else:
            assert len(steps) == len(gold) - 1 and r["answer_correct"]
            assert any(steps == gold[:k] + gold[k + 1 :] for k in range(len(gold) - 1))


def test_propagated_errors_change_the_answer_when_they_can():
    records = generate(ChainsConfig(num_examples=100, corruptions={"propagated": 1.0}, seed=2))
    assert sum(not r["answer_correct"] for r in records) >= 95


def test_modulus_100_and_ops_subset():
    records = generate(ChainsConfig(num_examples=50, modulus=100, ops="+*", corruptions={"wrong_step": 0.5}))
    assert all("-" not in r["question"] for r in records)
    assert any(len(n) == 2 for r in records for n in r["question"].replace("*", "+").split("+"))
    for r in records:
        assert r["labels"] == [int(v) for v in verify_steps(r["question"], r["steps"], 100)]
        assert r["modulus"] == 100 and gold_steps(r["question"], 100)[1] == r["gold_answer"]


def test_task_registry():
    assert TASKS["chains"] == (ChainsConfig, generate)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_steps": 1}, "max_steps must be >= min_steps (got 1 < 2)"),
    ({"min_steps": 0}, "min_steps must be >= 1 (got 0)"),
    ({"num_examples": 0}, "num_examples must be >= 1 (got 0)"),
    ({"modulus": 1}, "modulus must be >= 2 (got 1)"),
    ({"ops": "/"}, "ops: expected a non-empty subset of '+-*' (got '/')"),
    ({"ops": ""}, "ops: expected a non-empty subset of '+-*' (got '')"),
    ({"corruptions": {"wrong": 0.1}}, "corruptions: unknown kind 'wrong' (known: wrong_step, wrong_answer, "
                                      "propagated, skipped_step)"),
    ({"corruptions": {"wrong_step": -0.1}}, "corruptions: the fraction of 'wrong_step' must be a number >= 0 "
                                            "(got -0.1)"),
    ({"corruptions": {"wrong_step": 0.7, "propagated": 0.4}}, "corruptions: fractions must sum to <= 1 (got 1.1)"),
    ({"min_steps": 1, "corruptions": {"skipped_step": 0.1}}, "corruptions: 'skipped_step' corrupts an intermediate "
                                                             "step, so it needs min_steps >= 2 (got 1)"),
])
def test_invalid_config_is_a_one_line_value_error(kwargs, message):
    with pytest.raises(ValueError) as err:
        ChainsConfig(**kwargs)
    assert str(err.value) == message


def test_wrong_answer_works_with_one_step_questions():
    records = generate(ChainsConfig(num_examples=20, min_steps=1, max_steps=1, corruptions={"wrong_answer": 0.5}))
    assert sum(not r["answer_correct"] for r in records) == 10


# --- loaders --------------------------------------------------------------------------------------------------------
def test_load_gsm8k_fixture():
    records = load_gsm8k_jsonl(FIXTURES / "gsm8k_small.jsonl")
    assert records == load_jsonl(FIXTURES / "gsm8k_small.jsonl") and len(records) == 3
    r = records[0]
    assert set(r) == FIELDS and r["task"] == "gsm8k" and r["answer"] == r["gold_answer"] == "29"
    assert r["steps"][0] == "Mia gives away 48/2 = <<48/2=24>>24 stickers." and r["num_steps"] == 3
    assert r["labels"] is None and r["modulus"] is None and r["answer_correct"] is True
    assert r["prompt"] == format_prompt(r["question"])
    assert parse_completion(r["completion"]) == (r["steps"], "29")
    assert records[2]["answer"] == "3750" and records[2]["num_steps"] == 2  # commas removed, blank line skipped


def test_load_prm800k_nested_fixture():
    records = load_prm800k_jsonl(FIXTURES / "prm800k_small.jsonl")
    assert records == load_jsonl(FIXTURES / "prm800k_small.jsonl") and len(records) == 2
    a, b = records
    assert set(a) == FIELDS and a["task"] == "prm800k" and a["modulus"] is None
    assert a["labels"] == [1, 1, 1, 1]  # rating 0 (neutral) counts as not an error
    assert a["steps"][1] == "Let me double-check the product." and a["steps"][3] == "# Answer\n\n40"
    assert a["answer"] == a["gold_answer"] == "40" and a["answer_correct"] is True and a["num_steps"] == 4
    # step 0: no chosen completion -> the human one; step 1: none chosen, no human -> the first, rated -1
    assert b["steps"] == ["The divisors pair up: 1*12, 2*6, 3*4.", "So there are 4 divisors."]
    assert b["labels"] == [1, 0] and b["answer"] == "" and b["gold_answer"] == "6" and b["answer_correct"] is None
    assert b["completion"] == "\n".join(b["steps"])


def test_load_prm_flat_fixture():
    records = load_jsonl(FIXTURES / "prm_flat_small.jsonl")
    assert records == load_prm800k_jsonl(FIXTURES / "prm_flat_small.jsonl") and len(records) == 3
    assert [r["labels"] for r in records] == [[1, 1, 1], [1, 0], [1, 0]]
    assert [r["answer_correct"] for r in records] == [True, None, False]
    assert records[0]["completion"] == "3+4=7\n7*2=4\n4-5=9\nA:9"
    assert records[1]["question"] == "2*3+1" and records[1]["answer"] == "" and records[1]["gold_answer"] is None
    assert records[1]["completion"] == "2*3=6\n6+1=8"
    for r in records:  # these flat records are arithmetic chains: their labels agree with the verifier
        assert r["labels"] == [int(v) for v in verify_steps(r["question"], r["steps"])]


def test_nested_records_stop_at_unrated_steps_and_empty_ones_are_skipped(tmp_path):
    step = {"completions": [{"text": "ok", "rating": 1}], "chosen_completion": 0, "human_completion": None}
    unrated = {"completions": [{"text": "?", "rating": None}], "chosen_completion": 0, "human_completion": None}
    path = _write(tmp_path / "n.jsonl", [
        json.dumps({"question": {"problem": "p"}, "label": {"steps": []}}),
        json.dumps({"question": {"problem": "p"}, "label": {"steps": [step, unrated, step]}}),
    ])
    [r] = load_jsonl(path)
    assert r["steps"] == ["ok"] and r["labels"] == [1] and r["gold_answer"] is None
    empty = _write(tmp_path / "e.jsonl", [json.dumps({"question": {"problem": "p"}, "label": {"steps": []}})])
    with pytest.raises(TaskDataError, match="no usable records"):
        load_prm800k_jsonl(empty)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


FLAT = {"question": "3+4", "steps": ["3+4=7"], "labels": [1]}
GSM = {"question": "q", "answer": "a\n#### 1"}


@pytest.mark.parametrize("first,line,needle", [
    (FLAT, '{"question": "a", ', "{p}:2: not valid JSON"),
    (FLAT, json.dumps({"labels": [1], "steps": ["x"]}), '{p}:2: expected a string "question" or "problem"'),
    (FLAT, json.dumps({**FLAT, "labels": [1, 0]}), "{p}:2: expected one label per step (got 2 labels for 1 steps)"),
    (FLAT, json.dumps({**FLAT, "labels": [2]}), "{p}:2: expected labels[0] to be 1, 0, -1, true or false (got 2)"),
    (FLAT, json.dumps({**FLAT, "steps": "3+4=7"}), '{p}:2: expected "steps" to be a non-empty array of strings'),
    (FLAT, json.dumps({"question": "q"}), '{p}:2: missing field "labels" or "label"'),
    (FLAT, json.dumps({"question": {"problem": "p"}, "label": {"steps": [{"completions": [{"text": "t",
                                                                                           "rating": 5}]}]}}),
     '{p}:2: label.steps[0]: expected the completion\'s "rating" to be -1, 0, 1 or null (got 5)'),
    (FLAT, json.dumps({"question": {"problem": "p"}, "label": {}}), '{p}:2: expected "label" to be an object with '
                                                                    'an array "steps"'),
    (GSM, json.dumps({"question": "q"}), '{p}:2: missing field "answer"'),
    (GSM, json.dumps({"question": "q", "answer": "no final line"}), '{p}:2: field "answer" has no "#### " line'),
    (GSM, json.dumps({"question": 3, "answer": "#### 2"}), '{p}:2: field "question" is a JSON number'),
    ({"text": "hello"}, "", "{p}:1: unknown schema"),
])
def test_bad_files_are_one_line_task_data_errors(tmp_path, first, line, needle):
    path = _write(tmp_path / "bad.jsonl", [json.dumps(first), line])
    with pytest.raises(TaskDataError) as err:
        load_jsonl(path)
    message = str(err.value)
    assert message.startswith(needle.format(p=path)) and "\n" not in message
    if "unknown schema" in needle:
        assert "GSM8K" in message and "PRM" in message and "got keys text" in message


def test_file_level_errors(tmp_path):
    with pytest.raises(TaskDataError, match="file not found"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(TaskDataError, match="no records"):
        load_gsm8k_jsonl(_write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(TaskDataError, match=r"bad.jsonl:1: field \"answer\" has no"):
        load_gsm8k_jsonl(_write(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": "x"})]))


def test_all_corruption_kinds_are_known():
    assert CORRUPTIONS == ("wrong_step", "wrong_answer", "propagated", "skipped_step")


def test_prefix_prompts_move_written_steps_into_the_prompt():
    plain = generate(ChainsConfig(num_examples=100, corruptions={"wrong_step": 0.3}, seed=5))
    mixed = generate(ChainsConfig(num_examples=100, corruptions={"wrong_step": 0.3}, prefix_fraction=0.4, seed=5))
    assert [r["question"] for r in plain] == [r["question"] for r in mixed]  # same questions, same corruptions
    assert sum(r["prefix_steps"] > 0 for r in mixed) == 40
    for a, b in zip(plain, mixed):
        k = b["prefix_steps"]
        assert a["prompt"] + a["completion"] == b["prompt"] + b["completion"]  # the same text, cut elsewhere
        assert 0 <= k < a["num_steps"] and b["prompt"] == a["prompt"] + "".join(s + "\n" for s in a["steps"][:k])
        assert b["completion"] == format_completion(a["steps"][k:], a["answer"])
    with pytest.raises(ValueError, match="prefix_fraction: expected a number in"):
        ChainsConfig(prefix_fraction=1.5)
