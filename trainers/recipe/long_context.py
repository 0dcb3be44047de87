"""Recipe checks of the long-context switches (issue 21): ``trainer.sequence_parallel`` and ``model.rope_scaling``
with the positional mitigation's PoSE. Each combination that cannot work is one :class:`UserError` line before
anything is built. The generic capability checks (rotary positions, position range) live in ``capabilities.py``;
these are the ones specific to sequence parallelism and to RoPE scaling.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import Mitigation
from llm_limits.trainers.recipe.errors import UserError


def check_long_context(recipe: Any, mitigations: list[tuple[str, Any]], source: str) -> None:
    """Both families of checks, in recipe order (called by ``validate_recipe``)."""
    check_sequence_parallel(recipe, mitigations, source)
    check_rope_scaling(recipe, mitigations, source)


# --- sequence parallelism ---------------------------------------------------------------------------------------------
def check_sequence_parallel(recipe: Any, mitigations: list[tuple[str, Any]], source: str) -> None:
    """``trainer.sequence_parallel: N`` > 1: the TRL backend's SFT only, N dividing the ranks and ``data.seq_len``,
    an attention kernel Ulysses can wrap, and no mitigation that would see a slice of a sequence where it expects
    the whole (an ``extra_loss`` reads the outputs of the rank's slice only)."""
    t = recipe.trainer
    sp = t.sequence_parallel
    if sp == 1:
        return
    field = f"{source}: trainer.sequence_parallel"
    if t.backend == "lightning":
        raise UserError(f"{field}: {sp} needs backend: trl (trl.algorithm: sft); the lightning backend has no "
                        "sequence parallelism (docs/scaling.md says why)")
    if t.trl.algorithm == "grpo":
        raise UserError(f"{field}: GRPO cannot shard sequences: it builds its inputs after generation, inside the "
                        "trainer (TRL refuses it too, trl#5699); use sequence_parallel: 1")
    if t.trl.algorithm != "sft":
        raise UserError(f"{field}: {sp} applies to trl.algorithm: sft only (got {t.trl.algorithm}); use "
                        "sequence_parallel: 1")
    world = t.devices * t.num_nodes
    if world % sp:
        raise UserError(f"{field}: {sp} does not divide the {world} ranks (trainer.devices x num_nodes = "
                        f"{t.devices} x {t.num_nodes}); each group of {sp} ranks shares one sequence")
    if recipe.data.seq_len % sp:
        raise UserError(f"{field}: data.seq_len {recipe.data.seq_len} is not a multiple of {sp} (each rank holds "
                        f"an equal slice of every sequence; use a seq_len divisible by {sp})")
    attn = recipe.model.attn_implementation
    if attn == "eager":
        raise UserError(f"{field}: model.attn_implementation: eager builds a full [seq, seq] mask that Ulysses "
                        "cannot slice; use sdpa (or flash_attention_2 on GPUs)")
    scaling = recipe.model.rope_scaling
    if scaling is not None and scaling.type == "dynamic":
        raise UserError(f"{field}: model.rope_scaling type dynamic sets its frequencies from the largest position id "
                        "a rank sees, which differs between the slices of one sequence; use yarn, linear or llama3")
    for i, (name, config) in enumerate(mitigations):
        mit = MITIGATIONS[name](config)
        if mit.enabled and type(mit).extra_loss is not Mitigation.extra_loss:
            raise UserError(f"{source}: mitigations[{i}]: {name} adds a loss computed from the model's outputs, "
                            f"which trainer.sequence_parallel: {sp} splits across ranks; use sequence_parallel: 1")
    _check_heads(recipe, sp, field)


def _check_heads(recipe: Any, sp: int, field: str) -> None:
    """Ulysses gives each rank ``heads / N`` attention heads: the head count must divide (config-built models; a
    loaded checkpoint is checked when its config is read, by DeepSpeed's own error)."""
    cfg = recipe.model.config
    heads = cfg.get("num_attention_heads") if recipe.model.model_type is not None else None
    if heads is None and recipe.model.path is not None:
        heads = _stored_config(recipe.model.path).get("num_attention_heads")
    if isinstance(heads, int) and heads % sp:
        raise UserError(f"{field}: {sp} does not divide the model's {heads} attention heads (Ulysses hands each "
                        f"rank heads / {sp} of them)")


# --- RoPE scaling -------------------------------------------------------------------------------------------------------
def check_rope_scaling(recipe: Any, mitigations: list[tuple[str, Any]], source: str) -> None:
    """``model.rope_scaling`` on a model without RoPE, and PoSE's ``target_len`` against the window the scaling
    covers (``factor x original``): ids drawn past it would train positions the scaled model does not serve. Without
    scaling, a RoPE model trained past ``max_position_embeddings`` is allowed with a warning (``capabilities.py``).
    The model's window is read from ``model.config`` (or the config class's default) or from the ``config.json`` of
    ``model.path``; a model whose config cannot be read here is checked when it is built."""
    m = recipe.model
    scaling = m.rope_scaling
    stored = _model_config(m)
    if scaling is not None and stored is not None and not stored.get("_has_rope", True):
        raise UserError(f"{source}: model.rope_scaling: a {stored.get('model_type')} model has no rotary position "
                        "embeddings to scale (RoPE scaling needs a RoPE model such as llama, qwen2 or mistral)")
    for i, (name, config) in enumerate(mitigations):
        pose = getattr(config, "pose", None) if name == "positional" else None
        if not (config.enabled and pose is not None and pose.enabled and pose.target_len is not None):
            continue
        where = f"{source}: mitigations[{i}].pose.target_len"
        target = int(pose.target_len)
        window = stored.get("max_position_embeddings") if stored else None
        if scaling is not None:
            original = scaling.original_max_position_embeddings or window
            if original is None:
                continue
            reach = int(round(original * scaling.factor))
            if target > reach:
                need = math.ceil(target / original)
                raise UserError(f"{where}: {target} lies beyond the window model.rope_scaling covers (factor "
                                f"{scaling.factor:g} x {original} = {reach} positions); set rope_scaling.factor to "
                                f">= {need} or lower target_len")


def _model_config(m: Any) -> dict[str, Any] | None:
    """What the checks read of the model's config before it is built: ``max_position_embeddings``, ``model_type``
    and ``_has_rope``; ``None`` when it cannot be known yet (a pretrained name not pulled, a missing path)."""
    if m.model_type is not None:
        import transformers

        cls = transformers.CONFIG_MAPPING[m.model_type] if m.model_type in transformers.CONFIG_MAPPING else None
        if cls is None:
            return None  # the schema's model check names the unknown type
        keys = _config_fields(cls)
        window = m.config.get("max_position_embeddings")
        if window is None:
            window = getattr(cls(), "max_position_embeddings", None) if "max_position_embeddings" in keys else None
        if window is None and "n_positions" in keys:
            window = m.config.get("n_positions", getattr(cls(), "n_positions", None))
        return {"model_type": m.model_type, "max_position_embeddings": window, "_has_rope": "rope_parameters" in keys}
    if m.path is not None:
        stored = _stored_config(m.path)
        if not stored:
            return None
        import transformers

        kind = stored.get("model_type")
        if kind not in transformers.CONFIG_MAPPING:
            return None
        has_rope = "rope_parameters" in _config_fields(transformers.CONFIG_MAPPING[kind])
        window = stored.get("max_position_embeddings", stored.get("n_positions"))
        return {"model_type": kind, "max_position_embeddings": window, "_has_rope": has_rope}
    return None


def _config_fields(cls: type) -> set[str]:
    """Fields of a transformers config class (transformers 5 configs are dataclasses), with its attribute aliases."""
    import dataclasses

    keys = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return keys | set(getattr(cls, "attribute_map", {}) or {})


def _stored_config(path: str) -> dict[str, Any]:
    """``config.json`` of a local model directory, or ``{}``."""
    file = os.path.join(os.path.expanduser(str(path)), "config.json")
    try:
        with open(file) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
