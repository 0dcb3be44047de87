"""The process reward model itself: how well a PRM finds the first wrong step of a chain, and how much reranking a
policy's samples by it buys.

The model this eval runs on is a token classifier (the PRM or ORM ``trainer.trl.algorithm: prm`` trains, read by
:class:`evals.lm.PRMScorer`), not a causal LM. Its curve is the ProcessBench F1 (Zheng et al. 2024, arXiv
2412.06559; :func:`evals.lm.processbench_f1`) by chain length on a ProcessBench-style set
(:func:`evals.lm.processbench_records`: arithmetic chains of the ``chains`` task, half with one corrupted step), and
the limit is the longest length up to which every length reaches ``threshold`` (:func:`evals.base.read_limit`).
Beside it, ``step_auc``/``answer_auc`` (:func:`roc_auc`) say how well its scores rank valid against invalid steps and
right against wrong answers, by the task's verifier. With a ``policy_path`` it reranks that policy's samples
(:func:`evals.lm.sample_completions`, the same sampling path as the ``reasoning`` eval's best-of-N) and plots
accuracy against the number of samples (:func:`evals.lm.best_of_n_accuracy` over :func:`sample_counts`).

Prompt format (``prompt_format``, :func:`evals.lm.format_prompt`): under ``chat`` (``auto`` with a reward model
tokenizer that has a chat template, as the TRL backend's ``data.prompt_format`` trains it) each problem is one user
turn of the template and the chain follows the generation prompt; the step ends are read at the same characters of
the chain (:func:`evals.lm.step_positions` counts from the end of the wrapped prompt). The policy of best-of-N reads
the problem in its own tokenizer's format.

The ``reasoning`` eval (evals/reasoning.py) measures the policy; this one measures the reward model. The pieces both
use (the held-out and ProcessBench-style chains, the scorer, the best-of-N accuracies) live in :mod:`evals.lm`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm import tqdm

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, LimitSpec, Series, read_limit
from llm_limits.evals.lm import (PRMScorer, best_of_n_accuracy, check_chains_spelling, first_errors, format_prompt,
                                 has_rope, held_out_records, own_prompt_format, position_range, processbench_f1,
                                 processbench_records, resolve_prompt_format, sample_completions, step_positions,
                                 validate_chain_fields)
from llm_limits.evals.tasks import chains
from llm_limits.evals.tasks.chains import ANSWER_PREFIX


@dataclass
class ProcessRewardConfig(EvalConfig):
    lengths: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    """Chain lengths (number of operations), strictly ascending; the curve has one ProcessBench F1 point per length."""
    examples_per_length: int = 32
    """ProcessBench-style chains per length (half with a corrupted step, :data:`evals.lm.PRM_CORRUPTIONS`), and
    best-of-N problems per length."""
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
        validate_chain_fields(self, "prm")
        if self.best_of_n < 1:
            raise ValueError(f"prm: best_of_n must be >= 1 (got {self.best_of_n})")
        for name in ("policy_path", "orm_path"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"prm: {name} must be a non-empty directory path or null (got {value!r})")


# --- functional core -------------------------------------------------------------------------------------------------
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


# --- model-facing functions ------------------------------------------------------------------------------------------
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


# --- the eval --------------------------------------------------------------------------------------------------------
class ProcessReward(Eval):
    """ProcessBench-style step-error localisation F1 of a process reward model by chain length (the limit: the longest
    length up to which every length reaches ``threshold``), step/answer ROC AUC against the verifier, and, with a
    policy, how much reranking its samples by this model buys (best-of-N accuracy against N)."""

    name = "prm"
    version = "1"
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
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        sample = processbench_records(c, max(c.lengths), "prm")[0]
        text = sample["prompt"] + sample["completion"]
        check_chains_spelling(tokenizer, text, "prm")
        try:
            ids, _ = step_positions(tokenizer, format_prompt(tokenizer, sample["prompt"], fmt), sample["completion"])
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
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        stages = 1 + (2 + int(c.orm_path is not None) if c.policy_path is not None else 0)
        bar = tqdm(total=stages, desc="prm", unit="stage", disable=not progress, leave=False)
        notes: list[str] = []
        series: dict[str, Series] = {}
        prm = PRMScorer(model, tokenizer, device=device, batch_size=c.batch_size)

        # --- 1. ProcessBench F1 per length, step and answer AUC
        bar.set_postfix_str("processbench")
        records = [r for length in c.lengths for r in processbench_records(c, length, "prm")]
        scores = prm.score([format_prompt(tokenizer, r["prompt"], fmt) for r in records],
                           [r["completion"] for r in records])
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
            self._best_of_n(prm, fmt, device, bar, scalars, series, notes)
        elif c.orm_path is not None:
            notes.append("orm_path is set but policy_path is not: there are no samples to rerank, the ORM was not used")
        bar.close()
        return self.result(spec=spec, curve=curve, limit_value=float(limit), threshold=c.threshold,
                           prompt_format=fmt, scalars=scalars, notes=notes, series=series)

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

    def _best_of_n(self, prm: PRMScorer, fmt: str, device, bar, scalars, series, notes) -> None:
        c = self.config
        n = c.best_of_n
        bar.set_postfix_str("sampling")
        records = [r for length in c.lengths for r in held_out_records(c, length, "prm")]
        prompts = [r["prompt"] for r in records]
        policy, policy_tokenizer = _load_policy(c.policy_path, device)
        # each model reads the problem in its own tokenizer's format: the policy its own (it loads here with its
        # tokenizer), the reward model being measured the eval's, an ORM its own
        policy_fmt = own_prompt_format(policy_tokenizer, c.prompt_format)
        try:
            texts = sample_completions(policy, policy_tokenizer,
                                       [format_prompt(policy_tokenizer, p, policy_fmt) for p in prompts], n,
                                       batch_size=c.batch_size, max_new_tokens=c.max_new_tokens,
                                       temperature=c.temperature, seed=c.seed, device=device)
        finally:
            del policy
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
        bar.update(1)
        repeated = [p for p in prompts for _ in range(n)]
        answers = [chains.parse_completion(t)[1] for t in texts]
        bar.set_postfix_str("prm scoring")
        prm_scores = prm.score([format_prompt(prm.tokenizer, p, fmt) for p in repeated], texts)
        bar.update(1)
        orm_scores = None
        if c.orm_path is not None:
            bar.set_postfix_str("orm scoring")
            orm = PRMScorer(c.orm_path, device=device, batch_size=c.batch_size)
            orm_fmt = own_prompt_format(orm.tokenizer, c.prompt_format)
            orm_scores = orm.score([format_prompt(orm.tokenizer, p, orm_fmt) for p in repeated], texts)
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
