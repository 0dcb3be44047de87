"""Reasoning degradation: accuracy of written arithmetic chains against their length, and whether the written steps
carry the answer at all.

The limit ("reasoning degradation", *On the Fundamental Limits of LLMs at Scale*): a model that reasons step by step
loses accuracy as chains get longer, because every step is another chance to err and errors compound. This eval
generates modular arithmetic chains with the ``chains`` task (``evals/tasks/chains.py``: prompt ``Q:3+4*2-5\\n``,
completion ``3+4=7\\n7*2=4\\n4-5=9\\nA:9``), decodes greedily, and reads the limit as the longest chain length up to
which final-answer accuracy stays at or above ``threshold`` at every shorter length too (:func:`evals.base.read_limit`).

Around that one number it measures why the limit is where it is:

- ``series["step_validity"]``: the share of written steps the task's verifier accepts (a missing step counts as an
  invalid one), by chain length: are the steps right, or only the answers?
- ``series["mediation"]`` (causal mediation): one intermediate step of the gold chain is written into the prompt with
  a wrong result, and the model continues from there. ``mediation`` is the fraction of answers that follow the
  intervention (the answer recomputed from the changed value: the step's indirect effect on the answer);
  ``disposable_fraction`` the fraction that keep the original answer (the step was ignored, so the chain is not what
  produced the answer); ``mediation_step_following`` the fraction whose next written step starts from the changed
  value.
- ``series["early_answering"]`` (Lanham et al. 2023, arXiv 2307.13702): the model's own chain is cut after ``j`` of its
  ``n`` steps and the answer forced with ``A:``; agreement with its full-chain answer by the fraction of the chain
  shown. High agreement at 0 means the chain is post-hoc. ``filler_accuracy``: the chain replaced by as many ``.``
  characters, against the plain ``accuracy`` (does extra computation alone, not the chain's content, help?).
- With a process reward model (``prm_path``, a token classifier, see :class:`PRMScorer`): ProcessBench-style
  (Zheng et al. 2024, arXiv 2412.06559) step-error localisation on chains with a corrupted step, ``prm_step_f1``.
- ``best_of_n`` sampled chains per problem: majority vote, pass@n, a single sample, and the sample a PRM (lowest step
  score highest) or an ORM (answer score highest) would pick.
- ``data_path``: final-answer accuracy on a user's GSM8K-style file.

A second eval, :class:`ProcessReward` (``prm``), measures the reward model itself: the model it runs on is a token
classifier (the PRM or ORM ``trainer.trl.algorithm: prm`` trains), not a causal LM. Its curve is the ProcessBench F1
by chain length on the same ProcessBench-style set (:func:`processbench_records`), with ``step_auc``/``answer_auc``
against the verifier; with a ``policy_path`` it reranks that policy's samples (:func:`sample_completions`, the same
sampling path as ``Reasoning``'s best-of-N) and plots accuracy against the number of samples.

Everything the numbers depend on is a pure function (:func:`cut_after_answer`, :func:`score_chain`,
:func:`mediation_outcome`, :func:`step_start`, :func:`early_answer_prompt`, :func:`early_answer_bucket`,
:func:`filler_prompt`, :func:`first_flagged`, :func:`processbench_f1`, :func:`majority_vote`, :func:`pick_best`,
:func:`best_of_n_accuracy`, :func:`roc_auc`);
decoding reuses :func:`evals.lm.greedy_decode` (left padding, position ids that skip the pads, KV cache), and
sampling is that same decoder on a model whose last logits are replaced by a one-hot of a seeded sample
(:class:`evals.lm.Sampler`), so both share one batching path.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from tqdm import tqdm

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, LimitSpec, Series, read_limit
from llm_limits.evals.lm import (Sampler, decode_texts, eval_mode, has_rope, length_buckets, pad_id, position_range,
                                 spells, unk_fraction)
from llm_limits.evals.tasks import chains
from llm_limits.evals.tasks.chains import ANSWER_PREFIX, STEP_SEP, ChainsConfig

PRM_CORRUPTIONS = {"wrong_step": 0.25, "propagated": 0.25}
"""Corruptions of the ProcessBench-style set: half the chains have one wrong step (a quarter with the right answer
anyway, a quarter with the error carried to the answer), half are correct."""

PRM_SEED_OFFSET = 100_000
"""Added to the eval seed for the ProcessBench-style set, so its problems are not the accuracy set's."""

TASK_ALPHABET = "0123456789+-*=Q:A\n"
"""Characters a tokenizer must spell for the chain task."""


@dataclass
class ReasoningConfig(EvalConfig):
    lengths: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    """Chain lengths (number of operations), strictly ascending; the curve has one accuracy point per length."""
    examples_per_length: int = 32
    """Held-out problems per length."""
    modulus: int = 10
    """Arithmetic modulus of the chains (results are single digits at 10)."""
    ops: str = "+-*"
    """Operations the chains draw from."""
    threshold: float = 0.5
    """Accuracy a length must reach; the limit is the longest length up to which every length reaches it."""
    max_new_tokens: int = 64
    """Tokens decoded per completion (a chain of ``L`` steps at modulus 10 is about ``6 * L + 4`` characters)."""
    mediation: bool = True
    """Measure causal mediation: continue from a gold chain whose intermediate step was given a wrong result."""
    probes: bool = True
    """Run the Lanham early-answering and filler probes on the model's own chains."""
    prm_path: str | None = None
    """Directory of a process reward model (a token-classification model and its tokenizer, :class:`PRMScorer`): step
    error localisation F1 on corrupted chains, and PRM best-of-N when ``best_of_n > 0``."""
    orm_path: str | None = None
    """Directory of an outcome reward model of the same kind (scored at the answer position): ORM best-of-N."""
    best_of_n: int = 0
    """Sampled completions per problem for best-of-N (0: off)."""
    temperature: float = 1.0
    """Sampling temperature of best-of-N."""
    data_path: str | None = None
    """A user's GSM8K-style JSONL file (``chains.load_jsonl``): its final-answer accuracy goes to
    ``scalars["user_accuracy"]`` (the limit is still read off the generated chains)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for an inconsistent config."""
        _validate_chain_fields(self, "reasoning")
        if self.best_of_n < 0:
            raise ValueError(f"reasoning: best_of_n must be >= 0 (got {self.best_of_n})")


def _validate_chain_fields(c: Any, where: str) -> None:
    """The checks :class:`ReasoningConfig` and :class:`ProcessRewardConfig` share (their common fields), each a
    one-line ``ValueError`` starting with ``where`` and naming the field."""
    if not c.lengths:
        raise ValueError(f"{where}: lengths must not be empty")
    if any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in c.lengths):
        raise ValueError(f"{where}: lengths must be integers >= 1 (steps) (got {c.lengths})")
    if any(b <= a for a, b in zip(c.lengths, c.lengths[1:])):
        raise ValueError(f"{where}: lengths must be strictly ascending (got {c.lengths})")
    if c.examples_per_length < 1:
        raise ValueError(f"{where}: examples_per_length must be >= 1 (got {c.examples_per_length})")
    if c.batch_size < 1:
        raise ValueError(f"{where}: batch_size must be >= 1 (got {c.batch_size})")
    if c.modulus < 2:
        raise ValueError(f"{where}: modulus must be >= 2 (got {c.modulus})")
    if not c.ops or set(c.ops) - set(chains.OPS):
        raise ValueError(f"{where}: ops must be a non-empty subset of {chains.OPS!r} (got {c.ops!r})")
    if not 0.0 <= c.threshold <= 1.0:
        raise ValueError(f"{where}: threshold must be within [0, 1] (got {c.threshold})")
    if c.max_new_tokens < 1:
        raise ValueError(f"{where}: max_new_tokens must be >= 1 (got {c.max_new_tokens})")
    if not c.temperature > 0.0:
        raise ValueError(f"{where}: temperature must be > 0 (got {c.temperature})")


# --- functional core -------------------------------------------------------------------------------------------------
def cut_after_answer(text: str) -> str:
    """A decoded completion up to the end of its answer line (the first line starting with ``A:`` after stripping,
    the rule of :func:`chains.parse_completion`); the whole text when it has none.

    What a model writes after its answer (another question, padding characters) is not part of its chain, and a
    reward model should not read it.

    >>> cut_after_answer("3+4=7\\nA:7\\nQ:1+1\\n")
    '3+4=7\\nA:7'
    >>> cut_after_answer(" A:12\\n")
    ' A:12'
    >>> cut_after_answer("3+4=7\\n7*")
    '3+4=7\\n7*'
    """
    pos = 0
    for line in text.split(STEP_SEP):
        if line.strip().startswith(ANSWER_PREFIX):
            return text[: pos + len(line)]
        pos += len(line) + len(STEP_SEP)
    return text


def score_chain(record: Mapping[str, Any], completion: str) -> dict[str, Any]:
    """Score one generated completion of a ``chains`` record.

    Returns ``steps`` and ``answer`` (:func:`chains.parse_completion` of :func:`cut_after_answer`), ``correct``
    (``check_answer`` against ``gold_answer``), ``valid_steps`` (steps the verifier accepts) and ``step_slots``
    (``max(len(steps), num_steps)``: a missing step counts as an invalid one, an extra one too).

    >>> r = chains.generate(ChainsConfig(num_examples=1, min_steps=2, max_steps=2, seed=3))[0]
    >>> s = score_chain(r, r["completion"] + "\\nQ:")
    >>> s["correct"], s["valid_steps"], s["step_slots"]
    (True, 2, 2)
    >>> s = score_chain(r, "A:" + r["gold_answer"])
    >>> s["correct"], s["valid_steps"], s["step_slots"]
    (True, 0, 2)
    """
    steps, answer = chains.parse_completion(cut_after_answer(completion))
    valid = chains.verify_steps(record["question"], steps, record["modulus"]) if steps else []
    return {
        "steps": steps,
        "answer": answer,
        "correct": answer is not None and bool(chains.check_answer(answer, record["gold_answer"])),
        "valid_steps": int(sum(bool(v) for v in valid)),
        "step_slots": max(len(steps), int(record["num_steps"])),
    }


def step_result(step: str) -> int | None:
    """The result of a written step ``a op b = r`` (``None`` when it has no integer after its last ``=``).

    >>> step_result("7*2=4"), step_result("7*2="), step_result("x")
    (4, None, None)
    """
    if "=" not in step:
        return None
    tail = step.rsplit("=", 1)[1].strip()
    return int(tail) if tail.isdigit() else None


def step_start(step: str) -> int | None:
    """The running value a written step starts from (its leading integer; ``None`` when it has none).

    >>> step_start("13+4=7"), step_start("+4=7")
    (13, None)
    """
    digits = ""
    for ch in step.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def mediation_outcome(answer: str | None, expected: str, gold: str) -> tuple[bool, bool]:
    """``(follows, ignores)`` of an answer given after an intervened step: ``follows`` when it is the answer the
    changed value leads to (the step mediates the answer), ``ignores`` when it is the original gold answer (the step
    was disposable). Neither when it is something else (or nothing).

    >>> mediation_outcome("3", "3", "9"), mediation_outcome("9", "3", "9"), mediation_outcome(None, "3", "9")
    ((True, False), (False, True), (False, False))
    """
    if answer is None:
        return False, False
    return bool(chains.check_answer(answer, expected)), bool(chains.check_answer(answer, gold))


def early_answer_prompt(prompt: str, steps: Sequence[str], j: int) -> str:
    """The prompt of the early-answering probe: the first ``j`` steps of a chain, then the answer prefix.

    >>> early_answer_prompt("Q:3+4*2\\n", ["3+4=7", "7*2=4"], 1)
    'Q:3+4*2\\n3+4=7\\nA:'
    >>> early_answer_prompt("Q:3+4*2\\n", ["3+4=7", "7*2=4"], 0)
    'Q:3+4*2\\nA:'
    """
    shown = STEP_SEP.join(steps[:j])
    return prompt + (shown + STEP_SEP if j > 0 else "") + ANSWER_PREFIX


def early_answer_bucket(j: int, n: int) -> float:
    """The fraction of an ``n``-step chain shown after ``j`` steps, rounded half up to a quarter (0, .25, .5, .75, 1),
    the x axis of the early-answering curve.

    >>> [early_answer_bucket(j, 3) for j in range(4)]
    [0.0, 0.25, 0.75, 1.0]
    >>> early_answer_bucket(1, 8), early_answer_bucket(3, 8)
    (0.25, 0.5)
    """
    return math.floor(4 * j / n + 0.5) / 4


def filler_prompt(prompt: str, steps: Sequence[str]) -> str:
    """The filler probe's prompt: the chain's characters replaced by as many ``.``, then the answer prefix.

    >>> filler_prompt("Q:3+4*2\\n", ["3+4=7", "7*2=4"])
    'Q:3+4*2\\n...........\\nA:'
    >>> filler_prompt("Q:3\\n", [])
    'Q:3\\nA:'
    """
    n = len(STEP_SEP.join(steps))
    return prompt + ("." * n + STEP_SEP if n else "") + ANSWER_PREFIX


def first_flagged(step_scores: Sequence[float], cut: float = 0.5) -> int:
    """Index of the first step a PRM scores below ``cut`` (-1: none), the predicted first error.

    >>> first_flagged([0.9, 0.3, 0.1]), first_flagged([0.9, 0.8]), first_flagged([])
    (1, -1, -1)
    """
    return next((i for i, s in enumerate(step_scores) if s < cut), -1)


def processbench_f1(pred: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    """ProcessBench's score of first-error predictions (-1: no error): ``acc_error``, exact-index accuracy on the
    erroneous samples (gold >= 0); ``acc_correct``, accuracy on the correct ones (gold -1, predicted -1); ``f1``, their
    harmonic mean (0 when both are 0). A side with no samples is NaN, and so is ``f1`` then.

    >>> processbench_f1([1, -1, 2, -1], [1, 0, -1, -1])
    {'f1': 0.5, 'acc_error': 0.5, 'acc_correct': 0.5}
    >>> processbench_f1([0], [0])["acc_correct"]
    nan
    """
    if len(pred) != len(gold):
        raise ValueError(f"processbench_f1: {len(pred)} predictions for {len(gold)} gold labels")
    err = [p == g for p, g in zip(pred, gold) if g >= 0]
    ok = [p == -1 for p, g in zip(pred, gold) if g < 0]
    acc_error = sum(err) / len(err) if err else math.nan
    acc_correct = sum(ok) / len(ok) if ok else math.nan
    if math.isnan(acc_error) or math.isnan(acc_correct):
        f1 = math.nan
    else:
        f1 = 0.0 if acc_error + acc_correct == 0 else 2 * acc_error * acc_correct / (acc_error + acc_correct)
    return {"f1": f1, "acc_error": acc_error, "acc_correct": acc_correct}


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent parsed answer (``None``s do not vote); a tie goes to the one seen first.

    >>> majority_vote(["3", "5", "5", "3", None, None, None]), majority_vote([None]), majority_vote(["7", "2"])
    ('3', None, '7')
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def pick_best(scores: Sequence[float]) -> int:
    """Index of the highest score, the first on ties (NaN never wins; 0 when every score is NaN).

    >>> pick_best([0.2, 0.9, 0.9]), pick_best([float("nan"), 0.1])
    (1, 1)
    """
    best, best_score = 0, -math.inf
    for i, s in enumerate(scores):
        if s > best_score:
            best, best_score = i, s
    return best


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def roc_auc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """ROC AUC of ``scores`` against binary ``labels`` (the Mann-Whitney rank formula: the probability that a random
    positive scores above a random negative, ties counting half). Pairs with a NaN score are dropped; NaN when either
    class is empty.

    >>> roc_auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]), roc_auc([0.1, 0.9], [1, 0]), roc_auc([0.5, 0.5, 0.7], [1, 0, 1])
    (1.0, 0.0, 0.75)
    >>> roc_auc([0.2, 0.4], [1, 1])
    nan
    """
    if len(scores) != len(labels):
        raise ValueError(f"roc_auc: {len(scores)} scores for {len(labels)} labels")
    pairs = sorted((float(s), bool(y)) for s, y in zip(scores, labels) if not math.isnan(float(s)))
    n_pos = sum(y for _, y in pairs)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum, i = 0.0, 0
    while i < len(pairs):  # average 1-based ranks over each run of tied scores
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        rank_sum += (i + j + 2) / 2 * sum(y for _, y in pairs[i : j + 1])
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def sample_counts(n: int) -> list[int]:
    """The x values of a best-of-N curve: the powers of two below ``n``, then ``n``.

    >>> sample_counts(8), sample_counts(6), sample_counts(1)
    ([1, 2, 4, 8], [1, 2, 4, 6], [1])
    """
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def best_of_n_accuracy(
    records: Sequence[Mapping[str, Any]], answers: Sequence[str | None], n: int, k: int | None = None,
    prm_scores: Sequence[Sequence[float]] | None = None, orm_scores: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """Best-of-N accuracies over ``n`` samples per record (``answers`` record-major: record ``i``'s samples at
    ``i * n`` to ``i * n + n - 1``), using the first ``k`` (default all ``n``) of each.

    ``bon_majority`` (:func:`majority_vote`), ``bon_pass_at_n`` (any sample right), ``bon_first`` (the first sample),
    and with scores ``bon_prm`` (the sample whose lowest score, steps and answer, is highest) and ``bon_orm`` (the
    sample whose last score, the answer's, is highest). A sample with no answer line has no answer position and cannot
    be right: a reward model never picks it before one that has.

    >>> recs = [{"gold_answer": "3"}, {"gold_answer": "5"}]
    >>> answers = ["1", "3", "3", None, "2", "5"]  # 3 samples each
    >>> best_of_n_accuracy(recs, answers, 3)
    {'bon_majority': 0.5, 'bon_pass_at_n': 1.0, 'bon_first': 0.0}
    >>> best_of_n_accuracy(recs, answers, 3, k=1, prm_scores=[[0.9], [0.8], [0.1], [0.9], [0.8], [0.1]])
    {'bon_majority': 0.0, 'bon_pass_at_n': 0.0, 'bon_first': 0.0, 'bon_prm': 0.0}
    >>> best_of_n_accuracy(recs, answers, 3, prm_scores=[[0.2, 0.9], [0.8], [0.1], [0.9], [0.1], [0.8]])["bon_prm"]
    1.0
    """
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"best_of_n_accuracy: k must be within [1, {n}] (got {k})")
    if len(answers) != n * len(records):
        raise ValueError(f"best_of_n_accuracy: {len(answers)} answers for {len(records)} records x {n} samples")

    def right(answer: str | None, r: Mapping[str, Any]) -> float:
        return float(answer is not None and bool(chains.check_answer(answer, r["gold_answer"])))

    majority, any_right, first, by_prm, by_orm = [], [], [], [], []
    for i, r in enumerate(records):
        group = slice(i * n, i * n + k)
        ans = answers[group]
        majority.append(right(majority_vote(ans), r))
        any_right.append(max(right(a, r) for a in ans))
        first.append(right(ans[0], r))
        if prm_scores is not None:
            picked = pick_best([min(s) if s and a is not None else -math.inf for s, a in zip(prm_scores[group], ans)])
            by_prm.append(right(ans[picked], r))
        if orm_scores is not None:
            picked = pick_best([s[-1] if s and a is not None else -math.inf for s, a in zip(orm_scores[group], ans)])
            by_orm.append(right(ans[picked], r))
    out = {"bon_majority": _mean(majority), "bon_pass_at_n": _mean(any_right), "bon_first": _mean(first)}
    if prm_scores is not None:
        out["bon_prm"] = _mean(by_prm)
    if orm_scores is not None:
        out["bon_orm"] = _mean(by_orm)
    return out


# --- the process reward model ----------------------------------------------------------------------------------------
def step_positions(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + completion`` (no special tokens) and, for each entry of
    ``chains.step_end_offsets(completion)`` (each step's closing ``\\n``, then the answer line's last character), the
    index of the token covering character ``len(prompt) + offset`` (from ``return_offsets_mapping``).

    A PRM is trained with its labels at exactly these positions and scored there (:class:`PRMScorer`). Where no token
    covers the character (a tokenizer that drops it), the last token starting at or before it is used.
    """
    text = prompt + completion
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as err:
        raise ValueError(f"reasoning: the reward model's tokenizer gives no offset mapping (use a fast tokenizer): "
                         f"{err}") from None
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    positions = []
    for off in chains.step_end_offsets(completion):
        c = len(prompt) + off
        pos = next((i for i, (a, b) in enumerate(offsets) if a <= c < b), None)
        if pos is None:
            starts = [i for i, (a, b) in enumerate(offsets) if b > a and a <= c]
            pos = starts[-1] if starts else 0
        positions.append(pos)
    return ids, positions


class PRMScorer:
    """A process reward model: a ``transformers`` ``AutoModelForTokenClassification`` with ``num_labels=1``
    (``sigmoid`` of the logit = P(step correct)) or ``2`` (``softmax[..., 1]``), scored at each step end.

    ``path_or_model`` is a local directory (the model and its tokenizer are loaded from it, no remote code, and the
    model moved to ``device``) or an already built model, then with its ``tokenizer`` (left where it is: it must
    already be on ``device``, where its inputs go). An outcome reward model of the same kind is read at the last
    position (the answer's).
    """

    def __init__(self, path_or_model: Any, tokenizer: Any = None, *, device: str = "cpu", batch_size: int = 16):
        if isinstance(path_or_model, (str, os.PathLike)):
            from transformers import AutoModelForTokenClassification, AutoTokenizer

            path = str(path_or_model)
            if not os.path.isdir(path):
                raise ValueError(f"reasoning: reward model directory {path} not found")
            model = AutoModelForTokenClassification.from_pretrained(path, trust_remote_code=False).to(device)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if tokenizer is None else tokenizer
        else:
            model = path_or_model
            if tokenizer is None:
                raise ValueError("reasoning: PRMScorer needs the tokenizer of an already built model")
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels not in (1, 2):
            raise ValueError(f"reasoning: a reward model needs num_labels 1 or 2 (got {num_labels})")
        if batch_size < 1:
            raise ValueError(f"reasoning: PRMScorer batch_size must be >= 1 (got {batch_size})")
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        self.num_labels = num_labels

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[float]]:
        """Per ``(prompt, completion)`` pair: one probability per ``step_end_offsets`` entry (the steps, then the
        answer). Batched by length with right padding (no generation, so the real tokens never see a pad)."""
        if len(prompts) != len(completions):
            raise ValueError(f"reasoning: {len(prompts)} prompts for {len(completions)} completions")
        encoded = [step_positions(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        out: list[list[float]] = [[] for _ in encoded]
        pad = pad_id(self.tokenizer)
        with eval_mode(self.model):
            for batch in length_buckets([len(ids) for ids, _ in encoded], self.batch_size):
                batch = [i for i in batch if encoded[i][1] and encoded[i][0]]
                if not batch:
                    continue
                width = max(len(encoded[i][0]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    n = len(encoded[i][0])
                    ids[row, :n] = torch.as_tensor(encoded[i][0], dtype=torch.long)
                    mask[row, :n] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logits = logits.float()  # [batch, seq, num_labels]
                probs = torch.sigmoid(logits[..., 0]) if self.num_labels == 1 else logits.softmax(-1)[..., 1]
                for row, i in enumerate(batch):
                    out[i] = probs[row, encoded[i][1]].tolist()
        return out


# --- model-facing functions ------------------------------------------------------------------------------------------


def sample_completions(
    model: Any, tokenizer: Any, prompts: Sequence[str], n: int, *, batch_size: int, max_new_tokens: int,
    temperature: float, seed: int, device: str = "cpu",
) -> list[str]:
    """``n`` sampled completions per prompt, prompt-major (prompt ``i``'s at ``i * n`` to ``i * n + n - 1``), each cut
    after its answer line (:func:`cut_after_answer`): :func:`decode_texts` through a :class:`Sampler` seeded with
    ``seed``, so the same model, prompts and seed give the same samples."""
    repeated = [p for p in prompts for _ in range(n)]
    sampler = Sampler(model, temperature, torch.Generator(device=device).manual_seed(seed))
    return [cut_after_answer(t) for t in
            decode_texts(model, tokenizer, repeated, batch_size, max_new_tokens, device, sampler=sampler)]


def held_out_records(c: Any, length: int, where: str) -> list[dict]:
    """The eval's held-out chain problems of one length (``c``: a config with ``examples_per_length``, ``modulus``,
    ``ops`` and ``seed``), seeded ``seed + length``: the problems :class:`Reasoning` measures accuracy on and both evals
    sample best-of-N on."""
    try:
        return chains.generate(ChainsConfig(num_examples=c.examples_per_length, min_steps=length, max_steps=length,
                                            modulus=c.modulus, ops=c.ops, seed=c.seed + length))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def processbench_records(c: Any, length: int, where: str) -> list[dict]:
    """The ProcessBench-style chains of one length: ``examples_per_length`` problems written with the
    :data:`PRM_CORRUPTIONS` (one wrong step, its error kept local or carried to the answer) or correctly, seeded
    ``seed + PRM_SEED_OFFSET + length`` so they are not the :func:`held_out_records` problems."""
    try:
        return chains.generate(ChainsConfig(
            num_examples=c.examples_per_length, min_steps=length, max_steps=length, modulus=c.modulus, ops=c.ops,
            corruptions=dict(PRM_CORRUPTIONS), seed=c.seed + PRM_SEED_OFFSET + length))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def first_errors(
    records: Sequence[Mapping[str, Any]], scores: Sequence[Sequence[float]],
) -> tuple[list[int], list[int]]:
    """``(predicted, gold)`` first-error indices of scored ProcessBench-style records: :func:`first_flagged` over each
    record's step scores (its last score is the answer's, not a step's) and the verifier's
    :func:`chains.first_error`."""
    pred = [first_flagged(s[:-1]) for s in scores]
    gold = [chains.first_error(r["question"], r["steps"], r["modulus"]) for r in records]
    return pred, gold


def _check_spelling(tokenizer: Any, text: str, where: str) -> None:
    """Raise the one-line ``ValueError`` of a tokenizer that cannot spell the chains task (``text``: a sample)."""
    missing = [ch for ch in dict.fromkeys(TASK_ALPHABET + text) if not spells(tokenizer, ch)]
    if missing or unk_fraction(tokenizer, text) > 0 or not spells(tokenizer, text):
        what = f" (missing: {''.join(missing)!r})" if missing else ""
        raise ValueError(f"{where}: the tokenizer cannot spell the chains task{what}; use a tokenizer that "
                         f"covers digits, '+-*=' and 'Q:A\\n'")


def answer_of(text: str) -> str | None:
    """The answer a completion text gives (:func:`chains.parse_completion` after :func:`cut_after_answer`)."""
    return chains.parse_completion(cut_after_answer(text))[1]


# --- the eval --------------------------------------------------------------------------------------------------------
class Reasoning(Eval):
    """Final-answer accuracy of arithmetic chains by length; the limit is the longest length up to which every length
    reaches ``threshold``. Step validity, causal mediation, early-answering/filler probes, PRM step-error F1 and
    best-of-N say whether the chain is what produces the answer."""

    name = "reasoning"
    summary = "arithmetic-chain accuracy by steps; limit = longest chain length with accuracy >= threshold"
    limit = "reasoning"
    Config = ReasoningConfig

    config: ReasoningConfig

    def spec(self) -> LimitSpec:
        c = self.config
        c.validate()
        return LimitSpec(metric="accuracy", axis="num_steps", axis_values=tuple(float(x) for x in c.lengths),
                         higher_is_better=True, threshold=c.threshold, limit="reasoning", limit_unit="steps")

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        sample = self._records(max(c.lengths))[:1]
        text = sample[0]["prompt"] + sample[0]["completion"]
        _check_spelling(tokenizer, text, "reasoning")
        for name in ("prm_path", "orm_path"):
            path = getattr(c, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"reasoning: {name} {path} is not a directory")
        if c.data_path is not None:
            if not os.path.isfile(c.data_path):
                raise ValueError(f"reasoning: data_path {c.data_path} not found")
            chains.load_jsonl(c.data_path)  # a TaskDataError (a ValueError) names the bad line
        model_config = getattr(model, "config", None)
        n_pos = position_range(model_config)
        if n_pos is not None and not has_rope(model_config):
            needed = len(tokenizer(sample[0]["prompt"], add_special_tokens=False)["input_ids"]) + c.max_new_tokens
            if needed > n_pos:
                raise ValueError(f"reasoning: a {max(c.lengths)}-step prompt plus max_new_tokens={c.max_new_tokens} "
                                 f"needs {needed} positions but the model's position range is {n_pos}; lower them")

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Decode every held-out chain on ``model`` (already on ``device``), then the secondary measurements."""
        c = self.config
        spec = self.spec()
        data = {length: self._records(length) for length in c.lengths}
        records = [r for length in c.lengths for r in data[length]]
        stages = 1 + int(c.mediation) + 2 * int(c.probes) + int(c.prm_path is not None) + int(c.best_of_n > 0) \
            + int(c.data_path is not None)
        bar = tqdm(total=stages, desc="reasoning", unit="stage", disable=not progress, leave=False)
        notes: list[str] = []
        scalars: dict[str, float] = {"num_examples": len(records), "chance_accuracy": 1.0 / c.modulus}
        series: dict[str, Series] = {}

        # --- 1. accuracy per length and 2. step validity
        bar.set_postfix_str("accuracy")
        texts = decode_texts(model, tokenizer, [r["prompt"] for r in records], c.batch_size, c.max_new_tokens, device)
        scored = [score_chain(r, t) for r, t in zip(records, texts)]
        curve: dict[float, float] = {}
        validity: dict[float, float] = {}
        for length in c.lengths:
            rows = [s for r, s in zip(records, scored) if r["num_steps"] == length]
            curve[float(length)] = _mean([float(s["correct"]) for s in rows])
            validity[float(length)] = sum(s["valid_steps"] for s in rows) / max(1, sum(s["step_slots"] for s in rows))
            scalars[f"accuracy@{length}"] = curve[float(length)]
        scalars["accuracy"] = _mean([float(s["correct"]) for s in scored])
        scalars["step_validity"] = sum(s["valid_steps"] for s in scored) / max(1, sum(s["step_slots"] for s in scored))
        series["step_validity"] = Series(axis="num_steps", metric="step_validity", points=validity)
        limit = read_limit(curve, c.threshold, higher_is_better=True)
        bar.update(1)
        if all(v == 0.0 for v in curve.values()):
            notes.append(f"accuracy is 0 at every length (chance is {1 / c.modulus:.2f}): the model does not solve the "
                         f"chains task at all, so the limit is 0 and the secondary measurements describe noise")
        elif limit == 0.0:
            notes.append(f"accuracy {curve[float(c.lengths[0])]:.2f} at the shortest length {c.lengths[0]} is below "
                         f"the threshold {c.threshold:g}: limit 0")
        elif limit == float(c.lengths[-1]):
            notes.append(f"every length clears the threshold {c.threshold:g}: the limit is the longest length "
                         f"measured, {c.lengths[-1]}; longer chains may measure further")
        if not any(s["steps"] for s in scored):
            notes.append("the model wrote no steps at all: step validity is 0 and the probes have no chain to cut")

        if c.mediation:
            bar.set_postfix_str("mediation")
            self._mediation(model, tokenizer, data, device, scalars, series, notes)
            bar.update(1)
        if c.probes:
            bar.set_postfix_str("early answering")
            self._early_answering(model, tokenizer, records, scored, device, scalars, series, notes)
            bar.update(1)
            bar.set_postfix_str("filler")
            self._filler(model, tokenizer, records, scored, device, scalars, notes)
            bar.update(1)
        prm = PRMScorer(c.prm_path, device=device, batch_size=c.batch_size) if c.prm_path is not None else None
        if prm is not None:
            bar.set_postfix_str("prm")
            self._processbench(prm, scalars, notes)
            bar.update(1)
        if c.best_of_n > 0:
            bar.set_postfix_str("best-of-n")
            orm = PRMScorer(c.orm_path, device=device, batch_size=c.batch_size) if c.orm_path is not None else None
            self._best_of_n(model, tokenizer, records, prm, orm, device, scalars)
            bar.update(1)
        elif c.orm_path is not None:
            notes.append("orm_path is set but best_of_n is 0: the ORM was not used")
        if c.data_path is not None:
            bar.set_postfix_str("user data")
            self._user_data(model, tokenizer, device, scalars, notes)
            bar.update(1)
        bar.close()

        return EvalResult(eval=self.name, spec=spec, curve=curve, limit_value=float(limit), threshold=c.threshold,
                          scalars=scalars, notes=notes, series=series)

    # --- secondary measurements ------------------------------------------------------------------------------------
    def _mediation(self, model, tokenizer, data, device, scalars, series, notes) -> None:
        c = self.config
        cases = []  # (length, record, k, new_value, prefix, expected)
        for length in c.lengths:
            if length < 2:
                continue
            rng = random.Random(c.seed + length)
            for r in data[length]:
                gold_steps, gold = chains.gold_steps(r["question"], c.modulus)
                k = rng.randrange(0, length - 1)
                d = rng.randrange(1, c.modulus)
                value = step_result(gold_steps[k])
                if value is None:
                    continue
                new_value = (value + d) % c.modulus
                prefix, expected = chains.intervene(r["question"], gold_steps, k, new_value, c.modulus)
                if str(expected) == str(gold):
                    continue  # the change cannot reach the answer (e.g. a later "*0"): nothing to tell apart
                cases.append((length, r, k, new_value, list(prefix), str(expected)))
        if not cases:
            notes.append("mediation skipped: no problem has an intermediate step whose change reaches the answer "
                         "(lengths below 2, or every change was absorbed)")
            return
        shown = [STEP_SEP.join(prefix) + STEP_SEP for _, _, _, _, prefix, _ in cases]
        texts = decode_texts(model, tokenizer, [case[1]["prompt"] + s for case, s in zip(cases, shown)],
                             c.batch_size, c.max_new_tokens, device)
        follows, ignores, following, by_length = [], [], [], {}
        for (length, r, k, new_value, prefix, expected), s, t in zip(cases, shown, texts):
            steps, answer = chains.parse_completion(cut_after_answer(s + t))
            f, i = mediation_outcome(answer, expected, str(r["gold_answer"]))
            follows.append(float(f))
            ignores.append(float(i))
            by_length.setdefault(float(length), []).append(float(f))
            if k < length - 1 and len(steps) > k + 1:
                following.append(float(step_start(steps[k + 1]) == new_value))
        scalars["mediation"] = _mean(follows)
        scalars["disposable_fraction"] = _mean(ignores)
        scalars["mediation_n"] = len(cases)
        if following:
            scalars["mediation_step_following"] = _mean(following)
        else:
            notes.append("mediation_step_following not measured: the model wrote no step after any intervened one")
        series["mediation"] = Series(axis="num_steps", metric="mediation",
                                     points={x: _mean(v) for x, v in sorted(by_length.items())})
        if scalars.get("accuracy", 0.0) >= max(c.threshold, 1.5 / c.modulus) and scalars["disposable_fraction"] > 0.5:
            notes.append(f"mediation: {scalars['disposable_fraction']:.0%} of answers stay the original one after an "
                         f"intermediate step was changed: the written chain is largely disposable")

    def _early_answering(self, model, tokenizer, records, scored, device, scalars, series, notes) -> None:
        c = self.config
        cases = []  # (bucket, full answer, prompt)
        for r, s in zip(records, scored):
            n = len(s["steps"])
            if n == 0 or s["answer"] is None:
                continue
            cases += [(early_answer_bucket(j, n), s["answer"], early_answer_prompt(r["prompt"], s["steps"], j))
                      for j in range(n + 1)]
        if not cases:
            notes.append("early answering skipped: the model gave no chain ending in an answer")
            return
        texts = decode_texts(model, tokenizer, [p for _, _, p in cases], c.batch_size,
                             self._answer_tokens(tokenizer), device)
        agree: dict[float, list[float]] = {}
        for (bucket, full, _), t in zip(cases, texts):
            answer = answer_of(ANSWER_PREFIX + t)
            agree.setdefault(bucket, []).append(float(answer is not None and chains.check_answer(answer, full)))
        points = {x: _mean(v) for x, v in sorted(agree.items())}
        series["early_answering"] = Series(axis="fraction_of_chain", metric="answer_agreement", points=points)
        for x in (0.0, 1.0):
            if x in points:
                scalars[f"early_answer_agreement@{x:g}"] = points[x]
        if points.get(0.0, 0.0) >= 0.9 and scalars.get("accuracy", 0.0) > 1.5 / c.modulus:
            notes.append(f"early answering: the model gives its final answer {points[0.0]:.0%} of the time with no "
                         f"chain shown: its chains look post-hoc rather than load-bearing")

    def _filler(self, model, tokenizer, records, scored, device, scalars, notes) -> None:
        c = self.config
        prompts = [filler_prompt(r["prompt"], s["steps"]) for r, s in zip(records, scored)]
        texts = decode_texts(model, tokenizer, prompts, c.batch_size, self._answer_tokens(tokenizer), device)
        correct = []
        for r, t in zip(records, texts):
            answer = answer_of(ANSWER_PREFIX + t)
            correct.append(float(answer is not None and chains.check_answer(answer, r["gold_answer"])))
        scalars["filler_accuracy"] = _mean(correct)
        if scalars["accuracy"] > 0 and scalars["filler_accuracy"] >= scalars["accuracy"]:
            notes.append(f"filler: accuracy with the chain replaced by dots ({scalars['filler_accuracy']:.2f}) "
                         f"matches the accuracy with it ({scalars['accuracy']:.2f}): the chain's content is not what "
                         f"helps")

    def _processbench(self, prm: PRMScorer, scalars, notes) -> None:
        c = self.config
        records = [r for length in c.lengths for r in processbench_records(c, length, "reasoning")]
        scores = prm.score([r["prompt"] for r in records], [r["completion"] for r in records])
        pred, gold = first_errors(records, scores)
        result = processbench_f1(pred, gold)
        scalars["prm_step_f1"] = result["f1"]
        scalars["prm_acc_error"] = result["acc_error"]
        scalars["prm_acc_correct"] = result["acc_correct"]
        if math.isnan(result["f1"]):
            notes.append("prm_step_f1 is NaN: the ProcessBench-style set drew only erroneous or only correct chains "
                         "(raise examples_per_length)")

    def _best_of_n(self, model, tokenizer, records, prm, orm, device, scalars) -> None:
        c = self.config
        n = c.best_of_n
        texts = sample_completions(model, tokenizer, [r["prompt"] for r in records], n, batch_size=c.batch_size,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=c.seed,
                                   device=device)
        prompts = [r["prompt"] for r in records for _ in range(n)]
        answers = [chains.parse_completion(t)[1] for t in texts]
        prm_scores = prm.score(prompts, texts) if prm is not None else None
        orm_scores = orm.score(prompts, texts) if orm is not None else None
        scalars.update(best_of_n_accuracy(records, answers, n, prm_scores=prm_scores, orm_scores=orm_scores))

    def _user_data(self, model, tokenizer, device, scalars, notes) -> None:
        c = self.config
        records = [r for r in chains.load_jsonl(c.data_path) if r.get("gold_answer") is not None]
        if not records:
            notes.append(f"user data: no record of {c.data_path} has a gold answer; user_accuracy not measured")
            return
        texts = decode_texts(model, tokenizer, [r["prompt"] for r in records], c.batch_size, c.max_new_tokens,
                             device)
        correct = []
        for r, t in zip(records, texts):
            answer = answer_of(t)
            correct.append(float(answer is not None and bool(chains.check_answer(answer, r["gold_answer"]))))
        scalars["user_accuracy"] = _mean(correct)
        scalars["user_num_examples"] = len(records)
        if not any(ANSWER_PREFIX in t for t in texts):
            notes.append(f"user data: no completion reached an {ANSWER_PREFIX!r} line within max_new_tokens="
                         f"{c.max_new_tokens}; GSM8K-style chains are long, so raise it")

    # --- data ------------------------------------------------------------------------------------------------------
    def _records(self, length: int) -> list[dict]:
        return held_out_records(self.config, length, "reasoning")

    def _answer_tokens(self, tokenizer: Any) -> int:
        """Tokens to decode after a forced ``A:``: the longest answer's tokens and the line end, plus one."""
        return len(tokenizer(str(self.config.modulus - 1), add_special_tokens=False)["input_ids"]) + 2


# --- the reward-model eval -------------------------------------------------------------------------------------------
@dataclass
class ProcessRewardConfig(EvalConfig):
    lengths: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    """Chain lengths (number of operations), strictly ascending; the curve has one ProcessBench F1 point per length."""
    examples_per_length: int = 32
    """ProcessBench-style chains per length (half with a corrupted step, :data:`PRM_CORRUPTIONS`), and best-of-N
    problems per length."""
    modulus: int = 10
    """Arithmetic modulus of the chains."""
    ops: str = "+-*"
    """Operations the chains draw from."""
    threshold: float = 0.5
    """ProcessBench F1 a length must reach; the limit is the longest length up to which every length reaches it."""
    policy_path: str | None = None
    """Directory of a causal LM (the SFT policy) and its tokenizer whose sampled chains the reward model reranks
    (best-of-N); ``None``: no best-of-N."""
    orm_path: str | None = None
    """Directory of an outcome reward model (a token classifier read at the answer position) reranking the same
    samples: ``bon_orm``. Used only with ``policy_path``."""
    best_of_n: int = 8
    """Sampled completions per problem for best-of-N; the ``best_of_n`` series runs over 1, 2, 4, ... up to it."""
    temperature: float = 1.0
    """Sampling temperature of best-of-N."""
    max_new_tokens: int = 64
    """Tokens the policy decodes per sample."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for an inconsistent config."""
        _validate_chain_fields(self, "prm")
        if self.best_of_n < 1:
            raise ValueError(f"prm: best_of_n must be >= 1 (got {self.best_of_n})")
        for name in ("policy_path", "orm_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"prm: {name} must be a non-empty directory path or null (got {value!r})")


def _token_classifier_problem(model: Any) -> str | None:
    """Why ``model`` is not a reward model :class:`PRMScorer` can read (``None`` when it is one): a ``transformers`` /
    ``peft`` model must be a ``...ForTokenClassification``; any model needs ``config.num_labels`` 1 or 2 (a scripted
    stand-in is judged by that alone)."""
    name = type(model).__name__
    if type(model).__module__.split(".")[0] in ("transformers", "peft") and not name.endswith("ForTokenClassification"):
        return f"the prm eval measures a reward model (AutoModelForTokenClassification); got {name}"
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels not in (1, 2):
        return f"the prm eval needs a reward model with num_labels 1 or 2 (got {num_labels} on {name})"
    return None


def _load_policy(path: str, device: str) -> tuple[Any, Any]:
    """The best-of-N policy (a causal LM, on ``device``) and its tokenizer from one local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


class ProcessReward(Eval):
    """ProcessBench-style step-error localisation F1 of a process reward model by chain length (the limit: the longest
    length up to which every length reaches ``threshold``), step/answer ROC AUC against the verifier, and, with a
    policy, how much reranking its samples by this model buys (best-of-N accuracy against N)."""

    name = "prm"
    summary = "process reward model: step-error F1 by steps; limit = longest chain length with F1 >= threshold"
    limit = "reasoning"
    Config = ProcessRewardConfig

    config: ProcessRewardConfig

    def spec(self) -> LimitSpec:
        c = self.config
        c.validate()
        return LimitSpec(metric="step_f1", axis="num_steps", axis_values=tuple(float(x) for x in c.lengths),
                         higher_is_better=True, threshold=c.threshold, limit="reasoning", limit_unit="steps")

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        problem = _token_classifier_problem(model)
        if problem is not None:
            raise ValueError(f"prm: {problem}")
        sample = processbench_records(c, max(c.lengths), "prm")[0]
        text = sample["prompt"] + sample["completion"]
        _check_spelling(tokenizer, text, "prm")
        try:
            ids, _ = step_positions(tokenizer, sample["prompt"], sample["completion"])
        except ValueError as err:
            raise ValueError(f"prm: {str(err).removeprefix('reasoning: ')}") from None
        model_config = getattr(model, "config", None)
        n_pos = position_range(model_config)
        if n_pos is not None and not has_rope(model_config) and len(ids) > n_pos:
            raise ValueError(f"prm: a {max(c.lengths)}-step chain needs {len(ids)} positions but the reward model's "
                             f"position range is {n_pos}; lower lengths")
        for name in ("policy_path", "orm_path"):
            path = getattr(c, name)
            if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
                what = "is not a directory" if not os.path.isdir(path) else "has no config.json"
                raise ValueError(f"prm: {name} {path} {what}")

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Score the ProcessBench-style chains with ``model`` (a token classifier already on ``device``), then, with a
        ``policy_path``, rerank the policy's sampled chains."""
        c = self.config
        spec = self.spec()
        stages = 1 + (2 + int(c.orm_path is not None) if c.policy_path is not None else 0)
        bar = tqdm(total=stages, desc="prm", unit="stage", disable=not progress, leave=False)
        notes: list[str] = []
        series: dict[str, Series] = {}
        prm = PRMScorer(model, tokenizer, device=device, batch_size=c.batch_size)

        # --- 1. ProcessBench F1 per length, step and answer AUC
        bar.set_postfix_str("processbench")
        records = [r for length in c.lengths for r in processbench_records(c, length, "prm")]
        scores = prm.score([r["prompt"] for r in records], [r["completion"] for r in records])
        pred, gold = first_errors(records, scores)
        curve: dict[float, float] = {}
        scalars: dict[str, float] = {"num_examples": len(records)}
        for length in c.lengths:
            rows = [i for i, r in enumerate(records) if r["num_steps"] == length]
            curve[float(length)] = processbench_f1([pred[i] for i in rows], [gold[i] for i in rows])["f1"]
            scalars[f"step_f1@{length}"] = curve[float(length)]
        total = processbench_f1(pred, gold)
        scalars.update(step_f1=total["f1"], acc_error=total["acc_error"], acc_correct=total["acc_correct"])
        step_scores, step_labels, answer_scores, answer_labels = [], [], [], []
        for r, s in zip(records, scores):
            if not s:
                continue
            step_scores += s[:-1][: len(r["labels"])]
            step_labels += r["labels"][: len(s) - 1]
            answer_scores.append(s[-1])
            answer_labels.append(int(r["answer_correct"]))
        scalars["step_auc"] = roc_auc(step_scores, step_labels)
        scalars["answer_auc"] = roc_auc(answer_scores, answer_labels)
        limit = read_limit(curve, c.threshold, higher_is_better=True)
        bar.update(1)
        self._notes(curve, limit, scalars, pred, notes)

        # --- 2. best-of-N over the policy's samples
        if c.policy_path is not None:
            self._best_of_n(prm, device, bar, scalars, series, notes)
        elif c.orm_path is not None:
            notes.append("orm_path is set but policy_path is not: there are no samples to rerank, the ORM was not used")
        bar.close()
        return EvalResult(eval=self.name, spec=spec, curve=curve, limit_value=float(limit), threshold=c.threshold,
                          scalars=scalars, notes=notes, series=series)

    def _notes(self, curve, limit, scalars, pred, notes) -> None:
        c = self.config
        nan_lengths = [int(x) for x, v in curve.items() if math.isnan(v)]
        if nan_lengths:
            notes.append(f"step_f1 is NaN at length(s) {nan_lengths}: the ProcessBench-style set drew only erroneous "
                         f"or only correct chains there (raise examples_per_length); a NaN point fails the threshold")
        if all(p == -1 for p in pred):
            notes.append("the reward model flags no step of any chain (every step score >= 0.5): it calls every chain "
                         "correct, so acc_error is 0 and F1 is 0")
        elif all(p == 0 for p in pred):
            notes.append("the reward model flags the first step of every chain (its scores are < 0.5 from the start): "
                         "acc_correct is 0 and F1 is 0")
        elif limit == 0.0:
            notes.append(f"step_f1 {curve[float(c.lengths[0])]:.2f} at the shortest length {c.lengths[0]} is below "
                         f"the threshold {c.threshold:g}: limit 0")
        elif limit == float(c.lengths[-1]):
            notes.append(f"every length clears the threshold {c.threshold:g}: the limit is the longest length "
                         f"measured, {c.lengths[-1]}; longer chains may measure further")
        auc = scalars["step_auc"]
        if not math.isnan(auc) and abs(auc - 0.5) < 0.05:
            notes.append(f"step_auc {auc:.2f}: the step scores barely separate valid from invalid steps; the F1 "
                         f"depends on the 0.5 cut more than on a learned ranking")

    def _best_of_n(self, prm: PRMScorer, device, bar, scalars, series, notes) -> None:
        c = self.config
        n = c.best_of_n
        bar.set_postfix_str("sampling")
        records = [r for length in c.lengths for r in held_out_records(c, length, "prm")]
        prompts = [r["prompt"] for r in records]
        policy, policy_tokenizer = _load_policy(c.policy_path, device)
        try:
            texts = sample_completions(policy, policy_tokenizer, prompts, n, batch_size=c.batch_size,
                                       max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=c.seed,
                                       device=device)
        finally:
            del policy
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
        bar.update(1)
        repeated = [p for p in prompts for _ in range(n)]
        answers = [chains.parse_completion(t)[1] for t in texts]
        bar.set_postfix_str("prm scoring")
        prm_scores = prm.score(repeated, texts)
        bar.update(1)
        orm_scores = None
        if c.orm_path is not None:
            bar.set_postfix_str("orm scoring")
            orm = PRMScorer(c.orm_path, device=device, batch_size=c.batch_size)
            orm_scores = orm.score(repeated, texts)
            del orm
            bar.update(1)
        scalars.update(best_of_n_accuracy(records, answers, n, prm_scores=prm_scores, orm_scores=orm_scores))
        scalars["bon_num_problems"] = len(records)
        curves: dict[str, dict[float, float]] = {}
        for k in sample_counts(n):
            for key, value in best_of_n_accuracy(records, answers, n, k, prm_scores, orm_scores).items():
                curves.setdefault(key, {})[float(k)] = value
        for name, key in (("best_of_n", "bon_prm"), ("best_of_n_majority", "bon_majority"),
                          ("best_of_n_orm", "bon_orm"), ("best_of_n_pass_at_n", "bon_pass_at_n")):
            if key in curves:
                series[name] = Series(axis="num_samples", metric=f"{key}_accuracy", points=curves[key])
        if all(a is None for a in answers):
            notes.append(f"best-of-N: no sample of the policy reached an {ANSWER_PREFIX!r} line within max_new_tokens="
                         f"{c.max_new_tokens}: every bon_* accuracy is 0")
        elif n > 1 and scalars["bon_prm"] <= scalars["bon_first"] < scalars["bon_pass_at_n"]:
            notes.append(f"best-of-N: reranking {n} samples by this reward model ({scalars['bon_prm']:.2f}) does not "
                         f"beat a single sample ({scalars['bon_first']:.2f}), though some sample is right "
                         f"{scalars['bon_pass_at_n']:.0%} of the time")
