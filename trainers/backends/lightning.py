"""The Lightning backend: a LightningModule for causal LMs that applies every mitigation hook, and the Trainer around it.

Reads top to bottom: build the module -> wrap it in a Trainer (strategy, precision, checkpoints, logger) -> fit.
Every mitigation hook goes through the run's :class:`~llm_limits.trainers.backends.hooks.HookDriver` (``setup`` has
run once before the module exists): per micro-batch its context, ``transform_batch``, the forward, the LM loss plus each
``extra_loss``, the token count; the driver's state rides in each checkpoint and comes back on resume.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from transformers import get_scheduler

from llm_limits.mitigations.base import MODEL_KEYS, StepContext
from llm_limits.trainers.backends import checkpoints
from llm_limits.trainers.backends.base import ADAPTER_DIR, MODEL_DIR, Fitted, is_rank_zero
from llm_limits.trainers.backends.hooks import HookDriver
from llm_limits.trainers.build import kernels, vlm
from llm_limits.trainers.build.data import build_loaders, loaders
from llm_limits.trainers.build.models import save_model
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import TrainerSpec

# Mid-epoch resume is exact here: the train sampler's position rides in the module's checkpoint state
# (trainers/build/data.py ResumableRandomSampler), which Lightning cannot see, so its generic warning does not apply.
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")

FORWARD_KEYS = (*MODEL_KEYS, "pixel_values")
"""Batch keys passed to the model's forward (``pixel_values``: vision-language rows); the rest is hook metadata."""

NO_DECAY = ("bias", "norm", "ln_", "layernorm", "embed_positions", "ssmax")
"""Parameter-name parts exempt from weight decay (decay would pull SSMax's log-length scale s towards 0)."""


class CausalLMModule(L.LightningModule):
    """Wraps a Hugging Face causal LM (``input_ids`` ``[batch, seq]`` -> ``logits`` ``[batch, seq, vocab]``).

    ``model`` has been through ``hooks``' setup already (:meth:`HookDriver.prepare`)."""

    def __init__(self, model: torch.nn.Module, hooks: HookDriver, spec: TrainerSpec):
        super().__init__()
        self.model = model
        self.hooks = hooks
        self.spec = spec
        # Learnable loss parameters of the mitigations (a contrastive temperature...): trained with the model and saved
        # in every checkpoint (they are part of this module's state dict), never in the saved model.
        self.loss_modules = torch.nn.ModuleDict(hooks.loss_modules)
        self.hidden_states = hooks.needs_hidden_states
        self.train_sampler: Any = None
        """The train loader's :class:`~trainers.data.ResumableRandomSampler`, when it has one (set by the run)."""
        self.train_batch_size: int | None = None
        """Rows per micro-batch of that loader (set by the run)."""
        self._epoch_batches = 0
        self._unlogged: dict[str, float] = {}
        """The mitigations' metrics of the steps since the last logging step (:meth:`_logs_now`)."""
        self.history: list[dict[str, float]] = []
        """Training metrics logged on this rank, for the report's loss plot."""

    @property
    def tokens_seen(self) -> int:
        return self.hooks.tokens_seen

    # --- the step ----------------------------------------------------------------------------------------------
    def _ctx(self) -> StepContext:
        world_size = int(self.trainer.world_size) if self._trainer is not None else 1
        return self.hooks.context(self.global_step, self.spec.max_steps, rank=self.global_rank, world_size=world_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Micro-batches of this epoch served so far; Lightning's batch_idx counts within the epoch and continues
        # from the restored position after a resume (it does not restart at 0, and no epoch-start hook runs).
        self._epoch_batches = batch_idx + 1
        ctx = self._ctx()
        batch = self.hooks.transform_batch(batch, ctx)
        extra_kwargs = {"output_hidden_states": True} if self.hidden_states else {}
        outputs = self.model(**self._forward_inputs(batch), **extra_kwargs)
        lm_loss = outputs.loss.detach()
        loss = self.hooks.add_extra_losses(outputs.loss, outputs, batch, ctx)
        self.hooks.count_tokens(batch, ctx.world_size)
        if self.spec.max_tokens and self.tokens_seen >= self.spec.max_tokens:
            self.trainer.should_stop = True  # the token budget is spent: this is the last optimizer step
        bs = batch["input_ids"].shape[0]
        # Under DDP the logged losses are the mean over the ranks (each rank's micro-batch is part of one global
        # batch): the numbers a single process on the same global batch logs.
        synced = ctx.world_size > 1
        self.log("train/loss", loss, prog_bar=True, batch_size=bs, sync_dist=synced)  # every step: bar, final_loss
        pending = self.hooks.pop_pending()
        if self._logs_now():
            # The rest only reaches the logger, which writes on its logging steps (every log_every), and the
            # Trainer's callback_metrics at the end: logged then, not at every step. self.log turns each Python number
            # into a tensor on the device, on a GPU a blocking copy per number per step (PoSE's tiny recipe logs
            # four; issue 20: tiny recipes were launch-bound).
            self.log("train/lm_loss", lm_loss, batch_size=bs, sync_dist=synced)
            self.log("train/tokens_seen", float(self.tokens_seen), batch_size=bs)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
            for name, value in {**self._unlogged, **pending}.items():  # a metric of a step in between: its last value
                self.log(name, value, batch_size=bs)
            self._unlogged = {}
        else:
            self._unlogged.update(pending)
        if self.trainer.is_last_batch or (self.global_step % self.spec.log_every == 0 and self._is_accum_boundary(batch_idx)):
            value = loss.detach()
            if synced:  # every rank reaches this line at the same steps
                value = self.trainer.strategy.reduce(value, reduce_op="mean")
            self.history.append({"step": float(self.global_step), "loss": float(value), **pending})
        return loss

    def _logs_now(self) -> bool:
        """Whether this micro-batch's metrics beyond the loss are logged: on the run's last optimizer step (so the
        Trainer's ``callback_metrics`` end with every metric's last value, as when all were logged at every step) and
        on the steps the Trainer's loggers write (Lightning's own test: every ``log_every_n_steps`` optimizer steps,
        and when the run stops; read from the logger connector's ``should_update_logs``, lightning being pinned to
        2.6.6). Every rank gets the same answer (the same step counters), so ``sync_dist`` logging stays collective."""
        trainer = self._trainer
        if trainer is None:
            return True
        if trainer.should_stop or self.global_step + 1 >= self.spec.max_steps:
            return True
        # Not ``trainer.loggers``: only rank zero has a logger, and a rank that skipped the sync_dist logs above
        # while another made them would wait in different collectives forever (DDP deadlock).
        return bool(trainer._logger_connector.should_update_logs)

    @staticmethod
    def _forward_inputs(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The model's keyword arguments: the forward keys of the batch and no KV cache. A cache only serves
        generation; in training it costs memory, and with one transformers reads packed rows (``position_ids``, no
        mask) as a single sequence, letting attention cross from one document into the next."""
        return {**{k: v for k, v in batch.items() if k in FORWARD_KEYS}, "use_cache": False}

    def _is_accum_boundary(self, batch_idx: int) -> bool:
        return (batch_idx + 1) % self.spec.grad_accum == 0

    # Validation is sharded under DDP (llm_limits.trainers.build.data.ShardSampler: each rank scores its own share of the rows, none
    # twice) and its loss is exact: summed token losses and token counts are reduced over the ranks once per
    # validation, so ``val/loss`` is the mean over every validation token, whatever the batching or the world size.
    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        outputs = self.model(**self._forward_inputs(batch))
        tokens = (batch["labels"][:, 1:] != -100).sum()  # the shifted targets a causal LM's loss averages over
        total = torch.where(tokens > 0, outputs.loss.detach().double() * tokens, 0.0)  # no target: the loss is 0/0
        self._val_sums += torch.stack([total, tokens.double()])

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        if float(sums[1]) > 0:
            self.log("val/loss", (sums[0] / sums[1]).float(), prog_bar=True, rank_zero_only=True)

    # --- optimizer ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # the model's and the mitigations' loss parameters
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or any(k in name.lower() for k in NO_DECAY) else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = kernels.adamw([g for g in groups if g["params"]], lr=self.spec.lr, fused=self.spec.fused_optimizer)
        if self.spec.max_tokens:
            # The schedule runs on tokens seen (read when the scheduler steps), so arms whose batches differ in
            # length follow the same LR per token.
            spec = self.spec
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda _: lr_factor(self.tokens_seen, spec.warmup_tokens, spec.max_tokens, spec.lr_schedule)
            )
        else:
            name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[self.spec.lr_schedule]
            scheduler = get_scheduler(name, optimizer, num_warmup_steps=self.spec.warmup_steps, num_training_steps=self.spec.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.spec.stages:  # LLaVA-style stages: the parts this stage does not train get no update (trainers/build/vlm.py)
            from llm_limits.trainers.build.vlm import drop_stage_grads, stage_at

            done = (self.tokens_seen / self.spec.max_tokens) if self.spec.max_tokens else self.global_step / max(1, self.spec.max_steps)
            stage = stage_at(self.spec.stages, done)
            drop_stage_grads(self.model, stage)

    # --- checkpoints carry the mitigations' state ----------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sampler_state, served = getattr(self.train_sampler, "epoch_state", None), self._epoch_batches
        if sampler_state is not None and served * int(self.train_batch_size or 0) >= self.train_sampler.per_epoch:
            # The epoch's last batch is served: the next epoch starts from the generator as it stands now. Replaying
            # the epoch would not get there: Lightning stops at the loader's length, so the sampler is never exhausted
            # and its tail draw (which a replay makes) does not happen.
            sampler_state, served = self.train_sampler.generator.get_state(), 0
        checkpoint["llm_limits"] = {
            **self.hooks.state_dict(),  # the mitigations' state and tokens_seen, as the TRL backend saves them
            "history": self.history,
            # where the data order stands: the epoch's sampler state and the micro-batches it has already served
            "epoch_batches": served,
            "sampler_state": sampler_state,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("llm_limits", {})
        self.hooks.load_state_dict(state)
        self.history = list(state.get("history", []))
        sampler_state = state.get("sampler_state")
        if sampler_state is not None and self.train_sampler is not None and hasattr(self.train_sampler, "resume"):
            self._epoch_batches = int(state.get("epoch_batches", 0))
            self.train_sampler.resume(sampler_state, self._epoch_batches * int(self.train_batch_size or 0))


def lr_factor(done: float, warmup: float, total: float, schedule: str) -> float:
    """LR multiplier after ``done`` units (steps or tokens) of ``total``: linear warmup, then constant, linear or
    cosine decay to 0 (transformers' schedules, in any unit).

    >>> [round(lr_factor(x, 10, 110, "cosine"), 3) for x in (0, 5, 10, 60, 110, 200)]
    [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    >>> lr_factor(50, 0, 100, "linear"), lr_factor(50, 0, 100, "constant")
    (0.5, 1.0)
    """
    if done < warmup:
        return done / max(1.0, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (done - warmup) / max(1.0, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


CHECKPOINT_FILE = "step-{step:06d}"
"""Periodic checkpoints are ``checkpoints/step-000019.ckpt``; the newest is also ``checkpoints/last.ckpt``."""
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


class ManifestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus a manifest (size + SHA-256, :mod:`trainers.checkpoints`) beside every
    checkpoint it writes, written once the file is complete; pruning a checkpoint removes its manifest with it.

    Overrides two private methods of ModelCheckpoint (lightning is pinned to 2.6.6): ``_save_checkpoint`` (every save,
    periodic and ``last``, goes through it) and ``_remove_checkpoint`` (keep-last pruning)."""

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)  # returns once every rank's part is written (it ends in a barrier)
        if trainer.is_global_zero:
            checkpoints.write_manifest(Path(filepath), int(trainer.global_step))

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:  # after the file: a kill in between leaves a stray manifest, not an unverified file
            checkpoints.manifest_path(Path(filepath)).unlink(missing_ok=True)


def checkpoint_files(root: Path) -> list[Path]:
    """The run's Lightning checkpoints under ``root``, newest first: ``last.ckpt``, then ``step-N.ckpt`` by N."""
    if not root.is_dir():
        return []
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_FILE.match(p.name))), reverse=True)
    last = root / "last.ckpt"
    return ([last] if last.exists() else []) + [p for _, p in steps]


def last_good_checkpoint(root: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest Lightning checkpoint under ``root`` whose manifest verifies, each one skipped reported in one line
    through ``warn`` (:func:`trainers.checkpoints.last_good_checkpoint`, as the TRL backend). A run none of whose
    checkpoints has a manifest (saved before manifests existed) resumes from the newest unverified, with a warning;
    in a run that has manifests, a file without one was saved by a run stopped before its manifest: skipped (the file
    itself is written atomically, but only on one filesystem: fsspec stages it in the system temp directory and
    moves it, which is a copy when that is another filesystem)."""
    return checkpoints.last_good_checkpoint(root, warn, candidates=checkpoint_files, legacy_ok=True)


def build_trainer(spec: TrainerSpec, run_dir: Path, logger: Any, *, has_val: bool, progress: bool = True) -> L.Trainer:
    """A Lightning Trainer for the recipe's trainer section, checkpointing into ``run_dir/checkpoints``."""
    every = spec.checkpoint_every or spec.max_steps
    checkpoint = ManifestCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename=CHECKPOINT_FILE,
        auto_insert_metric_name=False,
        every_n_train_steps=every,
        save_top_k=spec.keep_last,
        monitor="step",  # save_top_k > 1 needs a monitor; the largest steps are the newest
        mode="max",
        save_last=True,
        # Save every `every` steps in on_train_batch_end, the epoch's last batch included. Left unset, ModelCheckpoint
        # decides that a monitored run with check_val_every_n_epoch=None saves after validation, so on an epoch's last
        # batch it defers the save to on_validation_end, and no validation follows unless val_every falls there: the
        # checkpoint was lost. `step` is known at every batch; nothing needs validation's metrics.
        save_on_train_epoch_end=True,
        # A step saved again after a resume from an earlier checkpoint replaces its file (and its manifest) instead of
        # becoming step-N-v1.ckpt beside it, which the restored keep-last list would never prune.
        enable_version_counter=False,
    )
    callbacks: list[Any] = [checkpoint]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, spec.log_every)))
    val_kwargs: dict[str, Any] = {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    if has_val:
        val_kwargs = {
            "val_check_interval": spec.val_every or spec.max_steps,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
        }
    return L.Trainer(
        accelerator=spec.accelerator,
        devices=spec.devices,
        num_nodes=spec.num_nodes,
        strategy=_strategy(spec),
        precision=spec.precision,
        max_steps=spec.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=spec.grad_accum,
        gradient_clip_val=spec.grad_clip,
        log_every_n_steps=spec.log_every,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        deterministic=False,
        # The train loader's ResumableRandomSampler splits each epoch across DDP ranks itself and can restart
        # mid-epoch; Lightning's DistributedSampler could not (a resume would replay the epoch from its start).
        # Validation is then not split: every rank reads the whole (small) validation set, synced as before.
        use_distributed_sampler=False,
        **val_kwargs,
    )


def _strategy(spec: TrainerSpec) -> Any:
    if spec.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # gloo on CPU, NCCL on GPU; find_unused_parameters stays off (it costs a graph traversal per step).
        return DDPStrategy(process_group_backend="gloo" if spec.accelerator == "cpu" else "nccl")
    if spec.strategy.startswith("deepspeed") and spec.offload != "none":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=int(spec.strategy.rsplit("_", 1)[1]), offload_optimizer=True)
    return spec.strategy  # "auto" or "deepspeed_stage_1/2" (CUDA only; the recipe check refuses it on CPU, and stage 3)


def fit(
    module: CausalLMModule,
    trainer: L.Trainer,
    train_loader: Any,
    val_loader: Any,
    ckpt_path: str | None = None,
) -> dict[str, float]:
    """Train; returns wall time and throughput numbers for the report."""
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
    wall = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    return {
        "wall_s": wall,
        "steps": float(trainer.global_step),
        "tokens_seen": float(module.tokens_seen),
        "final_loss": metrics.get("train/loss", float("nan")),
        "val_loss": metrics.get("val/loss", float("nan")),
    }


# --- the backend ----------------------------------------------------------------------------------------------------
class LightningBackend:
    """``trainer.backend: lightning``: causal LMs and LLaVA-style vision-language models
    (:mod:`llm_limits.trainers.backends.base`)."""

    name = "lightning"
    head = "causal_lm"
    prompt_data = False

    def __init__(self, recipe: Any) -> None:
        self.recipe = recipe

    def check(self, mitigations: list[Any]) -> None:
        """Rewards need an RL trainer: ignoring a mitigation's rewards would train something else than the recipe says."""
        for m in mitigations:
            if m.enabled and m.reward_fns():
                raise UserError(f"mitigations: {m.name} provides reward functions, which the Lightning backend cannot "
                                "use (set trainer.backend to an RL backend such as trl)")

    def load_records(self, recipe: Any, tokenizer: Any, *, vision: bool) -> list[dict[str, Any]] | None:
        """Image records for a vision-language run (the mitigations may rebalance them); text LM data has none."""
        return vlm.load_image_records(recipe.data, recipe.seed) if vision else None

    def build_data(self, recipe: Any, tokenizer: Any, model: torch.nn.Module, records: list[dict[str, Any]] | None,
                   mitigations: list[Any], *, vision: bool) -> tuple[Any, Any]:
        if vision:
            return loaders(*vlm.build_vlm_datasets(recipe.data, records, tokenizer, model), recipe.data.batch_size, recipe.seed)
        return build_loaders(recipe.data, tokenizer, recipe.seed)

    def fit(self, built: Any, hooks: HookDriver, data: tuple[Any, Any], run_dir: Path, tracker: Any, *,
            resume: bool, progress: bool, echo: Callable[[str], None]) -> Fitted:
        train_data, val_data = data
        spec = self.recipe.trainer
        if spec.liger:  # the fused cross-entropy returns no logits in training: only when no extra_loss may read them
            kernels.apply_liger(built.model, fused_linear_cross_entropy=not (hooks.reads_outputs or hooks.needs_hidden_states))
        module = CausalLMModule(built.model, hooks, spec)
        module.train_sampler = getattr(train_data, "sampler", None)  # its position rides in every checkpoint
        module.train_batch_size = train_data.batch_size
        trainer = build_trainer(spec, run_dir, tracker.lightning_logger() if tracker else None,
                                has_val=val_data is not None, progress=progress)
        ckpt_path = None
        if resume:
            ckpt_path = checkpoints.resume_point(run_dir / "checkpoints", rank0=is_rank_zero(), echo=echo,
                                                 candidates=checkpoint_files, legacy_ok=True)
        with kernels.compiled_forward(module.model, enabled=spec.compile):
            stats = fit(module, trainer, train_data, val_data, ckpt_path=ckpt_path)
        return Fitted(module.model, stats, module.history, handle=module)

    def save(self, fitted: Fitted, built: Any, run_dir: Path) -> torch.nn.Module | None:
        """Rank 0 writes the weights (LoRA: the adapter, then the merged model) and returns the model it wrote."""
        if not is_rank_zero():
            return None
        model = fitted.model
        if hasattr(model, "merge_and_unload"):
            save_model(model, built.tokenizer, run_dir / ADAPTER_DIR)
            model = model.merge_and_unload()
        save_model(model, built.tokenizer, run_dir / MODEL_DIR)
        return model
