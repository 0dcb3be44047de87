from llm_limits.mitigations.noop.core import identity
from llm_limits.mitigations.noop.mitigation import NoOp, NoOpConfig

__all__ = ["NoOp", "NoOpConfig", "identity"]
