"""Causal LMs for a run: built from a config (tests, demos, tiny recipes), or loaded from a local directory (or a hub id
already in the local Hugging Face cache); LoRA on top; saving in a form :func:`build_model` reads back.

Offline by design: every ``from_pretrained`` here passes ``local_files_only=True``, and a hub id that is not cached
fails at once with a :class:`~trainers.errors.UserError` instead of retrying a network that is not there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification, PreTrainedModel

from llm_limits.trainers.recipe.errors import UserError

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Values of ``model.dtype`` and the torch dtype the weights are created or loaded in."""

EXAMPLE_MODEL_TYPES = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "phi3", "gemma2", "qwen3")
"""Shown in the error for an unknown ``model.model_type`` (every causal LM type of ``transformers`` is accepted)."""

_CONFIG_KEYS_ELSEWHERE = {
    "dtype": "model.dtype",
    "torch_dtype": "model.dtype",
    "attn_implementation": "model.attn_implementation",
    "_attn_implementation": "model.attn_implementation",
    "model_type": "model.model_type",
}
"""Keys a user may put under ``model.config`` that this module sets from another recipe field."""

_ROPE_LEGACY_KEYS = ("rope_theta", "rope_scaling", "partial_rotary_factor")
"""Pre-v5 RoPE keys that ``transformers`` still folds into ``rope_parameters`` for configs that have it."""


HEADS = {"causal_lm": AutoModelForCausalLM, "token_classification": AutoModelForTokenClassification}
"""``build_model(head=...)`` -> the Auto class that puts that head on the backbone."""


# --- building ----------------------------------------------------------------------------------------------------
def build_model(
    model_type: str | None = None,
    config: Mapping[str, Any] | None = None,
    path: str | None = None,
    *,
    vocab_size: int,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    field_prefix: str = "model",
    head: str = "causal_lm",
    rope_scaling: Mapping[str, Any] | None = None,
) -> PreTrainedModel:
    """A causal LM (or, with ``head="token_classification"``, the same backbone with a one-logit token-classification
    head: a process reward model scored at step ends), from scratch (``model_type`` + ``config``) or from ``path``; exactly one of the two.

    From scratch: ``AutoConfig.for_model(model_type, **config)`` then ``AutoModelForCausalLM.from_config``, with
    random weights (seed torch beforehand for a reproducible init). Every key of ``config`` is checked against the
    config class (its fields and attribute aliases, e.g. ``hidden_size`` for gpt2's ``n_embd``); an unknown key is a
    :class:`UserError` with a "did you mean". ``vocab_size`` (the tokenizer's ``len(tok)``) and the special token ids
    are set from the tokenizer; a ``vocab_size`` in ``config`` is kept only if it is at least the tokenizer's (padding
    the embedding to a round number is fine, fewer rows than tokens is not).

    From ``path``: ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``; ``path`` is a local
    directory with a ``config.json`` or a hub id already in the local Hugging Face cache. ``config`` may override
    keys of the stored config (e.g. ``rope_parameters`` for a longer context), checked the same way. The tokenizer's
    vocab must fit the model's embeddings (``vocab_size <= rows``); a missing ``pad_token_id`` in the stored config is
    filled in from ``pad_token_id``.

    ``dtype`` is one of :data:`DTYPES`; ``attn_implementation`` (``"eager"``, ``"sdpa"``, ...) is passed through;
    ``trust_remote_code=True`` runs Python shipped with the checkpoint and logs a warning saying so.
    ``field_prefix`` names the recipe section in error messages (``model.config.hidden_sise: ...``).
    ``rope_scaling`` (the recipe's ``model.rope_scaling``: ``type``, ``factor`` and the type's own keys) is written into
    the config's ``rope_parameters`` before the weights are made or loaded (:func:`apply_rope_scaling`), for both
    sources; a model without RoPE refuses it.

    Returns the model in train mode (``from_pretrained`` returns eval mode; a run builds a model to train it).
    """
    config = dict(config or {})
    if dtype not in DTYPES:
        raise UserError(f"{field_prefix}.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if vocab_size is None or vocab_size < 1:
        raise UserError(f"{field_prefix}.tokenizer: vocab_size must be a positive int (got {vocab_size!r})")
    if (model_type is None) == (path is None):
        raise UserError(
            f"{field_prefix}: set exactly one of model_type (build from a config) or path (load a checkpoint); "
            f"got model_type={model_type!r}, path={path!r}"
        )
    if trust_remote_code:
        logger.warning("%s: trusting remote code (trust_remote_code=True runs Python shipped with the checkpoint)",
                       field_prefix)
    token_ids = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    load_kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation

    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)} (got {head!r})")
    if head == "token_classification":
        load_kwargs["num_labels"] = 1
    if model_type is not None:
        model = _from_config(model_type, config, vocab_size, token_ids, load_kwargs, field_prefix, HEADS[head],
                             rope_scaling)
    else:
        model = _from_pretrained(path, config, token_ids, load_kwargs, field_prefix, HEADS[head], rope_scaling)

    if head == "causal_lm" and getattr(model, "loss_type", None) is None:
        # Classes not named *ForCausalLM (gpt2's GPT2LMHeadModel) get no loss type and transformers warns on the first
        # loss; every model built here is a causal LM, so name the loss it falls back to anyway.
        model.loss_type = "ForCausalLM"
    rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size > rows:
        raise UserError(
            f"{field_prefix}.tokenizer: vocab of {vocab_size} tokens but the model's embeddings have {rows} rows "
            "(the tokenizer does not match the model; use the tokenizer saved with it)"
        )
    model.train()
    return model


def _from_config(
    model_type: str,
    config: dict[str, Any],
    vocab_size: int,
    token_ids: dict[str, int],
    load_kwargs: dict[str, Any],
    field_prefix: str,
    auto_cls: Any = AutoModelForCausalLM,
    rope_scaling: Mapping[str, Any] | None = None,
) -> PreTrainedModel:
    config_cls = _causal_config_class(model_type, field_prefix)
    _check_config_keys(config_cls, config, model_type, field_prefix)
    user_vocab = config.get("vocab_size")
    if user_vocab is not None and (not isinstance(user_vocab, int) or isinstance(user_vocab, bool)):
        raise UserError(f"{field_prefix}.config.vocab_size: expected an int (got {user_vocab!r})")
    if user_vocab is not None and user_vocab < vocab_size:
        raise UserError(
            f"{field_prefix}.config.vocab_size: {user_vocab!r} is smaller than the tokenizer's {vocab_size} tokens "
            "(leave it out to use the tokenizer's size)"
        )
    # A model made from scratch has no special tokens of its own: ids the tokenizer lacks become None rather than the
    # config class's defaults (gpt2's 50256 lies outside a small vocab and transformers warns about it).
    ids = {key: config.get(key, value) if value is None else value for key, value in token_ids.items()}
    config = {**config, "vocab_size": user_vocab or vocab_size, **ids}
    if "num_labels" in load_kwargs:  # a config field, not a from_config argument
        config["num_labels"] = load_kwargs.pop("num_labels")
    try:
        with _held_transformers_logs():
            model_config = AutoConfig.for_model(model_type, **config)
            if rope_scaling:
                apply_rope_scaling(model_config, rope_scaling, field_prefix)
            return auto_cls.from_config(model_config, **load_kwargs)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 -- transformers rejects bad configs with many types; name them all
        if not _is_config_rejection(err):
            raise
        raise UserError(_config_error_message(err, field_prefix)) from err


@contextlib.contextmanager
def _held_transformers_logs() -> Any:
    """Hold the log records ``transformers`` emits while a config is built: replayed if the model builds, dropped if it
    is rejected, so a bad value is answered by the one-line error alone (``rope_scaling: {type: bogus}`` made
    transformers log "Missing validation function ... 'rope_type'='bogus'" before the error)."""
    root = transformers.utils.logging.get_logger()  # the "transformers" logger, where its handler lives
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    hold, saved = _Hold(), list(root.handlers)
    for h in saved:
        root.removeHandler(h)
    root.addHandler(hold)
    built = False
    try:
        yield
        built = True
    finally:
        root.removeHandler(hold)
        for h in saved:
            root.addHandler(h)
        if built:
            for record in held:
                root.handle(record)


def _from_pretrained(
    path: str,
    config: dict[str, Any],
    token_ids: dict[str, int],
    load_kwargs: dict[str, Any],
    field_prefix: str,
    auto_cls: Any = AutoModelForCausalLM,
    rope_scaling: Mapping[str, Any] | None = None,
) -> PreTrainedModel:
    source = resolve_pretrained(path, f"{field_prefix}.path")
    trust = load_kwargs["trust_remote_code"]
    if config or rope_scaling:
        try:
            stored = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust)
        except (OSError, ValueError) as err:
            raise UserError(f"{field_prefix}.path: could not read the config in {path}: {_one_line(err)}") from err
        _check_config_keys(type(stored), config, stored.model_type, field_prefix)
        for key, value in config.items():
            setattr(stored, key, value)
        if rope_scaling:
            apply_rope_scaling(stored, rope_scaling, field_prefix)
        load_kwargs = {**load_kwargs, "config": stored}
    try:
        model = auto_cls.from_pretrained(
            source, local_files_only=True, adapter_kwargs={"local_files_only": True}, **load_kwargs
        )
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        if isinstance(err, (OSError, ValueError, KeyError)) or _is_config_rejection(err):
            raise UserError(f"{field_prefix}.path: could not load a causal LM from {path}: {_one_line(err)}") from err
        raise
    for key, value in token_ids.items():
        if value is not None and getattr(model.config, key, None) is None:
            setattr(model.config, key, value)
    return model


def resolve_pretrained(
    path: str,
    field: str,
    *,
    marker_files: tuple[str, ...] = ("config.json",),
    what: str = "model",
) -> str:
    """What to hand to ``from_pretrained(..., local_files_only=True)`` for the user's ``path``.

    A local directory holding one of ``marker_files`` is returned as is (``~`` expanded). Anything that looks like a
    filesystem path (absolute, ``./``, ``~``, an existing file) must be such a directory. Otherwise ``path`` is read as
    a hub id (``org/name``) and must already be in the local Hugging Face cache; its cached snapshot directory is
    returned. Never touches the network; a miss is a one-line :class:`UserError` naming ``field``.

    Handing ``from_pretrained`` a directory rather than the hub id is deliberate: transformers 5.23's
    ``AutoModelForCausalLM.from_pretrained`` looks for ``adapter_config.json`` without passing ``local_files_only``
    on, so a hub id (even a cached one) costs five network retries (~30 s) where there is no network.
    """
    expanded = os.path.expanduser(str(path))
    listed = " or ".join(marker_files[:2])
    if os.path.isdir(expanded):
        if any(os.path.isfile(os.path.join(expanded, name)) for name in marker_files):
            return expanded
        if os.path.isfile(os.path.join(expanded, "adapter_config.json")):
            raise UserError(
                f"{field}: {path} holds a LoRA adapter only, not a full {what} (load its base model, then "
                "peft.PeftModel.from_pretrained(base, path); or save model.merge_and_unload() for a full checkpoint)"
            )
        raise UserError(
            f"{field}: {path} is not a directory with a {listed} "
            f"(expected a local Hugging Face {what} directory)"
        )
    looks_local = (
        os.path.isabs(expanded)
        or str(path).startswith((".", "~"))
        or os.path.exists(expanded)
        or "\\" in str(path)
        or str(path).count("/") > 1
    )
    if looks_local:
        state = "is a file, not a directory" if os.path.exists(expanded) else "does not exist"
        raise UserError(f"{field}: {path} {state} (expected a local Hugging Face {what} directory with a {listed})")
    if (snapshot := _cached_snapshot(str(path), marker_files)) is not None:
        return snapshot
    raise UserError(
        f"{field}: {path!r} is not a local directory and is not in the Hugging Face cache "
        "(no network here; download it elsewhere or pass a local path)"
    )


def _cached_snapshot(repo_id: str, marker_files: tuple[str, ...]) -> str | None:
    """The local snapshot directory of ``repo_id`` in the Hugging Face cache if it holds one of ``marker_files``."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    for name in marker_files:
        try:
            hit = try_to_load_from_cache(repo_id, name)
        except (HFValidationError, ValueError):
            return None  # not even a valid repo id
        if isinstance(hit, str):
            return os.path.dirname(hit)  # .../models--org--name/snapshots/<commit>
    return None


# --- RoPE scaling ------------------------------------------------------------------------------------------------
ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
"""``model.rope_scaling.type`` values, each a ``rope_type`` of transformers' ``ROPE_INIT_FUNCTIONS``."""

_ROPE_KEYS = {"yarn": ("beta_fast", "beta_slow", "attention_factor"), "llama3": ("low_freq_factor", "high_freq_factor")}
_ROPE_DEFAULTS = {"llama3": {"low_freq_factor": 1.0, "high_freq_factor": 4.0}}


def has_rope(config: Any) -> bool:
    """Whether a model config describes rotary position embeddings (transformers 5 gives every RoPE config a
    ``rope_parameters`` field; gpt2's learned table and bloom's ALiBi have none)."""
    return "rope_parameters" in config_keys(type(config))


def apply_rope_scaling(config: Any, scaling: Mapping[str, Any], field_prefix: str = "model") -> Any:
    """Write the recipe's ``model.rope_scaling`` into ``config.rope_parameters`` (in place; returns ``config``).

    ``scaling``: ``type`` (one of :data:`ROPE_SCALING_TYPES`), ``factor`` (> 1), optional
    ``original_max_position_embeddings`` (default: the config's ``max_position_embeddings``) and the type's own keys
    (yarn: ``beta_fast``, ``beta_slow``, ``attention_factor``; llama3: ``low_freq_factor``, ``high_freq_factor``).
    ``rope_theta`` and ``partial_rotary_factor`` are kept. ``linear``, ``yarn`` and ``llama3`` set
    ``max_position_embeddings`` to ``factor x original`` (the window the scaled model serves, what evals and PoSE's
    default ``target_len`` read); ``dynamic`` keeps it, since transformers starts its scaling there.

    One-line :class:`UserError`: a model without RoPE, or a checkpoint whose RoPE is already scaled.

    >>> from transformers import LlamaConfig
    >>> c = apply_rope_scaling(LlamaConfig(max_position_embeddings=256), {"type": "yarn", "factor": 4.0})
    >>> c.max_position_embeddings, c.rope_parameters["rope_type"], c.rope_parameters["original_max_position_embeddings"]
    (1024, 'yarn', 256)
    """
    field = f"{field_prefix}.rope_scaling"
    kind, factor = scaling["type"], float(scaling["factor"])
    if not has_rope(config):
        raise UserError(f"{field}: a {config.model_type} model has no rotary position embeddings to scale (RoPE "
                        "scaling needs a RoPE model such as llama, qwen2 or mistral)")
    if hasattr(config, "standardize_rope_params"):
        config.standardize_rope_params()
    current = dict(getattr(config, "rope_parameters", None) or {})
    if any(isinstance(v, dict) for v in current.values()):
        raise UserError(f"{field}: {config.model_type} has one RoPE per layer type; scaling it is not supported here")
    if current.get("rope_type", "default") not in ("default", None):
        raise UserError(f"{field}: the model's RoPE is already scaled ({current.get('rope_type')}, factor "
                        f"{current.get('factor')}); scaling it again would compound the two (leave rope_scaling out)")
    original = int(scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
    params: dict[str, Any] = {"rope_type": kind, "factor": factor}
    for key in ("rope_theta", "partial_rotary_factor"):
        if current.get(key) is not None:
            params[key] = current[key]
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    params.update(_ROPE_DEFAULTS.get(kind, {}))
    params.update({k: float(scaling[k]) for k in _ROPE_KEYS.get(kind, ()) if scaling.get(k) is not None})
    config.rope_parameters = params
    config.max_position_embeddings = original if kind == "dynamic" else int(round(original * factor))
    if hasattr(config, "validate_rope"):
        config.validate_rope()
    return config


# --- config checks -----------------------------------------------------------------------------------------------
def _causal_config_class(model_type: str, field_prefix: str) -> type[transformers.PretrainedConfig]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    field = f"{field_prefix}.model_type"
    all_types = list(transformers.CONFIG_MAPPING.keys())
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type in all_types:
        return transformers.CONFIG_MAPPING[model_type]
    examples = ", ".join(EXAMPLE_MODEL_TYPES)
    if model_type in all_types:
        raise UserError(f"{field}: {model_type!r} has no causal LM head in transformers (expected one like {examples})")
    close = difflib.get_close_matches(str(model_type), list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UserError(f"{field}: unknown model type {model_type!r} ({hint}expected a transformers type like {examples})")


def config_keys(config_cls: type[transformers.PretrainedConfig]) -> set[str]:
    """Keys ``config_cls(**kwargs)`` understands: its dataclass fields, its attribute aliases (gpt2's ``hidden_size``
    for ``n_embd``) and, for RoPE models, the legacy ``rope_theta``/``rope_scaling``. ``transformers`` itself accepts
    any key silently (it becomes a stray attribute), which is how a typo goes unnoticed."""
    keys = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    keys |= set(getattr(config_cls, "attribute_map", {}) or {})
    if "rope_parameters" in keys:
        keys |= set(_ROPE_LEGACY_KEYS)
    return {k for k in keys if not k.startswith("_")}


POSITIVE_CONFIG_KEYS = frozenset({
    "hidden_size", "n_embd", "d_model", "intermediate_size", "n_inner", "num_attention_heads", "n_head",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "n_positions", "vocab_size", "image_size",
    "patch_size", "num_channels",
})
"""Sizes a model is built with: transformers does not check them, and 0 or a negative one fails deep in a module's
constructor (a tensor of negative dimension, ``0.0 ** -0.5``), found by the recipe fuzzer."""


def _check_config_keys(
    config_cls: type[transformers.PretrainedConfig], config: Mapping[str, Any], model_type: str, field_prefix: str,
    *, where: str | None = None,
) -> None:
    """Every key of ``config`` known to ``config_cls`` (else one line with a "did you mean"), and every size in
    :data:`POSITIVE_CONFIG_KEYS` >= 1. ``where``: the field of ``config`` itself (default ``<field_prefix>.config``;
    a LLaVA side passes ``model.config.vision_config``)."""
    known = config_keys(config_cls)
    where = where or f"{field_prefix}.config"
    for key in config:
        field = f"{where}.{key}"
        if key in _CONFIG_KEYS_ELSEWHERE:
            raise UserError(f"{field}: set by {_CONFIG_KEYS_ELSEWHERE[key]} instead, not under {where}")
        value = config[key]
        if key in POSITIVE_CONFIG_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 1:
            raise UserError(f"{field}: expected an integer >= 1 (got {value})")
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UserError(f"{field}: unknown key for {model_type} config{hint}")


def _is_config_rejection(err: BaseException) -> bool:
    from huggingface_hub.errors import StrictDataclassError

    # KeyError: a config value the model's constructor looks up and does not know (rope_scaling type "bogus")
    return isinstance(err, (StrictDataclassError, ValueError, TypeError, KeyError))


_FIELD_ERROR = re.compile(r"^Validation error for field '([^']+)':\s*")
_CLASS_ERROR = re.compile(r"^Class validation error for validator '[^']+':\s*")


def _config_error_message(err: BaseException, field_prefix: str) -> str:
    """``transformers``' message on one line, prefixed by the recipe field (``model.config.<key>`` when the strict
    dataclass names the field, else ``model.config``)."""
    text = str(err).strip()
    field = f"{field_prefix}.config"
    if isinstance(err, KeyError):  # the model's constructor looked a config value up in a table that lacks it
        return f"{field}: the model class does not know the value {text} (check rope_scaling / *_type values)"
    if match := _FIELD_ERROR.match(text):
        field = f"{field}.{match.group(1)}"
        text = text[match.end():]
    elif match := _CLASS_ERROR.match(text):
        text = text[match.end():]
    text = re.sub(r"^(ValueError|TypeError): ", "", text.strip())
    return f"{field}: {_one_line(text)}"


def _one_line(err: BaseException | str) -> str:
    return " ".join(str(err).split())


# --- LoRA ----------------------------------------------------------------------------------------------------------
def apply_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: list[str] | str = "all-linear",
    *,
    field_prefix: str = "model.lora",
) -> "peft.PeftModel":  # noqa: F821 -- peft is imported lazily (it is slow to import)
    """Wrap ``model`` in LoRA adapters (peft, ``task_type="CAUSAL_LM"``): base weights frozen, only the ``lora_A`` /
    ``lora_B`` matrices trainable. ``target_modules="all-linear"`` adapts every linear layer but the LM head (and
    gpt2's ``Conv1D`` layers); a list names module suffixes such as ``["q_proj", "v_proj"]``. The update is scaled by
    ``alpha / r``."""
    import peft

    if not isinstance(r, int) or r < 1:
        raise UserError(f"{field_prefix}.r: expected a positive int (got {r!r})")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"{field_prefix}.alpha: expected a positive number (got {alpha!r})")
    if not 0.0 <= float(dropout) < 1.0:
        raise UserError(f"{field_prefix}.dropout: expected a probability in [0, 1) (got {dropout!r})")
    lora_config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():
            # gpt2's Conv1D layers store weights transposed; peft sets fan_in_fan_out=True for them and warns each time
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated")  # peft 0.21 on tf 5
            return peft.get_peft_model(model, lora_config)
    except ValueError as err:
        raise UserError(f"{field_prefix}.target_modules: {_one_line(err)}") from err


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied weights (shared embedding and LM head) count once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- saving --------------------------------------------------------------------------------------------------------
def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: str | os.PathLike) -> Path:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` (created if needed) with ``save_pretrained``, weights in
    safetensors.

    - A plain model: ``config.json``, ``generation_config.json``, ``model.safetensors`` and the tokenizer files;
      ``build_model(path=out_dir, ...)`` loads it back with identical logits.
    - A LoRA :class:`peft.PeftModel`: the adapter only (``adapter_config.json``, ``adapter_model.safetensors``) and
      the tokenizer, not the base weights nor a merged copy. Load it with
      ``peft.PeftModel.from_pretrained(base, out_dir)`` on the same base model; for a merged checkpoint save
      ``model.merge_and_unload()`` instead.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # transformers 5 and peft write safetensors by default
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
