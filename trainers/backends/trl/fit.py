"""Training arguments, DeepSpeed, callbacks, and :func:`fit`: the TRL backend from a recipe to a trained model."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from llm_limits.mitigations.base import Mitigation
from llm_limits.trainers.backends.base import ADAPTER_DIR, MODEL_DIR, Fitted, is_rank_zero
from llm_limits.trainers.backends.checkpoints import resume_point, write_manifest
from llm_limits.trainers.backends.hooks import STATE_FILE, HookDriver, load_state, save_state
from llm_limits.trainers.backends.trl.data import build_datasets, load_prompt_records
from llm_limits.trainers.backends.trl.trainers import PRMTrainer, _grpo_trainer_cls, prm_collator, sft_trainer
from llm_limits.trainers.build import kernels
from llm_limits.trainers.build.models import build_model, save_model
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import DataSpec, Recipe, TrainerSpec

# --- arguments, DeepSpeed, callbacks ---------------------------------------------------------------------------------
def deepspeed_config(strategy: str, offload: str = "none") -> dict[str, Any] | None:
    """The ZeRO config for ``deepspeed_stage_N`` (``"auto"`` values are filled in by the HF integration from the
    training arguments, so batch size, accumulation, clipping and precision have one source: the recipe).

    >>> deepspeed_config("deepspeed_stage_2")["zero_optimization"]["stage"]
    2
    >>> deepspeed_config("ddp") is None
    True
    >>> deepspeed_config("deepspeed_stage_3", "optimizer_and_params")["zero_optimization"]["offload_param"]
    {'device': 'cpu', 'pin_memory': True}
    """
    if not strategy.startswith("deepspeed_stage_"):
        return None
    stage = int(strategy.rsplit("_", 1)[1])
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # model/ holds whole weights that load in one process
    if offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep the HF Trainer's torch AdamW (DeepSpeed's CPU Adam is for offload)
    }


def training_kwargs(spec: TrainerSpec, data: DataSpec, run_dir: Path, seed: int, *, progress: bool, has_val: bool) -> dict[str, Any]:
    """``TrainingArguments`` keywords from the recipe (the same names and meanings as the Lightning backend's)."""
    sched = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[spec.lr_schedule]
    kw: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=spec.max_steps,
        learning_rate=spec.lr,
        weight_decay=spec.weight_decay,
        warmup_steps=spec.warmup_steps,
        lr_scheduler_type=sched,
        per_device_train_batch_size=data.batch_size,
        per_device_eval_batch_size=data.batch_size,
        gradient_accumulation_steps=spec.grad_accum,
        max_grad_norm=spec.grad_clip if spec.grad_clip is not None else 0.0,
        bf16=spec.precision == "bf16-mixed",
        fp16=spec.precision == "16-mixed",
        logging_steps=spec.log_every,
        save_strategy="steps",
        save_steps=spec.checkpoint_every or spec.max_steps,
        save_total_limit=spec.keep_last,
        seed=seed,
        data_seed=seed,
        report_to=[],
        disable_tqdm=not progress,
        use_cpu=spec.accelerator == "cpu",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",  # the Lightning backend counts non-padding tokens too
        deepspeed=deepspeed_config(spec.strategy, spec.offload),
        # TRL's SFT and GRPO configs turn activation checkpointing on by default, which recomputes every forward
        # (measured: +25% step time, scripts/bench_trl_overhead.py). The recipe's model.gradient_checkpointing
        # decides it, applied to the model itself (run.enable_checkpointing), as for the Lightning backend.
        activation_checkpointing=False,
        **kernels.hf_optim(spec.fused_optimizer),  # unset: transformers' default (fused AdamW on torch >= 2.8)
    )
    if has_val:
        kw.update(eval_strategy="steps", eval_steps=spec.val_every or spec.max_steps)
    return kw


def mean_example_tokens(ds: Dataset, tokenizer: Any) -> float:
    """Mean tokens of one SFT example (prompt + completion + EOS), what ``num_input_tokens_seen`` counts for it."""
    lengths = [len(tokenizer(p + c, add_special_tokens=False)["input_ids"]) + 1 for p, c in zip(ds["prompt"], ds["completion"])]
    return sum(lengths) / max(1, len(lengths))


def budget_steps(spec: TrainerSpec, tokens_per_step: float, *, has_val: bool) -> dict[str, int]:
    """The ``TrainingArguments`` step counts that ``trainer.max_tokens`` (and ``warmup_tokens``) buy at
    ``tokens_per_step`` non-padding tokens per optimizer step."""
    steps = max(1, min(spec.max_steps, math.ceil(spec.max_tokens / tokens_per_step)))
    out = {"max_steps": steps,
           "warmup_steps": min(steps - 1, math.ceil(spec.warmup_tokens / tokens_per_step)) if spec.warmup_tokens else 0}
    if not spec.checkpoint_every:
        out["save_steps"] = steps
    if has_val and not spec.val_every:
        out["eval_steps"] = steps
    return out


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class TokenBudget(TrainerCallback):
    """Stops training once ``max_tokens`` non-padding input tokens (summed over ranks) have been seen: the guard behind
    the step count that :func:`fit` derives from the mean example length."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if int(getattr(state, "num_input_tokens_seen", 0) or 0) >= self.max_tokens:
            control.should_training_stop = True
            control.should_save = True
        return control


class RunCallback(TrainerCallback):
    """Logs to the run's tracker, keeps the history for the report's loss plot, and writes the hook driver's state
    (the mitigations' state and tokens seen, the same dict the Lightning backend keeps in its checkpoints) into every
    checkpoint folder."""

    def __init__(self, hooks: HookDriver, tracker: Any, history: list[dict[str, float]]):
        self.hooks = hooks
        self.tracker = tracker
        self.history = history

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        pending = self.hooks.pop_pending()
        scalars = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        scalars.update(pending)
        named = {_metric_name(k): v for k, v in scalars.items()}
        if "train/loss" in named or "train/reward" in named or "val/loss" in named:
            self.history.append({"step": float(state.global_step), **{k.removeprefix("train/"): v for k, v in named.items()}})
        if self.tracker is not None and self.tracker.run is not None:
            self.tracker.run.log(named, step=int(state.global_step))

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_state(folder / STATE_FILE, {**self.hooks.state_dict(), "history": self.history})
            write_manifest(folder, int(state.global_step))  # last: a folder without one is an interrupted save


def _metric_name(key: str) -> str:
    """HF/TRL log keys -> the run's names: ``loss`` -> ``train/loss``, ``eval_loss`` -> ``val/loss``, ``lr``."""
    if key.startswith("eval_"):
        return "val/" + key.removeprefix("eval_")
    if key == "learning_rate":
        return "train/lr"
    if "/" in key and key.split("/", 1)[0] not in ("rewards", "completions", "clip_ratio", "sampling"):
        return key  # a mitigation's own name, e.g. process/step_reward_mean
    return "train/" + key


def ensure_distributed_env() -> None:
    """A single process that DeepSpeed is asked to run still needs a process group: give it a one-process world on a
    free local port (a launcher's variables, when present, are left alone)."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


# --- fit -------------------------------------------------------------------------------------------------------------
def fit(
    model: Any, tokenizer: Any, hooks: HookDriver, recipe: Recipe, datasets: tuple[Dataset, Dataset | None],
    run_dir: Path, tracker: Any, *, resume: bool, progress: bool, echo: Callable[[str], None] = print,
) -> Fitted:
    """Train with the algorithm of ``trainer.trl``. ``model`` has been through the hooks' ``setup`` (once, by the run).
    The returned model is the trained module (unwrapped); under ZeRO-3 its parameters are shards, so the caller saves
    with :func:`save_trained` (``Fitted.handle`` is the HF trainer)."""
    import datasets as hf_datasets

    hf_datasets.disable_progress_bars()  # TRL's map() bars over a few hundred rows say nothing; training has its own
    spec, algo = recipe.trainer, recipe.trainer.trl.algorithm
    train_ds, val_ds = datasets
    if spec.strategy.startswith("deepspeed"):
        ensure_distributed_env()
    if spec.liger:  # layer kernels only: SFT's loss goes through TRL's own chunked LM head, GRPO's through its log-probs
        kernels.apply_liger(model, fused_linear_cross_entropy=False)
    kw = training_kwargs(spec, recipe.data, run_dir, recipe.seed, progress=progress, has_val=val_ds is not None)
    history: list[dict[str, float]] = []
    callback = RunCallback(hooks, tracker, history)

    # a sequence-parallel group of N ranks trains one batch together: N ranks are one data-parallel rank
    rows_per_step = recipe.data.batch_size * spec.grad_accum * (_world_size() // spec.sequence_parallel)
    if spec.max_tokens:  # sft only (recipe rule): the token budget becomes steps, and a callback enforces it
        kw.update(budget_steps(spec, mean_example_tokens(train_ds, tokenizer) * rows_per_step, has_val=val_ds is not None))
    if algo == "sft":
        trainer = sft_trainer(model, tokenizer, recipe, kw, (train_ds, val_ds), [callback], hooks)
        if recipe.data.packing == "per_document" and spec.max_tokens:  # a step now holds packed rows: recount the steps the budget buys
            packed = trainer.train_dataset["input_ids"]
            per_row = sum(len(ids) for ids in packed) / max(1, len(packed))
            for key, value in budget_steps(spec, per_row * rows_per_step, has_val=val_ds is not None).items():
                setattr(trainer.args, key, value)
    elif algo == "grpo":
        from trl import GRPOConfig

        t = spec.trl
        reward_funcs = hooks.reward_fns()
        if not reward_funcs:
            raise UserError("mitigations: GRPO needs a reward: add a mitigation that provides one (process_rewards)")
        args = GRPOConfig(**kw, num_generations=t.num_generations, max_completion_length=t.max_completion_length,
                          temperature=t.temperature, beta=t.beta, epsilon=t.epsilon, loss_type=t.loss_type,
                          scale_rewards=t.scale_rewards, num_iterations=t.num_iterations, log_completions=False,
                          shuffle_dataset=True)
        trainer = _grpo_trainer_cls()(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_ds,
                                      processing_class=tokenizer, callbacks=[callback])
    else:
        args = TrainingArguments(**kw, remove_unused_columns=False)
        trainer = PRMTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, processing_class=tokenizer,
                             data_collator=prm_collator(tokenizer.pad_token_id or 0), callbacks=[callback])
    trainer.hooks = hooks
    if spec.max_tokens:  # HF counts each group's batch once per rank of a sequence-parallel group
        trainer.add_callback(TokenBudget(spec.max_tokens * spec.sequence_parallel))

    ckpt = resume_point(run_dir / "checkpoints", rank0=is_rank_zero(), echo=echo) if resume else None
    if ckpt is not None:
        state = _read_state(Path(ckpt))
        hooks.load_state_dict(state)
        history.extend(state.get("history", []))
    t0 = time.perf_counter()
    with kernels.compiled_forward(model, enabled=spec.compile):  # the forward TRL patched in, compiled for training
        result = trainer.train(resume_from_checkpoint=ckpt)
    wall = time.perf_counter() - t0
    if getattr(trainer, "sequence_parallel", None) is not None:
        trainer.sequence_parallel.restore()  # the evals after training run transformers' own attention
    last = history[-1] if history else {}
    stats = {
        "wall_s": wall,
        "steps": float(trainer.state.global_step),
        # every rank of a sequence-parallel group counted the group's whole batch
        "tokens_seen": float(getattr(trainer.state, "num_input_tokens_seen", 0) or 0) / spec.sequence_parallel,
        "final_loss": float(last.get("loss", result.training_loss if math.isfinite(result.training_loss) else float("nan"))),
        "val_loss": next((float(h["val/loss"]) for h in reversed(history) if "val/loss" in h), float("nan")),
    }
    if "reward" in last:
        stats["final_reward"] = float(last["reward"])
    stats["world_size"] = float(trainer.args.world_size)
    stats["sequence_parallel"] = float(spec.sequence_parallel)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    stats["zero_stage"] = float(plugin.zero_stage) if trainer.is_deepspeed_enabled and plugin is not None else -1.0
    engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
    # what the DeepSpeed engine ran with (not what the recipe asked): 0 none, 1 optimizer state, 2 also parameters
    stats["zero_offload"] = (float(engine.zero_cpu_offload()) + float(engine.zero_offload_param() is not None)
                             if engine is not None and hasattr(engine, "zero_cpu_offload") else 0.0)
    return Fitted(trainer.accelerator.unwrap_model(trainer.model), stats, history, handle=trainer)


LEGACY_STATE_FILE = "llm_limits_state.json"
"""Checkpoints written before the hook driver kept the state as JSON (mitigations without tensor state only)."""


def _read_state(checkpoint: Path) -> dict[str, Any]:
    if (checkpoint / STATE_FILE).is_file():
        return load_state(checkpoint / STATE_FILE)
    if (checkpoint / LEGACY_STATE_FILE).is_file():  # a run started before this release, resumed with it
        return json.loads((checkpoint / LEGACY_STATE_FILE).read_text())
    return {}


def save_trained(trainer: Any, out_dir: Path) -> None:
    """Write the trained weights (safetensors) and the tokenizer; every rank must call it (under ZeRO-3 the weights are
    gathered from all ranks; rank 0 writes)."""
    trainer.save_model(str(out_dir))
    if is_rank_zero():
        if getattr(trainer, "processing_class", None) is not None:
            trainer.processing_class.save_pretrained(str(out_dir))
        # The HF Trainer also pickles its arguments there; a model directory holds weights and configs only.
        (out_dir / "training_args.bin").unlink(missing_ok=True)


# --- the backend ----------------------------------------------------------------------------------------------------
class TRLBackend:
    """``trainer.backend: trl``: SFT, GRPO and PRM through TRL/HF trainers (:mod:`llm_limits.trainers.backends.base`)."""

    name = "trl"
    prompt_data = True

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.head = "token_classification" if recipe.trainer.trl.algorithm == "prm" else "causal_lm"

    def check(self, mitigations: list[Mitigation]) -> None:
        """GRPO needs a reward from an enabled mitigation."""
        if self.recipe.trainer.trl.algorithm == "grpo" and not any(m.enabled and m.reward_fns() for m in mitigations):
            raise UserError("mitigations: GRPO needs a reward: add an enabled mitigation that provides one "
                            "(e.g. - name: process_rewards)")

    def load_records(self, recipe: Recipe, tokenizer: Any, *, vision: bool) -> list[dict[str, Any]] | None:
        return load_prompt_records(recipe.data, recipe.seed, tokenizer)

    def build_data(self, recipe: Recipe, tokenizer: Any, model: Any, records: list[dict[str, Any]] | None,
                   mitigations: list[Mitigation], *, vision: bool) -> tuple[Any, Any]:
        labels_cfg = next((m.config.labels for m in mitigations if m.name == "process_rewards" and m.enabled), None)
        train_ds, val_ds, _ = build_datasets(recipe, tokenizer, model, labels_cfg, records=records)
        return train_ds, val_ds

    def fit(self, built: Any, hooks: HookDriver, data: tuple[Any, Any], run_dir: Path, tracker: Any, *,
            resume: bool, progress: bool, echo: Callable[[str], None]) -> Fitted:
        return fit(built.model, built.tokenizer, hooks, self.recipe, data, run_dir, tracker, resume=resume,
                   progress=progress, echo=echo)

    def save(self, fitted: Fitted, built: Any, run_dir: Path) -> torch.nn.Module | None:
        """Every rank saves (under ZeRO-3 the weights are gathered from all ranks); rank 0 returns the whole model:
        the trained module, or under ZeRO-3 the gathered weights reloaded; LoRA: the adapter, then the merged model."""
        lora = hasattr(fitted.model, "merge_and_unload")
        save_trained(fitted.handle, run_dir / (ADAPTER_DIR if lora else MODEL_DIR))
        if not is_rank_zero():
            return None
        model = fitted.model
        if self.recipe.trainer.strategy == "deepspeed_stage_3":  # rank 0 holds shards only
            model = _reload(run_dir / MODEL_DIR, built, self.recipe)
        if lora:
            model = model.merge_and_unload()
            save_model(model, built.tokenizer, run_dir / MODEL_DIR)
        return model


def _reload(path: Path, built: Any, r: Recipe) -> torch.nn.Module:
    """Rank 0, after a ZeRO-3 run: the whole weights the ranks saved, as a plain model. The training's DeepSpeed
    config is unset first: while it is set, ``from_pretrained`` builds under ``zero.Init`` and broadcasts every
    parameter to ranks that have already left (the run hung up on a closed gloo connection)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return build_model(
        path=str(path), vocab_size=len(built.tokenizer), pad_token_id=built.tokenizer.pad_token_id,
        head="token_classification" if r.trainer.trl.algorithm == "prm" else "causal_lm", field_prefix="model",
    )
