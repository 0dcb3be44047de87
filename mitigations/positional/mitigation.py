"""Positional curricula against context compression: four parts, each switchable on its own.

``transform_batch`` applies, in order: position-balanced needles (IN2) -> sequence-length warmup (truncation) ->
PoSE position ids. ``setup`` installs Scalable-Softmax attention (log-length logit scaling) when asked. The math
lives in :mod:`mitigations.positional.core`; this module only holds the config, the random state and the adapters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

import torch

from llm_limits.mitigations.base import Batch, Mitigation, MitigationConfig, Need, StepContext
from llm_limits.mitigations.positional.core import (
    CHUNK_LENGTHS,
    SCHEDULES,
    balance_needles,
    curriculum_seq_len,
    needle_depth,
    pose_position_ids,
    ssmax_attention,
    ssmax_init,
    truncate_batch,
)

SSMAX_ATTENTION = "llm_limits_ssmax"
"""Name under which the SSMax attention (and its mask builder) is registered in transformers' interfaces."""

SSMAX_PARAM = "ssmax_s"
"""Attribute (and state-dict key suffix) of the learnable ``s`` on each attention module."""

HIST_BUCKETS = 8
"""Buckets of the covered-position histogram summary logged every ``histogram_every`` steps."""


# --- config --------------------------------------------------------------------------------------------------------
@dataclass
class WarmupConfig:
    """Sequence-length warmup (DeepSpeed curriculum learning, arXiv 2108.06084)."""

    enabled: bool = False
    """Truncate batches to a length that grows from ``min_len`` to ``max_len``."""
    min_len: int = 64
    """Sequence length at the start of the warmup (DeepSpeed suggests 64 or 8x smaller than the full length)."""
    max_len: int | None = None
    """Length reached when the warmup ends; None = the batch's own length (the data's ``seq_len``)."""
    schedule: Literal["linear", "root", "discrete"] = "linear"
    """``linear``; ``root`` (fast early growth: ``(progress) ** (1/root_degree)``); ``discrete`` (step function)."""
    root_degree: int = 2
    """Root of the ``root`` schedule (DeepSpeed uses 2)."""
    warmup_steps: int | None = None
    """Steps the warmup lasts (``count_in: steps``); None = the whole run (``trainer.max_steps``)."""
    count_in: Literal["steps", "tokens"] = "steps"
    """Measure warmup progress in optimizer steps or in training tokens seen (``warmup_tokens``)."""
    warmup_tokens: int | None = None
    """Tokens (non-padding, over all ranks) the warmup lasts; required with ``count_in: tokens``."""
    multiple_of: int = 8
    """Round the length down to a multiple of this (8 for tensor cores; never below ``min_len``)."""
    discrete_lengths: tuple[int, ...] = ()
    """``discrete`` schedule: the lengths, e.g. [64, 128, 256]; capped at ``max_len``, not rounded."""
    discrete_steps: tuple[int, ...] = ()
    """``discrete`` schedule: length i is used while step (or tokens) < discrete_steps[i]; one fewer than lengths."""

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"warmup.schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.count_in not in ("steps", "tokens"):
            raise ValueError(f"warmup.count_in must be steps or tokens (got {self.count_in!r})")
        if self.min_len < 1:
            raise ValueError(f"warmup.min_len must be >= 1 (got {self.min_len})")
        if self.max_len is not None and self.max_len < self.min_len:
            raise ValueError(f"warmup.max_len must be >= warmup.min_len (got {self.max_len} < {self.min_len})")
        for name in ("root_degree", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"warmup.{name} must be >= 1 (got {getattr(self, name)})")
        if self.warmup_steps is not None and self.warmup_steps < 1:
            raise ValueError(f"warmup.warmup_steps must be >= 1 or null (got {self.warmup_steps})")
        if self.count_in == "tokens" and (self.warmup_tokens is None or self.warmup_tokens < 1):
            raise ValueError(f"warmup.warmup_tokens must be >= 1 with count_in: tokens (got {self.warmup_tokens})")
        self.discrete_lengths = tuple(self.discrete_lengths)
        self.discrete_steps = tuple(self.discrete_steps)
        if self.schedule == "discrete":
            if not self.discrete_lengths or len(self.discrete_steps) != len(self.discrete_lengths) - 1:
                raise ValueError(
                    "warmup.discrete_steps must have one entry fewer than warmup.discrete_lengths "
                    f"(got {len(self.discrete_steps)} steps for {len(self.discrete_lengths)} lengths)"
                )
            if min(self.discrete_lengths) < 1:
                raise ValueError(f"warmup.discrete_lengths must all be >= 1 (got {list(self.discrete_lengths)})")
            if any(b <= a for a, b in zip(self.discrete_steps, self.discrete_steps[1:])):
                raise ValueError(f"warmup.discrete_steps must be increasing (got {list(self.discrete_steps)})")


@dataclass
class PoseConfig:
    """Positional skip-wise training (PoSE, arXiv 2309.10400)."""

    enabled: bool = False
    """Give each training window position ids that skip, so they cover ``target_len``."""
    target_len: int | None = None
    """Context length the ids cover (the length you want to serve); None = the model's
    ``max_position_embeddings``. Typically 4-16x the training window, with RoPE scaling in ``model.config``."""
    num_chunks: int = 2
    """Chunks per window, each with its own skip (the paper finds 2 best)."""
    chunk_lengths: Literal["authors", "random", "equal"] = "authors"
    """``authors``: first chunk ~ U{1..ceil(window/2)} as in the PoSE code; ``random``: every cut point uniform;
    ``equal``: even split. Every chunk has >= 1 token."""
    seed: int | None = field(default=None, metadata={"seed_offset": 0})
    """Seed of PoSE's own random generator (skips and cut points; resampled per example). ``None`` (the default): the
    recipe's ``seed`` (+0), so runs of an ablation at different seeds draw different skips; set it to fix the draws
    across seeds."""

    def __post_init__(self) -> None:
        if self.target_len is not None and self.target_len < 2:
            raise ValueError(f"pose.target_len must be >= 2 or null (got {self.target_len})")
        if self.num_chunks < 1:
            raise ValueError(f"pose.num_chunks must be >= 1 (got {self.num_chunks})")
        if self.chunk_lengths not in CHUNK_LENGTHS:
            known = ", ".join(CHUNK_LENGTHS)
            raise ValueError(f"pose.chunk_lengths must be one of {known} (got {self.chunk_lengths!r})")


@dataclass
class BalancedConfig:
    """Position-balanced needles (IN2 training, arXiv 2404.16811)."""

    enabled: bool = False
    """Move each structured row's needle to a uniformly random depth of its haystack (plain rows untouched)."""
    seed: int | None = field(default=None, metadata={"seed_offset": 1})
    """Seed of the needle placement's own random generator. ``None`` (the default): the recipe's ``seed`` + 1 (so it
    differs from PoSE's draws in one run and varies across seeds); set it to fix the placement across seeds."""


@dataclass
class LogScalingConfig:
    """Scalable-Softmax: attention logits times ``s * log(n_keys)`` (arXiv 2501.19399)."""

    enabled: bool = False
    """Switch the model's attention to SSMax (llama, qwen2 and other q/k/v/o attentions)."""
    per_head: bool = False
    """One learnable ``s`` per attention head instead of one per layer."""
    init_len: int | None = None
    """Keys at which ``s * log(n) == 1`` at initialisation (``s = 1 / log(init_len)``); None = the training window
    (the first batch's length, before the warmup cuts it), so training starts at standard attention."""

    def __post_init__(self) -> None:
        if self.init_len is not None and self.init_len < 2:
            raise ValueError(f"log_scaling.init_len must be >= 2 or null (got {self.init_len})")


@dataclass
class PositionalConfig(MitigationConfig):
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    """Sequence-length warmup (curriculum on the training length)."""
    pose: PoseConfig = field(default_factory=PoseConfig)
    """PoSE position ids covering a longer target length."""
    balanced: BalancedConfig = field(default_factory=BalancedConfig)
    """Needles placed at uniformly random depths."""
    log_scaling: LogScalingConfig = field(default_factory=LogScalingConfig)
    """SSMax log-length attention scaling."""
    histogram_every: int = 50
    """Log a summary of the position ids trained on so far every N steps (0 = never)."""

    def __post_init__(self) -> None:
        if self.histogram_every < 0:
            raise ValueError(f"histogram_every must be >= 0 (got {self.histogram_every})")


# --- the hook object -----------------------------------------------------------------------------------------------
def _seed(part: Any) -> int:
    """A part's seed: its own, or (left ``None``) its ``seed_offset``, what the recipe's seed 0 derives."""
    if part.seed is not None:
        return int(part.seed)
    return int(type(part).__dataclass_fields__["seed"].metadata.get("seed_offset", 0))


class Positional(Mitigation):
    name = "positional"
    summary = "positional curricula: seq-len warmup, PoSE ids, position-balanced needles, SSMax log-length attention"
    limit = "context"
    Config = PositionalConfig

    def __init__(self, config: PositionalConfig | None = None, **injected: Any) -> None:
        super().__init__(config, **injected)
        cfg: PositionalConfig = self.config
        # Seeds left None are filled from the recipe's seed when the recipe is resolved (trainers/recipe/schema.py
        # derive_seeds); a config built in Python without one draws as recipe seed 0 would.
        self.pose_generator = torch.Generator().manual_seed(_seed(cfg.pose))
        self.balanced_generator = torch.Generator().manual_seed(_seed(cfg.balanced))
        self.calls = 0
        """transform_batch calls so far."""
        self.histogram = torch.zeros(0, dtype=torch.long)
        """Non-padding tokens trained at each position id so far."""
        self.pose_target: int | None = cfg.pose.target_len
        self.ssmax_init_len: int | None = cfg.log_scaling.init_len
        """The length ``s`` was initialised for; None until known (set on the first batch when ``init_len`` is null)."""
        self.ssmax_modules: list[torch.nn.Module] = []

    def needs(self) -> tuple[Need, ...]:
        """PoSE feeds skipped position ids and SSMax is defined on q/k attention with rotary positions: both need RoPE
        (a learned position table has no entries past its end, and no sense in skipping). PoSE's ``target_len`` is the
        range of position ids it feeds.

        >>> Positional(PositionalConfig(pose=PoseConfig(enabled=True, target_len=512))).needs()
        (Need(kind='rotary', field='pose', value=None), Need(kind='positions', field='pose.target_len', value=512))
        """
        cfg: PositionalConfig = self.config
        out: list[Need] = []
        if cfg.enabled and cfg.pose.enabled:
            out.append(Need("rotary", "pose"))
            if cfg.pose.target_len is not None:
                out.append(Need("positions", "pose.target_len", cfg.pose.target_len))
        if cfg.enabled and cfg.log_scaling.enabled:
            out.append(Need("rotary", "log_scaling"))
        return tuple(out)

    def rewrites_positions(self) -> bool:
        cfg: PositionalConfig = self.config
        return cfg.enabled and (cfg.warmup.enabled or cfg.pose.enabled or cfg.balanced.enabled)

    # --- setup ---------------------------------------------------------------------------------------------------
    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
        cfg: PositionalConfig = self.config
        if cfg.pose.enabled and self.pose_target is None:
            self.pose_target = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if self.pose_target is None:
                raise ValueError("positional.pose.target_len: the model has no max_position_embeddings; set it")
        if cfg.log_scaling.enabled:
            init = ssmax_init(self.ssmax_init_len) if self.ssmax_init_len else _PROVISIONAL_S
            self.ssmax_modules = attach_ssmax(model, per_head=cfg.log_scaling.per_head, init=init)
        return model

    # --- per batch -----------------------------------------------------------------------------------------------
    def transform_batch(self, batch: Batch, ctx: StepContext) -> Batch:
        cfg: PositionalConfig = self.config
        out = dict(batch)
        seq = int(out["input_ids"].shape[1])
        if self.calls == 0:
            for part in ("warmup", "pose", "balanced", "log_scaling"):
                ctx.log(f"positional/{part}_enabled", float(getattr(cfg, part).enabled))
        self.calls += 1

        if cfg.log_scaling.enabled and self.ssmax_modules:
            if self.ssmax_init_len is None:  # init_len: null = the training window, known at the first batch
                self.ssmax_init_len = seq
                with torch.no_grad():
                    for m in self.ssmax_modules:
                        getattr(m, SSMAX_PARAM).fill_(ssmax_init(max(seq, 2)))
            ctx.log("positional/ssmax_s_mean", _mean_s(self.ssmax_modules))

        if cfg.balanced.enabled:
            out = balance_needles(out, self.balanced_generator)
            depth = needle_depth(out)
            if not bool(depth.isnan().all()):
                ctx.log("positional/needle_depth_mean", float(depth.nanmean()))

        if cfg.warmup.enabled:
            length = self.seq_len_at(ctx, seq)
            out = truncate_batch(out, length)
            ctx.log("positional/seq_len", float(length))

        if cfg.pose.enabled:
            out = self._apply_pose(out, ctx)

        if cfg.histogram_every:
            self._count_positions(out)
            if ctx.step % cfg.histogram_every == 0:
                for name, value in self.histogram_summary().items():
                    ctx.log(f"positional/{name}", value)
        return out

    def seq_len_at(self, ctx: StepContext, batch_len: int) -> int:
        """The warmup's length for this step (or token count) on a batch of ``batch_len`` tokens."""
        w = self.config.warmup
        max_len = batch_len if w.max_len is None else min(w.max_len, batch_len)
        min_len = min(w.min_len, max_len)
        if w.count_in == "tokens":
            progress, total = ctx.tokens_seen, int(w.warmup_tokens or 0)
        else:
            progress, total = ctx.step, w.warmup_steps if w.warmup_steps is not None else ctx.max_steps
        return curriculum_seq_len(
            progress, total, min_len, max_len, w.schedule, w.root_degree, w.multiple_of,
            w.discrete_lengths, w.discrete_steps,
        )  # fmt: skip

    def _apply_pose(self, out: Batch, ctx: StepContext) -> Batch:
        p = self.config.pose
        ids = out["input_ids"]
        b, window = ids.shape[:2]
        target = self.pose_target
        if target is None:
            raise ValueError("positional.pose.target_len is null and setup() was not called to read the model's")
        if target < window:
            raise ValueError(f"positional.pose.target_len ({target}) must be >= the training window ({window})")
        chunks = min(p.num_chunks, window)
        pos = torch.stack(
            [pose_position_ids(window, target, chunks, self.pose_generator, p.chunk_lengths) for _ in range(b)]
        )
        out["position_ids"] = pos.to(ids.device)
        # transformers reads skipping ids with attention_mask=None as packed sequences and blocks attention across
        # the skips; an explicit all-ones mask keeps the window one causal sequence
        if out.get("attention_mask") is None:
            out["attention_mask"] = torch.ones_like(ids)
        ctx.log("positional/pose_max_position_id", float(pos.max()))
        ctx.log("positional/pose_coverage", float(torch.unique(pos).numel()) / target)
        return out

    # --- position histogram --------------------------------------------------------------------------------------
    def _count_positions(self, out: Batch) -> None:
        ids = out["input_ids"]
        pos = out.get("position_ids")
        pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1) if pos is None else pos.detach().cpu()
        mask = out.get("attention_mask")
        if mask is not None:
            pos = pos[mask.detach().cpu().bool()]
        counts = torch.bincount(pos.flatten().long())
        if len(counts) > len(self.histogram):
            grow = torch.zeros(len(counts) - len(self.histogram), dtype=torch.long)
            self.histogram = torch.cat([self.histogram, grow])
        self.histogram[: len(counts)] += counts

    def histogram_summary(self) -> dict[str, float]:
        """Over ``[0, R)`` (R = the PoSE target when PoSE is on, else the largest position trained + 1):
        ``pos_coverage`` (fraction of positions trained at least once), ``pos_balance`` (least-trained bucket / mean
        bucket; 1 = uniform) and ``pos_hist_bK`` (share of trained tokens in bucket K of ``HIST_BUCKETS``)."""
        hist = self.histogram
        span = max(len(hist), self.pose_target or 0) if self.config.pose.enabled else len(hist)
        if span == 0 or int(hist.sum()) == 0:
            return {}
        full = torch.zeros(span, dtype=torch.long)
        full[: len(hist)] = hist[:span]
        edges = [round(i * span / HIST_BUCKETS) for i in range(HIST_BUCKETS + 1)]
        buckets = torch.stack([full[a:b].sum() for a, b in zip(edges, edges[1:])]).double()
        total = float(buckets.sum())
        out = {"pos_coverage": float((full > 0).double().mean()), "pos_balance": float(buckets.min() / buckets.mean())}
        out.update({f"pos_hist_b{k}": float(v) / total for k, v in enumerate(buckets)})
        return out

    # --- resume --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "pose_generator": self.pose_generator.get_state(),
            "balanced_generator": self.balanced_generator.get_state(),
            "histogram": self.histogram.clone(),
            "pose_target": self.pose_target,
            "ssmax_init_len": self.ssmax_init_len,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
        if "pose_generator" in state:
            self.pose_generator.set_state(state["pose_generator"].clone())
        if "balanced_generator" in state:
            self.balanced_generator.set_state(state["balanced_generator"].clone())
        if "histogram" in state:
            self.histogram = state["histogram"].clone()
        self.pose_target = state.get("pose_target", self.pose_target)
        # s itself rides in the model's weights; knowing it was initialised stops the first batch re-initialising it
        self.ssmax_init_len = state.get("ssmax_init_len", self.ssmax_init_len)


# --- SSMax attention through transformers' attention interface ------------------------------------------------------
_PROVISIONAL_S = 1.0 / math.log(2048)
"""``s`` before the training window is known (``init_len: null``); replaced at the first batch."""


def attach_ssmax(model: torch.nn.Module, per_head: bool = False, init: float = _PROVISIONAL_S) -> list[torch.nn.Module]:
    """Register a learnable ``ssmax_s`` (``[1]`` or ``[heads]``, filled with ``init``) on every attention module of
    ``model`` and switch the model to the SSMax attention. Returns the modules. Raises ``ValueError`` naming the
    model type when no attention module dispatches through transformers' attention interface."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"positional.log_scaling: model type {model_type!r} soft-caps its attention logits, which SSMax "
            "attention does not implement"
        )
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    modules = [m for m in model.modules() if _is_interface_attention(m)]
    if not modules or can_switch is None or not can_switch():
        raise ValueError(
            f"positional.log_scaling: model type {model_type!r} has no attention modules that dispatch through "
            "transformers' attention interface (supported: llama, qwen2 and other q/k/v/o attentions such as "
            "mistral, qwen3)"
        )
    for m in modules:
        heads = _num_heads(m) if per_head else 1
        weight = m.q_proj.weight
        s = torch.nn.Parameter(torch.full((heads,), float(init), dtype=weight.dtype, device=weight.device))
        setattr(m, SSMAX_PARAM, s)
    register_ssmax_attention()
    model.set_attn_implementation(SSMAX_ATTENTION)
    return modules


def _is_interface_attention(m: torch.nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "num_key_value_groups"))


def _num_heads(m: torch.nn.Module) -> int:
    heads = getattr(getattr(m, "config", None), "num_attention_heads", None)
    return int(heads) if heads else m.q_proj.out_features // m.head_dim


def _mean_s(modules: list[torch.nn.Module]) -> float:
    with torch.no_grad():
        return float(torch.cat([getattr(m, SSMAX_PARAM).detach().float().flatten() for m in modules]).mean())


def register_ssmax_attention() -> None:
    """Register the SSMax attention function and its mask builder under ``SSMAX_ATTENTION`` (idempotent).

    Both are needed: transformers builds no mask at all (not even padding) for an attention name that its mask
    interface does not know, and SSMax must count each query's keys from the mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def ssmax_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
        kwargs["allow_is_causal_skip"] = False  # always a real [batch, 1, q, kv] bool mask: the key counts come from it
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(SSMAX_ATTENTION, ssmax_attention_forward)
    AttentionMaskInterface.register(SSMAX_ATTENTION, ssmax_mask)


def ssmax_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` ``[batch, heads, q, dim]``, ``key``/``value``
    ``[batch, kv_heads, kv, dim]`` -> (``[batch, q, heads, dim]``, no weights). A module without ``ssmax_s`` (one
    that :func:`attach_ssmax` did not see) gets standard attention."""
    if kwargs.get("softcap") is not None:
        raise ValueError("SSMax attention does not support softcap")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = ssmax_attention(
        query, key, value, attention_mask, getattr(module, SSMAX_PARAM, None), scaling=scaling, dropout=dropout,
        is_causal=causal,
    )  # fmt: skip
    return out, None
