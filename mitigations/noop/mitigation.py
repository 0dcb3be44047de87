"""A mitigation that changes nothing but counts the hook calls it receives.

It is the control arm of an ablation and the backend's test double: the counters show that a backend really calls
every hook, and they round-trip through ``state_dict`` so a resumed run keeps counting where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from llm_limits.mitigations.base import Batch, Mitigation, MitigationConfig, StepContext
from llm_limits.mitigations.noop.core import identity


@dataclass
class NoOpConfig(MitigationConfig):
    log_every: int = 0
    """Log the hook counters every N steps under ``noop/*`` (0 = never)."""


class NoOp(Mitigation):
    name = "noop"
    summary = "changes nothing; counts hook calls (control arm and backend test double)"
    limit = ""
    Config = NoOpConfig

    def __init__(self, config: NoOpConfig | None = None, **injected: Any) -> None:
        super().__init__(config, **injected)
        self.calls = {"setup": 0, "transform_batch": 0, "extra_loss": 0, "reward_fns": 0}

    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
        self.calls["setup"] += 1
        return model

    def transform_batch(self, batch: Batch, ctx: StepContext) -> Batch:
        self.calls["transform_batch"] += 1
        every = self.config.log_every
        if every and ctx.step % every == 0:
            ctx.log("noop/transform_batch_calls", float(self.calls["transform_batch"]))
        return identity(batch)

    def extra_loss(self, outputs: Any, batch: Batch, ctx: StepContext) -> torch.Tensor | None:
        self.calls["extra_loss"] += 1
        return None

    def reward_fns(self):
        self.calls["reward_fns"] += 1
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"calls": dict(self.calls)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calls.update(state.get("calls", {}))
