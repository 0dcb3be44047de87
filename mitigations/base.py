"""The mitigation interface: a pure functional core (``core.py``) behind a small hook object.

A backend (``trainers/``) builds each mitigation from its recipe entry and calls the hooks in this order:

0. ``transform_records(records, seed=...)`` once, when a backend builds a prompt/completion training set (the TRL
   backend's SFT): the records the trainer sees, e.g. retrieval contexts with distractors (RAFT) rebuilt from each
   record's fields. Data-level, before tokenization; the default returns the records unchanged.
1. ``setup(model, tokenizer)`` once, after the model is built and before the optimizer is made; it may change the
   model in place (e.g. swap the attention function) and returns it. Then ``loss_module()`` once: an ``nn.Module``
   of learnable loss parameters (a contrastive temperature, a bias) that the backend trains with the model (its
   parameters join the optimizer) and saves in checkpoints; ``None`` (the default) when there are none.
2. per optimizer micro-step: ``transform_batch(batch, ctx)`` (in list order, each sees the previous one's output),
   the forward pass, then ``extra_loss(outputs, batch, ctx)`` whose non-``None`` results are added to the LM loss.
3. ``reward_fns()`` when an RL backend builds its reward list (TRL's ``reward_funcs`` signature), and
   ``step_rewards(prompts, completions, **columns)`` after each generation when the mitigation asks for step-level
   advantages (DeepSeekMath's process supervision): ``None`` means "sequence-level advantages from the rewards".
4. ``state_dict()`` into every checkpoint and ``load_state_dict()`` on resume, so a curriculum continues exactly.

A mitigation whose ``extra_loss`` reads hidden states sets the class attribute ``needs_hidden_states = True``; the
backend then runs the main forward with ``output_hidden_states=True`` whenever any enabled mitigation asks for it.

This module imports torch only: never Lightning, TRL, ``trainers`` or ``evals`` (the dependency rule of
docs/architecture.md). Domain pieces (a verifier, a retriever) are injected by ``trainers/`` through the
constructor's keyword arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch

Batch = dict[str, torch.Tensor]
"""A causal-LM batch: ``input_ids``, ``attention_mask``, ``labels`` each ``[batch, seq]``; optional
``position_ids`` ``[batch, seq]``. Question/answer rows also carry metadata ``[batch]`` int tensors
``context_start``, ``context_end`` (token span of the context) and ``needle_start``, ``needle_end`` (token span of the
answer-bearing needle), all -1 on plain text rows; the backend drops them before the forward pass."""

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")
"""The batch keys a model's forward receives; every other key is metadata for the hooks."""


def _no_log(name: str, value: float) -> None:
    return None


@dataclass(frozen=True)
class StepContext:
    """What a hook may know about the run at one training step. Frozen: hooks read it, never write it."""

    step: int
    """Optimizer steps completed so far (0 at the first batch)."""
    max_steps: int
    """Optimizer steps the run will take in total."""
    tokens_seen: int = 0
    """Non-padding training tokens consumed before this batch, summed over all ranks."""
    max_tokens: int = 0
    """The run's token budget (``trainer.max_tokens``), 0 when the run is measured in steps."""
    log: Callable[[str, float], None] = field(default=_no_log, compare=False, repr=False)
    """``log("positional/seq_len", 128.0)``: a scalar metric at this step (the backend prefixes nothing)."""
    rank: int = 0
    world_size: int = 1

    @property
    def progress(self) -> float:
        """Fraction of the run done, in [0, 1]."""
        return min(1.0, self.step / max(1, self.max_steps))


@dataclass(frozen=True)
class Need:
    """One thing a mitigation needs from the model, declared (not discovered by a crash): the recipe check in
    ``trainers/`` compares it with the built model's config before the run directory exists.

    >>> Need("rotary", "pose")
    Need(kind='rotary', field='pose', value=None)
    """

    kind: Literal["rotary", "positions", "vision", "chat_template"]
    """``rotary``: rotary position embeddings (RoPE), which can be given skipped or rescaled position ids;
    ``positions``: position ids up to ``value`` (a learned table must be that long; RoPE past its nominal window is
    allowed with a warning); ``vision``: a vision tower; ``chat_template``: a tokenizer with a chat template."""
    field: str
    """The knob that asks for it, inside the mitigation's recipe entry (``pose``, ``pose.target_len``), "" for the
    mitigation as a whole."""
    value: int | None = None
    """``positions``: how many position ids the mitigation feeds the model."""


@dataclass
class MitigationConfig:
    """Fields every mitigation's config has. A mitigation's own ``Config`` subclasses this dataclass, one typed field
    per knob with its doc string under it."""

    enabled: bool = True
    """Switch the whole mitigation off without deleting it from the recipe (ablations flip this)."""


class Mitigation:
    """Base class: every hook is a no-op, so a mitigation overrides only what it needs."""

    name: ClassVar[str] = "base"
    """Registry key, the ``name:`` of the recipe entry."""
    summary: ClassVar[str] = ""
    """One line for ``llm-limits ls``."""
    limit: ClassVar[str] = ""
    """The limit this mitigation addresses (``context``, ``reasoning``, ``retrieval``, ``hallucination``,
    ``multimodal``); its paired evals declare the same name."""
    Config: ClassVar[type[MitigationConfig]] = MitigationConfig
    needs_hidden_states: ClassVar[bool] = False
    """Whether ``extra_loss`` reads ``outputs.hidden_states``: the backend passes ``output_hidden_states=True`` to the
    main forward when any enabled mitigation sets it."""

    def __init__(self, config: MitigationConfig | None = None, **injected: Any) -> None:
        self.config = config if config is not None else self.Config()
        self.injected = injected

    def needs(self) -> tuple[Need, ...]:
        """What the enabled mitigation needs from the model (rotary positions, a position range, a vision tower, a chat
        template); the recipe check refuses a model without it in one line. The default: nothing."""
        return ()

    def rewrites_positions(self) -> bool:
        """Whether ``transform_batch`` rewrites ``position_ids`` or moves or cuts tokens inside a row. Such a
        mitigation would undo ``data.packing: per_document`` (whose position ids mark where documents start), so
        the recipe check refuses the pair."""
        return False

    # --- hooks -------------------------------------------------------------------------------------------------
    def transform_records(self, records: list[dict[str, Any]], *, seed: int) -> list[dict[str, Any]]:
        """The prompt/completion records to train on, built from ``records`` (a task's records, every field kept);
        must not modify them in place. ``seed`` is the run's seed, so the same recipe builds the same data."""
        return records

    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
        """Called once before the optimizer is built. Returns the (possibly modified) model."""
        return model

    def transform_batch(self, batch: Batch, ctx: StepContext) -> Batch:
        """Return the batch the model will see at this step (``[batch, seq]`` tensors). Must not modify in place."""
        return batch

    def extra_loss(self, outputs: Any, batch: Batch, ctx: StepContext) -> torch.Tensor | None:
        """A scalar added to the LM loss, or ``None``. ``outputs`` is the model's output (``.loss``, ``.logits``
        ``[batch, seq, vocab]``, hidden states when the mitigation asked for them)."""
        return None

    def reward_fns(self) -> list[Callable[..., list[float]]]:
        """Reward functions in TRL's signature ``f(completions, **kwargs) -> list[float]``."""
        return []

    def step_rewards(self, prompts: list[str], completions: list[str], **columns: Any) -> list[list[tuple[int, float]]] | None:
        """Per completion, its steps as ``(end_char, reward)``: ``end_char`` is the index in the completion string of
        the character that closes the step (its separator, or the last character for the final step). An RL backend
        that gets a list turns it into per-token advantages (each token gets the sum of the group-normalised rewards
        of the steps that end at or after it); ``None`` (the default) keeps sequence-level advantages."""
        return None

    def loss_module(self) -> torch.nn.Module | None:
        """Learnable loss parameters (e.g. a contrastive temperature), or ``None``. The backend calls it once after
        ``setup``, adds the module's parameters to the optimizer and saves them in checkpoints with the model; the same
        module must be returned on every call."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly after a resume (curriculum position, counters, RNG state)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        return None

    # --- helpers -----------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(getattr(self.config, "enabled", True))

    def describe(self) -> dict[str, Any]:
        """The config as a plain dict (for the run report and wandb config)."""
        return dataclasses.asdict(self.config)


def hooks_overridden(mitigation: Mitigation) -> list[str]:
    """Names of the hooks a mitigation implements (for logs and ``llm-limits ls``)."""
    names = ["transform_records", "setup", "transform_batch", "extra_loss", "reward_fns", "step_rewards",
             "loss_module", "state_dict", "load_state_dict"]
    return [n for n in names if getattr(type(mitigation), n) is not getattr(Mitigation, n)]
