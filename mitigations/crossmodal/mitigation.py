"""Cross-modal alignment against the ``multimodal`` limit: auxiliary losses that pull an image's embedding towards
its caption's, in the language model's own hidden-state space, plus a data option that breaks question-only answer
priors.

Per micro-step, :meth:`CrossModal.extra_loss` pools the image tokens' hidden states of the main forward (the image
embedding) and runs the captions alone through the same model (the text embedding), exactly as ``evals/vlm.py``
defines both. It adds ``w(t) * (contrastive_weight * contrastive + gap_weight * gap_term)`` to the LM loss: CLIP's
InfoNCE or SigLIP's sigmoid loss (rows sharing a caption are all positives), and optionally Wang & Isola's
alignment + uniformity or the centroid distance against the modality gap. :meth:`CrossModal.transform_records`
answer-balances multiple-choice records when asked. The math lives in :mod:`mitigations.crossmodal.core`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from llm_limits.mitigations.base import Batch, Mitigation, MitigationConfig, Need, StepContext
from llm_limits.mitigations.crossmodal.core import (
    LOGIT_SCALE_MAX,
    SCHEDULES,
    alignment,
    balance_answers,
    centroid_gap,
    infonce,
    loss_weight,
    mean_pool,
    siglip,
    uniformity,
)

CONTRASTIVE = ("infonce", "siglip", "none")
GAPS = ("none", "align_uniform", "centroid")
IMAGE_KEYS = ("pixel_values", "image_mask")
TEXT_KEYS = ("caption_input_ids", "caption_attention_mask", "caption_group")


# --- config --------------------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class CrossModalConfig(MitigationConfig):
    contrastive: Literal["infonce", "siglip", "none"] = "infonce"
    """The contrastive loss between image and caption embeddings: ``infonce`` (CLIP, arXiv 2103.00020), ``siglip``
    (arXiv 2303.15343) or ``none``. Rows with the same caption are all positives of each other."""
    contrastive_weight: float = 1.0
    """Weight of the contrastive loss inside the auxiliary total (>= 0)."""
    gap: Literal["none", "align_uniform", "centroid"] = "none"
    """A term against the modality gap: ``align_uniform`` (alignment of each image with its caption plus uniformity
    of all image and caption embeddings together, arXiv 2405.18570), ``centroid`` (squared distance of the two
    modalities' normalised centroids, arXiv 2203.02053) or ``none``."""
    gap_weight: float = 1.0
    """Weight of the gap term inside the auxiliary total (>= 0)."""
    uniformity_t: float = 2.0
    """``t`` of the uniformity term, ``log mean exp(-t ||x_i - x_j||^2)`` (Wang & Isola use 2)."""
    alignment_alpha: float = 2.0
    """``alpha`` of the alignment term, ``mean ||x_i - y_i||^alpha`` (Wang & Isola use 2)."""
    schedule: Literal["constant", "linear_warmup"] = "constant"
    """Factor ``w(t)`` on the whole auxiliary loss: ``constant`` (1) or ``linear_warmup`` (0 -> 1 over the first
    ``warmup_fraction`` of the run), so the LM loss shapes the projector before the contrastive pull starts."""
    warmup_fraction: float = 0.1
    """Fraction of the run (``step / max_steps``) the ``linear_warmup`` ramp lasts, in [0, 1]."""
    layer: int = -1
    """Which hidden state both embeddings pool: ``-1`` the last layer, ``0`` the input embeddings (for the image
    tokens, the projector's output); any index into ``hidden_states`` (``num_layers + 1`` entries)."""
    infonce_init_temperature: float = 0.07
    """InfoNCE's initial temperature (CLIP: 0.07, i.e. ``logit_scale = log(1/0.07)``); in [0.01, 1], the range
    CLIP's clamp on ``logit_scale`` allows."""
    siglip_init_t_prime: float = math.log(10)
    """SigLIP's initial ``t'`` (the logit scale is ``exp(t')``; the paper starts at ``log 10``)."""
    siglip_init_bias: float = -10.0
    """SigLIP's initial bias ``b`` (the paper's -10, so the loss starts near its value for all-negative pairs)."""
    balance_answers: bool = False
    """Answer-balance the multiple-choice records before training (Goyal et al. 2017): per question text, oversample
    the rarer answers until every answer is equally frequent, so the question alone cannot decide the answer."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` (one line, naming the field) on a bad value."""
        if self.contrastive not in CONTRASTIVE:
            raise ValueError(f"contrastive: expected one of {', '.join(CONTRASTIVE)} (got {self.contrastive!r})")
        if self.gap not in GAPS:
            raise ValueError(f"gap: expected one of {', '.join(GAPS)} (got {self.gap!r})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        for name in ("contrastive_weight", "gap_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name}: expected a number >= 0 (got {value!r})")
        for name in ("uniformity_t", "alignment_alpha"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"{name}: expected a number > 0 (got {value!r})")
        if not _is_number(self.warmup_fraction) or not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction: expected a number in [0, 1] (got {self.warmup_fraction!r})")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer: expected an integer index into the hidden states (got {self.layer!r})")
        t = self.infonce_init_temperature
        if not _is_number(t) or not 0.01 <= t <= 1.0:
            raise ValueError(f"infonce_init_temperature: expected a number in [0.01, 1] (got {t!r}; CLIP clamps "
                             "logit_scale to [0, log 100])")
        for name in ("siglip_init_t_prime", "siglip_init_bias"):
            if not _is_number(getattr(self, name)):
                raise ValueError(f"{name}: expected a finite number (got {getattr(self, name)!r})")
        if not isinstance(self.balance_answers, bool):
            raise ValueError(f"balance_answers: expected true or false (got {self.balance_answers!r})")
        if self.contrastive == "none" and self.gap == "none" and not self.balance_answers:
            raise ValueError("contrastive: nothing to do with contrastive: none, gap: none and balance_answers: false "
                             "(turn on at least one)")


# --- learnable loss parameters -------------------------------------------------------------------------------------
class ContrastiveParams(torch.nn.Module):
    """The contrastive loss's learnable scalars: ``logit_scale`` (InfoNCE) or ``t_prime`` and ``bias`` (SigLIP),
    float32 0-d parameters. The backend trains them with the model and saves them in its checkpoints."""

    def __init__(self, kind: str, config: CrossModalConfig) -> None:
        super().__init__()
        self.kind = kind
        if kind == "infonce":
            self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1.0 / config.infonce_init_temperature)))
        elif kind == "siglip":
            self.t_prime = torch.nn.Parameter(torch.tensor(float(config.siglip_init_t_prime)))
            self.bias = torch.nn.Parameter(torch.tensor(float(config.siglip_init_bias)))
        else:
            raise ValueError(f"contrastive: no parameters for {kind!r}")

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


# --- the hook object -----------------------------------------------------------------------------------------------
class CrossModal(Mitigation):
    """Contrastive and modality-gap losses between pooled image and caption hidden states, plus answer balancing.

    Needs image batches (``pixel_values``, ``image_mask``, ``caption_input_ids``, ``caption_attention_mask``,
    ``caption_group``; see ``trainers/build/vlm.py``) and the main forward's hidden states (``needs_hidden_states``).
    Nothing is injected. The learnable temperature / bias live in :meth:`loss_module`, which the backend trains and
    checkpoints with the model, so :meth:`state_dict` has nothing extra to carry.
    """

    name = "crossmodal"
    summary = "CLIP/SigLIP contrastive + modality-gap losses on LM hidden states; answer-balanced multiple choice"
    limit = "multimodal"
    Config = CrossModalConfig
    needs_hidden_states = True

    def __init__(self, config: CrossModalConfig | None = None, **injected: Any) -> None:
        super().__init__(config, **injected)
        cfg: CrossModalConfig = self.config
        self._params = ContrastiveParams(cfg.contrastive, cfg) if cfg.contrastive != "none" else None
        self._model: Any = None
        self._tokenizer: Any = None

    def needs(self) -> tuple[Need, ...]:
        """Aligns images with text: a vision tower (a LLaVA-style model)."""
        return (Need("vision", ""),) if self.enabled else ()

    # --- hooks ---------------------------------------------------------------------------------------------------
    def transform_records(self, records: list[dict[str, Any]], *, seed: int) -> list[dict[str, Any]]:
        """:func:`~mitigations.crossmodal.core.balance_answers` when ``balance_answers`` is on, else ``records``."""
        if not self.enabled or not self.config.balance_answers:
            return records
        return balance_answers(records, seed)

    def setup(self, model: torch.nn.Module, tokenizer: Any = None) -> torch.nn.Module:
        """Keep the model (the caption-only forward of :meth:`extra_loss` runs through it) and return it unchanged."""
        self._model = model
        self._tokenizer = tokenizer
        return model

    def loss_module(self) -> torch.nn.Module | None:
        """:class:`ContrastiveParams` (``logit_scale``, or ``t_prime`` and ``bias``); ``None`` without a contrastive
        loss or when the mitigation is disabled."""
        return self._params if self.enabled else None

    def extra_loss(self, outputs: Any, batch: Batch, ctx: StepContext) -> torch.Tensor | None:
        """``w(progress) * (contrastive_weight * contrastive + gap_weight * gap_term)``, a scalar; ``None`` when only
        ``balance_answers`` is on. Logs ``crossmodal/{infonce|siglip}``, ``crossmodal/temperature`` (InfoNCE) or
        ``crossmodal/t`` and ``crossmodal/bias`` (SigLIP), ``crossmodal/alignment`` and ``crossmodal/uniformity``
        (``align_uniform``), and always ``crossmodal/gap`` (the batch's centroid distance ``sqrt(centroid_gap)``, in
        the unit of the ``multimodal`` eval's ``gap``), ``crossmodal/positive_cosine`` (mean cosine of each image with
        its caption), ``crossmodal/weight`` (w) and ``crossmodal/loss`` (the returned value). The caption forward runs
        even while ``w`` is 0, so every step uses the same parameters (DDP)."""
        cfg: CrossModalConfig = self.config
        if not self.enabled or (cfg.contrastive == "none" and cfg.gap == "none"):
            return None
        img, txt = self.embeddings(outputs, batch)
        group = batch["caption_group"].to(img.device).view(-1)
        positives = group[:, None] == group[None, :]

        total = img.new_zeros(())
        if cfg.contrastive != "none":
            p = {k: v.to(device=img.device, dtype=img.dtype) for k, v in self._params.named_parameters()}
            if cfg.contrastive == "infonce":
                con = infonce(img, txt, p["logit_scale"], positives)
                scale = p["logit_scale"].detach().clamp(0.0, LOGIT_SCALE_MAX).exp()
                ctx.log("crossmodal/temperature", float(1.0 / scale))
            else:
                con = siglip(img, txt, p["t_prime"], p["bias"], positives)
                ctx.log("crossmodal/t", float(p["t_prime"].detach().exp()))
                ctx.log("crossmodal/bias", float(p["bias"].detach()))
            ctx.log(f"crossmodal/{cfg.contrastive}", float(con.detach()))
            total = total + cfg.contrastive_weight * con
        if cfg.gap == "align_uniform":
            align = alignment(img, txt, cfg.alignment_alpha)
            unif = uniformity(torch.cat([img, txt]), cfg.uniformity_t)
            ctx.log("crossmodal/alignment", float(align.detach()))
            ctx.log("crossmodal/uniformity", float(unif.detach()))
            total = total + cfg.gap_weight * (align + unif)
        gap = centroid_gap(img, txt)
        if cfg.gap == "centroid":
            total = total + cfg.gap_weight * gap
        ctx.log("crossmodal/gap", math.sqrt(max(float(gap.detach()), 0.0)))  # Liang's distance, as eval/multimodal
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1).mean()
        ctx.log("crossmodal/positive_cosine", float(cos))
        w = loss_weight(1.0, cfg.schedule, cfg.warmup_fraction, ctx.progress)
        ctx.log("crossmodal/weight", w)
        total = w * total
        ctx.log("crossmodal/loss", float(total.detach()))
        return total

    # --- helpers -------------------------------------------------------------------------------------------------
    def embeddings(self, outputs: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image, text)`` embeddings ``[B, D]`` float32, not normalised, with gradients: the image tokens' hidden
        states of the main forward at ``layer``, mean-pooled, and the caption tokens' hidden states (``<bos>``
        excluded) of a caption-only forward of the model kept by :meth:`setup` — ``evals.vlm.embed_images`` /
        ``embed_texts`` without ``no_grad``."""
        missing = [k for k in IMAGE_KEYS if k not in batch]
        if missing:
            raise ValueError("crossmodal needs image batches (a multimodal task)")
        missing = [k for k in TEXT_KEYS if k not in batch]
        if missing:
            raise ValueError(f"crossmodal: the batch has no `{missing[0]}` (expected the caption fields the "
                             "vision-language data builder adds)")
        if self._model is None:
            raise ValueError("crossmodal: setup(model, tokenizer) was not called before extra_loss")
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None:
            raise ValueError("crossmodal: the model outputs carry no hidden_states (the backend must run the forward "
                             "with output_hidden_states=True when needs_hidden_states is set)")
        layer = self.config.layer
        if not -len(hidden) <= layer < len(hidden):
            raise ValueError(f"layer: {layer} is out of range for a model with {len(hidden)} hidden states")
        h = hidden[layer]
        img = mean_pool(h.float(), batch["image_mask"].to(h.device))

        ids = batch["caption_input_ids"].to(h.device)
        mask = batch["caption_attention_mask"].to(h.device)
        text_out = self._model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        pool = mask.clone()
        if self._tokenizer is None or getattr(self._tokenizer, "bos_token_id", None) is not None:
            pool[:, 0] = 0  # the <bos> state is the same for every caption
        txt = mean_pool(text_out.hidden_states[layer].float(), pool)
        return img, txt
