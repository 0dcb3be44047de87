"""The recipe schema: one YAML = name, seed, model, data, trainer, mitigations, evals, tracking, output_dir.

Everything is validated before anything runs, and every mistake becomes one :class:`UserError` line that names the
file, the field path and what was expected::

    recipes/x.yaml: trainer.max_steps: expected an integer >= 1 (got -5)
    recipes/x.yaml: trainer.max_step: unknown key (did you mean max_steps?)

The fixed sections are pydantic models. Mitigation and eval entries are validated against the ``Config`` dataclass of
the registered class (``mitigations.MITIGATIONS`` / ``evals.EVALS``), which stays free of pydantic: a strict pydantic
model is generated from the dataclass here, in the composition root.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from llm_limits.evals import EVALS
from llm_limits.evals.tasks import TASKS
from llm_limits.mitigations import MITIGATIONS
from llm_limits.trainers.recipe.errors import UserError


class Strict(BaseModel):
    """Unknown keys are errors; field doc strings become the schema's descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class TokenizerSpec(Strict):
    kind: Literal["char", "pretrained"] = "char"
    """``char``: a character tokenizer made locally; ``pretrained``: load one from ``path``."""
    path: str | None = None
    """Local directory of a Hugging Face tokenizer (kind ``pretrained``; defaults to ``model.path``)."""
    alphabet: str | None = None
    """Characters of the ``char`` tokenizer (default: printable ASCII)."""


class LoraSpec(Strict):
    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: int = Field(16, ge=1)
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or ``all-linear``."""


class RopeScalingSpec(Strict):
    """RoPE scaling written into the model's ``rope_parameters`` (transformers 5), for a model built from a config and
    for a loaded checkpoint alike; the method card of ``mitigations/positional`` says how it composes with PoSE."""

    type: Literal["linear", "dynamic", "yarn", "llama3"]
    """``linear`` (position interpolation, arXiv 2306.15595), ``dynamic`` (dynamic NTK: the base grows with the
    largest position id of each forward), ``yarn`` (arXiv 2309.00071), ``llama3`` (Llama 3.1's frequency bands)."""
    factor: float = Field(gt=1.0)
    """How many times the original window the scaled model covers (e.g. 4.0: 2k -> 8k)."""
    original_max_position_embeddings: int | None = Field(None, ge=1)
    """The window the model was trained at; default: its ``max_position_embeddings`` before scaling. ``linear``,
    ``yarn`` and ``llama3`` then set ``max_position_embeddings`` to ``factor`` times it (``dynamic`` keeps it: that is
    where its scaling starts)."""
    beta_fast: float | None = None
    """``yarn`` only: the high-frequency boundary of the ramp (transformers' default 32)."""
    beta_slow: float | None = None
    """``yarn`` only: the low-frequency boundary of the ramp (transformers' default 1)."""
    attention_factor: float | None = Field(None, gt=0)
    """``yarn`` only: the cos/sin scale; default ``0.1 ln(factor) + 1`` (the paper's sqrt(1/t))."""
    low_freq_factor: float | None = Field(None, gt=0)
    """``llama3`` only: wavelengths above ``original / low_freq_factor`` are interpolated fully (default 1.0)."""
    high_freq_factor: float | None = Field(None, gt=0)
    """``llama3`` only: wavelengths below ``original / high_freq_factor`` are kept (default 4.0)."""

    @model_validator(mode="after")
    def _fields_of_type(self) -> "RopeScalingSpec":
        own = {"yarn": ("beta_fast", "beta_slow", "attention_factor"), "llama3": ("low_freq_factor", "high_freq_factor")}
        for kind, names in own.items():
            for name in names:
                if getattr(self, name) is not None and self.type != kind:
                    raise ValueError(f"{name} applies to type {kind} only (got type {self.type})")
        return self


class ModelSpec(Strict):
    model_type: str | None = None
    """Build a fresh model of this transformers type from ``config`` (``llama``, ``qwen2``, ``gpt2``...)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the model type's config class (``hidden_size``, ``num_hidden_layers``...)."""
    path: str | None = None
    """Load a local Hugging Face model directory (or a hub id already in the local cache) instead."""
    pretrained: str | None = None
    """Load a pretrained model by name instead (``smollm2-135m-instruct``, or a name given to ``llm-limits models
    convert FILE.gguf --name NAME``): its converted directory in the cache (``$LLM_LIMITS_HOME/models/<name>``,
    default ``~/.cache/llm-limits/models/<name>``), pulled on first use; ``llm-limits models list`` shows the names.
    The tokenizer defaults to the model's own (``tokenizer.kind: pretrained``)."""
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype when the model is built or loaded."""
    trust_remote_code: bool = False
    """Run code shipped with a checkpoint. Off unless you turn it on; logged when on."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel (transformers' ``attn_implementation``); default: transformers' choice."""
    lora: LoraSpec | None = None
    """Train LoRA adapters (PEFT) instead of all weights."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (less memory, about a
    third more compute); non-reentrant, so it composes with LoRA, DDP and DeepSpeed."""
    rope_scaling: RopeScalingSpec | None = None
    """Scale the model's rotary positions to a longer window (``{type: yarn, factor: 4.0}``); refused on a model
    without RoPE. Composes with ``positional``'s PoSE: its ``target_len`` must lie within the scaled window."""
    freeze: list[Literal["vision_tower", "projector", "language_model"]] = Field(default_factory=list)
    """Vision-language models: parts frozen for the whole run (LLaVA freezes its vision_tower throughout)."""

    @field_validator("pretrained")
    @classmethod
    def _known_pretrained(cls, name: str | None) -> str | None:
        from llm_limits.trainers.build.pretrained import known_names, unknown_name_message

        if name is not None and name not in known_names():
            raise ValueError(unknown_name_message(name))
        return name

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSpec":
        if sum(x is not None for x in (self.model_type, self.path, self.pretrained)) != 1:
            raise ValueError("set exactly one of model_type (build from config) or path (load a local model) or "
                             "pretrained (a model by name: llm-limits models list)")
        if (self.path is not None or self.pretrained is not None) and self.config:
            raise ValueError("config applies only with model_type; a loaded model keeps its own config")
        if self.pretrained is not None and self.tokenizer.kind == "char":
            if "kind" in self.tokenizer.model_fields_set:
                raise ValueError(f"tokenizer.kind: char cannot read {self.pretrained}'s text; a pretrained model "
                                 "comes with its own tokenizer (kind: pretrained)")
            self.tokenizer = self.tokenizer.model_copy(update={"kind": "pretrained"})
        return self


class DataSpec(Strict):
    task: str = "synthetic_text"
    """Task generator of evals/tasks that makes the training text (ignored when ``path`` is set)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the task's config (e.g. ``num_docs``, ``doc_chars``)."""
    path: str | None = None
    """A JSONL file to train on instead of the generator: ``{"text": ...}`` lines (packed into blocks) or needle
    records ``{"context", "query", "answer", "needle_spans"?}`` (the ``ruler`` schema; one padded row each)."""
    seq_len: int = Field(64, ge=8)
    """Tokens per training sequence (documents are concatenated and cut into blocks of this length)."""
    batch_size: int = Field(16, ge=1)
    """Sequences per micro-batch on each device."""
    val_fraction: float = Field(0.05, ge=0.0, lt=0.5)
    """Fraction of blocks (or examples) held out for the validation loss."""
    loss_on: Literal["all", "answer"] = "all"
    """For question/answer tasks (``ruler``): train on every token, or on the answer tokens only."""
    packing: Literal["auto", "blocks", "per_document", "none"] = "auto"
    """How examples fill rows of ``seq_len`` tokens. ``auto``: ``blocks`` for text documents, ``none`` for
    question/answer and prompt/completion examples. ``blocks`` (text documents only) concatenates the documents (EOS
    between) and cuts ``seq_len`` blocks, positions running on across documents (Hugging Face's ``group_texts``).
    ``per_document``: every document or example starts at position 0 and attends only to itself (rows carry
    ``position_ids`` and no attention mask; transformers then masks attention per document, with sdpa, eager and
    flash attention alike): text documents in the same blocks as ``blocks``; question/answer examples (Lightning)
    and SFT prompt/completion examples (TRL) packed whole by TRL's best-fit decreasing. ``none``: one document or
    example per row, cut at ``seq_len`` and right-padded (no loss on padding)."""
    root: str | None = None
    """A folder the recipe's data files must stay inside: ``data.path``, an image folder's ``data.params.root`` and
    every eval's ``path`` are refused if they resolve (symlinks followed) outside it. Unset: no restriction (an image
    folder's images still must stay inside its own root)."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """How the TRL backend writes the prompts of its prompt/completion records (SFT, GRPO and reward models), the way
    the evals write theirs (``evals[i].prompt_format``), so a fine-tune and its evals see the same prompts: ``chat``
    makes each prompt one user turn of the tokenizer's chat template followed by the generation prompt, and the
    completion is the assistant's answer after it; ``plain`` trains on the prompt as it is; ``auto``: ``chat`` when the
    tokenizer has a chat template, else ``plain``. The Lightning backend trains on plain text (``chat`` is refused
    there)."""

    @model_validator(mode="after")
    def _known_task(self) -> "DataSpec":
        if self.path is None and self.task not in TASKS and self.task != "image_folder":
            raise ValueError(f"unknown task {self.task!r}{_did_you_mean(self.task, TASKS)} (known: {', '.join(TASKS)})")
        return self


Strategy = Literal["auto", "ddp", "deepspeed_stage_1", "deepspeed_stage_2", "deepspeed_stage_3"]


class TrlSpec(Strict):
    """The TRL backend's own knobs (``trainer.backend: trl``); the shared ones (lr, steps, batch, precision,
    strategy, checkpoints) stay in ``trainer``."""

    algorithm: Literal["sft", "grpo", "prm"] = "sft"
    """``sft``: TRL's SFTTrainer on prompt/completion records (loss on the completion); ``grpo``: TRL's GRPOTrainer
    with the mitigations' rewards (step-level advantages when a mitigation asks for them); ``prm``: a reward model
    (token-classification head) trained on step labels with a Hugging Face Trainer (TRL dropped its PRMTrainer)."""
    num_generations: int = Field(8, ge=2)
    """GRPO: completions sampled per prompt (the group that normalises rewards)."""
    max_completion_length: int = Field(64, ge=1)
    """GRPO: tokens generated per completion at most."""
    temperature: float = Field(1.0, gt=0)
    """GRPO: sampling temperature."""
    beta: float = Field(0.0, ge=0)
    """GRPO: KL coefficient against the reference (start) model; 0 loads no reference model (TRL's default)."""
    epsilon: float = Field(0.2, gt=0)
    """GRPO: PPO clip range."""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = "dapo"
    """GRPO: how token losses are averaged (TRL's ``loss_type``; ``grpo`` is the DeepSeekMath paper's)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: divide sequence-level advantages by the group's reward std (``group``, the paper's), the batch's, or not."""
    num_iterations: int = Field(1, ge=1)
    """GRPO: optimisation passes per generated batch (the paper's mu)."""
    reward_model_target: Literal["process", "outcome"] = "process"
    """PRM: ``process`` puts each step's label at its step end (a PRM); ``outcome`` puts the final answer's
    correctness at every step end (an outcome reward model, the baseline of Lightman et al. 2023)."""


class StageSpec(Strict):
    until: float = Field(gt=0.0, le=1.0)
    """This stage runs while the run's progress (step / max_steps) is below ``until``; the last stage's is 1.0."""
    train: list[Literal["vision_tower", "projector", "language_model"]] = Field(min_length=1)
    """The parts this stage trains; every other part gets no update during it."""


class TrainerSpec(Strict):
    backend: Literal["lightning", "trl"] = "lightning"
    """Training backend: ``lightning`` (causal-LM training with every mitigation hook) or ``trl`` (SFT, GRPO and
    reward models; settings in ``trainer.trl``)."""
    trl: TrlSpec = Field(default_factory=TrlSpec)
    """Settings of the TRL backend (ignored by ``lightning``)."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps to train (with ``max_tokens``: a hard cap on steps)."""
    max_tokens: int | None = Field(None, ge=1)
    """Train until this many tokens (non-padding, summed over ranks) have been seen, and run the LR schedule on token
    progress (``warmup_tokens``, then ``lr_schedule`` decay to ``max_tokens``). Arms whose batches differ in length (a
    sequence-length curriculum, retrieval contexts with distractors) then compare at equal tokens. Set ``max_steps``
    high enough not to stop first. The trl backend (``sft`` only) turns the budget into steps from the training set's
    mean example length and stops once the budget is reached."""
    warmup_tokens: int = Field(0, ge=0)
    """Linear LR warmup in tokens (with ``max_tokens``)."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear LR warmup steps."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """LR decay after warmup (transformers' schedulers)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Gradient norm clip; null to disable."""
    precision: Literal["32-true", "bf16-mixed", "bf16-true", "16-mixed"] = "32-true"
    """``32-true``: fp32 weights, optimizer state and compute. ``bf16-mixed``: fp32 weights and optimizer state,
    matrix multiplies in bf16 (autocast); under a DeepSpeed strategy the engine instead keeps bf16 weights with fp32
    master weights and fp32 optimizer state. ``bf16-true`` (lightning only): bf16 weights, gradients and optimizer
    state, no fp32 copy (the least memory; small updates can round away). ``16-mixed``: fp16 autocast with loss
    scaling (GPU only)."""
    accelerator: Literal["cpu", "gpu", "auto"] = "cpu"
    """Where to train."""
    devices: int = Field(1, ge=1)
    """Processes (CPU) or GPUs per node."""
    num_nodes: int = Field(1, ge=1)
    """Nodes."""
    strategy: Strategy = "auto"
    """``auto``: one plain process per device, no DeepSpeed (on one GPU: plain single-GPU training, the fastest
    choice when the model, its gradients and optimizer state fit); ``ddp`` (gloo on CPU, NCCL on GPU) or DeepSpeed
    ZeRO stages (lightning: stages 1-2, CUDA only; trl: 1-3, on CPU too, under torchrun)."""
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    """DeepSpeed ZeRO-Offload: keep the optimizer state (``optimizer``, ZeRO 1-3) and the parameters
    (``optimizer_and_params``, ZeRO-3 only) in CPU memory. Needs a ``deepspeed_stage_N`` strategy."""
    liger: bool = False
    """Liger kernels (liger-kernel, Triton; CUDA GPUs only, ``pip install 'llm-limits[gpu]'``): fused RMSNorm, SwiGLU
    and RoPE on both backends, and on the lightning backend also the fused linear cross-entropy, which never holds the
    whole ``[batch, seq, vocab]`` logits in training (TRL's SFT computes its loss through its own chunked LM head
    instead; a mitigation with an ``extra_loss`` keeps the plain head, since it may read the logits). Applied to the
    model once, before training; the saved weights are the same tensors."""
    compile: bool = False
    """``torch.compile`` the model's forward for training (both backends; the evals run the plain forward). The first
    steps pay the compilation (seconds to minutes); shapes that change (a sequence-length curriculum) recompile. On
    CPU it needs a C++ compiler. Same loss as the plain path within float rounding (tests/test_kernels.py)."""
    fused_optimizer: bool | None = None
    """``true``: AdamW with ``fused=True`` (one kernel updates every parameter, instead of a few multi-tensor
    kernels per step); ``false``: the unfused AdamW (foreach); unset: each backend's default, which differ: lightning
    unfused, trl fused (transformers' ``optim`` default on torch >= 2.8). Same update within float rounding."""
    sequence_parallel: int = Field(1, ge=1)
    """Ulysses sequence parallelism (trl backend, ``sft``): each group of this many ranks splits every sequence into
    equal slices and exchanges attention heads by all-to-all, so each rank holds 1/N of the activations. Must divide
    ``devices x num_nodes`` and ``data.seq_len``; 1 = off. docs/scaling.md."""
    checkpoint_every: int = Field(0, ge=0)
    """Save a checkpoint every N optimizer steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Periodic checkpoints kept (plus ``last.ckpt``)."""
    log_every: int = Field(5, ge=1)
    """Log training metrics every N optimizer steps."""
    val_every: int = Field(0, ge=0)
    """Validation loss every N optimizer steps (0: once, at the end)."""
    stages: list[StageSpec] = Field(default_factory=list)
    """Vision-language models, Lightning backend: train parts in stages within one run (LLaVA's two stages:
    ``[{until: 0.3, train: [projector]}, {until: 1.0, train: [projector, language_model]}]``). Empty: every part not
    in ``model.freeze`` trains throughout."""

    @model_validator(mode="after")
    def _checks(self) -> "TrainerSpec":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps must be < max_steps (got {self.warmup_steps} >= {self.max_steps})")
        if self.max_tokens is not None and self.warmup_tokens >= self.max_tokens:
            raise ValueError(f"warmup_tokens must be < max_tokens (got {self.warmup_tokens} >= {self.max_tokens})")
        if self.max_tokens is None and self.warmup_tokens:
            raise ValueError("warmup_tokens needs max_tokens (the schedule runs in steps otherwise: use warmup_steps)")
        if self.backend == "trl" and self.max_tokens is not None and self.trl.algorithm != "sft":
            raise ValueError(f"max_tokens: the trl backend's {self.trl.algorithm} counts optimizer steps; use max_steps "
                             "(max_tokens works with trl.algorithm: sft)")
        if self.offload != "none" and not self.strategy.startswith("deepspeed"):
            raise ValueError(f"offload: {self.offload} needs a DeepSpeed strategy (deepspeed_stage_1/2/3), not "
                             f"{self.strategy}")
        if self.backend == "lightning" and self.strategy == "deepspeed_stage_3":
            raise ValueError("strategy: deepspeed_stage_3 is not supported with the lightning backend: ZeRO-3 leaves "
                             "each rank a shard of the weights, and the saved model and the evals after training need "
                             "them whole on rank 0 (use deepspeed_stage_2, or backend: trl, whose ZeRO-3 gathers them)")
        if self.offload == "optimizer_and_params" and self.strategy != "deepspeed_stage_3":
            raise ValueError(f"offload: optimizer_and_params offloads parameters, which only ZeRO-3 partitions "
                             f"(strategy: deepspeed_stage_3, not {self.strategy}); use offload: optimizer")
        if self.stages:
            untils = [s.until for s in self.stages]
            if untils != sorted(untils) or len(set(untils)) != len(untils) or untils[-1] != 1.0:
                raise ValueError(f"stages: until must increase stage by stage and end at 1.0 (got {untils})")
            if self.backend != "lightning" or self.strategy.startswith("deepspeed"):
                raise ValueError("stages: run in one Lightning run without DeepSpeed (DeepSpeed owns the gradients); "
                                 "with DeepSpeed make one recipe per stage, as recipes/multimodal/llava-7b-stage*.yaml do")
        if self.backend == "trl" and self.precision == "bf16-true":
            raise ValueError("precision: the trl backend takes bf16-mixed (set model.dtype: bfloat16 for bf16 weights)")
        return self


class EntrySpec(Strict):
    """A mitigation or eval entry; its other keys are checked against the registered class's ``Config``."""

    model_config = ConfigDict(extra="allow")
    name: str


class EvalEntrySpec(EntrySpec):
    when: list[Literal["before", "after"]] = Field(default_factory=lambda: ["before", "after"])
    """When the eval runs: before training, after, or both (the limit delta needs both)."""


class WandbSpec(Strict):
    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline (default: files under the run directory, sync later), online (needs WANDB_API_KEY), or disabled."""
    project: str = "llm-limits"
    entity: str | None = None
    group: str | None = None
    """Runs of one comparison share a group (ablations set it)."""
    tags: list[str] = Field(default_factory=list)
    job_type: str | None = None
    """wandb job type (an ablation sets it to the arm's label)."""


class AblateSpec(Strict):
    """``llm-limits ablate``: one arm per combination of the grid's values and per seed."""

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Recipe key path -> the values to try, e.g. ``mitigations.0.pose.enabled: [true, false]``."""
    seeds: int = Field(1, ge=1)
    """Seeds per combination (``seed`` = 0 .. seeds-1)."""
    control: dict[str, Any] = Field(default_factory=dict)
    """The grid values of the control arm that every other arm is compared with (default: the first combination)."""


class TrackingSpec(Strict):
    wandb: WandbSpec = Field(default_factory=WandbSpec)


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name; runs go to ``<output_dir>/<name>/<time>/``."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed of weights, data and data order (numpy takes 0 to 2**32 - 1; mitigations derive theirs by adding small
    offsets, so the recipe's stays below 2**31)."""
    model: ModelSpec
    data: DataSpec = Field(default_factory=DataSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    mitigations: list[EntrySpec] = Field(default_factory=list)
    evals: list[EvalEntrySpec] = Field(default_factory=list)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output_dir: str = "runs"
    """Root of run directories."""
    ablate: AblateSpec | None = None
    """The ablation grid for ``llm-limits ablate`` (``train`` ignores it)."""


@dataclasses.dataclass
class ResolvedRecipe:
    """A validated recipe plus the typed configs of its mitigation and eval entries, in recipe order."""

    recipe: Recipe
    mitigations: list[tuple[str, Any]]
    """(name, Config instance) per mitigation entry."""
    evals: list[tuple[str, Any, list[str]]]
    """(name, Config instance, when) per eval entry."""
    source: str
    """The file it came from (for messages)."""

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved recipe (defaults filled in), as written to the run directory."""
        return self.recipe.model_dump(mode="json")


# --- loading -------------------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file into a dict; a missing file or a YAML syntax error is a one-line :class:`UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: file not found" if not p.exists() else f"{path}: not a file")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise UserError(f"{path}{where}: YAML syntax error: {e.problem or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of recipe sections at the top level (got {_kind(data)})")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps the last silently,
    so a recipe with two ``lr:`` lines would train with whichever came second)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once in a mapping)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "command line") -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.path=value`` overrides applied (values parsed as YAML).

    List items are addressed by index: ``mitigations.0.enabled=false``. Missing mapping keys are created, so the
    schema (not this function) reports a key that does not exist.

    >>> apply_overrides({"trainer": {"max_steps": 5}}, ["trainer.max_steps=50", "model.config.hidden_size=128"])
    {'trainer': {'max_steps': 50}, 'model': {'config': {'hidden_size': 128}}}
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"{source}: override {item!r}: expected KEY.PATH=VALUE, e.g. trainer.max_steps=50")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node: Any = out
        parts = key.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            here = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"{source}: override {item!r}: {here}: expected a list index < {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise UserError(f"{source}: override {item!r}: {'.'.join(parts[:i])} is a {_kind(node)}, not a section")
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None, *, check_hardware: bool = True) -> ResolvedRecipe:
    """Read, override and validate a recipe. Every problem is a one-line :class:`UserError`."""
    source = str(path)
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_recipe(data, source, check_hardware=check_hardware)


def validate_recipe(data: dict[str, Any], source: str = "recipe", *, check_hardware: bool = True) -> ResolvedRecipe:
    """Validate a recipe dict. ``check_hardware=False`` checks the schema only (``llm-limits validate``: a recipe for
    8 GPUs validates on a laptop); ``train`` also checks that this machine can run it."""
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source}: {_format_error(e, Recipe, data)}") from None
    mitigations = [
        (entry.name, derive_seeds(_entry_config(entry, i, "mitigations", MITIGATIONS, source), recipe.seed))
        for i, entry in enumerate(recipe.mitigations)
    ]
    evals = [
        (entry.name, _entry_config(entry, i, "evals", EVALS, source), list(entry.when))
        for i, entry in enumerate(recipe.evals)
    ]
    for i, (name, config, _) in enumerate(evals):
        try:  # an eval may reject a config that is well typed but inconsistent (seq_len not a multiple of buckets)
            EVALS[name](config).spec()
        except ValueError as e:
            raise UserError(f"{source}: evals[{i}]: {e}") from None
    _check_backend(recipe, source)
    _check_packing(recipe, mitigations, source)
    from llm_limits.trainers.recipe.long_context import check_long_context

    check_long_context(recipe, mitigations, source)
    _check_kernels(recipe, source)
    if check_hardware:
        _check_hardware(recipe, source)
    return ResolvedRecipe(recipe=recipe, mitigations=mitigations, evals=evals, source=source)


def _check_backend(recipe: Recipe, source: str) -> None:
    """Cross-section rules of the TRL backend (the schema of one section cannot see the others)."""
    t = recipe.trainer
    if t.backend != "trl":
        if recipe.data.prompt_format == "chat":
            raise UserError(f"{source}: data.prompt_format: chat writes the prompts of the trl backend's "
                            f"prompt/completion records; the {t.backend} backend trains on plain text (use auto or "
                            "plain)")
        return
    packing = recipe.data.packing
    if t.trl.algorithm == "sft" and packing == "blocks":
        raise UserError(f"{source}: data.packing: blocks cuts a stream of text documents; SFT prompt/completion "
                        "examples pack with per_document (whole examples per row) or none (one row each)")
    if t.trl.algorithm != "sft" and packing in ("blocks", "per_document"):
        raise UserError(f"{source}: data.packing: {packing} applies to SFT and language-model data; the trl "
                        f"backend's {t.trl.algorithm} keeps one example per row (use auto or none)")
    if t.trl.algorithm != "grpo":
        return
    world = t.devices * t.num_nodes
    per_generation = recipe.data.batch_size * t.grad_accum * world
    if per_generation % t.trl.num_generations:
        raise UserError(
            f"{source}: data.batch_size: GRPO generates data.batch_size x trainer.grad_accum x devices = "
            f"{per_generation} completions per batch, which must be a multiple of trainer.trl.num_generations "
            f"({t.trl.num_generations})"
        )


def _check_packing(recipe: Recipe, mitigations: list[tuple[str, Any]], source: str) -> None:
    """``data.packing: per_document`` marks documents by their position ids; a mitigation that rewrites them (or
    cuts and moves tokens in a row) would silently merge the documents again."""
    if recipe.data.packing != "per_document":
        return
    for i, (name, config) in enumerate(mitigations):
        if MITIGATIONS[name](config).rewrites_positions():
            raise UserError(
                f"{source}: mitigations[{i}]: {name} rewrites position ids or cuts rows, which data.packing: "
                "per_document uses to keep documents apart (use packing: blocks or none with it)"
            )


def _check_kernels(recipe: Recipe, source: str) -> None:
    """``trainer.liger`` on a model type Liger has no kernels for (read from ``model.path``'s config.json when the
    model is loaded), whatever the machine."""
    if not recipe.trainer.liger:
        return
    from llm_limits.trainers.build.kernels import LIGER_MODEL_TYPES, model_type_of

    kind = model_type_of(recipe.model)
    if kind is not None and kind not in LIGER_MODEL_TYPES:
        raise UserError(f"{source}: trainer.liger: liger-kernel has no kernels for {kind} models (it patches "
                        f"{', '.join(LIGER_MODEL_TYPES[:6])}, ...); set liger: false")


def _check_hardware(recipe: Recipe, source: str) -> None:
    """Combinations that cannot run, caught before anything is built."""
    t = recipe.trainer
    cuda = _cuda_available()
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not cuda)
    if t.strategy.startswith("deepspeed") and on_cpu and t.backend == "lightning":
        raise UserError(
            f"{source}: trainer.strategy: {t.strategy} needs CUDA GPUs with the Lightning backend "
            "(Lightning's DeepSpeed strategy is CUDA-only); on CPU use strategy: ddp"
        )
    if t.accelerator == "gpu" and not cuda:
        raise UserError(f"{source}: trainer.accelerator: gpu asked for but no CUDA device is visible (use cpu)")
    if not on_cpu:
        gpus = _cuda_device_count()
        if t.devices > gpus:
            raise UserError(f"{source}: trainer.devices: {t.devices} GPUs asked for but this node has {gpus}")
    elif t.devices > (os.cpu_count() or 1):
        raise UserError(f"{source}: trainer.devices: {t.devices} processes asked for but this machine has "
                        f"{os.cpu_count()} CPU cores (use at most that many)")
    from llm_limits.trainers.launch import check_rendezvous

    check_rendezvous(t, source)
    if t.precision == "16-mixed" and on_cpu:
        raise UserError(f"{source}: trainer.precision: 16-mixed needs a GPU; on CPU use 32-true or bf16-mixed")
    _check_kernel_hardware(t, on_cpu, source)
    if recipe.model.attn_implementation == "flash_attention_2":
        if on_cpu:
            raise UserError(f"{source}: model.attn_implementation: flash_attention_2 runs on CUDA GPUs only; on CPU "
                            "use sdpa or eager")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(f"{source}: model.attn_implementation: flash_attention_2 needs the flash-attn package, "
                            "which is not installed here (pip install flash-attn --no-build-isolation, or use sdpa)")


def _check_kernel_hardware(t: TrainerSpec, on_cpu: bool, source: str) -> None:
    """The training switches (``liger``, ``compile``, ``fused_optimizer``) where this machine cannot run them."""
    import llm_limits.trainers.build.kernels as kernels

    if t.liger and on_cpu:
        raise UserError(f"{source}: trainer.liger: Liger's kernels are Triton GPU kernels and cannot run on the CPU "
                        "(set liger: false, or train on a CUDA GPU)")
    if t.liger and not kernels.liger_installed():
        raise UserError(f"{source}: trainer.liger: needs the liger-kernel package, which is not installed here "
                        "(pip install 'llm-limits[gpu]', or set liger: false)")
    if t.compile and on_cpu and kernels.cpp_compiler() is None:
        raise UserError(f"{source}: trainer.compile: torch.compile on the CPU needs a C++ compiler (g++ or clang++, "
                        "or $CXX), and none is on PATH (install one, or set compile: false)")
    if t.fused_optimizer:  # true: asked for by the recipe (unset keeps the backend's default, which checks itself)
        device = "cpu" if on_cpu else "cuda"
        if not kernels.fused_adamw_supported(device):
            raise UserError(f"{source}: trainer.fused_optimizer: this torch ({kernels.torch_version()}) has no fused "
                            f"AdamW for {device} (set fused_optimizer: false)")


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


@functools.cache
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --- entries against registered dataclass configs --------------------------------------------------------------------
def derive_seeds(config: Any, seed: int) -> Any:
    """Fill every ``seed`` field left ``None`` in a mitigation's config (nested sections included) with the recipe's
    ``seed`` plus the field's ``seed_offset`` metadata, in place, so every training-side draw varies with the run's
    seed unless the recipe fixes it; results.json's ``mitigations`` records the seeds used (``--resume`` derives the
    same ones from the run's recipe.yaml). Eval data is seeded by each eval's own ``seed``: the arms of an ablation
    are compared on the same questions.

    >>> from llm_limits.mitigations.positional import PositionalConfig
    >>> c = derive_seeds(PositionalConfig(), 7)
    >>> c.pose.seed, c.balanced.seed
    (7, 8)
    """
    if not dataclasses.is_dataclass(config):
        return config
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "seed" and value is None and "seed_offset" in f.metadata:
            setattr(config, f.name, seed + int(f.metadata["seed_offset"]))
        elif dataclasses.is_dataclass(value):
            derive_seeds(value, seed)
    return config


def _entry_config(entry: EntrySpec, index: int, section: str, registry: dict[str, Any], source: str) -> Any:
    where = f"{section}[{index}]"
    if entry.name not in registry:
        raise UserError(
            f"{source}: {where}.name: unknown {section[:-1]} {entry.name!r}"
            f"{_did_you_mean(entry.name, registry)} (known: {', '.join(sorted(registry)) or 'none'})"
        )
    config_cls = registry[entry.name].Config
    params = dict(entry.model_extra or {})
    model = strict_model_for(config_cls)
    try:
        validated = model.model_validate(params)
    except ValidationError as e:
        raise UserError(f"{source}: {where}.{_format_error(e, model, params)}") from None
    try:  # a config's own consistency checks (__post_init__) raise ValueError naming the field
        return to_dataclass(config_cls, validated)
    except ValueError as e:
        raise UserError(f"{source}: {where}: {e}") from None


@functools.cache
def strict_model_for(cls: type) -> type[BaseModel]:
    """A strict pydantic model mirroring a (possibly nested) stdlib dataclass: same fields, types and defaults,
    unknown keys forbidden. Nested dataclass fields get their own strict model."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            tp = strict_model_for(tp)
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = ...
        fields[f.name] = (tp, default)
    return create_model(
        f"{cls.__name__}Schema", __config__=ConfigDict(extra="forbid", strict=False, validate_default=False), **fields
    )


def to_dataclass(cls: type, validated: BaseModel) -> Any:
    """Turn a model made by :func:`strict_model_for` back into the dataclass (recursively)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(validated, f.name)
        values[f.name] = to_dataclass(hints[f.name], v) if isinstance(v, BaseModel) else v
    return cls(**values)


# --- error formatting ----------------------------------------------------------------------------------------------
_EXPECTED = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "list_type": "expected a list",
    "missing": "required field is missing",
}


def _format_error(err: ValidationError, model: type[BaseModel], data: Any) -> str:
    """One line for the first error: ``field.path: what was expected (got X)``."""
    e = err.errors(include_url=False)[0]
    loc = [p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "function-before"))]
    path = _path(loc)
    kind = e["type"]
    if kind == "extra_forbidden":
        known = _known_fields(model, loc[:-1], data)
        return f"{path}: unknown key{_did_you_mean(str(loc[-1]), known)} (expected one of: {', '.join(known)})"
    if kind == "literal_error":
        expected = e.get("ctx", {}).get("expected", "")
        return f"{path}: expected one of {expected} (got {e['input']!r})"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        bound = next(iter(e["ctx"].values()))
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}[kind]
        what = "an integer" if isinstance(bound, int) and isinstance(e["input"], int) else "a number"
        return f"{path}: expected {what} {op} {bound} (got {e['input']!r})"
    if kind == "string_pattern_mismatch":
        return f"{path}: expected letters, digits, '_', '-' or '.' (got {e['input']!r})"
    if kind == "value_error":
        msg = e["msg"].removeprefix("Value error, ")
        return f"{path}: {msg}" if path else msg
    expected = _EXPECTED.get(kind, e["msg"])
    got = "" if kind == "missing" else f" (got {e['input']!r})"
    return f"{path}: {expected}{got}" if path else f"{expected}{got}"


def _path(loc: list[Any]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _known_fields(model: type[BaseModel], loc: list[Any], data: Any) -> list[str]:
    """Field names of the (sub)model at ``loc``, for "did you mean"."""
    cls: Any = model
    for p in loc:
        if isinstance(p, int):
            continue
        field = getattr(cls, "model_fields", {}).get(p)
        if field is None:
            return []
        cls = _model_in(field.annotation)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", type(None): "nothing"}.get(type(value), type(value).__name__)


def describe_schema() -> dict[str, Any]:
    """The JSON schema of the fixed recipe sections (for docs and editors)."""
    return Recipe.model_json_schema()
