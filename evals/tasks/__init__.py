"""Task generators and loaders: the one source of data shapes for training and evaluation."""


class TaskDataError(ValueError):
    """Bad task data from a user's file. The message is one line naming the file, the line and what was expected:
    ``data.jsonl:3: not valid JSON (Expecting ',' delimiter)``."""


# Imported after TaskDataError: the task modules import it from this package.
from llm_limits.evals.tasks import synthetic_text  # noqa: E402
from llm_limits.evals.tasks.synthetic_text import SyntheticTextConfig  # noqa: E402
from llm_limits.evals.tasks import ruler  # noqa: E402
from llm_limits.evals.tasks.ruler import RulerConfig  # noqa: E402
from llm_limits.evals.tasks import chains  # noqa: E402
from llm_limits.evals.tasks.chains import ChainsConfig  # noqa: E402
from llm_limits.evals.tasks import kb  # noqa: E402
from llm_limits.evals.tasks.kb import KBConfig  # noqa: E402
from llm_limits.evals.tasks import digits  # noqa: E402
from llm_limits.evals.tasks.digits import DigitsConfig  # noqa: E402
from llm_limits.evals.tasks import shapes  # noqa: E402
from llm_limits.evals.tasks.shapes import ShapesConfig  # noqa: E402
from llm_limits.evals.tasks import world  # noqa: E402
from llm_limits.evals.tasks.world import WorldConfig  # noqa: E402

TASKS = {
    "synthetic_text": (SyntheticTextConfig, synthetic_text.generate),
    "ruler": (RulerConfig, ruler.generate),
    "chains": (ChainsConfig, chains.generate),
    "kb": (KBConfig, kb.generate),
    "digits": (DigitsConfig, digits.generate),
    "shapes": (ShapesConfig, shapes.generate),
    "world": (WorldConfig, world.generate),
}
"""Task name (an eval's ``task:``) -> (its config dataclass, its generator ``generate(config) -> list[dict]``)."""

TASK_VERSIONS: dict[str, str] = {
    "synthetic_text": synthetic_text.VERSION,
    "ruler": ruler.VERSION,
    "chains": chains.VERSION,
    "kb": kb.VERSION,
    "digits": digits.VERSION,
    "shapes": shapes.VERSION,
    "world": world.VERSION,
}
"""Task name -> its version (the module's ``VERSION``): a task's version changes when the records it yields do."""

__all__ = ["TASKS", "TASK_VERSIONS", "ChainsConfig", "DigitsConfig", "KBConfig", "RulerConfig", "ShapesConfig",
           "SyntheticTextConfig", "TaskDataError", "WorldConfig"]
