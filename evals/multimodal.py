"""Cross-modal alignment: does a vision-language model put images and text in one space, and do its answers use the
image at all?

The limit (issue #6): a LLaVA-style model (a vision tower, a projector, a language model) can answer questions about
an image from the question's wording alone, and its image features can sit in a region of the language model's space
that no text reaches (the modality gap). This eval runs on any LLaVA-style model (:func:`evals.vlm.image_format`
raises for anything else; :meth:`Multimodal.check` calls it, so a run fails early with one line) over the held-out
records of a multimodal task (``shapes``, ``digits`` or a user's ``image_folder`` JSONL; the record schema is in
``evals/tasks/digits.py``).

Alignment, over ``num_retrieval`` distinct images and their captions (embeddings from :func:`evals.vlm.embed_images`
and :func:`evals.vlm.embed_texts` at hidden layer ``layer``, L2-normalised):

- ``gap`` (Liang et al. 2022, arXiv 2203.02053): ``|| mean(image embeddings) - mean(text embeddings) ||``
  (:func:`modality_gap`: 0 when the two clouds share a centre, up to 2); ``gap_pair_cosine``: the mean cosine of an
  image and its own caption (:func:`pair_cosine`).
- ``separability``: cross-validated accuracy of a logistic regression telling image embeddings from text embeddings
  (:func:`separability`: 0.5 inseparable, 1.0 a clean split).
- ``i2t_recall@k`` / ``t2i_recall@k``: cross-modal retrieval by cosine (:func:`recall_at_k`). Captions repeat (digits
  have 10 for hundreds of images), so a hit is any retrieved item whose caption TEXT equals the query's, not only the
  query's own image or caption; ``recall_chance@k`` is what a random ranking scores on the same set
  (:func:`recall_chance`), the reference to read recall against.

Answers (multiple-choice records: kind ``qa`` with choices), each picked as the choice of highest summed
log-probability (:func:`evals.vlm.choice_logprobs`, teacher-forced after ``Q: question\\nA: ``):

- The curve: accuracy against ``image_signal`` ``s``, the image blended with uniform noise at the model's image size
  (``s * image + (1 - s) * noise``, :func:`evals.vlm.blend`): ``s = 1`` the clean image (``acc_sighted``), ``s = 0``
  pure noise (``acc_noise``). The same noise image per record at every level, so the points differ only in ``s``.
- ``acc_no_image``: the blind prompt, image tokens removed. MMStar (Chen et al. 2024, arXiv 2403.20330):
  ``multimodal_gain = acc_sighted - acc_no_image`` (what the image adds; the limit value) and
  ``multimodal_leakage = max(0, acc_no_image - S_t)`` with ``S_t`` the base LLM's text-only score
  (``text_only_accuracy``; chance when unset: the mean of ``1 / len(choices)``, ``chance_accuracy``).
  ``gain_vs_noise = acc_sighted - acc_noise``.
- Traps (``shapes``: a question whose wording suggests ``prior_answer`` while the image says otherwise):
  ``trap_accuracy`` and ``trap_prior_rate`` (the share answering the suggested answer) with the image, and the same
  ``_no_image``.
- MMVP pairs (Tong et al. 2024, arXiv 2401.06209: two images that differ in one attribute, the same question,
  different answers): ``pair_accuracy`` (both records of a pair right, :func:`pair_accuracy`) and
  ``pair_record_accuracy`` (per record).

Prompt format: always ``plain`` (``prompt_format: auto`` is ``plain`` here, ``chat`` is refused). The prompts are
``<image>...<image>\\nQ: {question}\\nA: `` (:func:`evals.vlm.prompt_text`), the one format the trainer's
vision-language rows (``trainers/build/vlm.py``) share with this eval: a LLaVA-style model here learns its image tokens
and this layout in its own training, whatever chat template its language model came with, so wrapping the prompt in
that template would ask it something it was never trained to read.

The :class:`~evals.base.LimitSpec`'s curve is accuracy by image signal; the limit value is ``multimodal_gain`` (not a
point read off the curve: how much the image moves accuracy is the limit), and :attr:`~evals.base.EvalResult.threshold`
holds the chance accuracy as a reference line. Every number comes from pure functions of embeddings and picked answers
(:func:`modality_gap`, :func:`separability`, :func:`recall_at_k`, :func:`multimodal_gain`, :func:`multimodal_leakage`,
:func:`pair_accuracy`, :func:`summarize`); the model is reached only through :mod:`evals.vlm` in
:meth:`Multimodal.measure`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from llm_limits.evals import vlm
from llm_limits.evals.base import Eval, EvalConfig, EvalResult, LimitSpec, Series
from llm_limits.evals.lm import eval_mode, position_range, refuse_chat, spells, unk_fraction

TASK_NAMES = ("shapes", "digits", "image_folder")

SET_BY_EVAL = ("num_examples", "seed")
"""Task-config fields the eval sets itself (from its own ``num_examples`` / ``trap_examples`` / ``pair_examples`` and
``seed``); naming them in ``params`` is an error rather than an override that would be silently replaced."""

RECALL_KS = (1, 5)

SEED_OFFSETS = {"main": 0, "traps": 1, "pairs": 2, "noise": 3}
"""The eval's generations draw from ``seed + offset``: the trap and pair sets are separate generations with distinct
seeds, and the noise images their own stream."""


@dataclass
class MultimodalConfig(EvalConfig):
    task: Literal["shapes", "digits", "image_folder"] = "shapes"
    """Where the records come from: a generated task of ``evals.tasks.TASKS`` (``shapes``, ``digits``) or a user's
    JSONL (``image_folder``, read by ``evals.tasks.image_folder.load``)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Overrides of the task's config fields (``ShapesConfig`` / ``DigitsConfig``; for ``image_folder`` the keyword
    arguments of ``load``, e.g. ``root``). An unknown key is an error; ``num_examples`` and ``seed`` are set by the
    eval, and so are ``trap_fraction`` / ``pair_fraction`` / ``caption_fraction`` in the ``shapes`` trap and pair
    generations (the main set uses them as given). ``digits`` reads the held-out ``split: test`` unless ``params``
    sets ``split``."""
    path: str | None = None
    """The ``image_folder`` JSONL file; required for that task and only for it."""
    num_examples: int = 200
    """Multiple-choice records (kind ``qa`` with choices) scored at every signal level and blind."""
    num_retrieval: int = 100
    """Distinct images (with their captions) of the modality gap, separability and cross-modal recall."""
    trap_examples: int = 100
    """Trap records scored (``shapes``: a separate generation with ``trap_fraction: 1``; ``image_folder``: the file's
    ``trap`` records); 0 skips the trap metrics."""
    pair_examples: int = 50
    """MMVP pairs scored (``shapes``: a separate generation with ``pair_fraction: 1``; ``image_folder``: the file's
    ``pair`` records); 0 skips the pair metrics."""
    signal_levels: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Image signal of the curve's points, strictly ascending within [0, 1], 0 (pure noise) and 1 (clean) included."""
    layer: int = -1
    """Hidden state the embeddings are read from: -1 the language model's last layer, 0 its input embeddings (the
    projector's output for images)."""
    text_only_accuracy: float | None = None
    """MMStar's ``S_t``: the base LLM's accuracy on these questions without the vision tower, for
    ``multimodal_leakage``. ``None``: chance accuracy stands in (noted in the result)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for an inconsistent config."""
        w = "multimodal"
        if self.task not in TASK_NAMES:
            raise ValueError(f"{w}: task must be one of {', '.join(TASK_NAMES)} (got {self.task!r})")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"{w}: params must be a mapping of task-config fields (got {self.params!r})")
        if self.task == "image_folder" and not self.path:
            raise ValueError(f"{w}: path is required for task image_folder (the JSONL file of records)")
        if self.task != "image_folder" and self.path is not None:
            raise ValueError(f"{w}: path is only read by task image_folder (got task {self.task!r})")
        for name in ("num_examples", "num_retrieval", "batch_size"):
            minimum = 2 if name == "num_retrieval" else 1
            if not _is_int(getattr(self, name)) or getattr(self, name) < minimum:
                raise ValueError(f"{w}: {name} must be an integer >= {minimum} (got {getattr(self, name)!r})")
        for name in ("trap_examples", "pair_examples"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{w}: {name} must be an integer >= 0 (got {getattr(self, name)!r})")
        if not _is_int(self.layer):
            raise ValueError(f"{w}: layer must be an integer (got {self.layer!r})")
        levels = self.signal_levels
        if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or not levels or any(
                isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0 for s in levels):
            raise ValueError(f"{w}: signal_levels must be numbers within [0, 1] (got {levels!r})")
        if any(b <= a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"{w}: signal_levels must be strictly ascending (got {list(levels)})")
        if levels[0] != 0.0 or levels[-1] != 1.0:
            raise ValueError(f"{w}: signal_levels must include 0 (pure noise) and 1 (the clean image) "
                             f"(got {list(levels)})")
        t = self.text_only_accuracy
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0):
            raise ValueError(f"{w}: text_only_accuracy must be within [0, 1] or null (got {t!r})")
        refuse_chat(self.prompt_format, w, "its prompts are the image-token rows of evals.vlm, the format the "
                    "vision-language training writes")
        task_fields = _task_fields(self.task)
        for key in self.params:
            if key in SET_BY_EVAL:
                what = "num_examples / trap_examples / pair_examples" if key == "num_examples" else "seed"
                raise ValueError(f"{w}: params.{key} is set by the eval (use the eval's {what})")
            if key not in task_fields:
                known = sorted(task_fields - set(SET_BY_EVAL))
                raise ValueError(f"{w}: params.{key}: not a field of task {self.task} "
                                 f"(known: {', '.join(known) or 'none'})")
        if self.task != "image_folder":
            task_config(self, "main", 1)  # the task's own checks of the overrides, reworded


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(n: int, noun: str) -> str:
    """``n noun was`` / ``n nouns were``.

    >>> _count(1, "pair"), _count(2, "pair")
    ('1 pair was', '2 pairs were')
    """
    return f"{n} {noun} was" if n == 1 else f"{n} {noun}s were"


# --- the task's records ----------------------------------------------------------------------------------------------
def _task_entry(task: str) -> tuple[type, Callable[[Any], list[dict]]]:
    from llm_limits.evals.tasks import TASKS

    if task not in TASKS:
        raise ValueError(f"multimodal: task {task!r} is not registered in evals.tasks.TASKS")
    return TASKS[task]


def _task_fields(task: str) -> set[str]:
    """The keys ``params`` may hold for ``task``."""
    if task == "image_folder":
        from llm_limits.evals.tasks import image_folder

        return {p for p in list(inspect.signature(image_folder.load).parameters)[1:]}
    return {f.name for f in dataclasses.fields(_task_entry(task)[0])}


def task_config(c: MultimodalConfig, part: str, num_examples: int, **fixed: Any) -> Any:
    """The task config of one of the eval's generations: ``params`` (``digits`` defaulting to ``split: test``), then
    ``fixed`` (what the trap and pair generations set), ``num_examples`` and the seed ``c.seed + SEED_OFFSETS[part]``.
    The task's one-line errors come back starting with ``multimodal: params:``."""
    cls, _ = _task_entry(c.task)
    values = dict(c.params)
    if c.task == "digits":
        values.setdefault("split", "test")  # images no training run saw
    values.update(fixed)
    values.update(num_examples=num_examples, seed=c.seed + SEED_OFFSETS[part])
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        message = str(err)
        prefix = f"{c.task}: "
        raise ValueError(f"multimodal: params: {message[len(prefix):] if message.startswith(prefix) else message}") \
            from None


def _grow(make: Callable[[int], list[dict]], n: int, enough: Callable[[list[dict]], bool],
          tries: int = 6) -> list[dict]:
    """``make(n)``, doubling ``n`` until ``enough`` of its records (a task mixes kinds, so ``n`` records hold fewer
    of any one kind) or ``tries`` generations; the last generation either way."""
    records = make(n)
    for _ in range(tries - 1):
        if enough(records):
            break
        n *= 2
        records = make(n)
    return records


def is_multiple_choice(record: Mapping[str, Any], kind: str = "qa") -> bool:
    """Whether a record is scored as a multiple-choice question of ``kind``."""
    return record["kind"] == kind and len(record["choices"]) > 0


def retrieval_items(records: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The first record of each of the first ``n`` distinct images that have a caption (records in order).

    >>> rs = [{"image_id": i, "caption": c} for i, c in [("a", "x"), ("a", "x"), ("b", ""), ("c", "y")]]
    >>> [r["image_id"] for r in retrieval_items(rs, 5)]
    ['a', 'c']
    """
    seen: set[str] = set()
    out = []
    for r in records:
        if r["image_id"] in seen or not r["caption"]:
            continue
        seen.add(r["image_id"])
        out.append(r)
        if len(out) == n:
            break
    return out


def complete_pairs(records: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """The records of the first ``n`` pairs (by first appearance) that have both records, multiple-choice.

    >>> rs = [{"kind": "pair", "choices": ["y", "n"], "pair_id": p} for p in (3, 5, 3, 7, 7)]
    >>> [r["pair_id"] for r in complete_pairs(rs, 5)]
    [3, 3, 7, 7]
    """
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for r in records:
        if is_multiple_choice(r, "pair") and r["pair_id"] >= 0:
            groups.setdefault(r["pair_id"], []).append(r)
    kept = [g for g in groups.values() if len(g) >= 2][:n]
    return [r for g in kept for r in g]


@dataclass
class EvalSet:
    """The records one run scores (model-free; built by :func:`build_eval_set`)."""

    qa: list[dict]
    """Multiple-choice records of the curve and the blind prompt."""
    items: list[dict]
    """One record per distinct image with a caption: the gap and recall set."""
    traps: list[dict]
    pairs: list[dict]
    """Both records of each pair, in pair order."""
    notes: list[str] = field(default_factory=list)
    """What the data could not give (fewer records than asked, no traps...)."""


def build_eval_set(c: MultimodalConfig) -> EvalSet:
    """The records of the eval under ``c``. Deterministic: the generated tasks draw from ``c.seed`` (main set),
    ``c.seed + 1`` (traps) and ``c.seed + 2`` (pairs); an ``image_folder`` file is read once, its multiple-choice
    records shuffled with ``c.seed`` when there are more than ``num_examples``."""
    c.validate()
    notes: list[str] = []
    if c.task == "image_folder":
        from llm_limits.evals.tasks import image_folder

        records = image_folder.load(c.path, **dict(c.params))
        qa = [r for r in records if is_multiple_choice(r)]
        if len(qa) > c.num_examples:
            qa = random.Random(f"multimodal/{c.seed}/qa").sample(qa, c.num_examples)
        items = retrieval_items(records, c.num_retrieval)
        traps = [r for r in records if is_multiple_choice(r, "trap")][: c.trap_examples]
        pairs = complete_pairs(records, c.pair_examples)
        if c.trap_examples and not traps:
            notes.append("the image_folder file has no multiple-choice trap records: trap_* not measured")
        if c.pair_examples and not pairs:
            notes.append("the image_folder file has no complete multiple-choice pairs: pair_* not measured")
    else:
        _, generate = _task_entry(c.task)

        def main(n: int) -> list[dict]:
            return generate(task_config(c, "main", n))

        def enough(records: list[dict]) -> bool:
            return (sum(is_multiple_choice(r) for r in records) >= c.num_examples
                    and len(retrieval_items(records, c.num_retrieval)) >= c.num_retrieval)

        records = _grow(main, max(c.num_examples, c.num_retrieval), enough)
        qa = [r for r in records if is_multiple_choice(r)][: c.num_examples]
        items = retrieval_items(records, c.num_retrieval)
        traps, pairs = [], []
        task_fields = _task_fields(c.task)
        has_traps, has_pairs = "trap_fraction" in task_fields, "pair_fraction" in task_fields
        # the trap and pair sets are generations of one kind: the other kinds' fractions go to 0
        zero = {k: 0.0 for k in ("trap_fraction", "pair_fraction", "caption_fraction") if k in task_fields}
        if has_traps and c.trap_examples:
            fixed = {**zero, "trap_fraction": 1.0}
            records = _grow(lambda n: generate(task_config(c, "traps", n, **fixed)), c.trap_examples,
                            lambda rs: sum(is_multiple_choice(r, "trap") for r in rs) >= c.trap_examples)
            traps = [r for r in records if is_multiple_choice(r, "trap")][: c.trap_examples]
        if has_pairs and c.pair_examples:
            fixed = {**zero, "pair_fraction": 1.0}
            records = _grow(lambda n: generate(task_config(c, "pairs", n, **fixed)), 2 * c.pair_examples,
                            lambda rs: len(complete_pairs(rs, c.pair_examples)) >= 2 * c.pair_examples)
            pairs = complete_pairs(records, c.pair_examples)
        if not (has_traps or has_pairs):
            notes.append(f"{c.task} has no traps or MMVP pairs: trap_* and pair_* are not measured")
    if len(qa) < c.num_examples:
        notes.append(f"only {_count(len(qa), 'multiple-choice record')} available (num_examples={c.num_examples})")
    if len(items) < c.num_retrieval:
        notes.append(f"only {_count(len(items), 'distinct captioned image')} available for the gap and recall "
                     f"(num_retrieval={c.num_retrieval})")
    if c.trap_examples and traps and len(traps) < c.trap_examples:
        notes.append(f"only {_count(len(traps), 'trap record')} available (trap_examples={c.trap_examples})")
    if c.pair_examples and pairs and len(pairs) < 2 * c.pair_examples:
        notes.append(f"only {_count(len(pairs) // 2, 'complete pair')} available (pair_examples={c.pair_examples})")
    return EvalSet(qa=qa, items=items, traps=traps, pairs=pairs, notes=notes)


# --- functional core: alignment --------------------------------------------------------------------------------------
def l2_normalize(x: Any) -> np.ndarray:
    """Rows of ``x`` ``[N, D]`` scaled to unit length (float64; an all-zero row stays zero)."""
    a = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def modality_gap(images: Any, texts: Any) -> float:
    """Liang et al. 2022 (arXiv 2203.02053): the distance between the centres of the L2-normalised image and text
    embeddings, ``|| mean(img) - mean(txt) ||`` (``[N, D]`` and ``[M, D]``; 0 when the centres coincide, at most 2).

    Two clouds of unit vectors ``(0.6, +-0.8)`` and ``(-0.6, +-0.8)`` have centres ``(0.6, 0)`` and ``(-0.6, 0)``:

    >>> round(modality_gap([[0.6, 0.8], [3.0, -4.0]], [[-0.6, 0.8], [-0.6, -0.8]]), 6)
    1.2
    """
    return float(np.linalg.norm(l2_normalize(images).mean(0) - l2_normalize(texts).mean(0)))


def pair_cosine(images: Any, texts: Any) -> float:
    """Mean cosine of each image embedding with its own text's (row ``i`` with row ``i``; ``[N, D]`` each).

    >>> round(pair_cosine([[0.6, 0.8], [0.6, -0.8]], [[-0.6, 0.8], [-0.6, -0.8]]), 6)
    0.28
    """
    a, b = l2_normalize(images), l2_normalize(texts)
    if a.shape != b.shape:
        raise ValueError(f"multimodal: pair_cosine needs matched rows (got {a.shape} and {b.shape})")
    return float((a * b).sum(1).mean())


def separability(images: Any, texts: Any, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a logistic regression telling the L2-normalised image embeddings (label 0) from the
    text embeddings (label 1): 0.5 when the modalities are mixed, 1.0 when a hyperplane splits them. NaN with fewer
    than 2 embeddings of either modality.

    Folds are :class:`sklearn.model_selection.StratifiedGroupKFold` (``folds`` splits, or fewer when a modality has
    fewer embeddings; shuffled with ``seed``) grouped by pair when the two sets are matched row for row (equal
    lengths): an image and its caption fall in the same fold. Without the grouping, identical image and text
    embeddings (perfect alignment) put a point's twin, with the other label, into the training folds, and the probe
    would score systematically BELOW 0.5 instead of at it.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score

    a, b = l2_normalize(images), l2_normalize(texts)
    n, m = len(a), len(b)
    k = min(folds, n, m)
    if k < 2:
        return math.nan
    x = np.concatenate([a, b])
    y = np.array([0] * n + [1] * m)
    groups = np.concatenate([np.arange(n), np.arange(m) if n == m else n + np.arange(m)])
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = cross_val_score(LogisticRegression(max_iter=1000), x, y, groups=groups, cv=cv)
    return float(np.mean(scores))


def cosine_matrix(queries: Any, items: Any) -> np.ndarray:
    """``[Q, N]`` cosine similarities of ``queries`` ``[Q, D]`` and ``items`` ``[N, D]``."""
    return l2_normalize(queries) @ l2_normalize(items).T


def recall_at_k(sim: Any, query_captions: Sequence[str], item_captions: Sequence[str], k: int) -> float:
    """Fraction of queries (rows of ``sim`` ``[Q, N]``) whose ``k`` most similar items hold one whose caption text
    equals the query's. Ties rank by item index. Captions repeat (every handwritten seven is "a handwritten seven."),
    so any item of the same caption is a hit, not only the query's own.

    Four items, captions ``a a b c``; query 0's best item is item 1 (also ``a``: a hit), query 2's best is item 0:

    >>> sim = [[0.1, 0.9, 0.0, 0.0], [0.0, 0.2, 0.1, 0.8], [0.9, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]
    >>> caps = ["a", "a", "b", "c"]
    >>> recall_at_k(sim, caps, caps, 1), recall_at_k(sim, caps, caps, 2)
    (0.5, 1.0)
    """
    s = np.asarray(sim, dtype=np.float64)
    if s.shape != (len(query_captions), len(item_captions)):
        raise ValueError(f"multimodal: sim is {s.shape} for {len(query_captions)} queries and "
                         f"{len(item_captions)} items")
    if not len(query_captions):
        return math.nan
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    hits = [any(item_captions[j] == q for j in row) for q, row in zip(query_captions, order)]
    return float(np.mean(hits))


def recall_chance(captions: Sequence[str], k: int) -> float:
    """Expected :func:`recall_at_k` of a uniformly random ranking when queries and items carry the same ``captions``:
    the mean over queries of ``1 - C(N - n_c, k) / C(N, k)`` (``n_c`` items share the query's caption), ``n_c / N``
    at ``k = 1``.

    >>> recall_chance(["a", "a", "b", "c"], 1), round(recall_chance(["a", "a", "b", "c"], 2), 4)
    (0.375, 0.6667)
    """
    n = len(captions)
    if n == 0:
        return math.nan
    k = min(k, n)
    counts: dict[str, int] = {}
    for t in captions:
        counts[t] = counts.get(t, 0) + 1
    return float(np.mean([1.0 - math.comb(n - counts[t], k) / math.comb(n, k) for t in captions]))


# --- functional core: answers ----------------------------------------------------------------------------------------
def pick(choices: Sequence[str], scores: Sequence[float]) -> str:
    """The choice of highest score (the first on a tie).

    >>> pick(["yes", "no"], [-3.0, -1.0]), pick(["a", "b"], [0.0, 0.0])
    ('no', 'a')
    """
    if len(choices) != len(scores) or not choices:
        raise ValueError(f"multimodal: {len(scores)} scores for {len(choices)} choices")
    return choices[int(np.argmax(np.asarray(scores, dtype=np.float64)))]


def accuracy(records: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> float:
    """Fraction of ``answers`` equal to their record's ``answer`` (NaN with no records).

    >>> accuracy([{"answer": "7"}, {"answer": "yes"}], ["7", "no"])
    0.5
    """
    if len(records) != len(answers):
        raise ValueError(f"multimodal: {len(answers)} answers for {len(records)} records")
    return float(np.mean([a == r["answer"] for r, a in zip(records, answers)])) if records else math.nan


def prior_rate(records: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> float:
    """Fraction of ``answers`` equal to their record's ``prior_answer`` (what the wording suggests; NaN with none).

    >>> prior_rate([{"prior_answer": "red"}, {"prior_answer": "red"}], ["red", "blue"])
    0.5
    """
    if len(records) != len(answers):
        raise ValueError(f"multimodal: {len(answers)} answers for {len(records)} records")
    return float(np.mean([a == r["prior_answer"] for r, a in zip(records, answers)])) if records else math.nan


def chance_accuracy(choices: Sequence[Sequence[str]]) -> float:
    """Expected accuracy of a uniform guess: the mean of ``1 / len(choices)``.

    >>> chance_accuracy([["0", "1", "2", "3"], ["yes", "no"]])
    0.375
    """
    return float(np.mean([1.0 / len(c) for c in choices])) if choices else math.nan


def multimodal_gain(acc_sighted: float, acc_no_image: float) -> float:
    """MMStar's multi-modal gain (Chen et al. 2024, arXiv 2403.20330): accuracy with the image minus without it.

    >>> round(multimodal_gain(0.75, 0.5), 6)
    0.25
    """
    return acc_sighted - acc_no_image


def multimodal_leakage(acc_no_image: float, text_only_accuracy: float) -> float:
    """MMStar's multi-modal leakage: ``max(0, acc_no_image - S_t)``, how much better the VLM answers blind than its
    base LLM does (``S_t``): what multimodal training taught it about the questions' wording.

    >>> round(multimodal_leakage(0.6, 0.5), 6), multimodal_leakage(0.4, 0.5)
    (0.1, 0.0)
    """
    return max(0.0, acc_no_image - text_only_accuracy)


def pair_accuracy(pair_ids: Sequence[int], correct: Sequence[bool]) -> float:
    """MMVP's pair accuracy (Tong et al. 2024, arXiv 2401.06209): fraction of pairs (records sharing a
    ``pair_id``; ``-1`` is no pair) with every record right. NaN with no pairs.

    >>> round(pair_accuracy([0, 0, 1, 1, 2, 2], [True, True, True, False, False, False]), 4)
    0.3333
    """
    if len(pair_ids) != len(correct):
        raise ValueError(f"multimodal: {len(correct)} outcomes for {len(pair_ids)} pair ids")
    groups: dict[int, bool] = {}
    for p, ok in zip(pair_ids, correct):
        if p >= 0:
            groups[p] = groups.get(p, True) and bool(ok)
    return float(np.mean(list(groups.values()))) if groups else math.nan


# --- the summary -----------------------------------------------------------------------------------------------------
@dataclass
class Measurements:
    """What the model produced for an :class:`EvalSet` (:meth:`Multimodal.measure`); :func:`summarize` reads it."""

    image_embeddings: np.ndarray
    """``[N, D]`` of ``EvalSet.items`` (not normalised)."""
    text_embeddings: np.ndarray
    """``[N, D]`` of their captions."""
    answers: dict[float, list[str]]
    """Image signal -> the picked choice of every ``EvalSet.qa`` record."""
    answers_no_image: list[str]
    trap_answers: list[str] = field(default_factory=list)
    trap_answers_no_image: list[str] = field(default_factory=list)
    pair_answers: list[str] = field(default_factory=list)


def summarize(
    c: MultimodalConfig, data: EvalSet, m: Measurements,
) -> tuple[dict[float, float], float, float, dict[str, float], dict[str, Series], list[str]]:
    """``(curve, limit, threshold, scalars, series, notes)``: accuracy by image signal, ``multimodal_gain``, chance
    accuracy, and every number of the module docstring."""
    curve = {float(s): accuracy(data.qa, m.answers[float(s)]) for s in c.signal_levels}
    sighted, noise = curve[1.0], curve[0.0]
    blind = accuracy(data.qa, m.answers_no_image)
    chance = chance_accuracy([r["choices"] for r in data.qa])
    s_t = chance if c.text_only_accuracy is None else float(c.text_only_accuracy)
    gain = multimodal_gain(sighted, blind)
    scalars: dict[str, float] = {
        "num_examples": float(len(data.qa)),
        "num_retrieval": float(len(data.items)),
        "acc_sighted": sighted,
        "acc_no_image": blind,
        "acc_noise": noise,
        "chance_accuracy": chance,
        "text_only_accuracy": s_t,
        "multimodal_gain": gain,
        "multimodal_leakage": multimodal_leakage(blind, s_t),
        "gain_vs_noise": sighted - noise,
    }
    for s, v in curve.items():
        scalars[f"accuracy@{s:g}"] = v
    notes = list(data.notes)
    series: dict[str, Series] = {}

    captions = [r["caption"] for r in data.items]
    if len(data.items) >= 2:
        img, txt = m.image_embeddings, m.text_embeddings
        scalars["gap"] = modality_gap(img, txt)
        scalars["gap_pair_cosine"] = pair_cosine(img, txt)
        scalars["separability"] = separability(img, txt, seed=c.seed)
        sim = cosine_matrix(img, txt)  # [images, texts]
        recall = {"i2t": {}, "t2i": {}}
        for k in RECALL_KS:
            recall["i2t"][float(k)] = scalars[f"i2t_recall@{k}"] = recall_at_k(sim, captions, captions, k)
            recall["t2i"][float(k)] = scalars[f"t2i_recall@{k}"] = recall_at_k(sim.T, captions, captions, k)
            scalars[f"recall_chance@{k}"] = recall_chance(captions, k)
        scalars["num_captions"] = float(len(set(captions)))
        series["recall_i2t"] = Series("k", "recall", recall["i2t"])
        series["recall_t2i"] = Series("k", "recall", recall["t2i"])
        if len(set(captions)) < len(captions):
            notes.append(f"{len(captions)} images share {len(set(captions))} distinct captions: a recall hit is any "
                         f"retrieved item with the query's caption text; random ranking scores "
                         f"recall@1 {scalars['recall_chance@1']:.2f} (recall_chance@1)")
        if scalars["separability"] >= 0.9:
            notes.append(f"a linear probe tells image from text embeddings apart ({scalars['separability']:.2f} "
                         f"accuracy, 0.5 = mixed): the modalities sit in separate regions (gap "
                         f"{scalars['gap']:.2f})")
    else:
        notes.append("fewer than 2 captioned images: the gap, separability and recall are not measured")

    if data.traps:
        scalars["num_traps"] = float(len(data.traps))
        scalars["trap_accuracy"] = accuracy(data.traps, m.trap_answers)
        scalars["trap_prior_rate"] = prior_rate(data.traps, m.trap_answers)
        scalars["trap_accuracy_no_image"] = accuracy(data.traps, m.trap_answers_no_image)
        scalars["trap_prior_rate_no_image"] = prior_rate(data.traps, m.trap_answers_no_image)
        if scalars["trap_prior_rate"] > scalars["trap_accuracy"]:
            notes.append(f"on traps the model gives the answer the wording suggests "
                         f"({scalars['trap_prior_rate']:.0%}) more often than the one the image shows "
                         f"({scalars['trap_accuracy']:.0%}): it answers from language priors")
    if data.pairs:
        correct = [a == r["answer"] for r, a in zip(data.pairs, m.pair_answers)]
        scalars["num_pairs"] = float(len({r["pair_id"] for r in data.pairs}))
        scalars["pair_accuracy"] = pair_accuracy([r["pair_id"] for r in data.pairs], correct)
        scalars["pair_record_accuracy"] = accuracy(data.pairs, m.pair_answers)

    if c.text_only_accuracy is None:
        notes.append(f"multimodal_leakage uses chance ({chance:.2f}) as the text-only score S_t: set "
                     f"text_only_accuracy to the base LLM's score for MMStar's definition")
    if gain <= 0:
        notes.append(f"accuracy with the image ({sighted:.2f}) is no higher than without it ({blind:.2f}): the "
                     f"answers do not use the image (multimodal_gain {gain:+.2f})")
    elif sighted - noise <= 0:
        notes.append(f"the clean image ({sighted:.2f}) scores no better than pure noise ({noise:.2f}): the gain over "
                     f"the blind prompt comes from the image tokens being there, not from what they show")
    if scalars["multimodal_leakage"] > 0:
        notes.append(f"the blind prompt scores {blind:.2f}, above S_t {s_t:.2f}: part of the accuracy comes from the "
                     f"questions' wording (multimodal_leakage {scalars['multimodal_leakage']:.2f})")
    return curve, gain, chance, scalars, series, notes


# --- the eval --------------------------------------------------------------------------------------------------------
class Multimodal(Eval):
    """Does the model's image space meet its text space (modality gap, separability, cross-modal recall), and do its
    answers use the image (accuracy against image signal, blind, traps, MMVP pairs)? The limit value is MMStar's
    multimodal gain."""

    name = "multimodal"
    version = "1"
    summary = "VLM accuracy vs image signal, blind and on traps; modality gap; limit = multimodal gain (MMStar)"
    limit = "multimodal"
    Config = MultimodalConfig

    config: MultimodalConfig

    def __init__(self, config: MultimodalConfig | None = None) -> None:
        super().__init__(config)
        self._cache: tuple[str, EvalSet] | None = None  # (repr(config), the records)

    def spec(self) -> LimitSpec:
        c = self.config
        c.validate()
        return LimitSpec(metric="accuracy", axis="image_signal", axis_values=tuple(float(s) for s in c.signal_levels),
                         higher_is_better=True, threshold=None, limit="multimodal", limit_unit="accuracy points")

    def data(self) -> EvalSet:
        """The records scored (:func:`build_eval_set`), built once per config."""
        key = repr(self.config)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, build_eval_set(self.config))
        return self._cache[1]

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        try:
            fmt = vlm.image_format(model, tokenizer)
        except ValueError as err:
            raise ValueError(f"multimodal: {err}") from None
        data = self.data()
        if not data.qa:
            raise ValueError(f"multimodal: task {c.task} gave no multiple-choice records (kind qa with choices) to "
                             f"score{' in ' + str(c.path) if c.path else ''}")
        records = data.qa + data.items + data.traps + data.pairs
        text = "".join(dict.fromkeys(ch for r in records for t in (r["question"], r["caption"], *r["choices"])
                                     for ch in t))
        if unk_fraction(tokenizer, text) > 0 or not spells(tokenizer, text):
            raise ValueError(f"multimodal: the tokenizer cannot spell the {c.task} records' text "
                             f"(questions, captions, choices: {text!r})")
        text_config = getattr(model.config, "text_config", model.config)
        layers = getattr(text_config, "num_hidden_layers", None)
        if isinstance(layers, int) and not -layers - 1 <= c.layer <= layers:
            raise ValueError(f"multimodal: layer must be within [{-layers - 1}, {layers}] for this model's "
                             f"{layers} layers (got {c.layer})")
        n_pos = position_range(text_config)
        if n_pos is not None:
            prompt = max(len(vlm.encode(tokenizer, vlm.prompt_text(r["question"], fmt)))
                         + max(len(vlm.encode(tokenizer, o)) for o in r["choices"])
                         for r in data.qa + data.traps + data.pairs)
            caption = max((len(vlm.encode(tokenizer, r["caption"])) for r in data.items), default=0)
            needed = 1 + max(prompt, caption)
            if needed > n_pos:
                raise ValueError(f"multimodal: the longest prompt with its answer needs {needed} positions "
                                 f"({fmt.num_image_tokens} image tokens) but the model's position range is {n_pos}")

    def measure(self, model: Any, tokenizer: Any, data: EvalSet, progress: bool = False) -> Measurements:
        """Run ``model`` on ``data`` (the only place the eval touches the model, all through :mod:`evals.vlm`):
        the items' image and caption embeddings, and the picked choice of every multiple-choice record at each
        image signal, blind, and (traps, pairs) sighted."""
        c = self.config
        fmt = vlm.image_format(model, tokenizer)
        stages = 1 + len(c.signal_levels) + 1 + (1 if data.traps else 0) + (1 if data.pairs else 0)
        bar = tqdm(total=stages, desc="multimodal", unit="stage", disable=not progress, leave=False)

        def answers(records: Sequence[Mapping[str, Any]], images: Sequence[np.ndarray] | None) -> list[str]:
            if not records:
                return []
            scores = vlm.choice_logprobs(model, tokenizer, fmt, [r["question"] for r in records], images,
                                         [r["choices"] for r in records], batch_size=c.batch_size)
            return [pick(r["choices"], s) for r, s in zip(records, scores)]

        bar.set_postfix_str("embeddings")
        images = [r["image"] for r in data.items]
        img = vlm.embed_images(model, tokenizer, fmt, images, layer=c.layer, batch_size=c.batch_size)
        txt = vlm.embed_texts(model, tokenizer, [r["caption"] for r in data.items], layer=c.layer,
                              batch_size=c.batch_size)
        bar.update(1)
        clean = [r["image"] for r in data.qa]
        noise = vlm.noise_images(len(clean), fmt.image_size, seed=c.seed + SEED_OFFSETS["noise"])
        by_signal: dict[float, list[str]] = {}
        for s in c.signal_levels:
            bar.set_postfix_str(f"signal {s:g}")
            shown = clean if s == 1.0 else vlm.blend(clean, noise, float(s))
            by_signal[float(s)] = answers(data.qa, shown)
            bar.update(1)
        bar.set_postfix_str("no image")
        no_image = answers(data.qa, None)
        bar.update(1)
        trap_answers, trap_blind, pair_answers = [], [], []
        if data.traps:
            bar.set_postfix_str("traps")
            trap_answers = answers(data.traps, [r["image"] for r in data.traps])
            trap_blind = answers(data.traps, None)
            bar.update(1)
        if data.pairs:
            bar.set_postfix_str("pairs")
            pair_answers = answers(data.pairs, [r["image"] for r in data.pairs])
            bar.update(1)
        bar.close()
        return Measurements(image_embeddings=img.numpy(), text_embeddings=txt.numpy(), answers=by_signal,
                            answers_no_image=no_image, trap_answers=trap_answers, trap_answers_no_image=trap_blind,
                            pair_answers=pair_answers)

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Measure ``model`` (already on ``device``: the :mod:`evals.vlm` helpers follow its parameters) in eval mode
        with gradients off, then summarise."""
        spec = self.spec()
        data = self.data()
        with eval_mode(model):
            m = self.measure(model, tokenizer, data, progress=progress)
        curve, limit, threshold, scalars, series, notes = summarize(self.config, data, m)
        return self.result(spec=spec, curve=curve, limit_value=float(limit), threshold=float(threshold),
                           prompt_format="plain", scalars=scalars, notes=notes, series=series)
