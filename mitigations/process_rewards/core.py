"""Pure functions of process-supervised reasoning rewards: step-score aggregation, DeepSeekMath's group-normalised
step advantages, Math-Shepherd's Monte Carlo step labels, the consensus filter, and TRL reward factories.

A completion is a chain of steps separated by ``"\\n"`` followed by an answer line, e.g.
``"3+4=7\\n7*2=4\\nA:9"``. Its *step ends* are character offsets into the completion: the index of each ``"\\n"``
that closes a step, then the index of the answer line's last character (``[5, 11, 14]`` here). Scores come one per
step end, steps first and the answer last, each in [0, 1] (1 = the step is right).

Reward functions follow TRL's signature ``f(prompts, completions, **kwargs) -> list[float]``. TRL passes
``completion_ids``, ``trainer_state``, ``log_extra``, ``log_metric`` (and ``environments``) besides every dataset
column as a list. The factories here drop those trainer kwargs and hand the dataset columns to the injected
callables.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Sequence

import torch

AGGREGATES = ("min", "product", "mean", "last")
"""How step scores become one score per completion (``aggregate``)."""

TRL_KWARGS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
"""Keyword arguments TRL passes to reward functions that are not dataset columns."""


# --- 1. aggregation (Lightman et al., arXiv 2305.20050) ---------------------------------------------------------------
def aggregate(scores: Sequence[float], how: str = "min") -> float:
    """One score for a completion from its step scores (steps then answer, each in [0, 1]).

    ``min``: the weakest step (the usual PRM reading; Lightman et al. 2023 report it does about as well as their
    ``product``); ``product``: the probability that every step is right, if steps were independent; ``mean``;
    ``last``: the answer's score. Empty -> 0.0.

    >>> s = [0.9, 0.5, 1.0]
    >>> aggregate(s), aggregate(s, "product"), round(aggregate(s, "mean"), 4), aggregate(s, "last"), aggregate([])
    (0.5, 0.45, 0.8, 1.0, 0.0)
    """
    if how not in AGGREGATES:
        raise ValueError(f"aggregate: expected one of {', '.join(AGGREGATES)} (got {how!r})")
    if len(scores) == 0:
        return 0.0
    values = [float(s) for s in scores]
    if how == "min":
        return min(values)
    if how == "product":
        return math.prod(values)
    if how == "mean":
        return sum(values) / len(values)
    return values[-1]


# --- 2. step-level advantages (DeepSeekMath, arXiv 2402.03300, section 4.1.3) ----------------------------------------
def normalize_group_step_rewards(
    step_rewards: list[list[float]], group_size: int, eps: float = 1e-4
) -> list[list[float]]:
    """Normalise step rewards within each group of ``group_size`` consecutive completions (one prompt's group).

    For a group, ``R`` is every step reward of every completion in it; each reward becomes
    ``(r - mean(R)) / (std(R) + eps)`` with ``std`` the unbiased sample std (``torch.std``'s default, as TRL uses for
    outcome rewards). A group holding a single reward value gets std 0 (so its reward normalises to 0). The shape
    (``[batch][steps_i]``, ragged) is kept.

    >>> normalize_group_step_rewards([[1.0, 0.5], [0.0], [0.7], []], group_size=2, eps=0.0)
    [[1.0, 0.0], [-1.0], [0.0], []]
    """
    if group_size < 1 or len(step_rewards) % group_size != 0:
        raise ValueError(
            f"group_size: {len(step_rewards)} completions do not split into groups of {group_size} "
            "(need len(step_rewards) % group_size == 0 and group_size >= 1)"
        )
    out: list[list[float]] = []
    for g in range(0, len(step_rewards), group_size):
        rows = step_rewards[g : g + group_size]
        flat = torch.tensor([float(r) for row in rows for r in row], dtype=torch.float64)
        mean = flat.mean() if len(flat) else torch.tensor(0.0, dtype=torch.float64)
        std = flat.std() if len(flat) > 1 else torch.tensor(0.0, dtype=torch.float64)
        denom = float(std) + eps
        for row in rows:
            # std + eps == 0 only when every reward equals the mean (eps = 0): they all normalise to 0, not 0/0
            out.append([float((float(r) - mean) / denom) if denom > 0 else 0.0 for r in row])
    return out


def step_advantages(
    step_rewards: list[list[float]],
    step_token_ends: list[list[int]],
    completion_len: int,
    group_size: int,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Per-token advantages ``[batch, completion_len]`` (float32) from step rewards (DeepSeekMath process supervision).

    Rewards are normalised per group (:func:`normalize_group_step_rewards`); then token ``t`` of completion ``i``
    gets the sum of the normalised rewards of the steps of ``i`` that end at or after it
    (``step_token_ends[i][j] >= t``). Tokens after the last step end get 0. End indices ``>= completion_len`` are
    clipped to ``completion_len - 1``.

    Worked example, one group of two completions of 4 tokens, ``eps = 0``: rewards ``[[1.0, 0.5], [0.0]]`` give
    ``R = {1, 0.5, 0}``, mean 0.5, std 0.5, so normalised ``[[1, 0], [-1]]``. Completion 0's steps end at tokens 1
    and 3: tokens 0-1 get ``1 + 0``, tokens 2-3 get ``0``. Completion 1's step ends at token 2: tokens 0-2 get -1,
    token 3 (after the last step) gets 0.

    >>> step_advantages([[1.0, 0.5], [0.0]], [[1, 3], [2]], completion_len=4, group_size=2, eps=0.0)
    tensor([[ 1.,  1.,  0.,  0.],
            [-1., -1., -1.,  0.]])
    """
    if len(step_rewards) != len(step_token_ends):
        raise ValueError(
            f"step_token_ends: {len(step_token_ends)} rows for {len(step_rewards)} rows of step_rewards"
        )
    if completion_len < 1:
        raise ValueError(f"completion_len must be >= 1 (got {completion_len})")
    normalised = normalize_group_step_rewards(step_rewards, group_size, eps)
    adv = torch.zeros(len(step_rewards), completion_len, dtype=torch.float64)
    for i, (rewards, ends) in enumerate(zip(normalised, step_token_ends)):
        if len(rewards) != len(ends):
            raise ValueError(f"row {i}: {len(rewards)} step rewards but {len(ends)} step ends")
        for r, end in zip(rewards, ends):
            if end < 0:
                raise ValueError(f"row {i}: step end {end} is negative")
            adv[i, : min(int(end), completion_len - 1) + 1] += r  # every token up to and including the step's end
    return adv.float()


def char_ends_to_token_ends(char_ends: list[int], token_offsets: list[tuple[int, int]]) -> list[int]:
    """Map character offsets to the index of the token whose ``[start, end)`` span contains them.

    ``token_offsets`` are the tokenizer's offsets of the completion's tokens (``return_offsets_mapping``). Tokens
    with an empty span (special tokens) are skipped. A character no token covers (a gap, or beyond the last token)
    maps to the last non-empty token that starts before it, i.e. the last token of the text up to it; a character
    before the first token maps to the first non-empty token.

    >>> offsets = [(0, 3), (3, 5), (5, 6), (6, 9), (0, 0)]   # "3+4" "=7" "\\n" "A:7" of "3+4=7\\nA:7", then an EOS
    >>> char_ends_to_token_ends([5, 8, 12], offsets)          # the step's "\\n", the answer's last char, beyond the end
    [2, 3, 3]
    """
    spans = [(int(s), int(e), k) for k, (s, e) in enumerate(token_offsets) if int(e) > int(s)]
    if not spans:
        raise ValueError("token_offsets: no token with a non-empty span")
    starts = [s for s, _, _ in spans]
    out = []
    for c in char_ends:
        if c < 0:
            raise ValueError(f"char_ends: negative offset {c}")
        pos = bisect.bisect_right(starts, int(c)) - 1  # the last token starting at or before c
        out.append(spans[max(pos, 0)][2])
    return out


# --- 3. Monte Carlo step labels (Math-Shepherd, arXiv 2312.08935) -----------------------------------------------------
def math_shepherd_labels(
    prompt: str,
    steps: list[str],
    is_correct: Callable[[str], bool],
    complete: Callable[[list[str], int], list[list[str]]],
    n: int,
    sep: str = "\n",
) -> list[tuple[int, float]]:
    """Math-Shepherd's automatic step labels: ``(hard, soft)`` per step, estimated by completing from each step.

    For step ``i`` the prefix is ``prompt + sep.join(steps[: i + 1]) + sep``; ``complete(prefixes, n)`` returns ``n``
    continuations per prefix (one batched call for all steps); ``is_correct(prefix + continuation)`` says whether
    that full solution reaches the gold answer. Hard label: 1 if any of the ``n`` is correct, else 0 (a step from
    which the answer can still be reached); soft label: the fraction correct.

    As in the paper, each step is estimated independently: a step after one labelled 0 is not forced to 0 (a
    completer may recover from a wrong intermediate value by luck or by redoing the step).

    >>> def complete(prefixes, n):   # a fake completer: it finishes every prefix the same way
    ...     return [["A:9"] * n for _ in prefixes]
    >>> def is_correct(text):        # right when the chain never wrote the wrong product "7*2=4"
    ...     return "7*2=4" not in text
    >>> math_shepherd_labels("Q:3+4*2-5\\n", ["3+4=7", "7*2=4", "4-5=9"], is_correct, complete, n=2)
    [(1, 1.0), (0, 0.0), (0, 0.0)]
    """
    if n < 1:
        raise ValueError(f"n (rollouts per step) must be >= 1 (got {n})")
    if not steps:
        return []
    prefixes = [prompt + sep.join(steps[: i + 1]) + sep for i in range(len(steps))]
    continuations = complete(prefixes, n)
    if len(continuations) != len(prefixes) or any(len(c) != n for c in continuations):
        got = [len(c) for c in continuations]
        raise ValueError(f"complete: expected {n} continuations for each of {len(prefixes)} prefixes (got {got})")
    labels = []
    for prefix, conts in zip(prefixes, continuations):
        right = sum(bool(is_correct(prefix + c)) for c in conts)
        labels.append((int(right > 0), right / n))
    return labels


# --- 4. consensus filtering (Zhang et al., arXiv 2501.07301) ----------------------------------------------------------
def first_error_index(labels: Sequence[int]) -> int:
    """Index of the first step labelled 0 (wrong), or -1 when every step is right.

    >>> first_error_index([1, 1, 0, 1]), first_error_index([1, 1]), first_error_index([])
    (2, -1, -1)
    """
    for i, label in enumerate(labels):
        if not label:
            return i
    return -1


def consensus(mc_labels: Sequence[int], reference_labels: Sequence[int]) -> bool:
    """Keep a sample only when the Monte Carlo labels and a reference judge (here the exact verifier) put the first
    error at the same step; both finding none is agreement (Zhang et al. 2025's consensus filter).

    >>> consensus([1, 0, 0], [1, 0, 1]), consensus([1, 1], [1, 1]), consensus([0, 1], [1, 0])
    (True, True, False)
    """
    if len(mc_labels) != len(reference_labels):
        raise ValueError(f"consensus: {len(mc_labels)} MC labels but {len(reference_labels)} reference labels")
    return first_error_index(mc_labels) == first_error_index(reference_labels)


# --- 5. test-time selection -------------------------------------------------------------------------------------------
def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (self-consistency); ties go to the answer seen first; ``None`` (no answer parsed) is
    ignored; ``None`` when there is no answer at all.

    >>> majority_vote(["9", None, "7", "7", "9"]), majority_vote([None, None])
    ('9', None)
    """
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1  # dicts keep insertion order, so max() below prefers the first seen
    return max(counts, key=lambda a: counts[a]) if counts else None


def best_of_n(scores: Sequence[float]) -> int:
    """Index of the highest score (a verifier's or PRM's best-of-N pick); the first one on ties.

    >>> best_of_n([0.2, 0.9, 0.9, 0.1])
    1
    """
    if len(scores) == 0:
        raise ValueError("best_of_n: no scores")
    return max(range(len(scores)), key=lambda i: (float(scores[i]), -i))


# --- 6. reward functions in TRL's signature ---------------------------------------------------------------------------
def _columns(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The dataset columns among TRL's reward kwargs (trainer objects dropped)."""
    return {k: v for k, v in kwargs.items() if k not in TRL_KWARGS}


def completion_text(completion: Any) -> str:
    """A completion as text: a string as is; a conversational completion (a list of messages) as its last message's
    content.

    >>> completion_text("3+4=7\\nA:7"), completion_text([{"role": "assistant", "content": "A:7"}])
    ('3+4=7\\nA:7', 'A:7')
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise ValueError(f"completion: expected a string or a list of messages (got {type(completion).__name__})")


def make_outcome_reward(outcome: Callable[..., list[float]]) -> Callable[..., list[float]]:
    """A TRL reward ``outcome_reward(prompts, completions, **kwargs)`` returning ``outcome(prompts, completions,
    **columns)`` (1.0 for a right final answer, 0.0 otherwise); TRL's non-column kwargs are dropped.

    >>> def outcome(prompts, completions, answer, **_):   # a fake verifier reading the dataset column "answer"
    ...     return [float(c.endswith("A:" + a)) for c, a in zip(completions, answer)]
    >>> reward = make_outcome_reward(outcome)
    >>> reward.__name__, reward(prompts=["Q:3+4\\n"] * 2, completions=["3+4=7\\nA:7", "A:8"], answer=["7", "7"],
    ...                         trainer_state=None, log_metric=print)
    ('outcome_reward', [1.0, 0.0])
    """

    def outcome_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        return [float(r) for r in outcome(list(prompts), texts, **_columns(kwargs))]

    outcome_reward.__name__ = outcome_reward.__qualname__ = "outcome_reward"
    return outcome_reward


def make_process_reward(score_steps: Callable[..., list[list[float]]], how: str = "min") -> Callable[..., list[float]]:
    """A TRL reward ``process_reward(prompts, completions, **kwargs)``: each completion's step scores (steps then
    answer, from ``score_steps(prompts, completions, **columns)``) aggregated with ``how`` (:func:`aggregate`).

    >>> def score_steps(prompts, completions, **_):   # a fake verifier: a step is right unless it says "=4"
    ...     return [[0.0 if s.endswith("=4") else 1.0 for s in c.split("\\n")] for c in completions]
    >>> reward = make_process_reward(score_steps, "min")
    >>> reward.__name__, reward(prompts=["Q\\n", "Q\\n"], completions=["3+4=7\\nA:7", "7*2=4\\nA:9"])
    ('process_reward', [1.0, 0.0])
    >>> make_process_reward(score_steps, "mean")(prompts=["Q\\n"], completions=["7*2=4\\nA:9"])
    [0.5]
    """
    if how not in AGGREGATES:
        raise ValueError(f"aggregate: expected one of {', '.join(AGGREGATES)} (got {how!r})")

    def process_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        texts = [completion_text(c) for c in completions]
        scores = score_steps(list(prompts), texts, **_columns(kwargs))
        if len(scores) != len(texts):
            raise ValueError(f"score_steps: {len(scores)} score lists for {len(texts)} completions")
        return [aggregate(s, how) for s in scores]

    process_reward.__name__ = process_reward.__qualname__ = "process_reward"
    return process_reward
