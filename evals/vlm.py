"""Vision-language model I/O shared by the multimodal tasks' users (the ``multimodal`` eval, the training data
builder in ``trainers/``): how an image becomes ``pixel_values``, how a prompt places the image tokens, how an image or
a caption becomes one embedding, and how a multiple-choice answer is scored.

Works on any LLaVA-style ``transformers`` model (``LlavaForConditionalGeneration``: a vision tower, a projector, a
language model; ``config.image_token_id``, ``config.vision_config``): the tiny ones built from a config here and a
user's local checkpoint alike. Nothing here trains anything.

Prompt format (one image, then the question; the answer follows ``"A: "``)::

    <image><image>...<image>\\nQ: which digit is this?\\nA: 7

with :attr:`ImageFormat.num_image_tokens` copies of the image token (LLaVA's processor expands ``<image>`` the same
way: the model replaces each copy by one projected patch feature). A "blind" prompt (the image removed) is
``"Q: ...\\nA: "``; "noise" keeps the image tokens and feeds an image of uniform random pixels.

Embeddings (the modality gap, cross-modal recall and the ``crossmodal`` losses all use these two; arXiv 2203.02053
measures the gap on the embeddings both towers share, and in a LLaVA-style model that shared space is the language
model's):

- image: the language model's hidden states at the image-token positions of ``<bos><image>...<image>``, mean-pooled;
- text: the language model's hidden states at the caption's tokens of ``<bos>caption``, mean-pooled (the caption is run
  alone: in a training row it would see the image, and an embedding of "the caption given the image" is not a text
  embedding).

``layer`` picks the hidden state: ``-1`` the last layer (the default), ``0`` the input embeddings (for the image that is
the projector's output).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

IMAGE_TOKEN = "<image>"
"""The image placeholder's text (LLaVA's; a tokenizer that lacks it gets it as an added special token)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's pixel normalisation (CLIP vision towers); SigLIP towers use 0.5 / 0.5."""


@dataclass(frozen=True)
class ImageFormat:
    """How one model wants its images and prompts."""

    image_size: int
    """Side of the square image the vision tower takes (pixels)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_image_tokens: int
    """Image-token copies per image in a prompt (= projected features per image)."""
    image_token_id: int
    image_token: str
    """The token's text in the tokenizer (``"<image>"``)."""


def is_vlm(model: Any) -> bool:
    """Whether ``model`` (possibly LoRA-wrapped) is a LLaVA-style vision-language model."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None and getattr(config, "image_token_id", None) is not None


def image_format(model: Any, tokenizer: Any) -> ImageFormat:
    """The :class:`ImageFormat` of a LLaVA-style ``model``; raises ``ValueError`` (one line) when ``model`` is not one
    or ``tokenizer`` lacks its image token. Pixel statistics come from the checkpoint's ``preprocessor_config.json``
    when the model was loaded from a directory that has one, else from the vision tower's family (CLIP / SigLIP)."""
    if not is_vlm(model):
        raise ValueError(f"model type {getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)!r} "
                         "is not a vision-language model (expected a LLaVA-style model with a vision_config)")
    config = model.config
    vision = config.vision_config
    size, patch = int(vision.image_size), int(vision.patch_size)
    patches = (size // patch) ** 2
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    has_cls = getattr(vision, "model_type", "") == "clip_vision_model"
    num_tokens = patches + (1 if has_cls and strategy == "full" else 0)
    mean, std = (CLIP_MEAN, CLIP_STD) if has_cls else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pre = Path(str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")) / "preprocessor_config.json"
    if pre.is_file():
        stored = json.loads(pre.read_text())
        mean = tuple(stored.get("image_mean", mean))
        std = tuple(stored.get("image_std", std))
    token_id = int(config.image_token_id)
    token = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
    if token is None or tokenizer.convert_tokens_to_ids(token) != token_id:
        raise ValueError(f"the tokenizer has no token for the model's image_token_id {token_id} "
                         f"(expected {IMAGE_TOKEN!r}; use the tokenizer saved with the model)")
    return ImageFormat(size, tuple(mean), tuple(std), num_tokens, token_id, token)


# --- images ------------------------------------------------------------------------------------------------------
def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` (grey) or ``[H, W, 3|4]`` array -> ``[H, W, 3]`` uint8. Floats are read as 0..1, integers as 0..255
    (digits' 0..16 must be scaled by their task first)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an image [H, W], [H, W, 3] or [H, W, 4] (got shape {tuple(a.shape)})")
    a = a[:, :, :3]
    if a.dtype.kind == "f":
        a = np.clip(np.round(a * 255.0), 0, 255)
    return a.astype(np.uint8)


def pixel_values(images: Sequence[np.ndarray], fmt: ImageFormat) -> torch.Tensor:
    """``[B, 3, S, S]`` float32: each image resized (bilinear, Pillow) to ``fmt.image_size``, scaled to 0..1 and
    normalised by ``fmt.mean`` / ``fmt.std``."""
    from PIL import Image

    out = np.empty((len(images), 3, fmt.image_size, fmt.image_size), dtype=np.float32)
    mean = np.asarray(fmt.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(fmt.std, dtype=np.float32)[:, None, None]
    for i, img in enumerate(images):
        rgb = to_rgb_uint8(img)
        if rgb.shape[0] != fmt.image_size or rgb.shape[1] != fmt.image_size:
            rgb = np.asarray(Image.fromarray(rgb).resize((fmt.image_size, fmt.image_size), Image.BILINEAR))
        out[i] = (rgb.transpose(2, 0, 1).astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(out)


def noise_images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """``n`` images of uniform random pixels (``[size, size, 3]`` uint8), the "image replaced by noise" input."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8) for _ in range(n)]


def blend(images: Sequence[np.ndarray], noise: Sequence[np.ndarray], signal: float) -> list[np.ndarray]:
    """``signal * image + (1 - signal) * noise`` per pixel (both brought to the noise's size first): 1 is the clean
    image, 0 pure noise. The eval's accuracy-vs-signal curve walks this line."""
    from PIL import Image

    out = []
    for img, nz in zip(images, noise):
        rgb = to_rgb_uint8(img)
        if rgb.shape[:2] != nz.shape[:2]:
            rgb = np.asarray(Image.fromarray(rgb).resize((nz.shape[1], nz.shape[0]), Image.BILINEAR))
        mixed = signal * rgb.astype(np.float32) + (1.0 - signal) * nz.astype(np.float32)
        out.append(np.clip(np.round(mixed), 0, 255).astype(np.uint8))
    return out


# --- prompts -----------------------------------------------------------------------------------------------------
def image_prefix(fmt: ImageFormat) -> str:
    """The image tokens and the newline after them."""
    return fmt.image_token * fmt.num_image_tokens + "\n"


def prompt_text(question: str, fmt: ImageFormat | None) -> str:
    """``<image>...<image>\\nQ: {question}\\nA: `` (``fmt=None``: the blind prompt without image tokens)."""
    return (image_prefix(fmt) if fmt is not None else "") + f"Q: {question}\nA: "


def bos_ids(tokenizer: Any) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (callers place ``<bos>``)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- embeddings --------------------------------------------------------------------------------------------------
def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[B, T, D]``, ``mask`` ``[B, T]`` (1 = pooled) -> ``[B, D]`` mean over the masked positions."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_images(model: Any, tokenizer: Any, fmt: ImageFormat, images: Sequence[np.ndarray], *, layer: int = -1,
                 batch_size: int = 32) -> torch.Tensor:
    """``[N, D]`` float32 (not normalised): mean of the hidden states at the image tokens of ``<bos><image>...``."""
    dev = _device(model)
    ids = torch.tensor([bos_ids(tokenizer) + [fmt.image_token_id] * fmt.num_image_tokens])
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        batch_ids = ids.expand(len(chunk), -1).to(dev)
        pv = pixel_values(chunk, fmt).to(dev, dtype=_dtype(model))
        h = model(input_ids=batch_ids, pixel_values=pv, attention_mask=torch.ones_like(batch_ids),
                  output_hidden_states=True).hidden_states[layer]
        out.append(mean_pool(h.float(), (batch_ids == fmt.image_token_id).long()).cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_texts(model: Any, tokenizer: Any, texts: Sequence[str], *, layer: int = -1, batch_size: int = 32) -> torch.Tensor:
    """``[N, D]`` float32 (not normalised): mean of the hidden states at the text's tokens of ``<bos>text`` (run alone,
    right-padded)."""
    dev = _device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = caption_batch(tokenizer, texts[i:i + batch_size])
        ids, mask = ids.to(dev), mask.to(dev)
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        pool = mask.clone()
        if tokenizer.bos_token_id is not None:
            pool[:, 0] = 0  # the <bos> state is the same for every text
        out.append(mean_pool(h.float(), pool).cpu())
    return torch.cat(out) if out else torch.empty(0)


def caption_batch(tokenizer: Any, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``<bos>text`` rows right-padded: ``input_ids`` and ``attention_mask`` ``[B, T]`` (the text-side input of the
    embeddings and of the ``crossmodal`` losses)."""
    rows = [bos_ids(tokenizer) + encode(tokenizer, t) for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r)
        mask[j, :len(r)] = 1
    return ids, mask


def _dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


# --- multiple-choice scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def choice_logprobs(model: Any, tokenizer: Any, fmt: ImageFormat, questions: Sequence[str],
                    images: Sequence[np.ndarray] | None, choices: Sequence[Sequence[str]], *,
                    batch_size: int = 32) -> list[list[float]]:
    """Per question, the summed log-probability of each choice's tokens after its prompt (teacher forcing), with the
    image (``images``) or blind (``images=None``: the prompt without image tokens). Higher is more likely."""
    dev = _device(model)
    rows: list[tuple[int, list[int], int]] = []  # (question index, ids, answer start)
    for q, (question, opts) in enumerate(zip(questions, choices)):
        prompt = bos_ids(tokenizer) + encode(tokenizer, prompt_text(question, fmt if images is not None else None))
        for opt in opts:
            rows.append((q, prompt + encode(tokenizer, opt), len(prompt)))
    scores: list[list[float]] = [[] for _ in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r[1]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (_, r, _) in enumerate(chunk):
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        kwargs: dict[str, Any] = {}
        if images is not None:
            kwargs["pixel_values"] = pixel_values([images[q] for q, _, _ in chunk], fmt).to(dev, dtype=_dtype(model))
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **kwargs).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(dev)
        tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        for j, (q, r, start) in enumerate(chunk):
            scores[q].append(float(tok_lp[j, start - 1:len(r) - 1].sum()))
    return scores


