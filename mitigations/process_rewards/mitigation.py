"""Process-supervised reasoning rewards against reasoning degradation: reward the steps, not only the answer.

Three reward modes for an RL backend (``trainer.backend: trl``, ``trainer.trl.algorithm: grpo``): ``outcome`` (the
final answer only, the control arm), ``process`` (each completion's step scores aggregated into one reward) and
``step`` (DeepSeekMath's process supervision: per-step rewards turned into per-token advantages by the backend).
Steps are scored by an exact verifier or by a trained PRM; ``labels`` says how the PRM's training labels are made
(``trainer.trl.algorithm: prm``). The math lives in :mod:`mitigations.process_rewards.core`; this module holds the
config and the adapters around the callables the trainer injects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

from llm_limits.mitigations.base import Mitigation, MitigationConfig
from llm_limits.mitigations.process_rewards.core import (
    AGGREGATES,
    TRL_KWARGS,
    completion_text,
    make_outcome_reward,
    make_process_reward,
)

REWARDS = ("outcome", "process", "step")
SCORERS = ("verifier", "prm")
LABEL_KINDS = ("verifier", "monte_carlo")
LABEL_TARGETS = ("hard", "soft")

INJECTED = {
    "outcome": "outcome(prompts, completions, **columns) -> list[float]",
    "score_steps": "score_steps(prompts, completions, **columns) -> list[list[float]]",
    "step_ends": "step_ends(completion) -> list[int]",
}
"""The callables the trainer injects, with their signatures (for the error when one is missing)."""


# --- config --------------------------------------------------------------------------------------------------------
@dataclass
class LabelsConfig:
    """How the PRM's training labels are made (used by ``trainer.trl.algorithm: prm``)."""

    kind: Literal["verifier", "monte_carlo"] = "verifier"
    """``verifier``: exact per-step labels from the task's verifier; ``monte_carlo``: Math-Shepherd's estimate
    (complete ``rollouts`` times from each step; a step is good when a completion reaches the gold answer)."""
    rollouts: int = 8
    """Completions per step for ``monte_carlo`` (Math-Shepherd uses 8)."""
    target: Literal["hard", "soft"] = "hard"
    """Train the PRM on ``hard`` labels (1 if any rollout is right) or ``soft`` ones (the fraction right)."""
    consensus: bool = False
    """Keep only samples whose Monte Carlo and verifier labels put the first error at the same step (Zhang et al.,
    arXiv 2501.07301); needs ``kind: monte_carlo``, since verifier labels agree with themselves."""
    completer_path: str | None = None
    """The completer model's directory for ``monte_carlo``; None = the recipe's model (the policy being trained)."""
    temperature: float = 1.0
    """Sampling temperature of the Monte Carlo completions."""
    max_new_tokens: int = 64
    """Longest Monte Carlo completion, in tokens."""

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"labels.kind: expected one of {', '.join(LABEL_KINDS)} (got {self.kind!r})")
        if self.target not in LABEL_TARGETS:
            raise ValueError(f"labels.target: expected one of {', '.join(LABEL_TARGETS)} (got {self.target!r})")
        if self.rollouts < 1:
            raise ValueError(f"labels.rollouts: expected an integer >= 1 (got {self.rollouts})")
        if self.temperature < 0:
            raise ValueError(f"labels.temperature: expected a number >= 0 (got {self.temperature})")
        if self.max_new_tokens < 1:
            raise ValueError(f"labels.max_new_tokens: expected an integer >= 1 (got {self.max_new_tokens})")
        if self.consensus and self.kind != "monte_carlo":
            raise ValueError("labels.consensus: needs kind monte_carlo (verifier labels always agree with themselves)")


@dataclass
class ProcessRewardsConfig(MitigationConfig):
    reward: Literal["outcome", "process", "step"] = "step"
    """``outcome``: 1/0 on the final answer (the control arm); ``process``: each completion's step scores
    aggregated with ``aggregate``; ``step``: per-step rewards, turned into per-token advantages (DeepSeekMath)."""
    scorer: Literal["verifier", "prm"] = "verifier"
    """Who scores the steps: ``verifier`` (the task's exact checker) or ``prm`` (the trained PRM at ``prm_path``)."""
    prm_path: str | None = None
    """Directory of a PRM trained with ``trainer.trl.algorithm: prm``; required with ``scorer: prm``."""
    aggregate: Literal["min", "product", "mean", "last"] = "min"
    """How ``reward: process`` turns step scores into one reward: ``min`` (the weakest step), ``product`` (Lightman
    et al.'s main choice), ``mean``, ``last`` (the answer's score)."""
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    """How PRM training labels are made (``trainer.trl.algorithm: prm``)."""

    def __post_init__(self) -> None:
        if isinstance(self.labels, Mapping):  # a plain dict from Python code, as a recipe would write it
            self.labels = LabelsConfig(**self.labels)
        for name, allowed in (("reward", REWARDS), ("scorer", SCORERS), ("aggregate", AGGREGATES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)} (got {value!r})")
        if self.scorer == "prm" and not self.prm_path:
            raise ValueError("prm_path: required when scorer is prm")


# --- the hook object -----------------------------------------------------------------------------------------------
class ProcessRewards(Mitigation):
    """Process-supervised rewards for an RL backend.

    Injected by the trainer as keyword arguments (``ProcessRewards(config, outcome=..., score_steps=...,
    step_ends=...)``):

    - ``outcome(prompts, completions, **columns) -> list[float]``: 1.0 for a right final answer, 0.0 otherwise.
    - ``score_steps(prompts, completions, **columns) -> list[list[float]]``: one score in [0, 1] per step end of
      each completion, steps then the answer; from the verifier or the PRM (the trainer picks by ``config.scorer``).
    - ``step_ends(completion) -> list[int]``: the completion's step ends as character offsets (each ``"\\n"`` closing
      a step, then the answer line's last character).

    ``columns`` are the dataset columns TRL passes to reward functions (lists, one entry per completion).
    """

    name = "process_rewards"
    summary = "process-supervised reasoning rewards: outcome, aggregated step scores, or DeepSeekMath step advantages"
    limit = "reasoning"
    Config = ProcessRewardsConfig

    def __init__(self, config: ProcessRewardsConfig | None = None, **injected: Any) -> None:
        super().__init__(config, **injected)
        self.scored = 0
        """Completions scored so far (by ``outcome`` or ``score_steps``; a cache hit is not counted again)."""
        self._cache: tuple[list[Any], list[str], dict[str, Any], list[list[float]]] | None = None
        """The last ``score_steps`` call's arguments and result: in ``step`` mode the logged reward and
        :meth:`step_rewards` score the same completions, and a PRM forward is worth doing once."""

    # --- injected callables --------------------------------------------------------------------------------------
    def _injected(self, key: str) -> Callable[..., Any]:
        fn = self.injected.get(key)
        if not callable(fn):
            raise ValueError(f"process_rewards needs the trainer to inject `{key}` ({INJECTED[key]})")
        return fn

    def _outcome(self, prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
        rewards = self._injected("outcome")(prompts, completions, **columns)
        self.scored += len(completions)
        return rewards

    def _score_steps(self, prompts: list[Any], completions: list[str], **columns: Any) -> list[list[float]]:
        fn = self._injected("score_steps")
        if self._cache is not None:
            p, c, cols, scores = self._cache
            if _same(p, prompts) and _same(c, completions) and cols.keys() == columns.keys():
                if all(_same(cols[k], columns[k]) for k in cols):
                    return scores
        scores = [list(map(float, s)) for s in fn(prompts, completions, **columns)]
        if len(scores) != len(completions):
            raise ValueError(f"score_steps: {len(scores)} score lists for {len(completions)} completions")
        self.scored += len(completions)
        self._cache = (list(prompts), list(completions), dict(columns), scores)
        return scores

    # --- hooks ---------------------------------------------------------------------------------------------------
    def reward_fns(self) -> list[Callable[..., list[float]]]:
        cfg: ProcessRewardsConfig = self.config
        if cfg.reward == "outcome":
            self._injected("outcome")
            return [make_outcome_reward(self._outcome)]
        self._injected("score_steps")
        if cfg.reward == "process":
            return [make_process_reward(self._score_steps, cfg.aggregate)]
        # step: the advantages come from step_rewards; this reward is only logged (mean step score per completion)
        return [make_process_reward(self._score_steps, "mean")]

    def step_rewards(
        self, prompts: list[str], completions: list[str], **columns: Any
    ) -> list[list[tuple[int, float]]] | None:
        if self.config.reward != "step":
            return None
        step_ends = self._injected("step_ends")
        texts = [completion_text(c) for c in completions]
        columns = {k: v for k, v in columns.items() if k not in TRL_KWARGS}  # as the reward functions see them
        scores = self._score_steps(list(prompts), texts, **columns)
        # zip truncates to the shorter when a scorer returns more or fewer scores than the completion has step ends
        return [list(zip((int(e) for e in step_ends(c)), s)) for c, s in zip(texts, scores)]

    def state_dict(self) -> dict[str, Any]:
        return {"scored": self.scored}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scored = int(state.get("scored", 0))


def _same(a: Any, b: Any) -> bool:
    """``a is b`` or equal; values whose ``==`` is not a plain truth value (tensors) count as different."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False
