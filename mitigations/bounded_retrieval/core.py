"""Pure functions of bounded-oracle retrieval training: the context packer, oracle placement, exact mixing masks,
the target rule, and the per-record builder.

A *bounded oracle* is a retrieval context with a budget: at most ``k`` passages and at most ``budget`` evidence
tokens. Each training record's context is rebuilt from its fields: the oracle passage(s) (RAFT's ``P`` fraction of
records), retrieved distractors, and, for a contaminated fraction, PoisonedRAG-style passages asserting a wrong value.
The domain pieces (retrieval, token counting, rendering, poisoning) are callables passed in, so this module needs
nothing but the stdlib.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Sequence

CANDIDATE_MARGIN = 8
"""Candidates asked for beyond the distractors wanted, so the packer can skip passages that do not fit the budget."""

TARGET_KINDS = ("evidence", "bare", "abstain", "conflict")
"""What a record's completion says: ``evidence`` quotes the oracle passages then the gold answer; ``bare`` is the gold
answer alone (RAFT's oracle-free target); ``abstain`` and ``conflict`` quote no evidence and answer the abstain /
conflict word."""


# --- 1. packing (the bounded oracle) ----------------------------------------------------------------------------------
def pack(
    token_counts: Sequence[int], scores: Sequence[float], required: Sequence[int], k: int, budget: int
) -> list[int]:
    """Indices of the passages that go into a context of at most ``k`` passages and ``budget`` tokens.

    Truncation policy: the ``required`` passages (oracles, poisoned ones) come first, in their given order, and are
    kept whatever the limits; then the other passages by score per token, descending (ties: fewer tokens, then lower
    index), whole passages only: a passage that would overflow the budget is skipped and the next one is tried,
    until ``k`` passages are in. If the required passages alone exceed ``k`` or ``budget`` they are all kept and
    nothing else is added: check with :func:`overflows`. Negative scores count as 0; a passage of 0 tokens counts
    as 1 for its score per token.

    ``token_counts[i]``, ``scores[i]``: passage ``i``'s tokens and retrieval score; returns indices, required first,
    then the others in the order they were picked.

    >>> # passage 0 is required (an oracle); 1 has the best score per token; 2 (8 tokens) does not fit; 3 does
    >>> pack([6, 3, 8, 4], [0.0, 0.9, 1.0, 0.4], required=[0], k=3, budget=14)
    [0, 1, 3]
    >>> pack([6, 3, 8, 4], [0.0, 0.9, 1.0, 0.4], required=[0], k=2, budget=100)   # k caps the count
    [0, 1]
    >>> pack([10, 9, 1], [0.0, 0.0, 5.0], required=[1, 0], k=3, budget=12)       # required overflow: kept, alone
    [1, 0]
    """
    if len(token_counts) != len(scores):
        raise ValueError(f"pack: {len(token_counts)} token counts for {len(scores)} scores (expected one each)")
    if k < 1:
        raise ValueError(f"pack: k must be >= 1 (got {k})")
    if budget < 0:
        raise ValueError(f"pack: budget must be >= 0 (got {budget})")
    n = len(token_counts)
    for i in required:
        if not 0 <= i < n:
            raise ValueError(f"pack: required index {i} is out of range for {n} passages")
    if len(set(required)) != len(required):
        raise ValueError(f"pack: required indices repeat ({list(required)})")
    chosen = list(required)
    used = sum(int(token_counts[i]) for i in chosen)
    if overflows(token_counts, required, k, budget):
        return chosen
    taken = set(chosen)
    rest = [i for i in range(n) if i not in taken]
    rest.sort(key=lambda i: (-max(float(scores[i]), 0.0) / max(int(token_counts[i]), 1), int(token_counts[i]), i))
    for i in rest:
        if len(chosen) >= k:
            break
        if used + int(token_counts[i]) <= budget:  # skip what does not fit, try the next (a shorter one may)
            chosen.append(i)
            used += int(token_counts[i])
    return chosen


def overflows(token_counts: Sequence[int], required: Sequence[int], k: int, budget: int) -> bool:
    """Whether the required passages alone exceed ``k`` passages or ``budget`` tokens (then :func:`pack` keeps them
    and adds nothing).

    >>> overflows([6, 3], [0, 1], k=2, budget=9), overflows([6, 3], [0, 1], k=2, budget=8), overflows([1], [0, 0], 1, 9)
    (False, True, True)
    """
    return len(required) > k or sum(int(token_counts[i]) for i in required) > budget


# --- 2. placement and mixing ------------------------------------------------------------------------------------------
def place(n_slots: int, rng: random.Random) -> int:
    """A uniformly random slot in ``range(n_slots)``: where an oracle goes among ``n_slots - 1`` other passages.

    >>> rng = random.Random(0)
    >>> sorted({place(3, rng) for _ in range(100)}), place(1, rng)
    ([0, 1, 2], 0)
    """
    if n_slots < 1:
        raise ValueError(f"place: n_slots must be >= 1 (got {n_slots})")
    return rng.randrange(n_slots)


def place_in_order(n_items: int, n_others: int, rng: random.Random) -> list[int]:
    """Slots (ascending) for ``n_items`` passages placed among ``n_others`` in a context of ``n_items + n_others``:
    a uniformly random set of slots, filled in the items' given order (so a two-hop pair keeps its order; the
    first-hop passage is therefore more often early). One item: the same distribution as :func:`place`.

    >>> place_in_order(2, 3, random.Random(0)), place_in_order(1, 0, random.Random(0)), place_in_order(0, 2, None)
    ([3, 4], [0], [])
    """
    if n_items < 0 or n_others < 0:
        raise ValueError(f"place_in_order: counts must be >= 0 (got {n_items}, {n_others})")
    if n_items == 0:
        return []
    if n_items == 1:
        return [place(n_others + 1, rng)]
    return sorted(rng.sample(range(n_items + n_others), n_items))


def exact_mask(n: int, fraction: float, rng: random.Random) -> list[bool]:
    """``n`` flags, exactly ``round(fraction * n)`` of them True (Python's round: halves go to the even number),
    shuffled by ``rng``: a mix proportion that is exact, not binomial.

    >>> m = exact_mask(10, 0.3, random.Random(0))
    >>> sum(m), len(m), exact_mask(4, 1.0, random.Random(0)), exact_mask(0, 0.5, random.Random(0))
    (3, 10, [True, True, True, True], [])
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"exact_mask: fraction must be in [0, 1] (got {fraction})")
    if n < 0:
        raise ValueError(f"exact_mask: n must be >= 0 (got {n})")
    ones = round(fraction * n)
    mask = [True] * ones + [False] * (n - ones)
    rng.shuffle(mask)
    return mask


# --- 3. targets (RAFT, RGB) -------------------------------------------------------------------------------------------
def target_kind(
    *, answerable: bool, has_oracle: bool, contaminated: bool, oracle_free_target: str, conflict_target: str
) -> str:
    """Which completion a record is trained on (one of :data:`TARGET_KINDS`).

    - unanswerable (the entity is not in the knowledge base): ``abstain``, whatever the settings (RGB's negative
      rejection);
    - oracle present, clean: ``evidence`` (quote the oracle, then the answer: RAFT's chain-of-thought target);
    - oracle present, contaminated: ``conflict`` with ``conflict_target="flag"`` (RGB's counterfactual robustness:
      the context disagrees with itself), else ``evidence``;
    - oracle absent: ``bare`` with ``oracle_free_target="answer"`` (RAFT: answer from memory, no quote), else
      ``abstain``.

    >>> [target_kind(answerable=a, has_oracle=o, contaminated=c, oracle_free_target=f, conflict_target=t)
    ...  for a, o, c, f, t in [(False, False, False, "answer", "flag"), (True, True, False, "answer", "flag"),
    ...                        (True, True, True, "answer", "flag"), (True, True, True, "answer", "answer"),
    ...                        (True, False, False, "answer", "flag"), (True, False, False, "abstain", "flag")]]
    ['abstain', 'evidence', 'conflict', 'evidence', 'bare', 'abstain']
    """
    if not answerable:
        return "abstain"
    if has_oracle:
        return "conflict" if contaminated and conflict_target == "flag" else "evidence"
    return "bare" if oracle_free_target == "answer" else "abstain"


# --- 4. one record --------------------------------------------------------------------------------------------------
def build_record(
    record: dict[str, Any],
    *,
    has_oracle: bool,
    contaminated: bool,
    rng: random.Random,
    k: int,
    budget_tokens: int,
    num_distractors: tuple[int, int],
    candidates: Callable[[dict[str, Any], int], list[tuple[str, float]]],
    count_tokens: Callable[[str], int],
    render_prompt: Callable[[list[str], str], str],
    render_completion: Callable[[list[str] | None, str, bool], str],
    poison: Callable[[dict[str, Any], random.Random], tuple[str, str]] | None = None,
    poison_per_example: int = 1,
    oracle_free_target: str = "answer",
    conflict_target: str = "flag",
    quote_evidence: bool = True,
    abstain_answer: str = "unknown",
    conflict_answer: str = "conflict",
) -> dict[str, Any]:
    """A copy of ``record`` with a bounded retrieval context: new ``prompt``, ``completion``, ``answer``, plus
    ``has_oracle``, ``contaminated``, ``num_passages``, ``evidence_tokens``, ``oracle_slot`` (slot of the first oracle
    passage, -1 when none) and ``poisoned_answer`` (the first poisoned value, "" when none).

    Steps, all randomness from ``rng``: draw the number of distractors uniformly in ``num_distractors`` (inclusive),
    plus one per missing oracle when the context holds none, minus the poisoned passages when contaminated (so the
    number of passages carries no hint of the oracle or the poison);
    the required passages are the oracles (when ``has_oracle``; unanswerable records have none) and, when
    ``contaminated``, ``poison_per_example`` passages from ``poison(record, rng)``; ask ``candidates`` for the
    distractors wanted plus :data:`CANDIDATE_MARGIN` (passages equal to an oracle and repeats are dropped); pack
    with :func:`pack` (``k`` and ``budget_tokens``; the distractors give way first; required passages are never
    dropped); the distractors keep their retrieval order, the oracles go to uniformly random slots among them in
    their given order (:func:`place_in_order`), then each poisoned passage goes to a uniformly random slot.

    >>> fake = dict(
    ...     candidates=lambda rec, n: [("pet of Vokar is cat.", 2.0), ("job of Vokar is smith.", 1.0)][:n],
    ...     count_tokens=lambda text: len(text.split()),
    ...     render_prompt=lambda ps, q: "".join(f"P:{p}\\n" for p in ps) + f"Q:{q}\\n",
    ...     render_completion=lambda ev, a, quote=True: (("".join(f"E:{p}\\n" for p in ev) if ev else "E:none\\n")
    ...                                                  if quote else "") + f"A:{a}",
    ...     poison=lambda rec, rng: ("home of Vokar is mird.", "mird"))
    >>> rec = {"question": "home of Vokar?", "answer": "teln", "answerable": True, "closed_book": False,
    ...        "oracle_passages": ["home of Vokar is teln."]}
    >>> out = build_record(rec, has_oracle=True, contaminated=False, rng=random.Random(0), k=5, budget_tokens=64,
    ...                    num_distractors=(2, 2), **fake)
    >>> print(out["prompt"] + out["completion"])
    P:pet of Vokar is cat.
    P:home of Vokar is teln.
    P:job of Vokar is smith.
    Q:home of Vokar?
    E:home of Vokar is teln.
    A:teln
    >>> out["oracle_slot"], out["num_passages"], out["evidence_tokens"]
    (1, 3, 15)
    >>> bad = build_record(rec, has_oracle=True, contaminated=True, rng=random.Random(1), k=5, budget_tokens=64,
    ...                    num_distractors=(0, 0), **fake)
    >>> bad["prompt"].count("P:"), bad["completion"], bad["answer"], bad["poisoned_answer"]
    (2, 'E:none\\nA:conflict', 'conflict', 'mird')
    """
    answerable = bool(record.get("answerable", True))
    oracles = [str(p) for p in record["oracle_passages"]] if (has_oracle and answerable) else []
    has_oracle = bool(oracles)
    contaminated = bool(contaminated and has_oracle)
    lo, hi = num_distractors
    wanted = rng.randint(int(lo), int(hi))
    # The context's size must not tell whether the oracle is in it (RAFT keeps k documents either way): a context
    # without its oracle gets one distractor in each oracle's place, and poisoned passages take distractors' places.
    if not has_oracle:
        wanted += max(1, len(record.get("oracle_passages") or []))
    if contaminated:
        wanted = max(0, wanted - poison_per_example)

    poisoned: list[tuple[str, str]] = []
    if contaminated:
        if poison is None:
            raise ValueError("build_record: a contaminated record needs `poison(record, rng) -> (passage, value)`")
        poisoned = [tuple(poison(record, rng)) for _ in range(poison_per_example)]  # type: ignore[misc]

    required_texts = oracles + [p for p, _ in poisoned]
    room = max(0, min(wanted, k - len(required_texts)))  # distractors wanted, capped by k
    pool: list[tuple[str, float]] = []
    if room > 0:
        seen = set(required_texts)
        for text, score in candidates(record, room + CANDIDATE_MARGIN):
            if text not in seen:  # the retriever may return the oracle itself, or one passage twice
                seen.add(text)
                pool.append((str(text), float(score)))

    texts = required_texts + [t for t, _ in pool]
    counts = [int(count_tokens(t)) for t in texts]
    scores = [0.0] * len(required_texts) + [s for _, s in pool]
    required = list(range(len(required_texts)))
    limit = len(required_texts) + room
    chosen = pack(counts, scores, required, k=limit, budget=budget_tokens) if limit > 0 else []
    distractors = sorted(i for i in chosen if i >= len(required_texts))  # retrieval order (best first)

    # arrange: distractors, then the oracles at random slots (order kept), then each poison at a random slot
    items: list[tuple[str, int]] = [("distractor", i) for i in distractors]
    for slot, o in zip(place_in_order(len(oracles), len(items), rng), range(len(oracles))):
        items.insert(slot, ("oracle", o))
    for p in range(len(poisoned)):
        items.insert(place(len(items) + 1, rng), ("poison", len(oracles) + p))
    passages = [texts[i] for _, i in items]
    oracle_slot = next((n for n, (kind, _) in enumerate(items) if kind == "oracle"), -1)

    kind = target_kind(answerable=answerable, has_oracle=has_oracle, contaminated=contaminated,
                       oracle_free_target=oracle_free_target, conflict_target=conflict_target)
    if kind == "evidence":
        answer, completion = str(record["answer"]), render_completion(oracles, str(record["answer"]), quote_evidence)
    elif kind == "bare":
        answer, completion = str(record["answer"]), render_completion(None, str(record["answer"]), False)
    elif kind == "conflict":
        answer, completion = conflict_answer, render_completion(None, conflict_answer, quote_evidence)
    else:
        answer, completion = abstain_answer, render_completion(None, abstain_answer, quote_evidence)

    out = dict(record)
    out.update(
        prompt=render_prompt(passages, str(record["question"])),
        completion=completion,
        answer=answer,
        has_oracle=has_oracle,
        contaminated=contaminated,
        num_passages=len(passages),
        evidence_tokens=sum(counts[i] for _, i in items),
        oracle_slot=oracle_slot,
        poisoned_answer=str(poisoned[0][1]) if poisoned else "",
    )
    return out
