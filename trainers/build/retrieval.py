"""The retrieval pieces the trainer injects into ``bounded_retrieval`` (docs/architecture.md: mitigations never import
evals or retrieval libraries).

The corpus is the knowledge base's passages when the data is the ``kb`` task, else every passage the user's file
ships (each record's oracles and its ``candidate_passages``). One retriever (``bm25``, ``dense`` on MiniLM, or
``hybrid``) indexes it; the index is saved in the run directory (``<run>/index/``) and loaded from there on
``--resume``. Distractors are the retriever's best non-oracle passages for each question (hard negatives, as RAFT
samples them from the retrieved set), searched once for all records in one batch.

Injected callables (:data:`mitigations.bounded_retrieval.mitigation.INJECTED` has the signatures): ``candidates``,
``count_tokens``, ``render_prompt``, ``render_completion``, ``poison``; plus ``artifacts`` (name -> ``save(dir)``) that
:func:`trainers.run.train` writes into the run directory once it exists.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Sequence

from llm_limits.trainers.recipe.errors import UserError

INDEX_DIR = "index"
"""The retriever's saved index, inside the run directory."""

SEARCH_MARGIN = 8
"""Extra passages searched per question beyond the distractors asked for, so that removing the oracles (and the
question's other hop) still leaves enough."""


def corpus_of(records: Sequence[dict[str, Any]], data_params: dict[str, Any] | None) -> tuple[list[str], list[str], Any]:
    """(passage ids, passage texts, the KnowledgeBase or None). Generated ``kb`` records: the KB rebuilt from
    ``data.params`` (the same ``kb_seed`` gives the same KB); user data: every distinct passage of the file."""
    from llm_limits.evals.tasks import kb

    if records and records[0].get("task") == kb.TASK and records[0].get("oracle_ids") is not None and data_params is not None \
            and any(r.get("oracle_ids") for r in records):
        known = {f.name for f in dataclasses.fields(kb.KBConfig)}
        base = kb.build_kb(kb.KBConfig(**{k: v for k, v in data_params.items() if k in known}))
        ids = list(base.passages)
        return ids, [base.passages[i] for i in ids], base
    texts: dict[str, None] = {}
    for r in records:
        for p in list(r.get("oracle_passages") or []) + list(r.get("candidate_passages") or []):
            texts.setdefault(p, None)
    if not texts:
        raise UserError("data: bounded_retrieval found no passages in the records (expected oracle_passages or "
                        "candidate_passages: the kb task, or a JSONL file in one of the evals/tasks/kb.py shapes)")
    passages = list(texts)
    return [f"p{i}" for i in range(len(passages))], passages, None


def text_poison(records: Sequence[dict[str, Any]]) -> Callable[[dict[str, Any], random.Random], tuple[str, str]]:
    """PoisonedRAG-style passages for user data (no KB to draw a conflicting value from): the record's last oracle
    with its answer replaced by another record's answer. Raises ``ValueError`` when the answer is not in the oracle
    text (the mitigation then leaves that record clean)."""
    answers = sorted({str(r["answer"]) for r in records if r.get("answerable", True) and r.get("answer")})

    def poison(record: dict[str, Any], rng: random.Random) -> tuple[str, str]:
        oracles = record.get("oracle_passages") or []
        answer = str(record.get("answer", ""))
        if not oracles or not answer or answer not in oracles[-1]:
            raise ValueError(f"cannot poison {record.get('question', '')!r}: its answer is not in its oracle passage")
        others = [a for a in answers if a != answer and answer not in a and a not in answer]
        if not others:
            raise ValueError("cannot poison: the data has no other answer to assert")
        value = others[rng.randrange(len(others))]
        return oracles[-1].replace(answer, value), value

    return poison


def retrieval_injected(
    config: Any, *, records: list[dict[str, Any]], tokenizer: Any, data_params: dict[str, Any] | None,
    where: str, index_dir: Path | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for ``BoundedRetrieval(config, **kwargs)``: the retriever searched once over all records'
    questions, and the task's rendering. ``index_dir``: a saved index to load instead of building one (``--resume``)."""
    from llm_limits.evals.retrievers import RETRIEVERS, build_retriever, load_retriever
    from llm_limits.evals.tasks import kb

    kind = getattr(config, "retriever", "bm25")
    if kind not in RETRIEVERS:
        raise UserError(f"{where}.retriever: expected one of {', '.join(RETRIEVERS)} (got {kind!r})")
    ids, texts, base = corpus_of(records, data_params)
    if index_dir is not None and (index_dir / "kind.json").is_file():
        retriever = load_retriever(index_dir)
    else:
        retriever = build_retriever(kind, ids, texts)
    text_of = dict(zip(ids, texts))

    want = int(max(getattr(config, "num_distractors", [0, 4]))) + int(getattr(config, "poison_per_example", 1)) + SEARCH_MARGIN
    todo = [r for r in records if not r.get("closed_book")]
    questions = list(dict.fromkeys(r["question"] for r in todo))
    found = dict(zip(questions, retriever.search(questions, want))) if questions else {}

    def candidates(record: dict[str, Any], n: int) -> list[tuple[str, float]]:
        hits = found.get(record["question"])
        if hits is None or len(hits) < n + SEARCH_MARGIN // 2:
            hits = retriever.search([record["question"]], n + SEARCH_MARGIN)[0]
        oracle = set(record.get("oracle_passages") or [])
        out = [(text_of[i], float(s)) for i, s in hits if text_of[i] not in oracle]
        return out[:n]

    def count_tokens(text: str) -> int:
        return len(tokenizer(f"{kb.PASSAGE_PREFIX}{text}\n", add_special_tokens=False)["input_ids"])

    poison = base.poison if base is not None else text_poison(records)
    return {
        "candidates": candidates,
        "count_tokens": count_tokens,
        "render_prompt": kb.render_prompt,
        "render_completion": kb.render_completion,
        "poison": poison,
        "artifacts": {INDEX_DIR: retriever.save},
    }
