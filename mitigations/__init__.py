"""Training-time mitigations, registered by name in one dict (no plugin system, no import-time magic)."""

from mitigations.base import Mitigation, MitigationConfig, StepContext
from mitigations.noop import NoOp
from mitigations.positional import Positional

MITIGATIONS: dict[str, type[Mitigation]] = {
    "noop": NoOp,
    "positional": Positional,
}
"""``name:`` in a recipe's ``mitigations:`` list -> the class. New mitigations add one line here."""

__all__ = ["MITIGATIONS", "Mitigation", "MitigationConfig", "StepContext"]
