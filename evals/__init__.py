"""Limit evals, registered by name in one dict. Each measures one limit as a curve and reads the limit off it."""

from evals.base import Eval, EvalConfig, EvalResult, Grid, LimitSpec, Series, compare, read_limit
from evals.context import Context
from evals.hallucination import Hallucination
from evals.multimodal import Multimodal
from evals.positional_loss import PositionalLoss
from evals.reasoning import ProcessReward, Reasoning
from evals.retrieval import Retrieval

EVALS: dict[str, type[Eval]] = {
    "positional_loss": PositionalLoss,
    "context": Context,
    "reasoning": Reasoning,
    "prm": ProcessReward,
    "retrieval": Retrieval,
    "hallucination": Hallucination,
    "multimodal": Multimodal,
}
"""``name:`` in a recipe's ``evals:`` list -> the class. New evals add one line here."""

__all__ = ["EVALS", "Context", "Eval", "EvalConfig", "EvalResult", "Grid", "Hallucination", "Multimodal", "Series", "LimitSpec", "PositionalLoss", "ProcessReward", "Reasoning", "Retrieval", "compare", "read_limit"]
