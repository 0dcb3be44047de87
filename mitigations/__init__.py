"""Training-time mitigations, registered by name in one dict (no plugin system, no import-time magic)."""

from llm_limits.mitigations.base import Mitigation, MitigationConfig, Need, StepContext
from llm_limits.mitigations.bounded_retrieval import BoundedRetrieval
from llm_limits.mitigations.crossmodal import CrossModal
from llm_limits.mitigations.noop import NoOp
from llm_limits.mitigations.positional import Positional
from llm_limits.mitigations.process_rewards import ProcessRewards

MITIGATIONS: dict[str, type[Mitigation]] = {
    "noop": NoOp,
    "positional": Positional,
    "process_rewards": ProcessRewards,
    "bounded_retrieval": BoundedRetrieval,
    "crossmodal": CrossModal,
}
"""``name:`` in a recipe's ``mitigations:`` list -> the class. New mitigations add one line here."""

__all__ = ["MITIGATIONS", "Mitigation", "MitigationConfig", "Need", "StepContext"]
