"""Limit evals, registered by name in one dict. Each measures one limit as a curve and reads the limit off it."""

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, Grid, LimitSpec, Series, compare, read_limit
from llm_limits.evals.context import Context
from llm_limits.evals.general import General
from llm_limits.evals.hallucination import Hallucination
from llm_limits.evals.multimodal import Multimodal
from llm_limits.evals.positional_loss import PositionalLoss
from llm_limits.evals.prm import ProcessReward
from llm_limits.evals.reasoning import Reasoning
from llm_limits.evals.retrieval import Retrieval

EVALS: dict[str, type[Eval]] = {
    "positional_loss": PositionalLoss,
    "context": Context,
    "reasoning": Reasoning,
    "prm": ProcessReward,
    "retrieval": Retrieval,
    "hallucination": Hallucination,
    "multimodal": Multimodal,
    "general": General,
}
"""``name:`` in a recipe's ``evals:`` list -> the class. New evals add one line here."""

__all__ = ["EVALS", "Context", "Eval", "EvalConfig", "EvalResult", "General", "Grid", "Hallucination", "Multimodal", "Series", "LimitSpec", "PositionalLoss", "ProcessReward", "Reasoning", "Retrieval", "compare", "read_limit"]
