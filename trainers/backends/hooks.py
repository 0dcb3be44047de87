"""The one hook driver: every call from a backend into a mitigation goes through :class:`HookDriver`.

Both backends (Lightning's module, the TRL/HF trainers) hold one driver and call it at the same moments:

- :meth:`HookDriver.prepare` once, before the optimizer exists: each enabled mitigation's ``setup`` (exactly once per
  run), then its ``loss_module``;
- per micro-batch: :meth:`~HookDriver.context` (a :class:`StepContext` filled the same way on both backends),
  :meth:`~HookDriver.transform_batch`, the forward pass, :meth:`~HookDriver.add_extra_losses`, then
  :meth:`~HookDriver.count_tokens`;
- :meth:`~HookDriver.reward_fns` and :meth:`~HookDriver.step_rewards` for an RL trainer;
- :meth:`~HookDriver.state_dict` into every checkpoint and :meth:`~HookDriver.load_state_dict` on resume.

Mitigation state has ONE format on both backends: the dict :meth:`~HookDriver.state_dict` returns, written with
``torch.save`` (inside Lightning's ``.ckpt``, or as :data:`STATE_FILE` in an HF checkpoint folder). Any state a
mitigation returns survives it: tensors, generator states (``torch.Generator.get_state()``, a uint8 tensor), numbers,
strings, lists and dicts of them. It loads with ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from llm_limits.mitigations.base import Batch, Mitigation, StepContext
from llm_limits.trainers.build.data import real_tokens
from llm_limits.trainers.recipe.errors import UserError, check_finite

STATE_FILE = "llm_limits_state.pt"
"""The driver's state in an HF checkpoint folder (``checkpoint-N/``); Lightning keeps the same dict in its .ckpt."""


class HookDriver:
    """The enabled mitigations of a run, and what the run knows at each step (tokens seen, pending metrics)."""

    def __init__(self, mitigations: list[Mitigation], *, max_tokens: int | None = 0) -> None:
        self.mitigations = [m for m in mitigations if m.enabled]
        self.max_tokens = int(max_tokens or 0)
        self.tokens_seen = 0
        """Non-padding training tokens consumed so far, summed over ranks (after ``transform_batch``)."""
        self.pending: dict[str, float] = {}
        """Scalars the hooks logged since the backend last took them (:meth:`pop_pending`)."""
        self.loss_modules: dict[str, torch.nn.Module] = {}
        self._prepared = False

    # --- once, before the optimizer ----------------------------------------------------------------------------
    @classmethod
    def prepare(
        cls, model: torch.nn.Module, mitigations: list[Mitigation], tokenizer: Any = None, *, max_tokens: int | None = 0
    ) -> tuple[torch.nn.Module, "HookDriver"]:
        """A driver for ``mitigations`` and the model after their ``setup`` hooks (each called once)."""
        hooks = cls(mitigations, max_tokens=max_tokens)
        return hooks.setup(model, tokenizer), hooks

    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
        """Each enabled mitigation's ``setup``, in recipe order, then its ``loss_module``. Once per driver: a second
        call is a bug in the caller (a mitigation that patches attention would patch it twice)."""
        if self._prepared:
            raise RuntimeError("HookDriver.setup called twice: each mitigation's setup runs exactly once per run")
        self._prepared = True
        for m in self.mitigations:
            try:
                model = m.setup(model, tokenizer)
            except ValueError as e:  # e.g. an architecture the mitigation cannot patch
                raise UserError(f"mitigations: {m.name}: {e}") from None
        self.loss_modules = {m.name: mod for m in self.mitigations if (mod := m.loss_module()) is not None}
        return model

    # --- per micro-batch ---------------------------------------------------------------------------------------
    def context(self, step: int, max_steps: int, *, rank: int = 0, world_size: int = 1) -> StepContext:
        """What every hook sees at this micro-batch; the same fields on both backends."""
        return StepContext(step=int(step), max_steps=int(max_steps), tokens_seen=int(self.tokens_seen),
                           max_tokens=self.max_tokens, log=self.log, rank=int(rank), world_size=int(world_size))

    def log(self, name: str, value: float) -> None:
        """``ctx.log``: a scalar metric at this step, taken by the backend's logger."""
        self.pending[name] = float(value)

    def pop_pending(self) -> dict[str, float]:
        out, self.pending = self.pending, {}
        return out

    def transform_batch(self, batch: Batch, ctx: StepContext) -> Batch:
        """Each mitigation's ``transform_batch`` in recipe order, each seeing the previous one's output."""
        for m in self.mitigations:
            try:
                batch = m.transform_batch(batch, ctx)
            except ValueError as e:  # the recipe's knobs do not fit its data (e.g. a warmup shorter than a needle row)
                raise UserError(f"mitigations: {m.name} at step {ctx.step}: {e}") from None
        return batch

    @property
    def reads_outputs(self) -> bool:
        """Whether any ``extra_loss`` is implemented (a backend that must ask for the outputs separately asks then)."""
        return any(type(m).extra_loss is not Mitigation.extra_loss for m in self.mitigations)

    @property
    def needs_hidden_states(self) -> bool:
        return any(getattr(m, "needs_hidden_states", False) for m in self.mitigations)

    def add_extra_losses(self, loss: torch.Tensor, outputs: Any, batch: Batch, ctx: StepContext) -> torch.Tensor:
        """The LM loss plus every non-``None`` ``extra_loss`` (each logged as ``<name>/extra_loss``); a non-finite
        total stops the run in one line before the optimizer applies it."""
        for m in self.mitigations:
            extra = m.extra_loss(outputs, batch, ctx)
            if extra is not None:
                loss = loss + extra
                self.pending[f"{m.name}/extra_loss"] = float(extra.detach())
        check_finite(loss, ctx.step)
        return loss

    def count_tokens(self, batch: Batch, world_size: int) -> int:
        """Add this micro-batch's non-padding tokens (every rank's batch has the same shape) to :attr:`tokens_seen`."""
        self.tokens_seen += real_tokens(batch) * int(world_size)
        return self.tokens_seen

    # --- RL ------------------------------------------------------------------------------------------------------
    def reward_fns(self) -> list[Callable[..., list[float]]]:
        return [f for m in self.mitigations for f in m.reward_fns()]

    @property
    def gives_step_rewards(self) -> bool:
        return any(type(m).step_rewards is not Mitigation.step_rewards for m in self.mitigations)

    def step_rewards(self, prompts: list[str], completions: list[str], **columns: Any) -> list[list[tuple[int, float]]] | None:
        """The first mitigation's non-``None`` step rewards (DeepSeekMath process supervision), else ``None``."""
        for m in self.mitigations:
            steps = m.step_rewards(prompts, completions, **columns)
            if steps is not None:
                return steps
        return None

    # --- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every mitigation's state and the token count: what a resumed run needs to continue exactly."""
        return {"mitigations": {m.name: m.state_dict() for m in self.mitigations}, "tokens_seen": int(self.tokens_seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.mitigations:
            if m.name in state.get("mitigations", {}):
                m.load_state_dict(state["mitigations"][m.name])
        self.tokens_seen = int(state.get("tokens_seen", 0))


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a state dict (the driver's, plus what a backend adds) with ``torch.save``, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, Any]:
    """Read what :func:`save_state` wrote (tensors and plain Python values only: ``weights_only``)."""
    return torch.load(path, weights_only=True)
