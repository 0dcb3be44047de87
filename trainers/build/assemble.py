"""Build a run from its recipe: tokenizer, model (+LoRA), mitigations with their injected domain pieces, the
backend's data, and the evals, in that order, with every check on the user's input along the way.

Everything that can fail on the user's input (recipe, data, model, eval/model fit) fails here, before the run directory
exists, so a bad recipe never writes into a run directory. Under DDP every rank builds the same model and data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import torch

from llm_limits.evals import EVALS
from llm_limits.evals.base import Eval, FieldError
from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import Mitigation
from llm_limits.trainers.backends import BACKENDS, Backend, HookDriver
from llm_limits.trainers.build import vlm
from llm_limits.trainers.build.models import apply_lora, build_model
from llm_limits.trainers.build.pretrained import with_path
from llm_limits.trainers.build.rewards import injected_for
from llm_limits.trainers.build.tokenizers import load_tokenizer
from llm_limits.trainers.recipe.capabilities import check_capabilities
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import ResolvedRecipe


@dataclasses.dataclass
class Built:
    """What :func:`build` makes from a recipe: everything a backend needs, nothing written to disk yet."""

    resolved: ResolvedRecipe
    tokenizer: Any
    model: torch.nn.Module
    mitigations: list[Mitigation]
    evals: list[tuple[str, Eval, list[str]]]
    """(result key, eval, when) in recipe order; the key is the eval name, suffixed when a name repeats."""
    backend: Backend
    """The recipe's ``trainer.backend``: it built the data and will fit and save (:mod:`~llm_limits.trainers.backends`)."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    """One-line warnings of the capability check (a RoPE model trained past its nominal window), for the run to print
    once everything has been built."""


def build(
    resolved: ResolvedRecipe, *, checkpoint: str | None = None, with_data: bool = True, index_dir: Path | None = None
) -> tuple[Built, Any, Any]:
    """Tokenizer, model (+LoRA), mitigations, evals and the training data: Lightning data loaders, or the TRL
    backend's datasets (``trainer.backend: trl``, after the mitigations' ``transform_records``). ``index_dir``: a
    run's saved retrieval index to load rather than rebuild (``--resume``). Raises :class:`UserError` on bad input,
    always naming the recipe file."""
    try:
        return _build(resolved, checkpoint=checkpoint, with_data=with_data, index_dir=index_dir)
    except UserError as e:
        if str(e).startswith(f"{resolved.source}: "):
            raise
        raise UserError(f"{resolved.source}: {e}") from None


def _build(resolved: ResolvedRecipe, *, checkpoint: str | None, with_data: bool, index_dir: Path | None) -> tuple[Built, Any, Any]:
    r = resolved.recipe
    L.seed_everything(r.seed, workers=True, verbose=False)
    _check_data_root(resolved)
    backend = BACKENDS[r.trainer.backend](r)
    m = with_path(r.model)  # model.pretrained: its directory in the cache, pulled on first use
    tok_path = m.tokenizer.path or (m.path if m.tokenizer.kind == "pretrained" else None)
    tokenizer = load_tokenizer(m.tokenizer.kind, tok_path, alphabet=m.tokenizer.alphabet, trust_remote_code=m.trust_remote_code)
    vision = vlm.is_vlm_recipe(m) if checkpoint is None else vlm.is_vlm_recipe(m.model_copy(update={"model_type": None, "path": checkpoint}))
    _check_vision_fit(r, vision)
    if vision:
        vlm.add_image_token(tokenizer)
        model = vlm.build_vlm(m, tokenizer, checkpoint=checkpoint)
        vlm.freeze(model, m.freeze)
    else:
        model = build_model(
            m.model_type if checkpoint is None else None,
            m.config if checkpoint is None else {},
            m.path if checkpoint is None else checkpoint,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            dtype=m.dtype,
            trust_remote_code=m.trust_remote_code,
            attn_implementation=m.attn_implementation,
            field_prefix="model" if checkpoint is None else "--checkpoint",
            head=backend.head,
            # a run's own checkpoint (``--checkpoint``) saved the scaled config already
            rope_scaling=m.rope_scaling.model_dump(exclude_none=True) if m.rope_scaling and checkpoint is None else None,
        )
    if m.gradient_checkpointing:
        enable_checkpointing(model)
    if m.lora is not None and checkpoint is None:
        model = apply_lora(model, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
    data: tuple[Any, Any] = (None, None)
    records = backend.load_records(r, tokenizer, vision=vision) if with_data else None
    task = records[0].get("task") if records else None
    mitigations = [
        MITIGATIONS[name](config, **injected_for(name, config, where=f"mitigations[{i}]", task=task, records=records,
                                                 tokenizer=tokenizer, data_params=r.data.params, index_dir=index_dir))
        for i, (name, config) in enumerate(resolved.mitigations)
    ]
    # What the mitigations and the data need from the model (rotary positions, a position range, a vision tower),
    # against its config: refused here, before the data is built and before any run directory exists.
    warnings = check_capabilities(r, model.config, mitigations, vision=vision, tokenizer=tokenizer)
    for i, mit in enumerate(mitigations):
        if not mit.enabled or type(mit).transform_records is Mitigation.transform_records:
            continue
        if not (backend.prompt_data or vision):
            raise UserError(f"mitigations[{i}]: {mit.name} builds prompt/completion training data: it needs "
                            "trainer.backend: trl")
        if records is not None:
            try:
                records = mit.transform_records(records, seed=r.seed)
            except ValueError as e:
                raise UserError(f"mitigations[{i}]: {mit.name}: {e}") from None
    if with_data:
        data = backend.build_data(r, tokenizer, model, records, mitigations, vision=vision)
    backend.check(mitigations)
    evals = []
    seen: dict[str, int] = {}
    for i, (name, config, when) in enumerate(resolved.evals):
        ev = EVALS[name](config)
        try:
            ev.check(model, tokenizer)
        except FieldError as e:  # about one field of the entry: evals[i].prompt_format: ...
            raise UserError(f"evals[{i}].{e}") from None
        except ValueError as e:
            raise UserError(f"evals[{i}]: {e}") from None
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}.{seen[name]}"
        evals.append((key, ev, when))
    return Built(resolved, tokenizer, model, mitigations, evals, backend, warnings), *data


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing on every decoder layer, non-reentrant; the KV cache off (it only serves
    generation, and transformers refuses it with checkpointing while training)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.config.use_cache = False


def _check_data_root(resolved: ResolvedRecipe) -> None:
    """``data.root`` set: every data file the recipe names (``data.path``, ``data.params.root``, each eval's ``path``)
    must resolve inside it (symlinks followed), so a recipe from another hand cannot read outside the declared folder."""
    r = resolved.recipe
    if r.data.root is None:
        return
    root = Path(r.data.root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data.root: {r.data.root} is not a directory")
    named = [("data.path", r.data.path), ("data.params.root", r.data.params.get("root"))]
    named += [(f"evals[{i}].path", getattr(config, "path", None)) for i, (_, config, _) in enumerate(resolved.evals)]
    for field, value in named:
        if value is None:
            continue
        target = Path(str(value)).expanduser()
        target = (target if target.is_absolute() else Path.cwd() / target).resolve()
        if not target.is_relative_to(root):
            raise UserError(f"{field}: {value} is outside data.root {root}")


def _check_vision_fit(r: Any, vision: bool) -> None:
    """A vision-language model needs an image task and vice versa; freeze controls and stages need one."""
    image_task = r.data.task in vlm.IMAGE_TASKS
    if vision and not image_task and r.data.path is None:
        raise UserError(f"data.task: {r.data.task!r} has no images; a vision-language model trains on one of "
                        f"{', '.join(vlm.IMAGE_TASKS)}")
    if not vision and image_task:
        raise UserError(f"data.task: {r.data.task!r} is an image task; it needs a vision-language model "
                        "(model.model_type: llava, or a model.path to a LLaVA-style checkpoint)")
    if not vision and r.model.freeze:
        raise UserError("model.freeze: only vision-language models have parts to freeze (model.model_type: llava)")
    if not vision and r.trainer.stages:
        raise UserError("trainer.stages: only vision-language models train in stages (model.model_type: llava)")
    if vision and r.trainer.backend != "lightning":
        raise UserError("trainer.backend: vision-language models train with the lightning backend")
    for i, stage in enumerate(r.trainer.stages):
        both = sorted(set(stage.train) & set(r.model.freeze))
        if both:
            raise UserError(f"trainer.stages[{i}].train: {both[0]} is frozen for the whole run by model.freeze")


def restore_mitigations(built: Built, checkpoint: str) -> None:
    """Re-apply the recipe's mitigations to a loaded checkpoint: ``setup`` re-creates what they add to the model (e.g.
    SSMax's attention function and its ``ssmax_s`` parameters), then the saved values of exactly those added tensors
    are loaded, since ``from_pretrained`` drops weights that the bare architecture does not have."""
    from safetensors.torch import load_file

    before = set(built.model.state_dict())
    built.model, _ = HookDriver.prepare(built.model, built.mitigations, built.tokenizer)
    added = set(built.model.state_dict()) - before
    if not added:
        return
    saved: dict[str, torch.Tensor] = {}
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        saved.update(load_file(str(f)))
    missing = sorted(added - set(saved))
    if missing:
        raise UserError(f"--checkpoint {checkpoint}: lacks {missing[0]} (and {len(missing) - 1} more) that the recipe's "
                        "mitigations add; was it trained with the same mitigations?")
    built.model.load_state_dict({k: saved[k] for k in added}, strict=False)
