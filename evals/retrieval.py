"""Bounded-oracle retrieval: can the model read the one passage that answers a question when other passages crowd it,
when the evidence budget cuts the context, when the passage sits in the middle, and when poisoned passages contradict
it?

The limit (issue #5): a model answering from retrieved context is bounded by what reaches its prompt and by how well it
reads it. This eval builds a knowledge base with the ``kb`` task (``evals/tasks/kb.py``: passages such as
``home of Vokar is teln.``, questions ``home of Vokar?``), asks ``examples`` questions about it with the oracle passage
in the context, and adds distractor passages. The curve is answer accuracy (:func:`kb.answer_matches` of the first
answer line, :func:`evals.lm.answer_of`; or of the value a chat answer names, see the chat version below) against the
number of distractors; the limit is the largest count up to which every count keeps accuracy at or above
``threshold`` (:func:`evals.base.read_limit`), and -1 when even the oracle alone (0 distractors) falls short. The
same questions are asked at every point, each with its oracle at a uniformly random slot, so the points differ only
in the distractors.

By default the knowledge base is one no training recipe uses (``kb_seed`` 1000003): the facts cannot be remembered,
so the answer has to be read off the context. Setting ``kb_seed`` (and the other KB fields) to the training recipe's
``data.params`` measures the trained knowledge base instead, where memory can stand in for reading.

Around the curve:

- ``series["accuracy_by_budget"]``: the retriever's own context. Its top passages in rank order, whole passages,
  first-fit into ``budget_tokens`` (:func:`first_fit`); the oracle is there only if it was retrieved and fits
  (``series["oracle_in_context_by_budget"]`` says how often).
- ``series["accuracy_by_position"]``: the oracle at each slot of ``position_distractors + 1`` (lost in the middle,
  Liu et al. 2023, arXiv 2307.03172).
- ``series["asr_by_poison"]``, ``["accuracy_by_poison"]``, ``["conflict_flag_by_poison"]``: the oracle, a few
  distractors and ``n`` copies of one PoisonedRAG passage (Zou et al. 2024, arXiv 2402.07867: the same fact with
  another value), all at random slots. ASR is the fraction answering the poisoned value; a model trained to flag
  conflicts answers :data:`kb.CONFLICT` instead, which counts as neither an attack success nor a correct answer.
- ``negative_rejection`` / ``negative_hallucination`` (RGB, Chen et al. 2024, arXiv 2309.01431): contexts of
  distractors only; the fraction answering :data:`kb.ABSTAIN`, and the fraction answering anything else.
- ``recall@1`` / ``recall@5``: the retriever itself (every oracle passage of a question within the top k).

Prompt format (``prompt_format``, :func:`evals.lm.format_prompt`): under ``chat`` (``auto`` with a tokenizer that has
a chat template) each prompt, passages and question, is one user turn of the template and the completion is decoded
after its generation prompt; :class:`Case` keeps the plain prompt (the budgets count passage lines, not the template).

The chat version (``instruct: true``, chat only): an instruct model never trained on the completion format answers
``P:``/``Q:`` prompts with chat or echoes the passages, and scores 0 whichever format it is prompted in. With
``instruct`` the user turn is :data:`INSTRUCTION` (the ``instruction`` field) around the task's text: the passages and
question, then "Answer the question from the passages above. Reply with the answer word only, or unknown if no passage
gives it." (after the context, where RULER's QA prompt puts its instruction). The answers are then read by
containment (``reader: auto`` -> ``contains``, :func:`evals.lm.contained_answer`, in the spirit of RULER's reader,
Hsieh et al. 2024, arXiv 2404.06654): the answer is the one value of the knowledge base (the asked attributes' pools:
gold, distractors' and poisoned values alike) that the completion names as a word, up to its first ``A:`` line if it
has one; a completion that copies two or more passages back, one of them not an oracle, is an echo
(``scalars["echo_rate"]``) and counts as wrong, as does one naming several values; naming none, it is an abstention
when it says so ("unknown", "do not say", "not mentioned", ...), a flagged conflict when it says the passages
conflict, else an answer naming no value. Quoting the oracle alone is reading: with 0 distractors an echo of the one
passage counts as right. Accuracy, the poison series and the negative rejection all go through the reader, and the
result's notes say which was used. Without ``instruct`` (the default) the chat turn is the task's text alone and the
reader the exact ``A:`` line: the prompts and scoring of the fine-tunes in ``recipes/real/retrieval-*.yaml``, which
learn the completion format.

Every number comes from pure functions of the contexts and the completions (:func:`build_cases`, :func:`score_cases`,
:func:`summarize`); the model is reached through one method, :meth:`Retrieval.answer` (greedy decoding through
:func:`evals.lm.decode_texts`), so the metrics are tested with scripted answerers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Literal, Mapping, Sequence

from tqdm import tqdm

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, LimitSpec, Series, read_limit
from llm_limits.evals.lm import (KB_ECHO, RETRIEVER_KINDS, answer_of, build_retriever, check_instruct,
                                 check_kb_spelling, check_positions, contained_answer, count_tokens, decode_texts,
                                 format_prompt, instructed, kb_config, prompt_note, rate, resolve_prompt_format,
                                 resolve_reader, sample_distractors, validate_instruct_fields, validate_kb_fields)
from llm_limits.evals.tasks import kb

EVAL_KB_SEED = 1_000_003
"""The default ``kb_seed`` of the retrieval eval: a knowledge base no training recipe uses by default."""

DISTRACTOR_MODES = ("retrieved", "same_attribute", "random")

PARTS = ("distractors", "budget", "position", "poison", "negative")
"""The context families of the eval, in the order they are built and answered."""

READERS = ("auto", "exact", "contains")
"""Values of ``reader``."""

INSTRUCTION = ("{task}Answer the question from the passages above. Reply with the answer word only, or unknown if no "
               "passage gives it.")
"""The default ``instruction``: after the passages and the question (``{task}``), as RULER's QA prompt puts its
instruction right before the answer."""

CONTAINS_RULE = ("the one knowledge-base value the completion names; an echo of two or more passages, or several "
                 "values named, count as wrong")
"""What the ``contains`` reader does, as the result's note says it."""

PART_FIELDS = {"distractors": "distractors", "budget": "budgets", "position": "position_distractors",
               "poison": "poison_counts", "negative": "negative_distractors"}
"""The config field that sets the size of each family's contexts (named when a prompt is too long)."""


@dataclass
class RetrievalConfig(EvalConfig):
    kb_seed: int = EVAL_KB_SEED
    """Seed of the knowledge base asked about. The default is one no training recipe uses, so answers must be read
    from the context; set it (and the other KB fields) to the training recipe's ``data.params`` to measure the trained
    knowledge base instead."""
    num_entities: int = 200
    """Entities of the knowledge base (``kb.KBConfig.num_entities``)."""
    attributes: list[str] = field(default_factory=lambda: ["home", "job", "pet"])
    """Single-hop attributes asked about (``kb.KBConfig.attributes``)."""
    values_per_attribute: int = 40
    """Size of each attribute's value pool (``kb.KBConfig.values_per_attribute``)."""
    zipf: float = 1.0
    """Zipf exponent of the knowledge base (``kb.KBConfig.zipf``); questions here pick entities uniformly."""
    examples: int = 64
    """Questions, sampled once (seeded by ``seed``) and asked at every point of every curve."""
    two_hop_fraction: float = 0.0
    """Fraction of the questions that are two-hop (``home of boss of X?``: two oracle passages)."""
    distractors: list[int] = field(default_factory=lambda: [0, 2, 4, 8])
    """Distractor counts of the curve, strictly ascending."""
    distractor_mode: Literal["retrieved", "same_attribute", "random"] = "retrieved"
    """``retrieved``: the retriever's best non-oracle passages for the question (hard negatives, in rank order);
    ``same_attribute``: random passages of the asked attribute about other entities; ``random``: random passages."""
    retriever: Literal["bm25", "dense", "hybrid"] = "bm25"
    """Retriever built over the eval knowledge base's passages (``evals.retrievers.build_retriever``): the retrieved
    distractors, the budget contexts and ``recall@k``."""
    threshold: float = 0.5
    """Accuracy a distractor count must reach; the limit is the largest count up to which every count reaches it."""
    budgets: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    """Evidence budgets in tokens (``P:{passage}\\n`` lines counted with the model's tokenizer), strictly ascending;
    ``[]`` skips ``accuracy_by_budget``."""
    position_distractors: int = 4
    """Distractors of the position series (the oracle at each of ``position_distractors + 1`` slots); 0 skips it."""
    poison_counts: list[int] = field(default_factory=lambda: [0, 1, 2, 4])
    """Poisoned passages per context of the poison series, strictly ascending; ``[]`` skips it."""
    poison_distractors: int = 2
    """Distractors in each context of the poison series, beside the oracle and the poisoned passages."""
    negative_distractors: int = 4
    """Distractors of the no-oracle contexts (``negative_rejection``); 0 skips them."""
    max_new_tokens: int = 64
    """Tokens decoded per answer (a quoted passage and the answer line are about 40 characters)."""
    instruct: bool = False
    """Write each chat prompt as ``instruction`` around the task's text, and (``reader: auto``) read the answers with
    the ``contains`` reader: the chat version of the task, for an instruct model never trained on its ``P:``/``Q:``/
    ``A:`` completion format. ``false``: the chat turn is the task's text alone, the prompt the fine-tunes of
    ``recipes/real/retrieval-*.yaml`` train on, read by its answer line. Needs chat prompts (``prompt_format`` chat,
    or auto with a chat template)."""
    instruction: str = INSTRUCTION
    """The user turn of an instructed prompt; ``{task}`` stands for the task's text (the ``P:`` passage lines and the
    ``Q:`` question line), which the budgets still count alone. Used only with ``instruct``."""
    reader: Literal["auto", "exact", "contains"] = "auto"
    """How an answer is read off a completion. ``exact``: the first ``A:`` line, matched exactly
    (:func:`kb.answer_matches`), as every trained recipe is scored; ``contains``: :func:`evals.lm.contained_answer`,
    the one value of the knowledge base the completion names (an echo of the passages or several values named:
    wrong; none: an abstention or conflict phrase, else an answer naming no value); ``auto``: ``contains`` with
    ``instruct``, else ``exact``. Accuracy, the poison series and the negative rejection all go through it; the
    result's notes say which was used."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for an inconsistent config."""
        w = "retrieval"
        validate_kb_fields(self, w)
        validate_instruct_fields(self, w, READERS)
        _check_counts(self.distractors, "distractors", w, minimum=0, allow_empty=False)
        _check_counts(self.budgets, "budgets", w, minimum=1)
        _check_counts(self.poison_counts, "poison_counts", w, minimum=0)
        for name in ("examples", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{w}: {name} must be >= 1 (got {getattr(self, name)})")
        for name in ("position_distractors", "poison_distractors", "negative_distractors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{w}: {name} must be >= 0 (got {getattr(self, name)})")
        if not 0.0 <= self.two_hop_fraction <= 1.0:
            raise ValueError(f"{w}: two_hop_fraction must be within [0, 1] (got {self.two_hop_fraction})")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"{w}: threshold must be within [0, 1] (got {self.threshold})")
        if self.distractor_mode not in DISTRACTOR_MODES:
            raise ValueError(f"{w}: distractor_mode must be one of {', '.join(DISTRACTOR_MODES)} "
                             f"(got {self.distractor_mode!r})")
        if self.retriever not in RETRIEVER_KINDS:
            raise ValueError(f"{w}: retriever must be one of {', '.join(RETRIEVER_KINDS)} (got {self.retriever!r})")
        most = max_distractors(self)
        if self.distractor_mode == "same_attribute":
            pool, what = self.num_entities - 1, "other entities"
        else:
            # every entity has a passage per attribute plus its boss passage; a two-hop question has two oracles
            pool, what = self.num_entities * (len(self.attributes) + 1) - 2, "non-oracle passages"
        if most > pool:
            raise ValueError(f"{w}: a context holds up to {most} distractors but num_entities={self.num_entities} "
                             f"leaves {pool} {what} ({self.distractor_mode} mode); lower the distractor counts or "
                             f"raise num_entities")


def max_distractors(c: RetrievalConfig) -> int:
    """The most distractors any context of the eval holds (each question's distractor list is this long)."""
    return max([*c.distractors, c.position_distractors, c.negative_distractors,
                c.poison_distractors if c.poison_counts else 0])


def _check_counts(values: Any, name: str, where: str, *, minimum: int, allow_empty: bool = True) -> None:
    if not values and not allow_empty:
        raise ValueError(f"{where}: {name} must not be empty")
    if any(not isinstance(x, int) or isinstance(x, bool) or x < minimum for x in values):
        raise ValueError(f"{where}: {name} must be integers >= {minimum} (got {values})")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{where}: {name} must be strictly ascending (got {values})")


# --- functional core -------------------------------------------------------------------------------------------------
def passage_line(passage: str) -> str:
    """A passage as a prompt holds it: ``P:{passage}\\n`` (the unit the budgets count).

    >>> passage_line("home of Vokar is teln.")
    'P:home of Vokar is teln.\\n'
    """
    return f"{kb.PASSAGE_PREFIX}{passage}\n"


def first_fit(token_counts: Sequence[int], budget: int) -> list[int]:
    """Indices of the passages (in rank order) that a ``budget``-token context holds: whole passages only, each taken
    when it still fits, skipped otherwise (a shorter one further down may still fit).

    >>> first_fit([10, 30, 15, 5], 30)
    [0, 2, 3]
    >>> first_fit([40], 30)
    []
    """
    out, used = [], 0
    for i, n in enumerate(token_counts):
        if used + n <= budget:
            out.append(i)
            used += n
    return out


def arrange(oracles: Sequence[str], distractors: Sequence[str], rng: random.Random) -> tuple[list[str], list[int]]:
    """The oracle passages at uniformly random slots among the distractors (distractors keep their order, oracles
    theirs) -> ``(passages, oracle_slots)``. With one oracle and ``n`` distractors the slot is uniform over
    ``0..n``.

    >>> arrange(["O"], [], random.Random(0))
    (['O'], [0])
    >>> passages, slots = arrange(["O"], ["a", "b", "c"], random.Random(1))
    >>> [p for p in passages if p != "O"], passages[slots[0]]
    (['a', 'b', 'c'], 'O')
    """
    n = len(oracles) + len(distractors)
    slots = sorted(rng.sample(range(n), len(oracles)))
    rest, out = iter(distractors), []
    placed = dict(zip(slots, oracles))
    for i in range(n):
        out.append(placed[i] if i in placed else next(rest))
    return out, slots


@dataclass
class Case:
    """One prompt of the eval: a question with one context."""

    part: str
    """Context family (:data:`PARTS`)."""
    x: float
    """Axis value of the family's series: distractors, budget tokens, oracle slot, poisoned passages."""
    question: int
    """Index of the question."""
    passages: list[str]
    prompt: str
    gold: str
    """The right answer (:data:`kb.ABSTAIN` for a context without the oracle)."""
    oracle_slots: list[int]
    """Slots of the oracle passages in :attr:`passages` (``[]``: none)."""
    has_oracle: bool
    """Every oracle passage of the question is in the context."""
    evidence_tokens: int
    """Tokens of the context's passage lines."""
    poisoned: str = ""
    """The poisoned value of the question (``""``: not a poison case)."""


def build_cases(
    c: RetrievalConfig, knowledge: kb.KnowledgeBase, questions: Sequence[Mapping[str, Any]],
    ranked: Sequence[Sequence[str]], count: Callable[[str], int],
) -> list[Case]:
    """Every context of the eval (model-free): ``questions`` are ``kb`` records, ``ranked[i]`` the retriever's passage
    ids for question ``i`` best first (at least ``max(budgets)`` deep when budgets are measured), ``count(text)`` the
    tokens of one passage line. Randomness is seeded per question and family (string seeds of ``c.seed``), so
    switching a family off does not change the others' contexts. A two-hop question's two oracle passages take two
    random slots (in the position family: slots ``i`` and ``i + 1``)."""
    def rng(*parts: Any) -> random.Random:
        return random.Random("/".join(str(p) for p in ("retrieval", c.seed, *parts)))

    def case(part: str, x: float, i: int, passages: list[str], gold: str, slots: list[int],
             poisoned: str = "") -> Case:
        q = questions[i]
        return Case(part=part, x=float(x), question=i, passages=passages,
                    prompt=kb.render_prompt(passages, q["question"]), gold=gold, oracle_slots=slots,
                    has_oracle=all(o in passages for o in q["oracle_passages"]),
                    evidence_tokens=sum(count(passage_line(p)) for p in passages), poisoned=poisoned)

    most = max_distractors(c)
    cases: list[Case] = []
    for i, q in enumerate(questions):
        oracles = list(q["oracle_passages"])
        ids = sample_distractors(c.distractor_mode, most, q, knowledge, ranked[i], rng("distractors", i))
        texts = [knowledge.passages[j] for j in ids]
        for n in c.distractors:
            passages, slots = arrange(oracles, texts[:n], rng("slot", i, n))
            cases.append(case("distractors", n, i, passages, q["answer"], slots))
        if c.budgets:
            ranked_texts = [knowledge.passages[j] for j in ranked[i]]
            counts = [count(passage_line(p)) for p in ranked_texts]
            for b in c.budgets:
                passages = [ranked_texts[j] for j in first_fit(counts, b)]
                slots = [s for s, p in enumerate(passages) if p in oracles]
                cases.append(case("budget", b, i, passages, q["answer"], slots))
        if c.position_distractors > 0:
            pool = texts[: c.position_distractors]
            for s in range(c.position_distractors + 1):
                passages = pool[:s] + oracles + pool[s:]
                cases.append(case("position", s, i, passages, q["answer"], list(range(s, s + len(oracles)))))
        if c.poison_counts:
            poison_text, poisoned = knowledge.poison(q, rng("poison", i))
            for p in c.poison_counts:
                items = [(t, True) for t in oracles] + [(t, False) for t in texts[: c.poison_distractors]]
                items += [(poison_text, False)] * p
                rng("poison-slots", i, p).shuffle(items)
                passages = [t for t, _ in items]
                slots = [s for s, (_, is_oracle) in enumerate(items) if is_oracle]
                cases.append(case("poison", p, i, passages, q["answer"], slots, poisoned))
        if c.negative_distractors > 0:
            cases.append(case("negative", c.negative_distractors, i, texts[: c.negative_distractors], kb.ABSTAIN, []))
    return cases


def score_cases(
    cases: Sequence[Case], completions: Sequence[str], reader: str = "exact", candidates: Collection[str] = (),
) -> dict[tuple[str, float], dict[str, float]]:
    """Per ``(part, x)``: ``accuracy`` (answer matches the gold), ``asr`` (matches the poisoned value; NaN outside the
    poison family), ``conflict`` (answers :data:`kb.CONFLICT`), ``abstain`` (answers :data:`kb.ABSTAIN`), ``other``
    (an answer that is not an abstention nor an echo), ``no_answer`` (no answer), ``echo`` (the completion copies the
    context back, :data:`evals.lm.KB_ECHO`), ``evidence_tokens`` (mean), ``oracle_in_context``, ``n``. The answer of
    a completion is its answer line (``reader="exact"``, :func:`evals.lm.answer_of`) or what
    :func:`evals.lm.contained_answer` reads with ``candidates`` and the case's passages (``"contains"``).

    >>> cs = [Case("negative", 4, 0, [], "P:x\\n", kb.ABSTAIN, [], False, 5),
    ...       Case("negative", 4, 1, [], "P:y\\n", kb.ABSTAIN, [], False, 7)]
    >>> t = score_cases(cs, ["A:" + kb.ABSTAIN, "E:none\\nA:teln"])[("negative", 4.0)]
    >>> t["accuracy"], t["abstain"], t["other"], t["no_answer"], t["evidence_tokens"]
    (0.5, 0.5, 0.5, 0.0, 6.0)
    >>> t = score_cases(cs, ["I do not know.", "teln"], "contains", {"teln"})[("negative", 4.0)]
    >>> t["accuracy"], t["other"]
    (0.5, 0.5)
    """
    if len(cases) != len(completions):
        raise ValueError(f"retrieval: {len(completions)} completions for {len(cases)} cases")
    if reader not in ("exact", "contains"):
        raise ValueError(f"retrieval: reader must be exact or contains here (got {reader!r})")

    def read(case: Case, text: str) -> str | None:
        if reader == "exact":
            return answer_of(text)
        oracles = [case.passages[s] for s in case.oracle_slots]
        return contained_answer(text, candidates, case.passages, oracles)

    groups: dict[tuple[str, float], list[tuple[Case, str | None]]] = {}
    for case, text in zip(cases, completions):
        groups.setdefault((case.part, float(case.x)), []).append((case, read(case, text)))
    table = {}
    for key, rows in groups.items():
        poisoned = [(cs, a) for cs, a in rows if cs.poisoned]
        table[key] = {
            "accuracy": rate([kb.answer_matches(a, cs.gold) for cs, a in rows]),
            "asr": rate([kb.answer_matches(a, cs.poisoned) for cs, a in poisoned]),
            "conflict": rate([kb.answer_matches(a, kb.CONFLICT) for _, a in rows]),
            "abstain": rate([kb.answer_matches(a, kb.ABSTAIN) for _, a in rows]),
            "other": rate([a not in (None, KB_ECHO) and not kb.answer_matches(a, kb.ABSTAIN) for _, a in rows]),
            "no_answer": rate([a is None for _, a in rows]),
            "echo": rate([a == KB_ECHO for _, a in rows]),
            "evidence_tokens": sum(cs.evidence_tokens for cs, _ in rows) / len(rows),
            "oracle_in_context": rate([cs.has_oracle for cs, _ in rows]),
            "n": float(len(rows)),
        }
    return table


def limit_floor(distractors: Sequence[int]) -> float:
    """The limit when even the fewest distractors measured fail the threshold: -1 when that count is 0 (the model
    cannot read the oracle alone, one step below "reads it with no distractors"), else 0.

    >>> limit_floor([0, 2, 4]), limit_floor([2, 4])
    (-1.0, 0.0)
    """
    return -1.0 if distractors[0] == 0 else 0.0


def summarize(
    c: RetrievalConfig, table: Mapping[tuple[str, float], Mapping[str, float]], recall: Mapping[int, float],
) -> tuple[dict[float, float], float, dict[str, float], dict[str, Series], list[str]]:
    """``(curve, limit, scalars, series, notes)`` of a scored eval (``table`` from :func:`score_cases`, ``recall``
    ``{k: recall@k}`` of the retriever)."""
    def points(part: str, metric: str) -> dict[float, float]:
        return {x: row[metric] for (p, x), row in sorted(table.items()) if p == part}

    curve = points("distractors", "accuracy")
    limit = read_limit(curve, c.threshold, higher_is_better=True, floor=limit_floor(c.distractors))
    scalars: dict[str, float] = {"num_questions": float(c.examples)}
    for x, v in curve.items():
        scalars[f"accuracy@{x:g}"] = v
        scalars[f"evidence_tokens@{x:g}"] = table[("distractors", x)]["evidence_tokens"]
    for k, v in sorted(recall.items()):
        scalars[f"recall@{k}"] = v
    series: dict[str, Series] = {}
    notes: list[str] = []
    first = c.distractors[0]
    if not math.isnan(curve[float(first)]) and curve[float(first)] < c.threshold:
        if first == 0:
            notes.append(f"accuracy {curve[0.0]:.2f} with the oracle alone (0 distractors) is below the threshold "
                         f"{c.threshold:g}: the model cannot read the oracle, so the limit is -1 and distractors are "
                         f"not what limits it")
        else:
            notes.append(f"accuracy {curve[float(first)]:.2f} at the fewest distractors measured ({first}) is below "
                         f"the threshold {c.threshold:g}: limit {limit:g}")
    elif limit == float(c.distractors[-1]):
        notes.append(f"every distractor count clears the threshold {c.threshold:g}: the limit is the largest count "
                     f"measured, {c.distractors[-1]}; more distractors may measure further")
    if c.budgets:
        series["accuracy_by_budget"] = Series("budget_tokens", "accuracy", points("budget", "accuracy"))
        series["oracle_in_context_by_budget"] = Series("budget_tokens", "oracle_in_context",
                                                       points("budget", "oracle_in_context"))
    if c.position_distractors > 0:
        series["accuracy_by_position"] = Series("oracle_slot", "accuracy", points("position", "accuracy"))
    if c.poison_counts:
        asr = points("poison", "asr")
        series["asr_by_poison"] = Series("poisoned_passages", "attack_success_rate", asr, higher_is_better=False)
        series["accuracy_by_poison"] = Series("poisoned_passages", "accuracy", points("poison", "accuracy"))
        conflict = points("poison", "conflict")
        series["conflict_flag_by_poison"] = Series("poisoned_passages", "conflict_flag_rate", conflict)
        for x, v in asr.items():
            scalars[f"asr@{x:g}"] = v
        attacked = [x for x in asr if x > 0]
        if attacked:
            scalars["attack_success_rate"] = asr[attacked[0]]
            flagged = max(conflict[x] for x in attacked)
            if flagged > 0:
                notes.append(f"up to {flagged:.0%} of the poisoned contexts were answered '{kb.CONFLICT}': a flagged "
                             f"conflict is neither an attack success nor a correct answer, so the ASR and "
                             f"accuracy_by_poison leave it out (see conflict_flag_by_poison)")
    if c.negative_distractors > 0:
        row = table[("negative", float(c.negative_distractors))]
        scalars["negative_rejection"] = row["abstain"]
        scalars["negative_hallucination"] = row["other"]
        if row["other"] > 0.5:
            notes.append(f"with {c.negative_distractors} distractors and no oracle the model still answers "
                         f"{row['other']:.0%} of the questions (negative_hallucination): it does not abstain when "
                         f"the evidence is missing")

    reader = resolve_reader(c.reader, c.instruct, "contains")
    if reader == "contains" and table:
        scalars["echo_rate"] = sum(row["echo"] * row["n"] for row in table.values()) / sum(
            row["n"] for row in table.values())
        if scalars["echo_rate"] > 0.5:
            notes.append(f"{scalars['echo_rate']:.0%} of the completions copy two or more passages back (echo_rate): "
                         f"an echo is no answer, so it counts as wrong, and as neither an abstention nor a made-up "
                         f"answer")
    if table and all(row["no_answer"] == 1.0 for row in table.values()):
        notes.append(f"the model wrote no '{kb.ANSWER_PREFIX}' answer line for any question: every rate is 0"
                     if reader == "exact" else "the model wrote nothing for any question: every rate is 0")
    if c.budgets and recall.get(5, 1.0) < 1.0:
        notes.append(f"the {c.retriever} retriever ranks every oracle passage of a question in its top 5 for "
                     f"{recall[5]:.0%} of the questions: the budget curve is bounded by retrieval as well as reading "
                     f"(see oracle_in_context_by_budget)")
    note = prompt_note(c.instruct, reader, CONTAINS_RULE)
    if note:
        notes.append(note)
    return curve, limit, scalars, series, notes


# --- the eval --------------------------------------------------------------------------------------------------------
class Retrieval(Eval):
    """Answer accuracy with the oracle passage among distractors; the limit is the largest distractor count up to
    which every count reaches ``threshold``. Budgeted retrieval, oracle position, poisoning and no-oracle contexts
    say where the reading breaks."""

    name = "retrieval"
    version = "1"
    summary = "kb QA accuracy with the oracle among distractors; limit = most distractors with accuracy >= threshold"
    limit = "retrieval"
    Config = RetrievalConfig

    config: RetrievalConfig

    def __init__(self, config: RetrievalConfig | None = None) -> None:
        super().__init__(config)
        self._cache: tuple[Any, str, list[Case], dict[int, float]] | None = None  # (tokenizer, repr(config), ...)
        self._kb: tuple[str, kb.KnowledgeBase] | None = None  # (repr(config), its knowledge base)

    def spec(self) -> LimitSpec:
        c = self.config
        c.validate()
        return LimitSpec(metric="accuracy", axis="distractors", axis_values=tuple(float(x) for x in c.distractors),
                         higher_is_better=True, threshold=c.threshold, limit="retrieval", limit_unit="distractors")

    def knowledge(self) -> kb.KnowledgeBase:
        """The config's knowledge base (``kb.build_kb``), built once per config and shared by :meth:`check`,
        :meth:`contexts` and :meth:`candidates`."""
        if self._kb is None or self._kb[0] != repr(self.config):
            self._kb = (repr(self.config), kb.build_kb(kb_config(self.config, "retrieval")))
        return self._kb[1]

    def questions(self, knowledge: kb.KnowledgeBase) -> list[dict]:
        """The ``examples`` questions (``kb`` records with their oracle-only context): entities uniform over the
        knowledge base, attributes uniform, two-hop with probability ``two_hop_fraction``; seeded by ``seed``."""
        c = self.config
        rng = random.Random(f"retrieval/{c.seed}/questions")
        out = []
        for _ in range(c.examples):
            entity, attribute = rng.choice(knowledge.entities), rng.choice(list(c.attributes))
            hops = 2 if rng.random() < c.two_hop_fraction else 1
            out.append(kb.make_record(knowledge, entity, attribute, hops))
        return out

    def contexts(self, tokenizer: Any) -> tuple[list[Case], dict[int, float]]:
        """Every :class:`Case` of the eval and the retriever's ``{1: recall@1, 5: recall@5}``. Built once per
        tokenizer and config (``check`` builds them, so a missing retriever model fails before training)."""
        c = self.config
        if self._cache is not None and self._cache[0] is tokenizer and self._cache[1] == repr(c):
            return self._cache[2], self._cache[3]
        from llm_limits.evals.retrievers import recall_at_k

        knowledge = self.knowledge()
        questions = self.questions(knowledge)
        depth = min(len(knowledge.passages), max([5, max_distractors(c) + 2, *c.budgets]))
        retriever = build_retriever(c.retriever, knowledge)
        results = retriever.search([q["question"] for q in questions], k=depth)
        gold = [list(q["oracle_ids"]) for q in questions]
        recall = {k: float(recall_at_k(results, gold, k)) for k in (1, 5)}
        counts: dict[str, int] = {}

        def count(text: str) -> int:
            if text not in counts:
                counts[text] = count_tokens(tokenizer, text)
            return counts[text]

        cases = build_cases(c, knowledge, questions, [[i for i, _ in r] for r in results], count)
        self._cache = (tokenizer, repr(c), cases, recall)
        return cases, recall

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        check_instruct(c, fmt)
        knowledge = self.knowledge()
        sample = self.questions(knowledge)[0]
        check_kb_spelling(tokenizer, sample["prompt"] + sample["completion"] + kb.ABSTAIN + kb.CONFLICT, "retrieval")
        cases, _ = self.contexts(tokenizer)
        longest = max(cases, key=lambda cs: count_tokens(tokenizer, cs.prompt))
        check_positions(model, count_tokens(tokenizer, format_prompt(tokenizer, self.user_turn(longest.prompt), fmt)),
                        c.max_new_tokens, "retrieval", f"a {longest.part} context of {len(longest.passages)} passages",
                        PART_FIELDS[longest.part])

    def user_turn(self, prompt: str) -> str:
        """What the model is asked for a case's plain ``prompt``: the prompt itself, or with ``instruct`` the
        ``instruction`` around it (then written in the chat template by :func:`evals.lm.format_prompt`)."""
        c = self.config
        return instructed(c.instruction, prompt) if c.instruct else prompt

    def candidates(self) -> list[str]:
        """The values the ``contains`` reader looks for: every value of the asked attributes' pools (the gold, the
        distractors' and the poisoned values among them; never an entity name, so a two-hop answer that names the
        bridge entity still reads as its value)."""
        return [v for pool in self.knowledge().values.values() for v in pool]

    def answer(self, model: Any, tokenizer: Any, prompts: Sequence[str], device: str = "cpu") -> list[str]:
        """The model's greedy completions of ``prompts``, already written in the prompt format (the only place the
        eval touches the model)."""
        c = self.config
        return decode_texts(model, tokenizer, list(prompts), c.batch_size, c.max_new_tokens, device)

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Build every context, answer each family's prompts on ``model`` (already on ``device``), score."""
        c = self.config
        spec = self.spec()
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        check_instruct(c, fmt)
        reader = resolve_reader(c.reader, c.instruct, "contains")
        cases, recall = self.contexts(tokenizer)
        parts = [p for p in PARTS if any(cs.part == p for cs in cases)]
        completions = [""] * len(cases)
        bar = tqdm(total=len(parts), desc="retrieval", unit="stage", disable=not progress, leave=False)
        for part in parts:
            bar.set_postfix_str(part)
            index = [i for i, cs in enumerate(cases) if cs.part == part]
            prompts = [format_prompt(tokenizer, self.user_turn(cases[i].prompt), fmt) for i in index]  # chat: one turn
            for i, text in zip(index, self.answer(model, tokenizer, prompts, device)):
                completions[i] = text
            bar.update(1)
        bar.close()
        table = score_cases(cases, completions, reader, self.candidates() if reader == "contains" else ())
        curve, limit, scalars, series, notes = summarize(c, table, recall)
        return self.result(spec=spec, curve=curve, limit_value=float(limit), threshold=c.threshold,
                           prompt_format=fmt, scalars=scalars, notes=notes, series=series)
