"""Bounded-oracle retrieval training against retrieval fragility and hallucination: train on the contexts a retriever
would give (RAFT), inside a fixed budget of passages and tokens, with some of them poisoned (PoisonedRAG).

The hook is data-level: :meth:`BoundedRetrieval.transform_records` rebuilds each record's ``prompt`` and
``completion`` once, before tokenization. A fraction ``oracle_fraction`` of the answerable records hold their
oracle passage(s) among retrieved distractors; the rest hold distractors only and are trained to answer from memory
(RAFT) or to abstain. A fraction ``contamination_rate`` of the oracle-bearing records also hold passages that assert
a different value; they are trained to flag the conflict. The math lives in
:mod:`mitigations.bounded_retrieval.core`; this module holds the config and the adapter around the callables the
trainer injects.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from llm_limits.mitigations.base import Mitigation, MitigationConfig
from llm_limits.mitigations.bounded_retrieval.core import build_record, exact_mask

ORACLE_FREE_TARGETS = ("answer", "abstain")
CONFLICT_TARGETS = ("flag", "answer")

INJECTED = {
    "candidates": "candidates(record, n) -> list[tuple[str, float]]: up to n non-oracle passages, best first",
    "count_tokens": "count_tokens(text) -> int: tokens of one passage line as the prompt holds it",
    "render_prompt": "render_prompt(passages, question) -> str",
    "render_completion": "render_completion(evidence | None, answer, quote) -> str",
    "poison": "poison(record, rng) -> tuple[str, str]: a passage asserting a wrong value, and that value",
}
"""The callables the trainer injects, with their signatures (for the error when one is missing)."""

REQUIRED_KEYS = ("question", "answer", "oracle_passages")
"""Record fields the rebuild reads (besides ``answerable`` and ``closed_book``, which default to True / False)."""


# --- config --------------------------------------------------------------------------------------------------------
RETRIEVER_KINDS = ("bm25", "dense", "hybrid")
"""The index kinds the trainer can build (``evals.retrievers.RETRIEVERS``; mitigations do not import evals)."""


@dataclass
class BoundedRetrievalConfig(MitigationConfig):
    k: int = 5
    """At most this many passages in a context, oracles included."""
    budget_tokens: int = 256
    """At most this many evidence tokens in a context (``count_tokens`` summed over its passages). Distractors that
    do not fit are skipped; oracle and poisoned passages are always kept (a record where they alone exceed ``k`` or
    the budget counts as an overflow in :attr:`BoundedRetrieval.stats`)."""
    oracle_fraction: float = 0.8
    """RAFT's P: the fraction of answerable records whose context holds the oracle passage(s); exact (not sampled)."""
    num_distractors: list[int] = field(default_factory=lambda: [0, 4])
    """``[low, high]``: distractors per record, drawn uniformly in this inclusive range, then capped by ``k`` and the
    budget. A context without its oracle gets one more per missing oracle, and poisoned passages take distractors'
    places, so the context's size does not reveal the oracle or the poison."""
    oracle_free_target: Literal["answer", "abstain"] = "answer"
    """Target of an answerable record whose context lacks the oracle: ``answer`` (RAFT: the gold answer, no quoted
    evidence, i.e. answer from memory) or ``abstain`` (``abstain_answer`` with ``E:none``)."""
    contamination_rate: float = 0.0
    """Fraction of the oracle-bearing records that also get ``poison_per_example`` poisoned passages; exact."""
    poison_per_example: int = 1
    """Poisoned passages per contaminated record (PoisonedRAG injects 5 per question into a much larger corpus)."""
    conflict_target: Literal["flag", "answer"] = "flag"
    """Target of a contaminated record: ``flag`` (``conflict_answer`` with ``E:none``) or ``answer`` (the clean
    target: quote the oracle, give the gold answer)."""
    quote_evidence: bool = True
    """Completions quote the oracle passages as ``E:`` lines before ``A:`` (RAFT's chain-of-thought target)."""
    retriever: Literal["bm25", "dense", "hybrid"] = "bm25"
    """Which index the trainer searches for distractors (``trainers/build/retrieval.py``): ``bm25`` (bm25s), ``dense``
    (MiniLM embeddings through sentence-transformers) or ``hybrid`` (reciprocal-rank fusion of both). Distractors are
    its best non-oracle passages for the question: hard negatives."""
    abstain_answer: str = "unknown"
    """The answer word of an abstention (``llm_limits.evals.tasks.kb.ABSTAIN``)."""
    conflict_answer: str = "conflict"
    """The answer word of a flagged conflict (``llm_limits.evals.tasks.kb.CONFLICT``)."""

    def __post_init__(self) -> None:
        for name in ("k", "budget_tokens", "poison_per_example"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1 (got {value!r})")
        for name in ("oracle_fraction", "contamination_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1] (got {value!r})")
        nd = self.num_distractors
        if (
            isinstance(nd, (str, bytes))
            or not isinstance(nd, (list, tuple))
            or len(nd) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in nd)
            or not 0 <= nd[0] <= nd[1]
        ):
            raise ValueError(f"num_distractors: expected [low, high] integers with 0 <= low <= high (got {nd!r})")
        self.num_distractors = [int(nd[0]), int(nd[1])]
        if self.oracle_free_target not in ORACLE_FREE_TARGETS:
            raise ValueError(f"oracle_free_target: expected one of {', '.join(ORACLE_FREE_TARGETS)} "
                             f"(got {self.oracle_free_target!r})")
        if self.conflict_target not in CONFLICT_TARGETS:
            raise ValueError(f"conflict_target: expected one of {', '.join(CONFLICT_TARGETS)} "
                             f"(got {self.conflict_target!r})")
        for name in ("abstain_answer", "conflict_answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or "\n" in value:
                raise ValueError(f"{name}: expected a non-empty one-line string (got {value!r})")
        if self.retriever not in RETRIEVER_KINDS:
            raise ValueError(f"retriever: expected one of {', '.join(RETRIEVER_KINDS)} (got {self.retriever!r})")
        if self.abstain_answer == self.conflict_answer:
            raise ValueError(f"conflict_answer: must differ from abstain_answer (both {self.abstain_answer!r})")


# --- the hook object -----------------------------------------------------------------------------------------------
class BoundedRetrieval(Mitigation):
    """RAFT-style retrieval contexts under a passage and token budget, with optional poisoned passages.

    Injected by the trainer as keyword arguments (``BoundedRetrieval(config, candidates=..., count_tokens=...,
    render_prompt=..., render_completion=..., poison=...)``):

    - ``candidates(record, n) -> list[tuple[str, float]]``: up to ``n`` non-oracle passages for the record's
      question with their retrieval scores, best first (a BM25/dense/hybrid index, or ``record["candidate_passages"]``).
    - ``count_tokens(text) -> int``: tokens of one passage line as the prompt will hold it.
    - ``render_prompt(passages, question) -> str`` and ``render_completion(evidence, answer, quote) -> str``: the
      task's renderers (``evidence`` None: no evidence, ``"E:none"`` when quoting).
    - ``poison(record, rng) -> (passage, value)``: needed only when ``contamination_rate > 0``.
    """

    name = "bounded_retrieval"
    summary = "RAFT contexts under a k-passage / B-token budget: oracle + distractors, distractor-only, poisoned"
    limit = "retrieval"
    Config = BoundedRetrievalConfig

    def __init__(self, config: BoundedRetrievalConfig | None = None, **injected: Any) -> None:
        super().__init__(config, **injected)
        self.stats: dict[str, float] = {}
        """Counts of the last :meth:`transform_records` call (records, oracle, oracle_free, contaminated,
        unanswerable, closed_book, overflows) and its means (mean_evidence_tokens, mean_passages, over the rebuilt
        records); empty before the first call."""

    def _injected(self, key: str) -> Callable[..., Any]:
        fn = self.injected.get(key)
        if not callable(fn):
            raise ValueError(f"bounded_retrieval needs the trainer to inject `{key}` ({INJECTED[key]})")
        return fn

    # --- hooks ---------------------------------------------------------------------------------------------------
    def transform_records(self, records: list[dict[str, Any]], *, seed: int) -> list[dict[str, Any]]:
        """The records with rebuilt contexts and targets (new dicts; the input is not modified).

        Closed-book records keep their prompt, completion and answer; every output record gets the added fields
        (``has_oracle``, ``contaminated``, ``num_passages``, ``evidence_tokens``, ``oracle_slot``,
        ``poisoned_answer``) so a dataset built from them has the same columns on every row. All randomness comes
        from ``random.Random`` streams derived from ``seed``: the same seed and records give the same output, and
        record ``i``'s context depends only on ``seed``, ``i`` and the oracle/contamination masks.
        """
        if not self.enabled:
            return list(records)
        cfg: BoundedRetrievalConfig = self.config
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise ValueError(f"bounded_retrieval: record {i} is a {type(r).__name__} (expected a dict)")
            if r.get("closed_book", False):
                continue
            for key in REQUIRED_KEYS:
                if key not in r:
                    raise ValueError(f"bounded_retrieval: record {i} has no `{key}` (expected a kb_qa record with "
                                     "question, answer, oracle_passages, answerable, closed_book)")
            if r.get("answerable", True) and not r["oracle_passages"]:
                raise ValueError(f"bounded_retrieval: record {i} is answerable but its oracle_passages is empty")

        open_book = [i for i, r in enumerate(records) if not r.get("closed_book", False)]
        answerable = [i for i in open_book if records[i].get("answerable", True)]
        has_oracle = dict(zip(answerable, exact_mask(len(answerable), cfg.oracle_fraction,
                                                     random.Random(f"bounded_retrieval/{seed}/oracle"))))
        with_oracle = [i for i in answerable if has_oracle[i]]
        contaminated = dict(zip(with_oracle, exact_mask(len(with_oracle), cfg.contamination_rate,
                                                        random.Random(f"bounded_retrieval/{seed}/contamination"))))
        fns: dict[str, Any] = {}
        if open_book:
            fns = {key: self._injected(key) for key in ("candidates", "count_tokens", "render_prompt",
                                                         "render_completion")}
        fns["poison"] = self._injected("poison") if any(contaminated.values()) else None

        out: list[dict[str, Any]] = []
        for i, record in enumerate(records):
            if record.get("closed_book", False):
                out.append({**record, "has_oracle": False, "contaminated": False, "num_passages": 0,
                            "evidence_tokens": 0, "oracle_slot": -1, "poisoned_answer": ""})
                continue
            out.append(build_record(
                record,
                has_oracle=has_oracle.get(i, False),
                contaminated=contaminated.get(i, False),
                rng=random.Random(f"bounded_retrieval/{seed}/record/{i}"),
                k=cfg.k,
                budget_tokens=cfg.budget_tokens,
                num_distractors=(cfg.num_distractors[0], cfg.num_distractors[1]),
                poison_per_example=cfg.poison_per_example,
                oracle_free_target=cfg.oracle_free_target,
                conflict_target=cfg.conflict_target,
                quote_evidence=cfg.quote_evidence,
                abstain_answer=cfg.abstain_answer,
                conflict_answer=cfg.conflict_answer,
                **fns,
            ))
        self.stats = self._stats(records, out)
        return out

    def _stats(self, records: list[dict[str, Any]], out: list[dict[str, Any]]) -> dict[str, float]:
        cfg: BoundedRetrievalConfig = self.config
        rebuilt = [o for r, o in zip(records, out) if not r.get("closed_book", False)]
        answerable = [o for o in rebuilt if o.get("answerable", True)]
        n = max(len(rebuilt), 1)
        return {
            "records": len(out),
            "oracle": sum(o["has_oracle"] for o in rebuilt),
            "oracle_free": sum(not o["has_oracle"] for o in answerable),
            "contaminated": sum(o["contaminated"] for o in rebuilt),
            "unanswerable": len(rebuilt) - len(answerable),
            "closed_book": len(out) - len(rebuilt),
            "mean_evidence_tokens": sum(o["evidence_tokens"] for o in rebuilt) / n,
            "mean_passages": sum(o["num_passages"] for o in rebuilt) / n,
            # only required passages (oracles, poisons) can break the limits: pack never adds past them
            "overflows": sum(o["evidence_tokens"] > cfg.budget_tokens or o["num_passages"] > cfg.k for o in rebuilt),
        }

    def describe(self) -> dict[str, Any]:
        """The config, plus ``stats`` of the last :meth:`transform_records` call once there was one."""
        out = dataclasses.asdict(self.config)
        if self.stats:
            out["stats"] = dict(self.stats)
        return out
