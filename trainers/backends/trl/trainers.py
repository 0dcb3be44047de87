"""The TRL/HF trainer classes, each calling the run's hook driver: SFT with ``transform_batch`` and ``extra_loss``,
GRPO with DeepSeekMath step-level advantages, and a process reward model (PRM) trainer."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainerCallback

from llm_limits.mitigations.base import StepContext
from llm_limits.trainers.backends.hooks import HookDriver
from llm_limits.mitigations.process_rewards.core import char_ends_to_token_ends, step_advantages
from llm_limits.trainers.recipe.errors import check_finite
from llm_limits.trainers.recipe.schema import Recipe

TRL_VERSION = "1.16.0"
"""The TRL release whose GRPOTrainer internals :class:`ProcessGRPOTrainer` relies on (pinned in pyproject.toml)."""


class _Hooks:
    """What the three trainer classes share: every hook call goes through the run's driver, ``self.hooks`` (set by
    :func:`~llm_limits.trainers.backends.trl.fit.fit`), in the Lightning backend's order: context ->
    ``transform_batch`` -> forward -> LM loss + ``extra_loss`` -> token count. Evaluation batches (the HF trainer
    scores them through ``compute_loss`` too) see no hook, as in the Lightning backend's validation."""

    hooks: HookDriver
    sequence_parallel: Any = None
    """The rank's sequence-parallel group (``trainer.sequence_parallel`` > 1), else ``None``."""

    def _transform(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], StepContext]:
        # A sequence-parallel group trains one batch together: to the mitigations it is one data-parallel rank.
        size = self.sequence_parallel.size if self.sequence_parallel is not None else 1
        ctx = self.hooks.context(self.state.global_step, self.args.max_steps,  # type: ignore[attr-defined]
                                 rank=self.args.process_index // size,  # type: ignore[attr-defined]
                                 world_size=self.args.world_size // size)  # type: ignore[attr-defined]
        return self.hooks.transform_batch(inputs, ctx), ctx

    def _extra(self, loss: torch.Tensor, outputs: Any, inputs: dict[str, Any], ctx: StepContext) -> torch.Tensor:
        loss = self.hooks.add_extra_losses(loss, outputs, inputs, ctx)
        self.hooks.count_tokens(inputs, ctx.world_size)
        return loss


def _sft_trainer_cls() -> type:
    from trl import SFTTrainer

    class HookedSFTTrainer(_Hooks, SFTTrainer):
        """``trl.SFTTrainer`` whose loss runs every mitigation's ``transform_batch`` and ``extra_loss``."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:  # evaluation: the plain loss
                return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            inputs, ctx = self._transform(inputs)
            forward = inputs
            if self.sequence_parallel is not None:
                # the whole (transformed) batch -> this rank's slice; every rank of a group counted the batch's
                # tokens, so the token count the loss divides by is the sum over ranks / group size
                forward = self.sequence_parallel.shard(inputs)
                if num_items_in_batch is not None:
                    num_items_in_batch = num_items_in_batch // self.sequence_parallel.size
            # TRL recomputes the logits for return_outputs=True (a second forward): ask only when a hook reads them.
            if not (return_outputs or self.hooks.reads_outputs):
                loss = super().compute_loss(model, forward, num_items_in_batch=num_items_in_batch)
                return self._extra(loss, None, inputs, ctx)  # no extra loss: the finiteness check and the token count
            loss, outputs = super().compute_loss(model, forward, return_outputs=True, num_items_in_batch=num_items_in_batch)
            loss = self._extra(loss, outputs, inputs, ctx)
            return (loss, outputs) if return_outputs else loss

        def get_train_dataloader(self):
            loader = super().get_train_dataloader()
            if self.sequence_parallel is None:
                return loader
            from llm_limits.trainers.backends.trl.sequence_parallel import GroupBatches

            return GroupBatches(loader, self.sequence_parallel)  # each rank of a group gets the group's whole batches

    return HookedSFTTrainer


def sft_trainer(
    model: Any, tokenizer: Any, recipe: Recipe, kw: dict[str, Any], datasets: tuple[Dataset, Dataset | None],
    callbacks: list[TrainerCallback], hooks: HookDriver | None = None,
) -> Any:
    """The SFT trainer of a recipe: loss on the completion only. ``data.packing: per_document`` turns on TRL's
    best-fit-decreasing packing, padding-free: each micro-batch is one flat row of whole examples with position ids
    restarting per example and no attention mask, so transformers keeps attention inside each example."""
    from trl import SFTConfig

    args = SFTConfig(**kw, max_length=recipe.data.seq_len, completion_only_loss=True,
                     packing=recipe.data.packing == "per_document", packing_strategy="bfd", dataset_num_proc=None,
                     remove_unused_columns=True)
    trainer = _sft_trainer_cls()(model=model, args=args, train_dataset=datasets[0], eval_dataset=datasets[1],
                                 processing_class=tokenizer, callbacks=callbacks)
    trainer.hooks = hooks if hooks is not None else HookDriver([])  # no mitigation: the plain SFT loss
    if recipe.trainer.sequence_parallel > 1:  # Ulysses: groups of ranks share each sequence (sequence_parallel.py)
        from llm_limits.trainers.backends.trl.sequence_parallel import setup

        rows = 1 if recipe.data.packing == "per_document" else recipe.data.batch_size  # padding-free: one packed row
        trainer.sequence_parallel = setup(trainer.model, recipe.trainer.sequence_parallel, rows,
                                          pad_id=tokenizer.pad_token_id or 0)
    return trainer


def token_char_spans(tokenizer: Any, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in ``tokenizer.decode(ids, skip_special_tokens=True)``, found by decoding growing
    prefixes (exact for any tokenizer whose decode of a prefix is a prefix of the decode of the whole).

    >>> from llm_limits.trainers.build.tokenizers import build_char_tokenizer
    >>> tok = build_char_tokenizer()
    >>> token_char_spans(tok, tok("ab\\nc")["input_ids"] + [tok.eos_token_id])
    [(0, 1), (1, 2), (2, 3), (3, 4), (4, 4)]
    """
    spans, prev = [], 0
    for t in range(len(ids)):
        n = len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True))
        spans.append((prev, n))
        prev = n
    return spans


def process_advantages(
    tokenizer: Any, completion_ids: torch.Tensor, completion_mask: torch.Tensor, prompts: list[str],
    columns: dict[str, list[Any]], hooks: HookDriver, group_size: int, process_index: int,
    gather: Callable[[list[Any]], list[Any]],
) -> tuple[torch.Tensor | None, list[float]]:
    """Per-token advantages ``[batch, completion_len]`` from the first mitigation that returns step rewards
    (:meth:`HookDriver.step_rewards`; ``None`` when none does), and every process's step rewards (flat, for logging).

    ``completion_ids``/``completion_mask`` ``[batch, completion_len]`` are this process's rows; ``gather`` collects a
    list from every process in rank order (``accelerate.utils.gather_object``; the identity on one process), so a
    group's statistics include completions that other processes generated."""
    if not hooks.gives_step_rewards:
        return None, []
    texts, spans = [], []
    for row, keep in zip(completion_ids.tolist(), completion_mask.tolist()):
        kept = [t for t, k in zip(row, keep) if k]
        spans.append(token_char_spans(tokenizer, kept))
        texts.append(tokenizer.decode(kept, skip_special_tokens=True))
    steps = hooks.step_rewards(prompts, texts, **columns)
    if steps is None:
        return None, []
    token_ends = [
        char_ends_to_token_ends([c for c, _ in row], sp) if row and any(b > a for a, b in sp) else []
        for row, sp in zip(steps, spans)
    ]
    rewards = [[float(r) for _, r in row] if ends else [] for row, ends in zip(steps, token_ends)]  # empty: no steps
    all_rewards, all_ends = gather(rewards), gather(token_ends)
    adv = step_advantages(all_rewards, all_ends, completion_ids.shape[1], group_size)
    n = len(prompts)
    local = adv[process_index * n : (process_index + 1) * n]
    return local * completion_mask.to(local.dtype), [r for row in all_rewards for r in row]


def _grpo_trainer_cls() -> type:
    from accelerate.utils import gather_object
    from trl import GRPOTrainer

    class ProcessGRPOTrainer(_Hooks, GRPOTrainer):
        """``trl.GRPOTrainer`` with process-supervised, step-level advantages (DeepSeekMath section 4.1.3).

        Narrow on purpose: it calls TRL's ``_generate_and_score_completions`` unchanged (generation, rewards,
        sequence-level advantages, reference log-probs) and, when a mitigation returns step rewards, replaces the
        ``advantages`` ``[batch]`` by per-token advantages ``[batch, completion_len]``, which TRL's ``_compute_loss``
        accepts (TRL == 1.16.0, see ``TRL_VERSION``). Group statistics use every process's completions.
        """

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            prompts = [x["prompt"] for x in inputs]
            columns = {k: [x[k] for x in inputs] for k in inputs[0] if k != "prompt"}
            adv, flat = process_advantages(
                self.processing_class, out["completion_ids"], out["completion_mask"], prompts, columns,
                self.hooks, self.num_generations, self.accelerator.process_index, gather_object,
            )
            if adv is not None:
                out["advantages"] = adv.to(out["completion_ids"].device)
                self._metrics["train"]["process/step_reward_mean"].append(sum(flat) / max(1, len(flat)))
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            check_finite(loss[0] if return_outputs else loss, int(self.state.global_step))
            return loss

    return ProcessGRPOTrainer


class PRMTrainer(_Hooks, Trainer):
    """A process (or outcome) reward model: binary cross-entropy between the one-logit token-classification head and
    the targets at step ends (``labels`` ``[batch, seq]`` float, -100 elsewhere; soft targets allowed)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = model.training  # evaluation batches see no hook (as in the Lightning backend's validation)
        if training:
            inputs, ctx = self._transform(inputs)
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs.logits[..., 0].float()  # [batch, seq]
        keep = labels != -100
        loss = F.binary_cross_entropy_with_logits(logits[keep], labels[keep].float())
        if training:
            loss = self._extra(loss, outputs, inputs, ctx)
        return (loss, outputs) if return_outputs else loss


def prm_collator(pad_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100) to the longest row."""

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100.0)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            mask[i, :k] = 1
            labels[i, :k] = torch.tensor(r["labels"], dtype=torch.float)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate
