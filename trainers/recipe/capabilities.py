"""Capability checks: what the recipe's mitigations and data need from the model, against the built model's config.

Each mitigation declares its needs (:meth:`~llm_limits.mitigations.base.Mitigation.needs`: rotary positions, a range
of position ids, a vision tower, a chat template); each eval checks its own in ``Eval.check(model, tokenizer)`` (eval
lengths against a learned position table, a chat template where ``prompt_format: chat`` is asked, a vision tower).
:func:`check_capabilities` runs in the build, before the run directory exists: a mismatch is one line naming the
mitigation, the model type and what is missing (a :class:`UserError`, exit 2). Training a RoPE model past its nominal
window (``max_position_embeddings``) is allowed, with a one-line warning: rotary angles extrapolate, however badly,
and that is what PoSE and RoPE scaling are for. A learned position table (gpt2's ``n_positions``) has a hard end:
an id past it is an ``IndexError`` mid-training, so it is refused.
"""

from __future__ import annotations

from typing import Any

from llm_limits.evals.lm import has_rope, position_range
from llm_limits.mitigations.base import Mitigation
from llm_limits.trainers.recipe.errors import UserError

_WHAT = {"pose": "PoSE's skipped position ids need", "log_scaling": "SSMax (log-length attention scaling) needs"}
"""How a refusal names the part of a mitigation that needs rotary positions."""


def text_config(model_config: Any) -> Any:
    """The config that holds the positions: a vision-language model's language model (``text_config``), else the
    config itself."""
    return getattr(model_config, "text_config", None) or model_config


def _positions_attr(config: Any) -> str:
    """The name the user wrote the position range under: gpt2's ``n_positions`` (which its config also answers to as
    ``max_position_embeddings``), else ``max_position_embeddings``."""
    return "n_positions" if "n_positions" in vars(config) else "max_position_embeddings"


def check_capabilities(
    recipe: Any, model_config: Any, mitigations: list[Mitigation], *, vision: bool, tokenizer: Any = None
) -> list[str]:
    """Refuse (:class:`UserError`, one line) a model that lacks what an enabled mitigation or the training data
    needs; return the warnings (one line each) for what is allowed but out of the model's nominal range. The caller
    prints them once the whole build has passed, so a refused recipe still prints its one line alone.

    ``recipe``: the validated recipe (``data.seq_len`` is the longest row it trains on); ``model_config``: the built
    model's config; ``vision``: whether the model has a vision tower.
    """
    config = text_config(model_config)
    model_type = getattr(model_config, "model_type", None) or type(model_config).__name__
    rope = has_rope(config)
    n_pos = position_range(config)
    attr = _positions_attr(config)
    warnings: list[str] = []

    for i, m in enumerate(mitigations):
        if not m.enabled:
            continue
        for need in m.needs():
            where = f"mitigations[{i}]" + (f".{need.field}" if need.field else "")
            if need.kind == "rotary" and not rope:
                what = _WHAT.get(need.field, f"{need.field or m.name} needs")
                has = (f"learned absolute positions ({attr}={n_pos})" if n_pos is not None
                       else "no rotary position embeddings")
                raise UserError(f"{where}: {m.name}: {what} rotary position embeddings (RoPE); model type "
                                f"{model_type!r} has {has}: use a RoPE model (llama, qwen2, mistral) or disable it")
            if need.kind == "positions" and n_pos is not None and need.value is not None and need.value > n_pos:
                if not rope:
                    raise UserError(f"{where}: {m.name} feeds position ids up to {need.value}; model type "
                                    f"{model_type!r} has {n_pos} learned positions (model.config.{attr})")
                warnings.append(f"{where}: {m.name} trains position ids up to {need.value}, past the {model_type} model's "
                     f"{attr}={n_pos}; RoPE extrapolates there (set rope_scaling in model.config to interpolate)")
            if need.kind == "vision" and not vision:
                raise UserError(f"{where}: {m.name} aligns images with text: it needs a vision-language model "
                                f"(model.model_type: llava; model type {model_type!r} has no vision tower) and an "
                                "image task (data.task: digits, shapes or image_folder)")
            if need.kind == "chat_template" and getattr(tokenizer, "chat_template", None) is None:
                raise UserError(f"{where}: {m.name} needs a tokenizer with a chat template; the {model_type} "
                                "model's tokenizer has none")
    seq_len = getattr(getattr(recipe, "data", None), "seq_len", None)
    if n_pos is not None and seq_len is not None and seq_len > n_pos and not vision:
        if not rope:
            raise UserError(f"data.seq_len: rows of {seq_len} tokens, but model type {model_type!r} has {n_pos} "
                            f"learned positions (model.config.{attr}): lower data.seq_len or raise {attr}")
        warnings.append(f"data.seq_len: rows of {seq_len} tokens train past the {model_type} model's {attr}={n_pos}; RoPE "
             "extrapolates there")
    return warnings
