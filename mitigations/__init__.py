"""Training-time mitigations, registered by name in one dict (no plugin system, no import-time magic)."""

from mitigations.base import Mitigation, MitigationConfig, StepContext
from mitigations.bounded_retrieval import BoundedRetrieval
from mitigations.crossmodal import CrossModal
from mitigations.noop import NoOp
from mitigations.positional import Positional
from mitigations.process_rewards import ProcessRewards

MITIGATIONS: dict[str, type[Mitigation]] = {
    "noop": NoOp,
    "positional": Positional,
    "process_rewards": ProcessRewards,
    "bounded_retrieval": BoundedRetrieval,
    "crossmodal": CrossModal,
}
"""``name:`` in a recipe's ``mitigations:`` list -> the class. New mitigations add one line here."""

__all__ = ["MITIGATIONS", "Mitigation", "MitigationConfig", "StepContext"]
