from mitigations.noop.core import identity
from mitigations.noop.mitigation import NoOp, NoOpConfig

__all__ = ["NoOp", "NoOpConfig", "identity"]
