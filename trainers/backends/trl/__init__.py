"""The TRL backend: SFT, GRPO (with step-level advantages) and process reward models from the same recipe schema.

Reads top to bottom like the Lightning backend: build the data -> build the TRL/HF trainer (arguments, DeepSpeed,
callbacks that carry the mitigations' state and log to the run's wandb) -> fit. Hook order is the same as there:
``setup`` once before the optimizer exists (in ``run.build``), ``transform_batch`` then ``extra_loss`` per micro-batch
(SFT), ``reward_fns`` when GRPO builds its reward list, ``step_rewards`` after each generation, every mitigation's
``state_dict`` in each checkpoint and ``load_state_dict`` on ``--resume``.

Three algorithms (``trainer.trl.algorithm``):

- ``sft``: ``trl.SFTTrainer`` on ``{"prompt", "completion"}`` records, loss on the completion only.
- ``grpo``: ``trl.GRPOTrainer`` with the mitigations' reward functions. When a mitigation returns step rewards,
  :class:`ProcessGRPOTrainer` replaces TRL's sequence-level advantages by DeepSeekMath's process-supervision
  advantages (arXiv 2402.03300, section 4.1.3): the step rewards of a group are normalised together and each token
  gets the sum of the normalised rewards of the steps that end at or after it.
- ``prm``: a token-classification model (one logit) trained with a plain ``transformers.Trainer`` and a binary
  cross-entropy at each step end (:class:`PRMTrainer`; TRL removed its PRMTrainer after 1.13).

DeepSpeed: ``trainer.strategy: deepspeed_stage_N`` hands a ZeRO config to the HF Trainer (``deepspeed=``), which runs on
CPU too (gloo). Multi-process runs start under a launcher: ``torchrun --nproc_per_node 2 -m llm_limits.trainers.cli train R``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from llm_limits.evals.tasks.chains import STEP_SEP
from llm_limits.evals.tasks.jsonl import json_objects
from llm_limits.mitigations.base import Mitigation, StepContext
from llm_limits.mitigations.process_rewards.core import char_ends_to_token_ends, step_advantages
from llm_limits.trainers.backends.checkpoints import last_good_checkpoint, write_manifest
from llm_limits.trainers.recipe.errors import UserError, check_finite
from llm_limits.trainers.recipe.schema import DataSpec, Recipe, TrainerSpec

STATE_FILE = "llm_limits_state.json"
"""Written into every HF checkpoint folder: the mitigations' state and the training history (for ``--resume``)."""

TRL_VERSION = "1.16.0"
"""The TRL release whose GRPOTrainer internals :class:`ProcessGRPOTrainer` relies on (pinned in pyproject.toml)."""

GRPO_COLUMNS = ("question", "gold_answer", "modulus", "task", "prefix")
"""Record fields a GRPO dataset keeps beside ``prompt``; TRL passes them to every reward function as keyword lists."""


# --- data -----------------------------------------------------------------------------------------------------------
def load_prompt_records(spec: DataSpec, seed: int, tokenizer: Any) -> list[dict[str, Any]]:
    """Records with ``prompt`` and ``completion`` (and the task's other fields): from the user's JSONL (GSM8K-style,
    PRM800K-style, retrieval QA with oracle passages (ours, HotpotQA, RAFT: told apart by the first line's keys) or
    plain ``{"prompt", "completion"}`` lines) or from a task generator such as ``chains`` or ``kb``."""
    if spec.path is not None:
        from llm_limits.evals.tasks import TaskDataError
        from llm_limits.evals.tasks.chains import load_jsonl as chains_jsonl

        try:
            first = next(iter(json_objects(spec.path, "expected a JSON object per line")))[1]
            if "prompt" in first and "completion" in first:
                records = []
                for where, obj in json_objects(spec.path, "expected a JSON object per line"):
                    if not isinstance(obj.get("prompt"), str) or not isinstance(obj.get("completion"), str):
                        raise TaskDataError(f"{where}: expected string fields prompt and completion")
                    records.append(obj)
            elif {"oracle", "supporting_facts", "oracle_context"} & set(first):
                from llm_limits.evals.tasks.kb import load_jsonl as kb_jsonl

                records = kb_jsonl(spec.path)  # retrieval QA: ours, HotpotQA or RAFT (evals/tasks/kb.py)
            else:
                records = chains_jsonl(spec.path)
        except TaskDataError as e:
            raise UserError(f"data.path: {e}") from None
    else:
        from llm_limits.trainers.build.data import load_records

        records = load_records(spec, seed, tokenizer)
    if not records or "prompt" not in records[0] or "completion" not in records[0]:
        raise UserError(
            f"data.task: {spec.task} makes no prompt/completion records; the trl backend trains on tasks such as "
            "chains (or a JSONL file of prompt/completion, GSM8K or PRM800K lines in data.path)"
        )
    return records


def split(rows: list[dict[str, Any]], val_fraction: float) -> tuple[Dataset, Dataset | None]:
    """The last ``val_fraction`` of the rows (at least one row stays for training) as the validation set."""
    n_val = int(round(len(rows) * val_fraction))
    if n_val >= len(rows):
        n_val = 0
    train = Dataset.from_list(rows[: len(rows) - n_val])
    return train, (Dataset.from_list(rows[len(rows) - n_val :]) if n_val else None)


def grpo_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GRPO prompts plus the columns the rewards read (``GRPO_COLUMNS``; ``modulus`` -1 when a record has none)."""
    rows = []
    for rec in records:
        row = {"prompt": rec["prompt"], "question": str(rec.get("question", "")), "gold_answer": str(rec.get("gold_answer", rec.get("answer", ""))),
               "modulus": int(rec.get("modulus") or -1), "task": str(rec.get("task", "")),
               "prefix": STEP_SEP.join(rec.get("steps", [])[: int(rec.get("prefix_steps", 0))])}
        rows.append(row)
    return rows


def prm_rows(
    records: list[dict[str, Any]], tokenizer: Any, target: str, max_length: int
) -> tuple[list[dict[str, Any]], int]:
    """Token ids and per-token targets of a reward model: the label of each step end (steps, then the answer) at the
    token that covers it, -100 elsewhere. ``target="process"``: each step's own label (the answer's is
    ``answer_correct``); ``"outcome"``: the final answer's correctness at every step end. Records with no labels, or
    longer than ``max_length`` tokens, are skipped; returns the rows and how many were skipped."""
    from llm_limits.evals.reasoning import step_positions

    rows, skipped = [], 0
    for rec in records:
        labels = rec.get("labels")
        if labels is None:
            skipped += 1
            continue
        ids, positions = step_positions(tokenizer, rec["prompt"], rec["completion"])
        correct = rec.get("answer_correct")
        labels = labels[int(rec.get("prefix_steps", 0)) :]  # steps written in the prompt are not scored
        per_end = [float(x) for x in labels] + ([float(bool(correct))] if correct is not None else [])
        if target == "outcome":
            if correct is None:
                skipped += 1
                continue
            per_end = [float(bool(correct))] * len(positions)
        if len(ids) > max_length or len(per_end) < len(positions):
            skipped += 1
            continue
        targets = [-100.0] * len(ids)
        for pos, y in zip(positions, per_end):
            targets[pos] = y
        rows.append({"input_ids": ids, "labels": targets})
    return rows, skipped


def build_datasets(
    recipe: Recipe, tokenizer: Any, model: Any, labels_cfg: Any = None, records: list[dict[str, Any]] | None = None,
) -> tuple[Dataset, Dataset | None, str | None]:
    """Train and validation datasets for ``trainer.trl.algorithm``, and the records' task name. ``labels_cfg`` is the
    ``process_rewards`` mitigation's ``labels`` section (how reward-model labels are made), if the recipe has one.
    ``records``: the prompt records already loaded (and passed through the mitigations' ``transform_records``)."""
    algo = recipe.trainer.trl.algorithm
    if records is None:
        records = load_prompt_records(recipe.data, recipe.seed, tokenizer)
    task = records[0].get("task")
    if algo == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records]
        return (*split(rows, recipe.data.val_fraction), task)
    if algo == "grpo":
        return (*split(grpo_rows(records), 0.0), task)
    if labels_cfg is not None and labels_cfg.kind == "monte_carlo":
        records = monte_carlo_relabel(records, labels_cfg, tokenizer, model, recipe)
    rows, skipped = prm_rows(records, tokenizer, recipe.trainer.trl.reward_model_target, recipe.data.seq_len)
    if not rows:
        raise UserError(f"data: none of the {len(records)} records has step labels that fit data.seq_len={recipe.data.seq_len} "
                        "(a reward model needs labelled steps: the chains task or a PRM800K-style file)")
    return (*split(rows, recipe.data.val_fraction), task)


def monte_carlo_relabel(records: list[dict[str, Any]], cfg: Any, tokenizer: Any, model: Any, recipe: Recipe) -> list[dict[str, Any]]:
    """Replace each record's step labels by Math-Shepherd Monte Carlo labels (arXiv 2312.08935): ``cfg.rollouts``
    completions from every step prefix by the completer model; hard label = any reaches the gold answer, soft = the
    fraction. With ``cfg.consensus``, records whose MC and verifier labels disagree on the first error are dropped
    (arXiv 2501.07301)."""
    from tqdm import tqdm

    from llm_limits.evals.tasks.chains import check_answer, parse_completion
    from llm_limits.mitigations.process_rewards.core import consensus, math_shepherd_labels
    from llm_limits.trainers.build.models import build_model

    if cfg.completer_path is None:
        raise UserError("mitigations: process_rewards.labels.completer_path: monte_carlo labels need a completer model "
                        "(e.g. the SFT run's model/ directory)")
    completer = build_model(path=cfg.completer_path, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            field_prefix="mitigations.process_rewards.labels.completer_path").eval()
    eos = tokenizer.eos_token_id
    n = cfg.rollouts

    def judge(rec: dict[str, Any]) -> Callable[[str], bool]:
        return lambda text: check_answer(parse_completion(text[len(rec["prompt"]):])[1], rec["gold_answer"])

    # Pass 1 records every prefix math_shepherd_labels asks for; one batched generation then serves pass 2.
    wanted: list[str] = []
    for rec in records:
        math_shepherd_labels(rec["prompt"], rec["steps"], lambda t: False, lambda ps, k: wanted.extend(ps) or [[""] * k for _ in ps], n)
    cache: dict[str, list[str]] = {}
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last column
    wanted = list(dict.fromkeys(wanted))  # identical problems share their rollouts
    torch.manual_seed(recipe.seed)
    try:
        chunk = max(1, 256 // n)
        for i in tqdm(range(0, len(wanted), chunk), desc="monte-carlo rollouts", disable=not _rank0()):
            part = wanted[i : i + chunk]
            enc = tokenizer(part, padding=True, return_tensors="pt", add_special_tokens=False)
            ids = enc["input_ids"].repeat_interleave(n, dim=0)
            mask = enc["attention_mask"].repeat_interleave(n, dim=0)
            with torch.no_grad():
                out = completer.generate(ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                                         max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            for j, prefix in enumerate(part):
                cache[prefix] = texts[j * n : (j + 1) * n]
    finally:
        tokenizer.padding_side = side

    kept = []
    for rec in records:
        mc = math_shepherd_labels(rec["prompt"], rec["steps"], judge(rec), lambda ps, k: [cache[p] for p in ps], n)
        hard = [h for h, _ in mc]
        if cfg.consensus and rec.get("labels") is not None and not consensus(hard, rec["labels"]):
            continue
        new = dict(rec)
        new["labels"] = hard if cfg.target == "hard" else [s for _, s in mc]
        new["verifier_labels"] = rec.get("labels")
        kept.append(new)
    return kept


# --- trainers -------------------------------------------------------------------------------------------------------
def _ctx(trainer: Trainer, mitigations_log: Callable[[str, float], None]) -> StepContext:
    return StepContext(step=int(trainer.state.global_step), max_steps=int(trainer.args.max_steps),
                       log=mitigations_log, rank=int(trainer.args.process_index), world_size=int(trainer.args.world_size))


class _Hooks:
    """The mitigation hooks shared by the three trainer classes below."""

    mitigations: list[Mitigation]
    pending: dict[str, float]

    def _log_scalar(self, name: str, value: float) -> None:
        self.pending[name] = float(value)

    def _transform(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], StepContext]:
        ctx = _ctx(self, self._log_scalar)  # type: ignore[arg-type]
        for m in self.mitigations:
            try:
                inputs = m.transform_batch(inputs, ctx)
            except ValueError as e:
                raise UserError(f"mitigations: {m.name} at step {ctx.step}: {e}") from None
        return inputs, ctx

    def _extra(self, loss: torch.Tensor, outputs: Any, inputs: dict[str, Any], ctx: StepContext) -> torch.Tensor:
        for m in self.mitigations:
            extra = m.extra_loss(outputs, inputs, ctx)
            if extra is not None:
                loss = loss + extra
                self.pending[f"{m.name}/extra_loss"] = float(extra.detach())
        check_finite(loss, ctx.step)
        return loss


def _sft_trainer_cls() -> type:
    from trl import SFTTrainer

    class HookedSFTTrainer(_Hooks, SFTTrainer):
        """``trl.SFTTrainer`` whose loss runs every mitigation's ``transform_batch`` and ``extra_loss``."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs, ctx = self._transform(inputs)
            # TRL recomputes the logits for return_outputs=True (a second forward): ask only when a hook reads them.
            need = return_outputs or any(type(m).extra_loss is not Mitigation.extra_loss for m in self.mitigations)
            if not need:
                loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
                check_finite(loss, ctx.step)
                return loss
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            loss = self._extra(loss, outputs, inputs, ctx)
            return (loss, outputs) if return_outputs else loss

    return HookedSFTTrainer


def sft_trainer(
    model: Any, tokenizer: Any, recipe: Recipe, kw: dict[str, Any], datasets: tuple[Dataset, Dataset | None],
    callbacks: list[TrainerCallback],
) -> Any:
    """The SFT trainer of a recipe: loss on the completion only. ``data.packing: per_document`` turns on TRL's
    best-fit-decreasing packing, padding-free: each micro-batch is one flat row of whole examples with position ids
    restarting per example and no attention mask, so transformers keeps attention inside each example."""
    from trl import SFTConfig

    args = SFTConfig(**kw, max_length=recipe.data.seq_len, completion_only_loss=True,
                     packing=recipe.data.packing == "per_document", packing_strategy="bfd", dataset_num_proc=None,
                     remove_unused_columns=True)
    return _sft_trainer_cls()(model=model, args=args, train_dataset=datasets[0], eval_dataset=datasets[1],
                              processing_class=tokenizer, callbacks=callbacks)


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
    columns: dict[str, list[Any]], mitigations: list[Mitigation], group_size: int, process_index: int,
    gather: Callable[[list[Any]], list[Any]],
) -> tuple[torch.Tensor | None, list[float]]:
    """Per-token advantages ``[batch, completion_len]`` from the first mitigation that returns step rewards (``None``
    when none does), and every process's step rewards (flat, for logging).

    ``completion_ids``/``completion_mask`` ``[batch, completion_len]`` are this process's rows; ``gather`` collects a
    list from every process in rank order (``accelerate.utils.gather_object``; the identity on one process), so a
    group's statistics include completions that other processes generated."""
    steps = None
    for m in mitigations:
        if type(m).step_rewards is not Mitigation.step_rewards:
            texts, spans = [], []
            for row, keep in zip(completion_ids.tolist(), completion_mask.tolist()):
                kept = [t for t, k in zip(row, keep) if k]
                spans.append(token_char_spans(tokenizer, kept))
                texts.append(tokenizer.decode(kept, skip_special_tokens=True))
            steps = m.step_rewards(prompts, texts, **columns)
            if steps is not None:
                break
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
                self.mitigations, self.num_generations, self.accelerator.process_index, gather_object,
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
        inputs, ctx = self._transform(inputs)
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = outputs.logits[..., 0].float()  # [batch, seq]
        keep = labels != -100
        loss = F.binary_cross_entropy_with_logits(logits[keep], labels[keep].float())
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
    """Logs to the run's tracker, keeps the history for the report's loss plot, and writes the mitigations' state
    into every checkpoint folder."""

    def __init__(self, trainer_ref: Callable[[], Any], mitigations: list[Mitigation], tracker: Any, history: list[dict[str, float]]):
        self.trainer_ref = trainer_ref
        self.mitigations = mitigations
        self.tracker = tracker
        self.history = history

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        trainer = self.trainer_ref()
        pending = dict(getattr(trainer, "pending", {}) or {})
        trainer.pending = {}
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
            payload = {"mitigations": {m.name: m.state_dict() for m in self.mitigations}, "history": self.history}
            (folder / STATE_FILE).write_text(json.dumps(payload))
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


def _rank0() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


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
    model: Any, tokenizer: Any, mitigations: list[Mitigation], recipe: Recipe, datasets: tuple[Dataset, Dataset | None],
    run_dir: Path, tracker: Any, *, resume: bool, progress: bool, echo: Callable[[str], None] = print,
) -> tuple[Any, dict[str, float], list[dict[str, float]], Any]:
    """Train with the algorithm of ``trainer.trl``; returns (model, stats, history, trainer). The model is the trained
    module (unwrapped); under ZeRO-3 its parameters are shards, so callers save with :func:`save_trained`."""
    import datasets as hf_datasets

    hf_datasets.disable_progress_bars()  # TRL's map() bars over a few hundred rows say nothing; training has its own
    spec, algo = recipe.trainer, recipe.trainer.trl.algorithm
    enabled = [m for m in mitigations if m.enabled]
    train_ds, val_ds = datasets
    for m in enabled:  # before the optimizer exists, as in the Lightning backend
        try:
            model = m.setup(model, tokenizer)
        except ValueError as e:
            raise UserError(f"mitigations: {m.name}: {e}") from None
    if spec.strategy.startswith("deepspeed"):
        ensure_distributed_env()
    kw = training_kwargs(spec, recipe.data, run_dir, recipe.seed, progress=progress, has_val=val_ds is not None)
    history: list[dict[str, float]] = []
    holder: dict[str, Any] = {}
    callback = RunCallback(lambda: holder["t"], enabled, tracker, history)

    rows_per_step = recipe.data.batch_size * spec.grad_accum * _world_size()
    if spec.max_tokens:  # sft only (recipe rule): the token budget becomes steps, and a callback enforces it
        kw.update(budget_steps(spec, mean_example_tokens(train_ds, tokenizer) * rows_per_step, has_val=val_ds is not None))
    if algo == "sft":
        trainer = sft_trainer(model, tokenizer, recipe, kw, (train_ds, val_ds), [callback])
        if recipe.data.packing == "per_document" and spec.max_tokens:  # a step now holds packed rows: recount the steps the budget buys
            packed = trainer.train_dataset["input_ids"]
            per_row = sum(len(ids) for ids in packed) / max(1, len(packed))
            for key, value in budget_steps(spec, per_row * rows_per_step, has_val=val_ds is not None).items():
                setattr(trainer.args, key, value)
    elif algo == "grpo":
        from trl import GRPOConfig

        t = spec.trl
        reward_funcs = [f for m in enabled for f in m.reward_fns()]
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
    trainer.mitigations, trainer.pending = enabled, {}
    holder["t"] = trainer
    if spec.max_tokens:
        trainer.add_callback(TokenBudget(spec.max_tokens))

    ckpt = None
    if resume:
        good = last_good_checkpoint(run_dir / "checkpoints", warn=echo if _rank0() else (lambda _: None))
        ckpt = str(good) if good is not None else None
        if ckpt is None and _rank0():
            echo(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'}; training from the start")
        elif _rank0():
            echo(f"--resume: continuing from {ckpt}")
    if ckpt is not None:
        state_file = Path(ckpt) / STATE_FILE
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            for m in enabled:
                if m.name in state.get("mitigations", {}):
                    m.load_state_dict(state["mitigations"][m.name])
            history.extend(state.get("history", []))
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=ckpt)
    wall = time.perf_counter() - t0
    last = history[-1] if history else {}
    stats = {
        "wall_s": wall,
        "steps": float(trainer.state.global_step),
        "tokens_seen": float(getattr(trainer.state, "num_input_tokens_seen", 0) or 0),
        "final_loss": float(last.get("loss", result.training_loss if math.isfinite(result.training_loss) else float("nan"))),
        "val_loss": next((float(h["val/loss"]) for h in reversed(history) if "val/loss" in h), float("nan")),
    }
    if "reward" in last:
        stats["final_reward"] = float(last["reward"])
    stats["world_size"] = float(trainer.args.world_size)
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    stats["zero_stage"] = float(plugin.zero_stage) if trainer.is_deepspeed_enabled and plugin is not None else -1.0
    engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else None
    # what the DeepSpeed engine ran with (not what the recipe asked): 0 none, 1 optimizer state, 2 also parameters
    stats["zero_offload"] = (float(engine.zero_cpu_offload()) + float(engine.zero_offload_param() is not None)
                             if engine is not None and hasattr(engine, "zero_cpu_offload") else 0.0)
    return trainer.accelerator.unwrap_model(trainer.model), stats, history, trainer


def save_trained(trainer: Any, out_dir: Path) -> None:
    """Write the trained weights (safetensors) and the tokenizer; every rank must call it (under ZeRO-3 the weights are
    gathered from all ranks; rank 0 writes)."""
    trainer.save_model(str(out_dir))
    if _rank0():
        if getattr(trainer, "processing_class", None) is not None:
            trainer.processing_class.save_pretrained(str(out_dir))
        # The HF Trainer also pickles its arguments there; a model directory holds weights and configs only.
        (out_dir / "training_args.bin").unlink(missing_ok=True)

