"""The synthetic knowledge base (evals/tasks/kb.py): determinism, exact kind proportions, Zipf popularity, the format,
two-hop chains, poisoned passages, and the user-data loaders (ours, HotpotQA, RAFT)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from llm_limits.evals.tasks import TASKS, TaskDataError
from llm_limits.evals.tasks.kb import (
    ABSTAIN,
    ASKED_ATTRIBUTES,
    KB_ALPHABET,
    TASK,
    KBConfig,
    answer_matches,
    build_kb,
    generate,
    load_jsonl,
    make_record,
    parse_answer,
    passage_text,
    unknown_entities,
)

FIXTURES = Path(__file__).parent / "fixtures" / "retrieval"
FIELDS = {"task", "question", "prompt", "completion", "answer", "gold_answer", "entity", "attribute", "hops",
          "answerable", "oracle_ids", "oracle_passages", "candidate_passages", "rank", "closed_book"}
MIXED = KBConfig(num_entities=60, num_examples=200, two_hop_fraction=0.3, unanswerable_fraction=0.25,
                 closed_book_fraction=0.1, seed=3)


@pytest.fixture(scope="module")
def mixed() -> list[dict]:
    return generate(MIXED)


def test_registered_as_a_task():
    assert TASKS["kb"] == (KBConfig, generate)


# --- the knowledge base ---------------------------------------------------------------------------------------------
def test_same_config_same_records_and_the_kb_ignores_seed_and_num_examples(mixed):
    assert generate(MIXED) == mixed
    a, b = build_kb(KBConfig(seed=1, num_examples=5)), build_kb(KBConfig(seed=2, num_examples=50))
    assert (a.entities, a.facts, a.passages, a.probabilities) == (b.entities, b.facts, b.passages, b.probabilities)
    assert build_kb(KBConfig(kb_seed=1)).entities != a.entities
    other = generate(KBConfig(**{**MIXED.__dict__, "seed": 4}))
    assert [r["question"] for r in other] != [r["question"] for r in mixed]


def test_names_values_and_facts():
    kb = build_kb(KBConfig(num_entities=300, values_per_attribute=25))
    assert len(set(kb.entities)) == 300
    assert all(re.fullmatch(r"[A-Z][a-z]{3,6}", e) for e in kb.entities)
    pools = [kb.values[a] for a in ASKED_ATTRIBUTES]
    assert all(len(set(p)) == 25 and all(re.fullmatch(r"[a-z]{3,6}", v) for v in p) for p in pools)
    words = [v for p in pools for v in p] + [e.lower() for e in kb.entities]
    assert len(set(words)) == len(words)  # pools disjoint from each other and from the names
    assert abs(sum(kb.probabilities) - 1) < 1e-9
    for e in kb.entities:
        assert kb.facts[(e, "boss")] in kb.entities and kb.facts[(e, "boss")] != e
        for a in ASKED_ATTRIBUTES:
            assert kb.facts[(e, a)] in kb.values[a]
    assert len(kb.passages) == len(kb.facts) == 300 * 4
    assert kb.passages[kb.passage_id(kb.entities[0], "boss")] == \
        passage_text("boss", kb.entities[0], kb.facts[(kb.entities[0], "boss")])
    assert kb.rank(kb.entities[0]) == 1 and kb.rank(kb.entities[-1]) == 300 and kb.rank("Zzyzx") == 0
    # a KB asked about fewer attributes keeps the same values for the ones it keeps
    small = build_kb(KBConfig(num_entities=300, values_per_attribute=25, attributes=["job"]))
    assert small.entities == kb.entities and {k for k in small.facts if k[1] not in ("job", "boss")} == set()
    assert all(small.facts[(e, "job")] == kb.facts[(e, "job")] for e in kb.entities)


def test_unknown_entities_are_disjoint_from_the_kb():
    kb = build_kb(KBConfig(num_entities=500))
    unknown = unknown_entities(kb, 800, seed=0)
    assert len(set(unknown)) == 800 and not set(unknown) & set(kb.entities)
    assert all(re.fullmatch(r"[A-Z][a-z]{3,6}", e) and kb.rank(e) == 0 for e in unknown)
    assert unknown_entities(kb, 800, seed=0) == unknown


# --- generate -------------------------------------------------------------------------------------------------------
def test_exact_proportions_of_the_kinds(mixed):
    kb = build_kb(MIXED)
    assert len(mixed) == 200 and all(set(r) == FIELDS and r["task"] == TASK for r in mixed)
    unanswerable = [r for r in mixed if not r["answerable"]]
    assert len(unanswerable) == 50
    assert sum(r["hops"] == 2 for r in mixed) == 60
    assert sum(r["closed_book"] for r in mixed) == 20
    for r in unanswerable:
        assert r["answer"] == ABSTAIN and r["oracle_ids"] == r["oracle_passages"] == [] and r["rank"] == 0
        assert r["hops"] == 1 and kb.rank(r["entity"]) == 0 and r["prompt"] == f"Q:{r['question']}\n"
        assert r["completion"] == ("A:unknown" if r["closed_book"] else "E:none\nA:unknown")
    for r in mixed:
        if r["closed_book"]:
            assert "P:" not in r["prompt"] and "E:" not in r["completion"]
    # the kinds are spread over the whole list, not blocks
    assert 0 < sum(not r["answerable"] for r in mixed[:100]) < 50


def test_zipf_popularity_and_rank():
    kb = build_kb(KBConfig())
    records = generate(KBConfig(num_examples=5000, seed=1))
    counts = Counter(r["entity"] for r in records)
    assert counts[kb.entities[0]] > counts[kb.entities[49]]
    assert counts[kb.entities[0]] > 5000 * 0.1  # p(rank 1) = 1 / H(200) ~ 0.17
    assert all(r["rank"] == kb.entities.index(r["entity"]) + 1 for r in records)
    uniform = build_kb(KBConfig(zipf=0.0)).probabilities
    assert max(uniform) - min(uniform) < 1e-12


def test_format_alphabet_oracles_and_answers(mixed):
    for r in mixed:
        assert set(r["prompt"] + r["completion"]) <= set(KB_ALPHABET), r
        assert parse_answer(r["completion"]) == r["answer"] == r["gold_answer"]
        assert r["prompt"].endswith(f"Q:{r['question']}\n")
        if r["answerable"]:
            assert r["oracle_passages"][-1].endswith(f" is {r['answer']}.")
            if not r["closed_book"]:
                assert r["prompt"] == "".join(f"P:{p}\n" for p in r["oracle_passages"]) + f"Q:{r['question']}\n"
                assert r["completion"] == "".join(f"E:{p}\n" for p in r["oracle_passages"]) + f"A:{r['answer']}"
            else:
                assert r["completion"] == f"A:{r['answer']}"


def test_quote_evidence_off_gives_the_answer_line_only():
    records = generate(KBConfig(num_examples=30, unanswerable_fraction=0.5, quote_evidence=False))
    assert all(r["completion"] == f"A:{r['answer']}" for r in records)
    assert any("P:" in r["prompt"] for r in records)


def test_two_hop_chains_are_consistent(mixed):
    kb = build_kb(MIXED)
    two_hop = [r for r in mixed if r["hops"] == 2]
    assert two_hop
    for r in two_hop:
        x, a = r["entity"], r["attribute"]
        boss = kb.facts[(x, "boss")]
        assert r["question"] == f"{a} of boss of {x}?"
        assert r["oracle_ids"] == [f"{x}/boss", f"{boss}/{a}"]
        assert r["oracle_passages"] == [f"boss of {x} is {boss}.", f"{a} of {boss} is {kb.facts[(boss, a)]}."]
        assert r["answer"] == kb.facts[(boss, a)] and r["rank"] == kb.rank(x)


def test_make_record_closed_book_and_bad_arguments():
    kb = build_kb(KBConfig(num_entities=10))
    e = kb.entities[2]
    r = make_record(kb, e, "pet", 1, closed_book=True)
    assert (r["prompt"], r["completion"], r["oracle_ids"]) == (f"Q:pet of {e}?\n", f"A:{kb.facts[(e, 'pet')]}",
                                                               [f"{e}/pet"])
    assert make_record(kb, e, "boss", 1)["answer"] == kb.facts[(e, "boss")]
    with pytest.raises(ValueError, match="hops must be 1 or 2"):
        make_record(kb, e, "pet", 3)
    for entity in (e, "Zzyzx"):  # known or not, the attribute must be one of the KB's
        with pytest.raises(ValueError, match="unknown attribute 'age'"):
            make_record(kb, entity, "age", 1)


def test_poison_keeps_the_last_hop_and_changes_the_value(mixed):
    kb = build_kb(MIXED)
    answerable = [r for r in mixed if r["answerable"]]
    assert {r["hops"] for r in answerable} == {1, 2}
    for r in answerable:
        passage, value = kb.poison(r, random.Random(0))
        last = r["oracle_passages"][-1]
        head = last[: -len(r["answer"]) - 1]  # "home of Tunve is "
        assert passage == f"{head}{value}." and value != r["answer"] and value in kb.values[r["attribute"]]
    assert kb.poison(answerable[0], random.Random(5)) == kb.poison(answerable[0], random.Random(5))
    with pytest.raises(ValueError, match="unanswerable"):
        kb.poison(next(r for r in mixed if not r["answerable"]), random.Random(0))


@pytest.mark.parametrize("text,expected", [
    ("E:home of Vokar is teln.\nA:teln", "teln"),
    ("A: teln \nE:more text", "teln"),
    ("A:wrong\nA:right\n", "right"),  # the last one counts
    ("A:", ""),
    ("the answer is teln", None),
    ("", None),
])
def test_parse_answer(text, expected):
    assert parse_answer(text) == expected


def test_answer_matches():
    assert answer_matches(" TELN ", "teln") and answer_matches("Lake Geneva", "lake geneva")
    assert not answer_matches("tel", "teln") and not answer_matches(None, ABSTAIN)


@pytest.mark.parametrize("params,message", [
    ({"zipf": -1}, "kb: zipf must be >= 0 (got -1)"),
    ({"num_entities": 1}, "kb: num_entities must be an integer >= 2 (got 1)"),
    ({"num_entities": 10**6}, "kb: num_entities must be <= 100000 (got 1000000)"),
    ({"values_per_attribute": 1}, "kb: values_per_attribute must be an integer >= 2 (got 1)"),
    ({"num_examples": 0}, "kb: num_examples must be an integer >= 1 (got 0)"),
    ({"attributes": ["home", "boss"]}, "kb: attributes: 'boss' is the two-hop bridge"),
    ({"attributes": ["age"]}, "kb: attributes: unknown attribute 'age' (known: home, job, pet)"),
    ({"attributes": []}, "kb: attributes: expected a non-empty list"),
    ({"attributes": ["job", "job"]}, "kb: attributes: each attribute at most once"),
    ({"two_hop_fraction": 1.5}, "kb: two_hop_fraction must be a number in [0, 1] (got 1.5)"),
    ({"closed_book_fraction": -0.1}, "kb: closed_book_fraction must be a number in [0, 1]"),
    ({"two_hop_fraction": 0.6, "unanswerable_fraction": 0.5}, "kb: two_hop_fraction + unanswerable_fraction must"),
    ({"num_examples": 3_000_000, "unanswerable_fraction": 1.0}, "kb: num_entities + unanswerable questions"),
])
def test_config_errors_name_the_field(params, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        KBConfig(**params)
    assert "\n" not in str(err.value)


# --- user data ------------------------------------------------------------------------------------------------------
def test_load_ours():
    records = load_jsonl(FIXTURES / "ours.jsonl")
    assert len(records) == 4 and all(set(r) == FIELDS for r in records)
    r = records[1]
    assert (r["task"], r["entity"], r["attribute"], r["hops"], r["rank"], r["answerable"], r["oracle_ids"]) == \
        (TASK, "", "", 2, 0, True, [])
    assert r["answer"] == r["gold_answer"] == "Czech Republic" and len(r["candidate_passages"]) == 1
    assert r["prompt"] == "".join(f"P:{p}\n" for p in r["oracle_passages"]) + f"Q:{r['question']}\n"
    assert r["completion"].endswith("\nA:Czech Republic") and parse_answer(r["completion"]) == "Czech Republic"
    assert records[2]["candidate_passages"] == []
    assert "\n" not in records[3]["oracle_passages"][0]  # the newline inside the passage became a space


def test_load_hotpotqa():
    records = load_jsonl(FIXTURES / "hotpotqa.jsonl")
    assert len(records) == 3 and all(set(r) == FIELDS for r in records)
    r = records[0]
    assert r["answer"] == "Danube" and r["hops"] == 2
    assert [p.split(":")[0] for p in r["oracle_passages"]] == ["Hungarian Parliament Building", "Budapest"]
    assert r["oracle_passages"][1] == ("Budapest: Budapest is the capital and most populous city of Hungary. The city "
                                       "straddles the Danube, with Buda on the west bank and Pest on the east.")
    assert [p.split(":")[0] for p in r["candidate_passages"]] == ["Lake Balaton", "Debrecen"]
    # oracles follow supporting_facts' order, not the context's
    assert [p.split(":")[0] for p in records[1]["oracle_passages"]] == ["River Thames", "River Severn"]


def test_load_raft():
    records = load_jsonl(FIXTURES / "raft.jsonl")
    assert len(records) == 3 and all(set(r) == FIELDS for r in records)
    assert [r["answer"] for r in records] == ["Rhine", "Lake Geneva", "Guadalquivir"]
    r = records[0]
    assert r["hops"] == 1 and r["oracle_passages"][0].startswith("Cologne is the largest city")
    assert r["candidate_passages"] == ["Munich lies on the banks of the Isar, north of the Bavarian Alps.",
                                       "Hamburg's port on the Elbe is the third-busiest in Europe."]
    # an oracle_context with a newline still matches its (one-line) copy among the documents
    assert records[1]["candidate_passages"] == ["Zurich sits at the northern tip of Lake Zurich."]


def _lines(tmp_path: Path, *objs: object) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n")
    return path


OURS = {"question": "Which river flows through Vienna?", "answer": "Danube", "oracle": ["Vienna lies on the Danube."]}


def test_bad_json_line(tmp_path):
    path = _lines(tmp_path, OURS, '{"question": "x", ')
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:2: not valid JSON")):
        load_jsonl(path)


def test_line_missing_question(tmp_path):
    path = _lines(tmp_path, OURS, {"answer": "Danube", "oracle": ["Vienna lies on the Danube."]})
    with pytest.raises(TaskDataError, match=re.escape(f'{path}:2: missing field "question"')):
        load_jsonl(path)


def test_hotpotqa_supporting_title_missing_from_context(tmp_path):
    first = json.loads((FIXTURES / "hotpotqa.jsonl").read_text().splitlines()[0])
    bad = {**first, "supporting_facts": [["Budapest", 0], ["Vienna", 0]]}
    path = _lines(tmp_path, first, first, bad)
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:3: supporting_facts names the title 'Vienna', "
                                                      f'which is not in "context"')):
        load_jsonl(path)


@pytest.mark.parametrize("obj,message", [
    ({"question": "q", "answer": "a"}, ":1: unknown schema"),
    ({**OURS, "oracle": []}, ':1: field "oracle" is empty'),
    ({**OURS, "oracle": ["fine", 3]}, ":1: oracle[1] is a JSON number"),
    ({**OURS, "answer": 7}, ':1: field "answer" is a JSON number'),
    ({"question": "q", "oracle_context": "doc", "context": {"sentences": [["doc"]]}}, ':1: missing field "cot_answer"'),
    ({"question": "q", "answer": "a", "oracle_context": "doc", "context": {"sentences": "doc"}},
     ':1: "context.sentences" is a JSON string'),
])
def test_other_bad_lines(tmp_path, obj, message):
    path = _lines(tmp_path, obj)
    with pytest.raises(TaskDataError, match=re.escape(message)) as err:
        load_jsonl(path)
    assert str(err.value).startswith(f"{path}:") and "\n" not in str(err.value)
