"""The training switches of ``trainer.liger``, ``trainer.compile`` and ``trainer.fused_optimizer``: what each needs
from the machine (asked by the recipe check before anything is built), and how each is applied, once, for both
backends.

- Liger kernels (``liger-kernel``, pinned as the ``gpu`` extra): RMSNorm, SwiGLU and RoPE patched on the model
  instance; the fused linear cross-entropy where the backend computes its loss from ``outputs.loss`` alone.
- ``torch.compile``: the model's ``forward`` is compiled while training runs (:func:`compiled_forward`) and restored
  after, so the state dict keeps its names (no ``_orig_mod.`` prefix: checkpoints and resume do not change) and the
  evals after training run the plain forward (generation would recompile at every new length).
- Fused AdamW: ``torch.optim.AdamW(fused=True)`` on the devices this torch has the kernel for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

from llm_limits.trainers.recipe.errors import UserError

LIGER_VERSION = "0.8.5"
"""The liger-kernel release pinned in pyproject.toml's ``gpu`` extra."""

LIGER_MODEL_TYPES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "smollm3", "mixtral",
    "granite", "olmo2", "olmo3", "glm4", "qwen3_moe", "llava", "mllama", "mllama_text_model", "llama4_text", "llama4",
    "ministral", "nemotron", "paligemma", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "smolvlm", "gpt_oss",
    "deepseek_v2", "deepseek_v3", "exaone4", "falcon_h1", "hunyuan_v1_dense", "hunyuan_v1_moe",
)
"""Model types liger-kernel 0.8.5 patches (a subset of its ``MODEL_TYPE_TO_APPLY_LIGER_FN``; scripts/gpu_checks.sh
checks it against the installed package)."""


# --- what the machine can run (the recipe check asks these) ------------------------------------------------------------
def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend (inductor) would call: ``$CXX``, else g++ or clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx)
    return shutil.which("g++") or shutil.which("clang++")


def fused_adamw_supported(device_type: str) -> bool:
    """Whether this torch has a fused AdamW kernel for ``device_type`` (``cpu``, ``cuda``)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without fused optimizers at all
        return False
    return device_type in _get_fused_kernels_supported_devices()


def torch_version() -> str:
    return torch.__version__


def model_type_of(model_spec: Any) -> str | None:
    """The transformers model type a recipe's ``model`` section builds or loads, where it can be known before
    building: ``model_type``, or ``model_type`` in ``model.path``'s config.json; ``None`` otherwise."""
    if model_spec.model_type is not None:
        return str(model_spec.model_type)
    if model_spec.path is not None:
        config = Path(model_spec.path) / "config.json"
        try:
            return str(json.loads(config.read_text()).get("model_type")) if config.is_file() else None
        except (OSError, ValueError):
            return None  # the model builder says what is wrong with the file
    return None


# --- applying them -------------------------------------------------------------------------------------------------
def apply_liger(model: torch.nn.Module, *, fused_linear_cross_entropy: bool) -> torch.nn.Module:
    """Patch ``model`` (a transformers model, or a PEFT wrapper of one) in place with Liger's kernels: RMSNorm,
    SwiGLU, RoPE, and the fused linear cross-entropy when asked (its forward then returns ``loss`` and no ``logits``
    in training; logits as usual otherwise). A token-classification model never gets the fused cross-entropy."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(getattr(base, "config", None), "model_type", None)
    if kind not in LIGER_MODEL_TYPES:
        raise UserError(f"trainer.liger: liger-kernel has no kernels for {kind} models (set liger: false)")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance  # what transformers' own integration calls

    causal_lm = type(base).__name__.endswith("ForCausalLM") or type(base).__name__.endswith("ForConditionalGeneration")
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=fused_linear_cross_entropy and causal_lm)
    return model


@contextlib.contextmanager
def compiled_forward(model: torch.nn.Module, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Within the block, ``model.forward`` is ``torch.compile``'d (whatever forward the model has then, a trainer's
    patched one included); after it, the forward the model had before. The module, its parameters and its state
    dict's names stay the same objects, so optimizers, DeepSpeed and checkpoints see no wrapper."""
    if not enabled:
        yield model
        return
    had = "forward" in model.__dict__
    before = model.__dict__.get("forward")
    model.forward = torch.compile(model.forward)
    try:
        yield model
    finally:
        if had:
            model.forward = before
        else:
            del model.forward


def adamw(params: Any, *, lr: float, fused: bool | None) -> torch.optim.AdamW:
    """torch's AdamW: fused (one kernel for all parameters) when ``fused``; otherwise torch's default (foreach where
    the device has it), which is the lightning backend's default."""
    return torch.optim.AdamW(params, lr=lr, fused=True) if fused else torch.optim.AdamW(params, lr=lr)


def hf_optim(fused: bool | None) -> dict[str, str]:
    """``TrainingArguments`` keywords for ``trainer.fused_optimizer``: unset keeps transformers' default
    (``adamw_torch_fused`` on torch >= 2.8)."""
    return {} if fused is None else {"optim": "adamw_torch_fused" if fused else "adamw_torch"}
