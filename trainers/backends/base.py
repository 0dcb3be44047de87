"""The protocol every training backend implements, so the run lifecycle (``trainers/run.py``) has no backend branches.

A backend does four things, in this order, for one run:

1. :meth:`Backend.load_records`: the records the mitigations are built with and may rewrite (``transform_records``):
   prompt/completion records for the TRL backend, image records for a vision-language run, ``None`` for text LM data;
   (after :meth:`Backend.check` has refused, in one line, mitigations it cannot train with);
2. :meth:`Backend.build_data`: the training and validation data, from the built model, tokenizer and records;
3. :meth:`Backend.fit`: train, fresh or resumed from the run's newest good checkpoint, every hook through the run's
   :class:`~llm_limits.trainers.backends.hooks.HookDriver` (whose ``setup`` already ran, once);
4. :meth:`Backend.save`: write the trained weights into the run directory and return, on rank 0, the whole model the
   after-evals measure (``None`` on the other ranks, which are done).

Backends are registered by the recipe's ``trainer.backend`` name in :data:`llm_limits.trainers.backends.BACKENDS`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from llm_limits.mitigations.base import Mitigation
from llm_limits.trainers.backends.hooks import HookDriver


MODEL_DIR = "model"
"""``<run_dir>/model``: the trained (merged) weights and tokenizer, loadable alone."""
ADAPTER_DIR = "adapter"
"""``<run_dir>/adapter``: the LoRA adapter of a LoRA run."""


@dataclasses.dataclass
class Fitted:
    """What :meth:`Backend.fit` hands to :meth:`Backend.save`."""

    model: torch.nn.Module
    """The trained module, unwrapped (under ZeRO-3 its parameters are shards: :meth:`Backend.save` gathers them)."""
    stats: dict[str, float]
    """``wall_s``, ``steps``, ``tokens_seen``, ``final_loss``, ``val_loss`` and what the backend adds."""
    history: list[dict[str, float]]
    """The logged training metrics (``step``, ``loss``...) for the report's loss plot."""
    handle: Any = None
    """Whatever the backend needs to save (the HF trainer, the Lightning module)."""


class Backend(Protocol):
    name: str
    head: str
    """The model head the backend trains: ``causal_lm``, or ``token_classification`` for a process reward model."""
    prompt_data: bool
    """Whether it trains on prompt/completion records (a mitigation's ``transform_records`` builds those)."""

    def check(self, mitigations: list[Mitigation]) -> None:
        """Refuse, in one line and before the run directory exists, mitigations this backend cannot train with."""

    def load_records(self, recipe: Any, tokenizer: Any, *, vision: bool) -> list[dict[str, Any]] | None: ...

    def build_data(self, recipe: Any, tokenizer: Any, model: torch.nn.Module, records: list[dict[str, Any]] | None,
                   mitigations: list[Any], *, vision: bool) -> tuple[Any, Any]: ...

    def fit(self, built: Any, hooks: HookDriver, data: tuple[Any, Any], run_dir: Path, tracker: Any, *,
            resume: bool, progress: bool, echo: Callable[[str], None]) -> Fitted: ...

    def save(self, fitted: Fitted, built: Any, run_dir: Path) -> torch.nn.Module | None: ...


def is_rank_zero() -> bool:
    """Whether this process is global rank 0. Launchers (Lightning's subprocess launcher, torchrun, SLURM) set these
    variables in the processes they start; a plain process has none of them and is rank 0."""
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
