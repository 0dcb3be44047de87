"""The bounded_retrieval mitigation: the packer, oracle placement, exact RAFT / contamination mixes, the targets of
every record kind, closed-book passthrough, determinism and the errors, with fake injected callables."""

from __future__ import annotations

import copy
import random

import pytest

from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import hooks_overridden
from llm_limits.mitigations.bounded_retrieval import (
    BoundedRetrieval,
    BoundedRetrievalConfig,
    exact_mask,
    overflows,
    pack,
    place,
    place_in_order,
)

VALUES = ["teln", "mird", "sopa", "kavu", "bire", "lomo"]


# --- fake injected callables (what the trainer builds from the kb task and a retriever) ------------------------------
def render_prompt(passages: list[str], question: str) -> str:
    return "".join(f"P:{p}\n" for p in passages) + f"Q:{question}\n"


def render_completion(evidence: list[str] | None, answer: str, quote: bool = True) -> str:
    if not quote:
        return f"A:{answer}"
    if evidence is None:
        return f"E:none\nA:{answer}"
    return "".join(f"E:{p}\n" for p in evidence) + f"A:{answer}"


def count_tokens(text: str) -> int:
    return len(text) + 3  # a char tokenizer: "P:" + text + "\n"


def candidates(record: dict, n: int) -> list[tuple[str, float]]:
    """Distractors about the record's entity and others, best first (scores 1.0, 0.9, ...)."""
    entity = record["entity"] or "Zed"
    pool = [f"pet of {entity} is cat.", f"job of {entity} is smith."] + [f"home of Ent{j} is {VALUES[j % 6]}." for j in range(20)]
    return [(p, 1.0 - 0.04 * i) for i, p in enumerate(pool[:n])]


def poison(record: dict, rng: random.Random) -> tuple[str, str]:
    value = rng.choice([v for v in VALUES if v != record["answer"]])
    return f"{record['attribute']} of {record['entity']} is {value}.", value


FAKES = dict(candidates=candidates, count_tokens=count_tokens, render_prompt=render_prompt,
             render_completion=render_completion, poison=poison)


def record(entity: str = "Vokar", value: str = "teln", *, hops: int = 1, answerable: bool = True,
           closed_book: bool = False) -> dict:
    """A record shaped like the contract's kb_qa example (oracle-only context)."""
    if not answerable:
        oracles: list[str] = []
        value = "unknown"
    elif hops == 2:
        oracles = [f"boss of {entity} is Mira.", f"home of Mira is {value}."]
    else:
        oracles = [f"home of {entity} is {value}."]
    question = f"home of boss of {entity}?" if hops == 2 else f"home of {entity}?"
    prompt = render_prompt([] if closed_book else oracles, question)
    return {
        "task": "kb_qa", "question": question, "prompt": prompt,
        "completion": render_completion(oracles if oracles else None, value, quote=not closed_book),
        "answer": value, "gold_answer": value, "entity": entity, "attribute": "home", "hops": hops,
        "answerable": answerable, "oracle_ids": [f"{entity}/home"] if answerable else [],
        "oracle_passages": oracles, "candidate_passages": [], "rank": 1 if answerable else 0,
        "closed_book": closed_book,
    }


def records(n: int, **kw) -> list[dict]:
    return [record(f"Ent{i}x", VALUES[i % 6], **kw) for i in range(n)]


def make(**cfg) -> BoundedRetrieval:
    return BoundedRetrieval(BoundedRetrievalConfig(**cfg), **FAKES)


def passages_of(prompt: str) -> list[str]:
    return [line[2:] for line in prompt.splitlines() if line.startswith("P:")]


# --- the packer ---------------------------------------------------------------------------------------------------
def test_pack_budget_and_k_hold_unless_the_required_overflow():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 12)
        counts = [rng.randint(1, 30) for _ in range(n)]
        scores = [rng.random() for _ in range(n)]
        required = rng.sample(range(n), rng.randint(0, min(3, n)))
        k, budget = rng.randint(1, 6), rng.randint(0, 80)
        chosen = pack(counts, scores, required, k, budget)
        assert chosen[: len(required)] == required and len(set(chosen)) == len(chosen)
        if overflows(counts, required, k, budget):
            assert chosen == required
        else:
            assert sum(counts[i] for i in chosen) <= budget and len(chosen) <= k
            # nothing left out would still have fitted, unless k was reached
            used = sum(counts[i] for i in chosen)
            if len(chosen) < k:
                assert all(used + counts[i] > budget for i in range(n) if i not in chosen)


def test_pack_orders_by_relevance_per_token():
    # scores/tokens: 0 -> 0.1, 1 -> 0.5, 2 -> 0.25, 3 -> 0.2; the top raw score (0) is last
    assert pack([10, 1, 2, 2], [1.0, 0.5, 0.5, 0.4], required=[], k=4, budget=100) == [1, 2, 3, 0]
    # ties in score per token: the shorter first, then the lower index
    assert pack([4, 2, 2], [0.4, 0.2, 0.2], required=[], k=3, budget=100) == [1, 2, 0]


def test_pack_respects_k():
    assert pack([1] * 6, [0.6, 0.5, 0.4, 0.3, 0.2, 0.1], required=[5], k=3, budget=100) == [5, 0, 1]
    assert len(pack([1] * 6, [1.0] * 6, required=[], k=1, budget=100)) == 1


def test_pack_skips_what_does_not_fit_and_continues():
    # 0 has the best score per token but 9 tokens do not fit in the 8 left after the required 2; 1 and 2 do
    assert pack([9, 5, 3, 2], [9.0, 1.0, 0.5, 0.0], required=[3], k=4, budget=10) == [3, 1, 2]


def test_pack_keeps_overflowing_required_passages_alone():
    assert pack([30, 40, 1], [0.0, 0.0, 1.0], required=[1, 0], k=5, budget=50) == [1, 0]
    assert pack([1, 1, 1], [0.0, 0.0, 1.0], required=[0, 1], k=1, budget=50) == [0, 1]
    with pytest.raises(ValueError, match="required index 5 is out of range"):
        pack([1, 1], [0.0, 0.0], required=[5], k=2, budget=5)


# --- placement and exact mixes --------------------------------------------------------------------------------------
def test_place_spreads_uniformly():
    rng, slots = random.Random(0), 5
    counts = [0] * slots
    for _ in range(2000):
        counts[place(slots, rng)] += 1
    assert all(0.8 * 2000 / slots <= c <= 1.2 * 2000 / slots for c in counts)


def test_oracle_slot_spreads_uniformly_through_the_mitigation():
    m = make(k=4, budget_tokens=1000, oracle_fraction=1.0, num_distractors=[3, 3])
    out = m.transform_records(records(2000), seed=0)
    counts = [0] * 4
    for o in out:
        assert o["num_passages"] == 4 and passages_of(o["prompt"])[o["oracle_slot"]] == o["oracle_passages"][0]
        counts[o["oracle_slot"]] += 1
    assert all(0.8 * 500 <= c <= 1.2 * 500 for c in counts), counts


def test_two_hop_oracles_keep_their_order():
    m = make(k=5, budget_tokens=1000, oracle_fraction=1.0, num_distractors=[3, 3])
    firsts = set()
    for o in m.transform_records(records(200, hops=2), seed=1):
        ps = passages_of(o["prompt"])
        bridge, last = (ps.index(p) for p in o["oracle_passages"])
        assert bridge < last and o["oracle_slot"] == bridge
        assert o["completion"] == render_completion(o["oracle_passages"], o["answer"])
        firsts.add(bridge)
    assert firsts == {0, 1, 2, 3}  # the pair lands anywhere, in order
    assert place_in_order(2, 0, random.Random(0)) == [0, 1]


def test_exact_mask_counts():
    for n, fraction in [(10, 0.3), (7, 0.5), (100, 0.8), (3, 0.0), (5, 1.0)]:
        assert sum(exact_mask(n, fraction, random.Random(n))) == round(fraction * n)


def test_raft_mix_is_exact():
    recs = records(50) + records(10, answerable=False) + records(5, closed_book=True)
    m = make(oracle_fraction=0.8, num_distractors=[1, 3])
    out = m.transform_records(recs, seed=3)
    answerable = [o for o in out if o["answerable"] and not o["closed_book"]]
    assert sum(o["has_oracle"] for o in answerable) == 40
    for o in answerable:
        ps = passages_of(o["prompt"])
        assert (o["oracle_passages"][0] in ps) == o["has_oracle"]
        assert (o["oracle_slot"] >= 0) == o["has_oracle"]
    assert not any(o["has_oracle"] for o in out if not o["answerable"])
    assert m.stats["oracle"] == 40 and m.stats["oracle_free"] == 10
    assert m.stats["unanswerable"] == 10 and m.stats["closed_book"] == 5 and m.stats["records"] == 65


def test_contamination_rate_is_exact():
    m = make(oracle_fraction=0.8, contamination_rate=0.25, num_distractors=[0, 2], k=6, budget_tokens=1000)
    out = m.transform_records(records(100), seed=5)
    bad = [o for o in out if o["contaminated"]]
    assert len(bad) == 20 and all(o["has_oracle"] for o in bad)  # 25% of the 80 oracle records
    for o in bad:
        poisoned = f"home of {o['entity']} is {o['poisoned_answer']}."
        assert poisoned in passages_of(o["prompt"]) and o["poisoned_answer"] not in ("", o["gold_answer"])
    assert all(o["poisoned_answer"] == "" for o in out if not o["contaminated"])
    assert m.stats["contaminated"] == 20


def test_poisons_are_kept_and_distractors_give_way():
    # k = 2 holds the oracle and the poison: the 3 distractors wanted do not get in
    m = make(k=2, oracle_fraction=1.0, contamination_rate=1.0, num_distractors=[3, 3], budget_tokens=1000)
    for o in m.transform_records(records(20), seed=0):
        assert sorted(passages_of(o["prompt"])) == sorted([o["oracle_passages"][0],
                                                           f"home of {o['entity']} is {o['poisoned_answer']}."])
    # a tight budget: oracle (25 tokens) + poison (25) fill 55 tokens, no distractor (>= 23 tokens) fits
    m = make(k=6, oracle_fraction=1.0, contamination_rate=1.0, num_distractors=[4, 4], budget_tokens=55)
    out = m.transform_records(records(10), seed=0)
    assert all(o["num_passages"] == 2 and o["evidence_tokens"] <= 55 for o in out)
    assert m.stats["overflows"] == 0


def test_budget_caps_distractors_and_overflows_are_counted():
    m = make(k=5, oracle_fraction=1.0, num_distractors=[4, 4], budget_tokens=80)
    out = m.transform_records(records(30), seed=0)
    assert all(o["evidence_tokens"] <= 80 and 1 < o["num_passages"] < 5 for o in out)
    assert m.stats["overflows"] == 0
    m = make(k=5, oracle_fraction=1.0, num_distractors=[4, 4], budget_tokens=10)  # the oracle alone is ~25 tokens
    out = m.transform_records(records(30), seed=0)
    assert all(o["num_passages"] == 1 for o in out) and m.stats["overflows"] == 30


def test_candidates_equal_to_the_oracle_are_dropped():
    def with_oracle(rec, n):
        return [(rec["oracle_passages"][0], 5.0)] + candidates(rec, n)

    m = BoundedRetrieval(BoundedRetrievalConfig(oracle_fraction=1.0, num_distractors=[2, 2]),
                         **{**FAKES, "candidates": with_oracle})
    for o in m.transform_records(records(20), seed=0):
        assert passages_of(o["prompt"]).count(o["oracle_passages"][0]) == 1 and o["num_passages"] == 3


# --- targets --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, cfg, expected",
    [
        ("oracle", {}, "E:home of Vokar is teln.\nA:teln"),
        ("oracle", {"quote_evidence": False}, "A:teln"),
        ("contaminated", {}, "E:none\nA:conflict"),
        ("contaminated", {"conflict_target": "answer"}, "E:home of Vokar is teln.\nA:teln"),
        ("oracle_free", {}, "A:teln"),
        ("oracle_free", {"oracle_free_target": "abstain"}, "E:none\nA:unknown"),
        ("unanswerable", {}, "E:none\nA:unknown"),
        ("unanswerable", {"oracle_free_target": "answer", "abstain_answer": "idk"}, "E:none\nA:idk"),
    ],
)
def test_targets(kind, cfg, expected):
    base = {"oracle_fraction": 1.0, "num_distractors": [2, 2]}
    if kind == "contaminated":
        base["contamination_rate"] = 1.0
    if kind == "oracle_free":
        base["oracle_fraction"] = 0.0
    m = make(**{**base, **cfg})
    [out] = m.transform_records([record(answerable=kind != "unanswerable")], seed=0)
    assert out["completion"] == expected
    assert out["answer"] == expected.rsplit("A:", 1)[1]
    assert out["gold_answer"] == ("unknown" if kind == "unanswerable" else "teln")
    assert out["prompt"].endswith("Q:home of Vokar?\n")
    assert (out["oracle_slot"] >= 0) == (kind in ("oracle", "contaminated"))


# --- passthrough, determinism, no mutation --------------------------------------------------------------------------
def test_closed_book_records_pass_through():
    recs = records(4, closed_book=True)
    out = make(oracle_fraction=1.0).transform_records(recs, seed=0)
    for r, o in zip(recs, out):
        assert {k: o[k] for k in r} == r
        assert (o["has_oracle"], o["contaminated"], o["num_passages"], o["evidence_tokens"], o["oracle_slot"],
                o["poisoned_answer"]) == (False, False, 0, 0, -1, "")
    # every row has the same columns, closed book or not
    mixed = make().transform_records(records(3) + recs, seed=0)
    assert len({tuple(sorted(o)) for o in mixed}) == 1


def test_same_seed_same_output_and_input_untouched():
    recs = records(40) + records(5, hops=2) + records(5, answerable=False)
    before = copy.deepcopy(recs)
    cfg = dict(oracle_fraction=0.7, contamination_rate=0.3, num_distractors=[0, 4])
    a = make(**cfg).transform_records(recs, seed=11)
    b = make(**cfg).transform_records(copy.deepcopy(recs), seed=11)
    c = make(**cfg).transform_records(recs, seed=12)
    assert a == b and a != c
    assert recs == before


def test_disabled_passes_everything_through():
    recs = records(3)
    assert make(enabled=False).transform_records(recs, seed=0) == recs


# --- wiring and errors ----------------------------------------------------------------------------------------------
def test_registry_and_hooks():
    assert MITIGATIONS["bounded_retrieval"] is BoundedRetrieval
    assert (BoundedRetrieval.name, BoundedRetrieval.limit) == ("bounded_retrieval", "retrieval")
    assert hooks_overridden(BoundedRetrieval()) == ["transform_records"]
    m = make(k=3)
    assert m.describe()["k"] == 3 and "stats" not in m.describe()
    m.transform_records(records(5), seed=0)
    assert m.describe()["stats"]["records"] == 5


def test_missing_injected_callable_is_named():
    with pytest.raises(ValueError, match=r"bounded_retrieval needs the trainer to inject `candidates` \(candidates\("):
        BoundedRetrieval(BoundedRetrievalConfig()).transform_records(records(2), seed=0)
    no_poison = {k: v for k, v in FAKES.items() if k != "poison"}
    m = BoundedRetrieval(BoundedRetrievalConfig(contamination_rate=0.5), **no_poison)
    with pytest.raises(ValueError, match="inject `poison`"):
        m.transform_records(records(10), seed=0)
    assert BoundedRetrieval(BoundedRetrievalConfig(), **no_poison).transform_records(records(2), seed=0)
    # closed-book records need nothing
    assert BoundedRetrieval().transform_records(records(2, closed_book=True), seed=0)[0]["oracle_slot"] == -1


def test_bad_records():
    bad = record()
    del bad["oracle_passages"]
    with pytest.raises(ValueError, match="record 1 has no `oracle_passages`"):
        make().transform_records([record(), bad], seed=0)
    empty = record()
    empty["oracle_passages"] = []
    with pytest.raises(ValueError, match="record 0 is answerable but its oracle_passages is empty"):
        make().transform_records([empty], seed=0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("k", 0, r"k: expected an integer >= 1 \(got 0\)"),
        ("budget_tokens", -5, "budget_tokens: expected an integer >= 1"),
        ("oracle_fraction", 1.5, r"oracle_fraction: expected a number in \[0, 1\]"),
        ("contamination_rate", -0.1, "contamination_rate: expected a number in"),
        ("num_distractors", [3, 1], r"num_distractors: expected \[low, high\]"),
        ("num_distractors", [2], r"num_distractors: expected \[low, high\]"),
        ("oracle_free_target", "guess", "oracle_free_target: expected one of answer, abstain"),
        ("conflict_target", "ignore", "conflict_target: expected one of flag, answer"),
        ("poison_per_example", 0, "poison_per_example: expected an integer >= 1"),
        ("conflict_answer", "unknown", "conflict_answer: must differ from abstain_answer"),
        ("abstain_answer", "", "abstain_answer: expected a non-empty one-line string"),
    ],
)
def test_config_errors(field, value, message):
    with pytest.raises(ValueError, match=message):
        BoundedRetrievalConfig(**{field: value})


def test_with_the_kb_task():
    """The real kb renderers and poison, when llm_limits.evals.tasks.kb is there (another helper writes it)."""
    kb = pytest.importorskip("llm_limits.evals.tasks.kb")
    config = kb.KBConfig(num_entities=30, num_examples=60, unanswerable_fraction=0.1, two_hop_fraction=0.2)
    base = kb.build_kb(config)
    recs = kb.generate(config)
    texts = list(base.passages.values())

    def kb_candidates(rec, n):
        words = set(rec["question"].replace("?", "").split())
        scored = [(p, float(len(words & set(p.replace(".", "").split())))) for p in texts
                  if p not in rec["oracle_passages"]]
        return sorted(scored, key=lambda x: -x[1])[:n]

    m = BoundedRetrieval(
        BoundedRetrievalConfig(k=4, budget_tokens=200, oracle_fraction=0.5, contamination_rate=0.5),
        candidates=kb_candidates, count_tokens=lambda t: len(t) + 3, render_prompt=kb.render_prompt,
        render_completion=kb.render_completion, poison=base.poison,
    )
    out = m.transform_records(recs, seed=0)
    for o in out:
        assert set(o["prompt"] + o["completion"]) <= set(kb.KB_ALPHABET)
        parsed = kb.parse_answer(o["completion"])
        if o["contaminated"]:
            assert parsed == kb.CONFLICT
        elif not o["answerable"]:
            assert parsed == kb.ABSTAIN
        else:
            assert parsed == o["gold_answer"]
    assert m.stats["contaminated"] == round(0.5 * m.stats["oracle"])


def test_context_size_does_not_tell_whether_the_oracle_or_a_poison_is_there():
    # With distractors drawn per record, a context without its oracle would be one passage shorter: a model then learns
    # "one passage = no oracle" (the first tiny distractor arm did: accuracy 0 with the oracle alone). Oracle-free and
    # unanswerable contexts take one distractor per missing oracle; a poisoned passage takes a distractor's place.
    m = make(oracle_fraction=0.5, contamination_rate=0.5, num_distractors=[2, 2], k=8, budget_tokens=10_000)
    out = m.transform_records(records(40) + records(10, answerable=False) + records(10, hops=2), seed=1)
    kinds = {(o["hops"], o["has_oracle"], o["contaminated"]) for o in out if o["answerable"]}
    assert {(1, True, False), (1, False, False), (1, True, True), (2, False, False)} <= kinds  # every kind occurs
    for o in out:
        # 2 distractors + the oracle's place (two places for two hops), whatever fills them
        assert o["num_passages"] == 2 + (2 if o["hops"] == 2 else 1), (o["hops"], o["has_oracle"], o["contaminated"])
