"""The training backends behind one protocol (:mod:`.base`), their one hook driver (:mod:`.hooks`) and what they
share (:mod:`.checkpoints`: manifests and resume). Registered by the recipe's ``trainer.backend``."""

from llm_limits.trainers.backends.base import Backend, Fitted
from llm_limits.trainers.backends.hooks import HookDriver
from llm_limits.trainers.backends.lightning import LightningBackend
from llm_limits.trainers.backends.trl import TRLBackend

BACKENDS: dict[str, type] = {"lightning": LightningBackend, "trl": TRLBackend}
"""``trainer.backend`` -> the backend class; each takes the recipe and implements :class:`Backend`."""

__all__ = ["BACKENDS", "Backend", "Fitted", "HookDriver", "LightningBackend", "TRLBackend"]
