"""Vision-language runs (issue #6): a LLaVA-style model built from a config or loaded from a local checkpoint, freeze
controls per part, the two-stage schedule, and the image/question rows the Lightning backend trains on.

A recipe makes a vision-language run by naming ``model.model_type: llava`` (or a ``model.path`` whose config has a
``vision_config``) and a multimodal task (``data.task: digits | shapes | image_folder``)::

    model:
      model_type: llava
      config:
        vision_config: {model_type: clip_vision_model, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
                        intermediate_size: 128, image_size: 32, patch_size: 8}
        text_config: {model_type: llama, hidden_size: 96, num_hidden_layers: 3, ...}
        projector_hidden_act: gelu
      freeze: [vision_tower]          # parts frozen for the whole run
    trainer:
      stages:                          # optional, LLaVA's two stages in one run (arXiv 2304.08485)
        - {until: 0.3, train: [projector]}
        - {until: 1.0, train: [projector, language_model]}

The parts are LLaVA's three: ``vision_tower``, ``projector`` (``multi_modal_projector``) and ``language_model`` (the
decoder and its ``lm_head``). ``model.freeze`` sets ``requires_grad=False`` once, before the optimizer exists (so a
frozen tower costs no backward pass). ``trainer.stages`` leaves ``requires_grad`` alone (DDP needs the same set of
trainable parameters on every step) and instead drops the gradients of the parts a stage does not train just before
each optimizer step, so AdamW skips them entirely: no update, no weight decay, no moment change. A stage runs while the
run's progress (step / max_steps) is below its ``until``.

Rows (one per task record): ``<bos><image>*n\\nQ: {question}\\nA: {answer}<eos>`` right-padded to ``data.seq_len``;
the image tokens never carry a loss, the question's tokens do only with ``data.loss_on: all``. Each row also carries
what the ``crossmodal`` losses need: ``pixel_values``, ``image_mask``, the caption alone (``caption_input_ids``,
``caption_attention_mask``) and ``caption_group`` / ``image_group`` ids (rows with the same caption / image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llm_limits.evals import vlm
from llm_limits.evals.tasks import TASKS, TaskDataError
from llm_limits.trainers.build.data import RowDataset
from llm_limits.trainers.recipe.errors import UserError

VLM_MODEL_TYPES = ("llava",)
"""``model.model_type`` values built as vision-language models."""

PARTS = ("vision_tower", "projector", "language_model")
"""Freezable parts of a LLaVA-style model (names in recipes)."""

IMAGE_TASKS = ("digits", "shapes", "image_folder")
"""``data.task`` values whose records carry images."""

_PART_MODULES = {"vision_tower": ("vision_tower",), "projector": ("multi_modal_projector",),
                 "language_model": ("language_model", "lm_head")}


def is_vlm_recipe(model_spec: Any) -> bool:
    """Whether the recipe's model section names a vision-language model (a LLaVA type, or a checkpoint whose
    ``config.json`` has a ``vision_config``)."""
    if model_spec.model_type is not None:
        return model_spec.model_type in VLM_MODEL_TYPES
    cfg = Path(str(model_spec.path or "")).expanduser() / "config.json"
    if cfg.is_file():
        try:
            return "vision_config" in json.loads(cfg.read_text())
        except (OSError, ValueError):
            return False
    return False


def add_image_token(tokenizer: Any) -> Any:
    """Give ``tokenizer`` LLaVA's ``<image>`` token as an added special token when it lacks one (the character
    tokenizer); a pretrained LLaVA tokenizer already has it."""
    if vlm.IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [vlm.IMAGE_TOKEN]})
    return tokenizer


# --- the model -------------------------------------------------------------------------------------------------------
def build_vlm(model_spec: Any, tokenizer: Any, *, checkpoint: str | None = None, field_prefix: str = "model") -> torch.nn.Module:
    """A ``LlavaForConditionalGeneration`` from ``model.config`` (random weights; seed torch first) or from a local
    directory (``model.path``, or ``checkpoint`` for a run's saved model). Config keys are checked against the vision
    and text config classes (a typo is a one-line :class:`UserError` with a "did you mean")."""
    import transformers
    from transformers import AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

    from llm_limits.trainers.build.models import (
        DTYPES, _check_config_keys, _config_error_message, _is_config_rejection, _one_line, resolve_pretrained,
    )

    path = checkpoint or model_spec.path
    kwargs: dict[str, Any] = {"dtype": DTYPES[model_spec.dtype]}
    if model_spec.attn_implementation is not None:
        kwargs["attn_implementation"] = model_spec.attn_implementation
    image_id = tokenizer.convert_tokens_to_ids(vlm.IMAGE_TOKEN)
    if path is None:
        config = dict(model_spec.config)
        known = set(LlavaConfig.__init__.__code__.co_varnames) | {"projector_hidden_act", "multimodal_projector_bias"}
        for key in config:
            if key not in ("vision_config", "text_config") and key not in known:
                raise UserError(f"{field_prefix}.config.{key}: unknown key for llava config (expected vision_config, "
                                "text_config, projector_hidden_act, vision_feature_layer, vision_feature_select_strategy)")
        parts = {}
        for side, default in (("vision_config", "clip_vision_model"), ("text_config", "llama")):
            value = config.get(side)
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{field_prefix}.config.{side}: expected a mapping of config keys (got {value!r})")
            sub = dict(value or {})
            kind = sub.pop("model_type", default)
            if not isinstance(kind, str) or kind not in transformers.CONFIG_MAPPING:  # {} is unhashable
                raise UserError(f"{field_prefix}.config.{side}.model_type: unknown model type {kind!r} "
                                f"(expected e.g. {default})")
            _check_config_keys(transformers.CONFIG_MAPPING[kind], sub, kind, field_prefix,
                               where=f"{field_prefix}.config.{side}")
            try:  # each side alone first, so a rejected value is named with its side (vision_config.hidden_size)
                transformers.CONFIG_MAPPING[kind](**sub)
            except Exception as err:  # noqa: BLE001 -- transformers rejects bad configs with many types
                if not _is_config_rejection(err):
                    raise
                message = _config_error_message(err, field_prefix)  # "model.config[.key]: ..."
                raise UserError(message.replace(f"{field_prefix}.config", f"{field_prefix}.config.{side}", 1)) from err
            parts[side] = {"model_type": kind, **sub}
        parts["text_config"].update(vocab_size=max(len(tokenizer), parts["text_config"].get("vocab_size", 0)),
                                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
        rest = {k: v for k, v in config.items() if k not in parts}
        if parts["vision_config"]["model_type"] != "clip_vision_model":
            rest.setdefault("vision_feature_select_strategy", "full")  # SigLIP has no CLS token to drop
        try:
            llava = LlavaConfig(**parts, image_token_id=image_id, **rest)
            model = LlavaForConditionalGeneration._from_config(llava, **kwargs)
        except Exception as err:  # noqa: BLE001 -- as above; a strict dataclass raises its own error type
            if not _is_config_rejection(err):
                raise
            raise UserError(f"{field_prefix}.config: {_one_line(err)}") from err
    else:
        source = resolve_pretrained(path, f"{field_prefix}.path" if checkpoint is None else "--checkpoint")
        try:
            model = AutoModelForImageTextToText.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"{field_prefix}.path: could not load a vision-language model from {path}: "
                            f"{_one_line(err)}") from err
        if model.config.image_token_id != image_id:
            raise UserError(f"{field_prefix}.tokenizer: the tokenizer's {vlm.IMAGE_TOKEN} id {image_id} is not the "
                            f"model's image_token_id {model.config.image_token_id} (use the tokenizer saved with it)")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(f"{field_prefix}.tokenizer: vocab of {len(tokenizer)} tokens but the model's embeddings have "
                        f"{rows} rows (use the tokenizer saved with the model)")
    model.train()
    return model


def part_parameters(model: torch.nn.Module, part: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of one part of a (possibly LoRA-wrapped) LLaVA-style model."""
    keys = _PART_MODULES[part]
    out = []
    for name, p in model.named_parameters():
        pieces = name.split(".")
        if any(k in pieces for k in keys):
            out.append((name, p))
    return out


def freeze(model: torch.nn.Module, parts: list[str]) -> None:
    """``requires_grad=False`` for every parameter of the named parts (for the whole run)."""
    for part in parts:
        for _, p in part_parameters(model, part):
            p.requires_grad_(False)


def stage_at(stages: list[Any], progress: float) -> Any:
    """The stage that runs at ``progress`` (fraction of the run done): the first whose ``until`` is above it."""
    for s in stages:
        if progress < s.until:
            return s
    return stages[-1]


def drop_stage_grads(model: torch.nn.Module, stage: Any) -> None:
    """Set the gradients of the parts ``stage`` does not train to ``None`` (AdamW then skips those parameters)."""
    for part in PARTS:
        if part in stage.train:
            continue
        for _, p in part_parameters(model, part):
            p.grad = None


# --- data --------------------------------------------------------------------------------------------------------------
class VLMDataset(RowDataset):
    """Image/question rows (see the module docstring), every tensor of a fixed shape."""


def load_image_records(spec: Any, seed: int) -> list[dict[str, Any]]:
    """The records of a multimodal data section: a task generator (``digits``, ``shapes``; ``data.params`` are its
    config fields, the recipe seed seeds it) or the user's image folder (``data.task: image_folder``, ``data.path``:
    the JSONL; ``data.params.root``: the dataset root, default the JSONL's folder)."""
    from llm_limits.evals.tasks import image_folder
    from llm_limits.trainers.build.data import _check_params

    if spec.task == "image_folder" or spec.path is not None:
        if spec.path is None:
            raise UserError("data.path: required with data.task: image_folder (the JSONL of captions and questions)")
        extra = sorted(set(spec.params) - {"root"})
        if extra:
            raise UserError(f"data.params.{extra[0]}: unknown key for task image_folder (expected: root)")
        try:
            return image_folder.load(spec.path, root=spec.params.get("root"))
        except TaskDataError as e:
            raise UserError(f"data.path: {e}") from None
    config_cls, generate = TASKS[spec.task]
    params = {"seed": seed, **spec.params}
    if spec.task == "digits":
        params.setdefault("split", "train")
    _check_params(spec, config_cls, params)
    try:
        return generate(config_cls(**params))
    except (TypeError, ValueError) as e:
        raise UserError(f"data.params: {e}") from None


def vlm_rows(records: list[dict[str, Any]], tokenizer: Any, fmt: vlm.ImageFormat, seq_len: int, loss_on: str) -> tuple[list[dict], int]:
    """Rows for :class:`VLMDataset`; returns them and how many records did not fit ``seq_len``."""
    bos = vlm.bos_ids(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    captions = sorted({r["caption"] for r in records})
    caption_group = {c: i for i, c in enumerate(captions)}
    image_group = {i: n for n, i in enumerate(dict.fromkeys(r["image_id"] for r in records))}
    cap_ids, cap_mask = vlm.caption_batch(tokenizer, captions)
    pixels = {}
    rows, skipped = [], 0
    for r in records:
        prompt = bos + vlm.encode(tokenizer, vlm.prompt_text(r["question"], fmt))
        answer = vlm.encode(tokenizer, r["answer"]) + eos
        ids = prompt + answer
        if len(ids) > seq_len:
            skipped += 1
            continue
        n = len(ids)
        input_ids = torch.full((seq_len,), pad, dtype=torch.long)
        input_ids[:n] = torch.tensor(ids)
        mask = torch.zeros(seq_len, dtype=torch.long)
        mask[:n] = 1
        labels = torch.full((seq_len,), -100, dtype=torch.long)
        start = len(bos) + fmt.num_image_tokens + 1 if loss_on == "all" else len(prompt)  # never the image tokens
        labels[start:n] = input_ids[start:n]
        if r["image_id"] not in pixels:
            pixels[r["image_id"]] = vlm.pixel_values([r["image"]], fmt)[0]
        g = caption_group[r["caption"]]
        rows.append({
            "input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "pixel_values": pixels[r["image_id"]],
            "image_mask": (input_ids == fmt.image_token_id).long() * mask,
            "caption_input_ids": cap_ids[g], "caption_attention_mask": cap_mask[g],
            "caption_group": torch.tensor(g), "image_group": torch.tensor(image_group[r["image_id"]]),
        })
    return rows, skipped


def build_vlm_datasets(spec: Any, records: list[dict[str, Any]], tokenizer: Any, model: Any) -> tuple[VLMDataset, VLMDataset | None]:
    """Train and validation datasets (validation: the last ``val_fraction`` of the rows, in record order)."""
    try:
        fmt = vlm.image_format(model, tokenizer)
    except ValueError as e:
        raise UserError(f"model: {e}") from None
    rows, skipped = vlm_rows(records, tokenizer, fmt, spec.seq_len, spec.loss_on)
    if not rows:
        need = len(vlm.bos_ids(tokenizer)) + fmt.num_image_tokens + 12
        raise UserError(f"data.seq_len: none of the {len(records)} image examples fits {spec.seq_len} tokens "
                        f"(the image alone takes {fmt.num_image_tokens} tokens; try at least {need + 40})")
    n_val = int(round(len(rows) * spec.val_fraction))
    if n_val and len(rows) - n_val < 1:
        n_val = 0
    val = VLMDataset(rows[len(rows) - n_val:]) if n_val else None
    return VLMDataset(rows[: len(rows) - n_val]), val
