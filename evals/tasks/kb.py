"""A synthetic knowledge base for bounded-oracle retrieval (issue #5): made-up entities with one fact per attribute,
one passage per fact, questions asked with Zipf-skewed popularity, and loaders for user QA data with oracle passages
(our own JSONL, HotpotQA, RAFT).

Format (character-tokenizer friendly: every character a generated prompt or completion holds is in
:data:`KB_ALPHABET`). Entities are capitalised made-up words (``Vokar``), values lowercase made-up words (``teln``).
A passage states one fact, the prompt lists the context's passages and then the question, and the completion quotes
the evidence passages before the answer::

    passage:    "home of Vokar is teln."
    question:   "home of Vokar?"                       (two hops: "home of boss of Vokar?")
    prompt:     "P:home of Vokar is teln.\\nQ:home of Vokar?\\n"
    completion: "E:home of Vokar is teln.\\nA:teln"

Without evidence to quote (an unanswerable question, or a conflict) the completion is ``"E:none\\nA:unknown"``;
closed-book records (no passages in the prompt: the answer comes from memory) and ``quote_evidence=False`` drop the
``E:`` lines (``"A:teln"``). :func:`parse_answer` reads the text after the last ``A:``.

The knowledge base (:func:`build_kb`, deterministic in ``kb_seed``, ``num_entities``, ``attributes``,
``values_per_attribute`` and ``zipf``; never in ``seed`` or ``num_examples``): ``num_entities`` distinct names, and
for each entity one value per asked attribute, drawn uniformly from that attribute's pool of
``values_per_attribute`` words (the pools are disjoint from each other and from every name), plus a ``boss``: another
entity of the knowledge base, never itself. ``boss`` is the two-hop bridge, never asked about on its own by
:func:`generate`: ``"home of boss of Vokar?"`` needs the passage ``"boss of Vokar is Tesim."`` and then
``"home of Tesim is ..."``. Passage ids are ``"{entity}/{attribute}"``, one passage per fact.

Popularity (Zipf). ``entities[i]`` has rank ``i + 1`` and is asked about with probability proportional to
``1 / (i + 1) ** zipf`` (``zipf=0``: uniform; the default 1 makes the top entity 50 times as frequent as the 50th).
This is the long tail of Kandpal et al. (2023) and Mallen et al. (2023, PopQA): facts about rare entities are seen
rarely in training, which is where retrieval helps most. Each record carries its entity's ``rank``.

Records, from :func:`generate`, :func:`make_record` and :func:`load_jsonl` alike (every key always present)::

    {"task": "kb_qa",
     "question": "home of Vokar?",
     "prompt": "P:home of Vokar is teln.\\nQ:home of Vokar?\\n",  # oracle-only context ("Q:...\\n": closed book)
     "completion": "E:home of Vokar is teln.\\nA:teln",
     "answer": "teln",              # the target answer (ABSTAIN for unanswerable)
     "gold_answer": "teln",         # the true answer (same as answer here)
     "entity": "Vokar", "attribute": "home",
     "hops": 1,                     # 2: oracle_passages = [boss passage of Vokar, home passage of the boss]
     "answerable": True,            # False: entity not in the knowledge base, answer ABSTAIN, no oracle passages
     "oracle_ids": ["Vokar/home"],  # ids in KnowledgeBase.passages ([] for user data and unanswerable records)
     "oracle_passages": ["home of Vokar is teln."],
     "candidate_passages": [],      # other passages shipped with the record (user data's distractors)
     "rank": 3,                     # Zipf rank of the (asked) entity, 1-based; 0: not in the knowledge base
     "closed_book": False}

:func:`generate` mixes the kinds in exact proportions (counts ``round(fraction * num_examples)``, then shuffled):
``unanswerable_fraction`` of the questions are about names disjoint from the knowledge base (:func:`unknown_entities`)
and ``two_hop_fraction`` are two-hop (the two are exclusive); independently of both, ``closed_book_fraction`` of all
records have no passages in the prompt. Everything is drawn from ``random.Random(seed)``.

User data (:func:`load_jsonl`; the shape is told by the first record's keys, and every line must have it):

- ours (``oracle``)::

      {"question": str, "answer": str, "oracle": [str, ...], "distractors": [str, ...] (optional)}

- HotpotQA (``supporting_facts``), its distractor-setting JSON (the Hugging Face column shape
  ``{"title": [...], "sent_id": [...]}`` / ``{"title": [...], "sentences": [...]}`` is read too)::

      {"question": str, "answer": str, "supporting_facts": [[title, sent_idx], ...],
       "context": [[title, [sentence, ...]], ...]}

  A paragraph's passage is ``f"{title}: " + " ".join(sentences)``; the oracles are the paragraphs named in
  ``supporting_facts`` (in the order they are first named there: bridge first), the others are candidates.

- RAFT (``oracle_context``), as ``raft.py`` writes it::

      {"question": str, "cot_answer": str (or "answer": str), "oracle_context": str,
       "context": {"title": [[str, ...]], "sentences": [[str, ...], ...]}}

  The oracle is ``oracle_context``; every document string in ``context.sentences`` (raft.py puts the documents of a
  question in one inner list) that is not the oracle is a candidate. The answer is the text after the last
  ``<ANSWER>:`` of ``cot_answer`` when it has one, else ``answer``, else the whole ``cot_answer``.

User text is kept as written except that runs of white space (newlines included) become one space, so that each
passage stays one ``P:`` line. User records have ``entity`` and ``attribute`` ``""``, ``hops`` the number of oracles,
``rank`` 0, ``answerable`` True, ``oracle_ids`` ``[]``, and prompts and completions built like generated ones
(oracle-only context, quoted evidence); their text may hold characters outside :data:`KB_ALPHABET`.
"""

from __future__ import annotations

import itertools
import math
import random
import string
from dataclasses import dataclass, field
from os import PathLike
from typing import Iterable

from llm_limits.evals.tasks import TaskDataError
from llm_limits.evals.tasks.jsonl import json_objects, json_type

VERSION = "1"
"""Version of the records this task yields: bump it when they change, so that results over different records are
not compared as equals."""

TASK = "kb_qa"
"""``task`` of every record."""

ABSTAIN = "unknown"
"""The answer when the context holds no evidence for the question."""

CONFLICT = "conflict"
"""The answer when the context's passages assert different values for the asked fact."""

PASSAGE_PREFIX, QUESTION_PREFIX, EVIDENCE_PREFIX, ANSWER_PREFIX = "P:", "Q:", "E:", "A:"
"""Open a context passage line, the question line, a quoted evidence line and the answer line."""

NO_EVIDENCE = "none"
"""What the evidence line says when there is nothing to quote (``"E:none"``)."""

KB_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .:?\n"
"""Every character a generated prompt or completion can contain: letters (names are capitalised), digits, space,
``.:?`` and newline."""

ATTRIBUTES = ("home", "job", "pet", "boss")
"""Every attribute of an entity; ``boss`` maps an entity to another entity (the two-hop bridge)."""

BRIDGE = "boss"
"""The attribute that links an entity to another one."""

ASKED_ATTRIBUTES = tuple(a for a in ATTRIBUTES if a != BRIDGE)
"""The attributes :class:`KBConfig` ``attributes`` may name."""

MAX_ENTITIES = 100_000
"""Most entities a knowledge base can have (names are drawn from a space of about 16 million)."""

MAX_VALUES = 1_000
"""Largest value pool per attribute."""

MAX_NAMES = 1_000_000
"""Most names (knowledge-base entities plus unknown ones) one knowledge base can hand out; draws stay fast (under
one in ten of the name space) below it."""

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_RESERVED = {"of", "is", NO_EVIDENCE, ABSTAIN, CONFLICT, *ATTRIBUTES}
"""Words of the templates and answers that a made-up word must not be."""
_NAME_LEN = (4, 7)
_VALUE_LEN = (3, 6)


@dataclass
class KBConfig:
    kb_seed: int = 0
    """Seed of the knowledge base itself (entities, facts): the same ``kb_seed`` (and sizes) gives the same KB."""
    num_entities: int = 200
    """Entities in the knowledge base (2 to 100000)."""
    attributes: list[str] = field(default_factory=lambda: ["home", "job", "pet"])
    """Attributes asked about in single-hop (and two-hop) questions: a non-empty subset of home, job, pet. ``boss``
    is always in the knowledge base, as the two-hop bridge, and is not named here."""
    values_per_attribute: int = 40
    """Size of each attribute's value pool (made-up lowercase words of 3-6 letters; 2 to 1000)."""
    zipf: float = 1.0
    """Popularity skew: the entity of rank ``r`` is asked about with probability proportional to ``r ** -zipf``
    (0: uniform)."""
    num_examples: int = 2000
    """Records :func:`generate` returns."""
    two_hop_fraction: float = 0.0
    """Fraction of the questions asked two-hop, ``"home of boss of X?"`` (exact count, round(fraction * n))."""
    unanswerable_fraction: float = 0.0
    """Fraction of the questions about entities NOT in the knowledge base (answer ``unknown``, no oracle passage);
    exclusive with two-hop, so the two fractions sum to <= 1."""
    closed_book_fraction: float = 0.0
    """Fraction of all records whose prompt has no passages (answer from memory, no evidence quoted); drawn
    independently of the two kinds above."""
    quote_evidence: bool = True
    """Completions quote the evidence passages (``E:...`` lines) before ``A:...``."""
    seed: int = 0
    """Seed of the question sampling (kept apart from ``kb_seed``: same KB, other questions)."""

    def __post_init__(self) -> None:
        validate(self)


def validate(config: KBConfig) -> None:
    """Raise a one-line ``ValueError`` naming the field when ``config`` cannot build a knowledge base or generate.

    >>> KBConfig(zipf=-1)
    Traceback (most recent call last):
    ...
    ValueError: kb: zipf must be >= 0 (got -1)
    """
    c = config
    for name in ("kb_seed", "seed"):
        if not _is_int(getattr(c, name)):
            raise ValueError(f"kb: {name} must be an integer (got {getattr(c, name)!r})")
    for name, low, high in (("num_entities", 2, MAX_ENTITIES), ("values_per_attribute", 2, MAX_VALUES),
                            ("num_examples", 1, None)):
        value = getattr(c, name)
        if not _is_int(value) or value < low:
            raise ValueError(f"kb: {name} must be an integer >= {low} (got {value!r})")
        if high is not None and value > high:
            raise ValueError(f"kb: {name} must be <= {high} (got {value})")
    if not isinstance(c.attributes, (list, tuple)) or not c.attributes:
        raise ValueError(f"kb: attributes: expected a non-empty list of {', '.join(ASKED_ATTRIBUTES)} "
                         f"(got {c.attributes!r})")
    for a in c.attributes:
        if a == BRIDGE:
            raise ValueError(f"kb: attributes: {BRIDGE!r} is the two-hop bridge, not an attribute to ask about "
                             f"(every entity has one; ask 'home of boss of X?' with two_hop_fraction)")
        if a not in ASKED_ATTRIBUTES:
            raise ValueError(f"kb: attributes: unknown attribute {a!r} (known: {', '.join(ASKED_ATTRIBUTES)})")
    if len(set(c.attributes)) != len(c.attributes):
        raise ValueError(f"kb: attributes: each attribute at most once (got {list(c.attributes)})")
    if not (_is_number(c.zipf) and math.isfinite(c.zipf)) or c.zipf < 0:
        raise ValueError(f"kb: zipf must be >= 0 (got {c.zipf!r})")
    for name in ("two_hop_fraction", "unanswerable_fraction", "closed_book_fraction"):
        value = getattr(c, name)
        if not (_is_number(value) and 0 <= value <= 1):
            raise ValueError(f"kb: {name} must be a number in [0, 1] (got {value!r})")
    total = c.two_hop_fraction + c.unanswerable_fraction
    if total > 1 + 1e-9:
        raise ValueError(f"kb: two_hop_fraction + unanswerable_fraction must be <= 1, the two kinds are exclusive "
                         f"(got {c.two_hop_fraction:g} + {c.unanswerable_fraction:g} = {total:g})")
    if not isinstance(c.quote_evidence, bool):
        raise ValueError(f"kb: quote_evidence must be true or false (got {c.quote_evidence!r})")
    unknown = round(c.unanswerable_fraction * c.num_examples)
    if c.num_entities + unknown > MAX_NAMES:
        raise ValueError(f"kb: num_entities + unanswerable questions must be <= {MAX_NAMES} distinct names "
                         f"(got {c.num_entities} + {unknown}); lower num_examples or unanswerable_fraction")


# --- format (pure) --------------------------------------------------------------------------------------------------
def passage_text(attribute: str, entity: str, value: str) -> str:
    """The passage stating one fact.

    >>> passage_text("home", "Vokar", "teln"), passage_text("boss", "Vokar", "Tesim")
    ('home of Vokar is teln.', 'boss of Vokar is Tesim.')
    """
    return f"{attribute} of {entity} is {value}."


def question_text(attribute: str, entity: str, hops: int = 1) -> str:
    """The question asking ``attribute`` of ``entity`` (``hops=2``: of the entity's boss).

    >>> question_text("home", "Vokar"), question_text("home", "Vokar", hops=2)
    ('home of Vokar?', 'home of boss of Vokar?')
    """
    if hops == 1:
        return f"{attribute} of {entity}?"
    if hops == 2:
        return f"{attribute} of {BRIDGE} of {entity}?"
    raise ValueError(f"hops must be 1 or 2 (got {hops!r})")


def render_prompt(passages: list[str], question: str) -> str:
    """The model's input: one ``P:`` line per context passage, then the ``Q:`` line (closed book: ``passages=[]``).

    >>> render_prompt(["home of Vokar is teln."], "home of Vokar?")
    'P:home of Vokar is teln.\\nQ:home of Vokar?\\n'
    >>> render_prompt([], "home of Vokar?")
    'Q:home of Vokar?\\n'
    """
    return "".join(f"{PASSAGE_PREFIX}{p}\n" for p in passages) + f"{QUESTION_PREFIX}{question}\n"


def render_completion(evidence: list[str] | None, answer: str, quote: bool = True) -> str:
    """The target continuation. ``quote``: one ``E:`` line per evidence passage (``evidence=None``, nothing to quote
    for an abstention or a conflict: ``E:none``), then ``A:{answer}``; not ``quote``: the answer line alone.

    >>> render_completion(["boss of Vokar is Tesim.", "home of Tesim is teln."], "teln")
    'E:boss of Vokar is Tesim.\\nE:home of Tesim is teln.\\nA:teln'
    >>> render_completion(None, "unknown"), render_completion(["home of Vokar is teln."], "teln", quote=False)
    ('E:none\\nA:unknown', 'A:teln')
    """
    if not quote:
        return f"{ANSWER_PREFIX}{answer}"
    if evidence is None:
        return f"{EVIDENCE_PREFIX}{NO_EVIDENCE}\n{ANSWER_PREFIX}{answer}"
    return "".join(f"{EVIDENCE_PREFIX}{p}\n" for p in evidence) + f"{ANSWER_PREFIX}{answer}"


def parse_answer(text: str) -> str | None:
    """The answer a completion gives: the text after its LAST ``A:`` up to the next newline, stripped; ``None`` when
    there is no ``A:``.

    >>> parse_answer("E:home of Vokar is teln.\\nA: teln\\nP:more"), parse_answer("A:")
    ('teln', '')
    >>> parse_answer("E:home of Vokar is teln.") is None
    True
    """
    i = text.rfind(ANSWER_PREFIX)
    if i < 0:
        return None
    return text[i + len(ANSWER_PREFIX) :].split("\n", 1)[0].strip()


def answer_matches(predicted: str | None, gold: str) -> bool:
    """Exact match after stripping and lowercasing; a missing answer is wrong.

    >>> answer_matches(" Teln", "teln"), answer_matches("tel", "teln"), answer_matches(None, "unknown")
    (True, False, False)
    """
    if predicted is None or gold is None:
        return False
    return predicted.strip().lower() == gold.strip().lower()


# --- the knowledge base ---------------------------------------------------------------------------------------------
@dataclass
class KnowledgeBase:
    """Entities in rank order and their facts, with one passage per fact."""

    entities: list[str]
    """Rank order: ``entities[0]`` is the most frequently asked (rank 1)."""
    facts: dict[tuple[str, str], str]
    """``(entity, attribute) -> value`` for every entity and every asked attribute, plus ``boss`` (another entity)."""
    probabilities: list[float]
    """Zipf probability of each entity, same order; sums to 1."""
    passages: dict[str, str]
    """Passage id ``f"{entity}/{attribute}"`` -> :func:`passage_text`, one per fact."""
    values: dict[str, list[str]] = field(default_factory=dict)
    """Asked attribute -> its value pool (what :meth:`poison` draws a conflicting value from)."""
    _ranks: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._ranks = {e: i + 1 for i, e in enumerate(self.entities)}

    @staticmethod
    def passage_id(entity: str, attribute: str) -> str:
        """``f"{entity}/{attribute}"``, the key of a fact's passage in :attr:`passages`."""
        return f"{entity}/{attribute}"

    def rank(self, entity: str) -> int:
        """1-based popularity rank of ``entity``; 0 for a name not in the knowledge base."""
        return self._ranks.get(entity, 0)

    def chain(self, entity: str, attribute: str, hops: int) -> list[tuple[str, str]]:
        """The ``(entity, attribute)`` facts a question reads, in order: ``[(X, a)]``, or for two hops
        ``[(X, "boss"), (boss of X, a)]``. ``ValueError`` for a name or attribute not in the knowledge base."""
        if entity not in self._ranks:
            raise ValueError(f"{entity!r} is not an entity of this knowledge base")
        if (entity, attribute) not in self.facts:
            known = ", ".join([*self.values, BRIDGE])
            raise ValueError(f"unknown attribute {attribute!r} (this knowledge base has: {known})")
        if hops == 1:
            return [(entity, attribute)]
        if hops == 2:
            return [(entity, BRIDGE), (self.facts[(entity, BRIDGE)], attribute)]
        raise ValueError(f"hops must be 1 or 2 (got {hops!r})")

    def poison(self, record: dict, rng: random.Random) -> tuple[str, str]:
        """``(passage, value)``: a PoisonedRAG-style passage (Zou et al. 2024) for the record's LAST hop: the same
        attribute and entity as its last oracle passage, asserting another value of the same pool (for ``boss``:
        another entity, not the entity itself). ``ValueError`` for an unanswerable record or one not about this
        knowledge base (user data)."""
        if not record.get("answerable", False):
            raise ValueError(f"cannot poison an unanswerable record ({record.get('question', '')!r}): it has no "
                             f"oracle passage")
        entity, attribute = self.chain(record["entity"], record["attribute"], record["hops"])[-1]
        true = self.facts[(entity, attribute)]
        if attribute == BRIDGE:
            pool = [e for e in self.entities if e != true and e != entity]
        else:
            pool = [v for v in self.values[attribute] if v != true]
        value = pool[rng.randrange(len(pool))]
        return passage_text(attribute, entity, value), value


def zipf_probabilities(n: int, s: float) -> list[float]:
    """``p[i] ∝ 1 / (i + 1) ** s`` for ``i < n``, normalised.

    >>> [round(p, 4) for p in zipf_probabilities(3, 1.0)]  # 1 : 1/2 : 1/3
    [0.5455, 0.2727, 0.1818]
    """
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(weights)
    return [w / total for w in weights]


def build_kb(config: KBConfig) -> KnowledgeBase:
    """The knowledge base of ``config`` (see the module docstring). Deterministic in ``kb_seed``, ``num_entities``,
    ``attributes``, ``values_per_attribute`` and ``zipf`` only. Each attribute's facts come from their own stream,
    so a KB asked about fewer attributes holds the same values for those it keeps."""
    validate(config)
    c = config
    taken: set[str] = set(_RESERVED)
    # the pools of all three asked attributes are drawn whatever config.attributes says, so they never depend on it
    words = random.Random(f"kb:{c.kb_seed}:values")
    pools = {a: _distinct_words(words, c.values_per_attribute, *_VALUE_LEN, taken) for a in ASKED_ATTRIBUTES}
    entities = [w.capitalize() for w in _distinct_words(random.Random(f"kb:{c.kb_seed}:names"), c.num_entities,
                                                         *_NAME_LEN, taken)]
    facts: dict[tuple[str, str], str] = {}
    for a in ASKED_ATTRIBUTES:
        if a in c.attributes:
            rng = random.Random(f"kb:{c.kb_seed}:{a}")
            for e in entities:
                facts[(e, a)] = pools[a][rng.randrange(len(pools[a]))]
    rng = random.Random(f"kb:{c.kb_seed}:{BRIDGE}")
    n = len(entities)
    for i, e in enumerate(entities):
        j = rng.randrange(n - 1)
        facts[(e, BRIDGE)] = entities[j + (j >= i)]  # skip itself
    passages = {}
    for e in entities:
        for a in ATTRIBUTES:
            if (e, a) in facts:
                passages[KnowledgeBase.passage_id(e, a)] = passage_text(a, e, facts[(e, a)])
    return KnowledgeBase(entities=entities, facts=facts, probabilities=zipf_probabilities(n, c.zipf),
                         passages=passages, values={a: pools[a] for a in ASKED_ATTRIBUTES if a in c.attributes})


def unknown_entities(kb: KnowledgeBase, n: int, seed: int) -> list[str]:
    """``n`` distinct names, drawn like the knowledge base's own (so their form gives nothing away) but none of them
    in it, nor equal to any of its values. Deterministic in ``(kb, n, seed)``."""
    if not _is_int(n) or n < 0:
        raise ValueError(f"n must be an integer >= 0 (got {n!r})")
    if n + len(kb.entities) > MAX_NAMES:
        raise ValueError(f"at most {MAX_NAMES - len(kb.entities)} unknown names for this knowledge base (got {n})")
    taken = set(_RESERVED) | {e.lower() for e in kb.entities}
    taken |= {v.lower() for pool in kb.values.values() for v in pool}
    return [w.capitalize() for w in _distinct_words(random.Random(f"kb:unknown:{seed}"), n, *_NAME_LEN, taken)]


def _distinct_words(rng: random.Random, n: int, min_len: int, max_len: int, taken: set[str]) -> list[str]:
    """``n`` made-up lowercase words of ``min_len..max_len`` letters (consonant-vowel syllables, some closed by a
    consonant), none in ``taken``; each is added to ``taken``."""
    out = []
    while len(out) < n:
        target = rng.randint(min_len, max_len)
        word = ""
        while len(word) < target:
            word += rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
            if rng.random() < 0.4:
                word += rng.choice(_CONSONANTS)
        if len(word) <= max_len and word not in taken:
            taken.add(word)
            out.append(word)
    return out


# --- records --------------------------------------------------------------------------------------------------------
def make_record(kb: KnowledgeBase, entity: str, attribute: str, hops: int, *, closed_book: bool = False,
                quote: bool = True) -> dict:
    """One record (every key of the module docstring) asking ``attribute`` of ``entity`` over ``hops`` hops. The
    context holds the oracle passages only (none when ``closed_book``). An entity not in ``kb`` makes an unanswerable
    record: answer :data:`ABSTAIN`, no oracle passages, completion ``E:none\\nA:unknown`` (``A:unknown`` when closed
    book or not ``quote``). Closed-book completions never quote evidence: there is none in the prompt.

    >>> kb = build_kb(KBConfig(num_entities=5))
    >>> r = make_record(kb, kb.entities[0], "home", 2)
    >>> r["oracle_ids"] == [f"{kb.entities[0]}/boss", f"{kb.facts[(kb.entities[0], 'boss')]}/home"], r["rank"]
    (True, 1)
    >>> make_record(kb, "Zzyx", "pet", 1)["completion"]
    'E:none\\nA:unknown'
    """
    question = question_text(attribute, entity, hops)
    quote = quote and not closed_book
    if kb.rank(entity) == 0:
        if attribute != BRIDGE and attribute not in kb.values:
            raise ValueError(f"unknown attribute {attribute!r} (this knowledge base has: "
                             f"{', '.join([*kb.values, BRIDGE])})")
        return _record(question, render_prompt([], question),
                       render_completion(None, ABSTAIN, quote), ABSTAIN, ABSTAIN, entity, attribute, hops,
                       answerable=False, oracle_ids=[], oracle_passages=[], candidates=[], rank=0,
                       closed_book=closed_book)
    facts = kb.chain(entity, attribute, hops)
    ids = [kb.passage_id(e, a) for e, a in facts]
    oracles = [kb.passages[i] for i in ids]
    answer = kb.facts[facts[-1]]
    return _record(question, render_prompt([] if closed_book else oracles, question),
                   render_completion(oracles, answer, quote), answer, answer, entity, attribute, hops,
                   answerable=True, oracle_ids=ids, oracle_passages=oracles, candidates=[], rank=kb.rank(entity),
                   closed_book=closed_book)


def _record(question: str, prompt: str, completion: str, answer: str, gold: str, entity: str, attribute: str,
            hops: int, *, answerable: bool, oracle_ids: list[str], oracle_passages: list[str],
            candidates: list[str], rank: int, closed_book: bool) -> dict:
    return {
        "task": TASK,
        "question": question,
        "prompt": prompt,
        "completion": completion,
        "answer": answer,
        "gold_answer": gold,
        "entity": entity,
        "attribute": attribute,
        "hops": hops,
        "answerable": answerable,
        "oracle_ids": oracle_ids,
        "oracle_passages": oracle_passages,
        "candidate_passages": candidates,
        "rank": rank,
        "closed_book": closed_book,
    }


def kind_counts(config: KBConfig) -> dict[str, int]:
    """How many records of each kind :func:`generate` makes: ``unanswerable`` and ``two_hop`` (exclusive; the
    rest are ``one_hop``), and ``closed_book`` across all of them. Counts are ``round(fraction * num_examples)``.

    >>> kind_counts(KBConfig(num_examples=10, two_hop_fraction=0.3, unanswerable_fraction=0.2,
    ...                      closed_book_fraction=0.5))
    {'unanswerable': 2, 'two_hop': 3, 'one_hop': 5, 'closed_book': 5}
    """
    n = config.num_examples
    unanswerable = round(config.unanswerable_fraction * n)
    two_hop = min(round(config.two_hop_fraction * n), n - unanswerable)  # two .5 roundings could overshoot n
    return {"unanswerable": unanswerable, "two_hop": two_hop, "one_hop": n - unanswerable - two_hop,
            "closed_book": round(config.closed_book_fraction * n)}


def generate(config: KBConfig) -> list[dict]:
    """``config.num_examples`` records over :func:`build_kb` ``(config)`` (see the module docstring): entities drawn
    with their Zipf probabilities, attributes uniformly from ``config.attributes``, the kinds in exact counts
    (:func:`kind_counts`) shuffled. Deterministic: the questions draw only from ``random.Random(config.seed)``."""
    validate(config)
    c = config
    kb = build_kb(c)
    counts = kind_counts(c)
    master = random.Random(c.seed)
    kind_rng, q_rng, book_rng = (random.Random(master.getrandbits(64)) for _ in range(3))
    kinds = ["unanswerable"] * counts["unanswerable"] + ["two_hop"] * counts["two_hop"]
    kinds += ["one_hop"] * counts["one_hop"]
    kind_rng.shuffle(kinds)
    closed = set(book_rng.sample(range(c.num_examples), counts["closed_book"]))
    unknown = iter(unknown_entities(kb, counts["unanswerable"], master.getrandbits(64)))
    cum = list(itertools.accumulate(kb.probabilities))
    records = []
    for i, kind in enumerate(kinds):
        # every record draws an attribute and an entity, so the stream stays aligned whatever the kinds
        attribute = q_rng.choice(c.attributes)
        entity = q_rng.choices(kb.entities, cum_weights=cum)[0]
        if kind == "unanswerable":
            entity = next(unknown)
        records.append(make_record(kb, entity, attribute, 2 if kind == "two_hop" else 1, closed_book=i in closed,
                                   quote=c.quote_evidence))
    return records


# --- loaders --------------------------------------------------------------------------------------------------------
OURS_EXPECTED = ('ours: {"question": str, "answer": str, "oracle": [str, ...], '
                 '"distractors": [str, ...] (optional)}')
HOTPOT_EXPECTED = ('HotpotQA: {"question": str, "answer": str, "supporting_facts": [[title, sent_idx], ...], '
                   '"context": [[title, [sentence, ...]], ...]}')
RAFT_EXPECTED = ('RAFT: {"question": str, "cot_answer" or "answer": str, "oracle_context": str, '
                 '"context": {"sentences": [[str, ...], ...]}}')


def load_jsonl(path: str | PathLike) -> list[dict]:
    """Records (see the module docstring) from a JSONL file of QA examples with oracle passages, in one of three
    shapes told apart by the first record's keys: ``supporting_facts`` (HotpotQA), ``oracle_context`` (RAFT),
    ``oracle`` (ours). Other fields are ignored; problems raise :class:`~evals.tasks.TaskDataError` naming the file
    and line, e.g. ``data.jsonl:3: missing field "question" (expected ours: {...})``."""
    items = json_objects(path, f"expected a JSON object, one of {OURS_EXPECTED}; {HOTPOT_EXPECTED}; {RAFT_EXPECTED}")
    where, first = next(items)  # json_objects raises on a file with no records
    rest = itertools.chain([(where, first)], items)
    if "supporting_facts" in first:
        return [_hotpot_record(w, obj) for w, obj in rest]
    if "oracle_context" in first:
        return [_raft_record(w, obj) for w, obj in rest]
    if "oracle" in first:
        return [_ours_record(w, obj) for w, obj in rest]
    raise TaskDataError(f"{where}: unknown schema, expected one of {OURS_EXPECTED}; {HOTPOT_EXPECTED}; "
                        f"{RAFT_EXPECTED} (got keys {', '.join(sorted(first)) or 'none'})")


def _ours_record(where: str, obj: dict) -> dict:
    exp = f"expected {OURS_EXPECTED}"
    question, answer = _text_field(where, obj, "question", exp), _text_field(where, obj, "answer", exp)
    oracles = _strings(where, obj, "oracle", exp, required=True)
    candidates = _strings(where, obj, "distractors", exp, required=False)
    return _user_record(question, answer, oracles, candidates)


def _hotpot_record(where: str, obj: dict) -> dict:
    exp = f"expected {HOTPOT_EXPECTED}"
    question, answer = _text_field(where, obj, "question", exp), _text_field(where, obj, "answer", exp)
    for name in ("supporting_facts", "context"):
        if name not in obj:
            raise TaskDataError(f'{where}: missing field "{name}" ({exp})')
    paragraphs = _hotpot_context(where, obj["context"], exp)
    titles = _hotpot_titles(where, obj["supporting_facts"], exp)
    if not titles:
        raise TaskDataError(f'{where}: "supporting_facts" is empty (expected at least one [title, sent_idx])')
    by_title = dict(paragraphs)
    for t in titles:
        if t not in by_title:
            raise TaskDataError(f'{where}: supporting_facts names the title {t!r}, which is not in "context" '
                                f"(expected every supporting title among the context's paragraphs)")
    oracles = [by_title[t] for t in titles]
    candidates = [p for t, p in paragraphs if t not in titles]
    return _user_record(question, answer, oracles, candidates)


def _hotpot_context(where: str, context: object, exp: str) -> list[tuple[str, str]]:
    """``[(title, passage), ...]`` of a HotpotQA context (its list shape or the Hugging Face columns)."""
    if isinstance(context, dict) and isinstance(context.get("title"), list) \
            and isinstance(context.get("sentences"), list) and len(context["title"]) == len(context["sentences"]):
        pairs = list(zip(context["title"], context["sentences"]))
    elif isinstance(context, list):
        pairs = [tuple(p) if isinstance(p, list) and len(p) == 2 else (None, None) for p in context]
    else:
        raise TaskDataError(f'{where}: "context" is {_describe(context)} (expected a list of [title, [sentence, '
                            f"...]] pairs; {exp})")
    out = []
    for i, (title, sentences) in enumerate(pairs):
        if not isinstance(title, str) or not (isinstance(sentences, list)
                                              and all(isinstance(s, str) for s in sentences)):
            raise TaskDataError(f"{where}: context[{i}]: expected a [title, [sentence, ...]] pair of strings ({exp})")
        out.append((title, _clean(f"{title}: " + " ".join(sentences))))
    return out


def _hotpot_titles(where: str, facts: object, exp: str) -> list[str]:
    """The distinct titles of HotpotQA ``supporting_facts``, in the order first named."""
    if isinstance(facts, dict) and isinstance(facts.get("title"), list):
        titles = facts["title"]
    elif isinstance(facts, list):
        titles = [f[0] if isinstance(f, list) and len(f) == 2 else None for f in facts]
    else:
        raise TaskDataError(f'{where}: "supporting_facts" is {_describe(facts)} (expected a list of [title, '
                            f"sent_idx] pairs; {exp})")
    for i, t in enumerate(titles):
        if not isinstance(t, str):
            raise TaskDataError(f"{where}: supporting_facts[{i}]: expected a [title, sent_idx] pair with a string "
                                f"title ({exp})")
    return list(dict.fromkeys(titles))


def _raft_record(where: str, obj: dict) -> dict:
    exp = f"expected {RAFT_EXPECTED}"
    question = _text_field(where, obj, "question", exp)
    oracle = _text_field(where, obj, "oracle_context", exp)
    cot, plain = obj.get("cot_answer"), obj.get("answer")
    for name, value in (("cot_answer", cot), ("answer", plain)):
        if value is not None and not isinstance(value, str):
            raise TaskDataError(f'{where}: field "{name}" is a JSON {json_type(value)} ({exp})')
    if cot is not None and "<ANSWER>:" in cot:
        answer = cot.rsplit("<ANSWER>:", 1)[1]
    elif plain is not None:
        answer = plain.rsplit("<ANSWER>:", 1)[-1]
    elif cot is not None:
        answer = cot
    else:
        raise TaskDataError(f'{where}: missing field "cot_answer" or "answer" ({exp})')
    answer = _clean(answer)
    if not answer:
        raise TaskDataError(f"{where}: the answer is empty ({exp})")
    context = obj.get("context", {"sentences": []})
    docs = context.get("sentences") if isinstance(context, dict) else None
    if not isinstance(docs, list):
        got = f'"context" is {_describe(context)}' if not isinstance(context, dict) else \
            f'"context.sentences" is {"missing" if "sentences" not in context else _describe(docs)}'
        raise TaskDataError(f"{where}: {got} (expected a list of lists of document strings; {exp})")
    for i, d in enumerate(docs):
        if not (isinstance(d, list) and all(isinstance(s, str) for s in d)):
            raise TaskDataError(f"{where}: context.sentences[{i}]: expected a list of document strings ({exp})")
    oracle = _clean(oracle)
    candidates = [_clean(s) for d in docs for s in d]
    return _user_record(question, answer, [oracle], [c for c in candidates if c and c != oracle])


def _user_record(question: str, answer: str, oracles: list[str], candidates: Iterable[str]) -> dict:
    question, answer = _clean(question), _clean(answer)
    oracles = [_clean(p) for p in oracles]
    # a distractor identical to an oracle is the oracle; keep each distinct distractor once
    candidates = [p for p in dict.fromkeys(_clean(c) for c in candidates) if p and p not in oracles]
    return _record(question, render_prompt(oracles, question), render_completion(oracles, answer), answer, answer,
                   "", "", len(oracles), answerable=True, oracle_ids=[], oracle_passages=oracles,
                   candidates=candidates, rank=0, closed_book=False)


def _text_field(where: str, obj: dict, name: str, exp: str) -> str:
    if name not in obj:
        raise TaskDataError(f'{where}: missing field "{name}" ({exp})')
    value = obj[name]
    if not isinstance(value, str):
        raise TaskDataError(f'{where}: field "{name}" is a JSON {json_type(value)} ({exp})')
    if not value.strip():
        raise TaskDataError(f'{where}: field "{name}" is empty ({exp})')
    return value


def _strings(where: str, obj: dict, name: str, exp: str, *, required: bool) -> list[str]:
    if name not in obj:
        if required:
            raise TaskDataError(f'{where}: missing field "{name}" ({exp})')
        return []
    value = obj[name]
    if not isinstance(value, list):
        raise TaskDataError(f'{where}: field "{name}" is a JSON {json_type(value)} (expected a list of strings; {exp})')
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s.strip():
            got = "an empty string" if isinstance(s, str) else f"a JSON {json_type(s)}"
            raise TaskDataError(f'{where}: {name}[{i}] is {got} (expected a non-empty string; {exp})')
    if required and not value:
        raise TaskDataError(f'{where}: field "{name}" is empty (expected at least one passage; {exp})')
    return value


def _clean(text: str) -> str:
    """White space runs (newlines included) to one space, stripped: a passage must stay one line."""
    return " ".join(text.split())


def _describe(value: object) -> str:
    return f"a JSON {json_type(value)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
