from llm_limits.mitigations.process_rewards.core import (
    aggregate,
    best_of_n,
    char_ends_to_token_ends,
    completion_text,
    consensus,
    first_error_index,
    majority_vote,
    make_outcome_reward,
    make_process_reward,
    math_shepherd_labels,
    normalize_group_step_rewards,
    step_advantages,
)
from llm_limits.mitigations.process_rewards.mitigation import LabelsConfig, ProcessRewards, ProcessRewardsConfig

__all__ = [
    "LabelsConfig",
    "ProcessRewards",
    "ProcessRewardsConfig",
    "aggregate",
    "best_of_n",
    "char_ends_to_token_ends",
    "completion_text",
    "consensus",
    "first_error_index",
    "majority_vote",
    "make_outcome_reward",
    "make_process_reward",
    "math_shepherd_labels",
    "normalize_group_step_rewards",
    "step_advantages",
]
