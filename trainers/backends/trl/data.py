"""The TRL backend's data: prompt/completion records (a task generator or a user's JSONL), their prompts written in
``data.prompt_format`` (the evals' own chat wrapping), the SFT, GRPO and reward-model datasets built from them, and
Math-Shepherd Monte Carlo relabelling."""

from __future__ import annotations

from typing import Any, Callable

import torch
from datasets import Dataset

from llm_limits.evals.lm import format_prompt, resolve_prompt_format
from llm_limits.evals.tasks.chains import STEP_SEP
from llm_limits.evals.tasks.jsonl import json_objects
from llm_limits.trainers.backends.base import is_rank_zero
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import DataSpec, Recipe

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


def format_prompts(
    records: list[dict[str, Any]], tokenizer: Any, prompt_format: str
) -> tuple[list[dict[str, Any]], str]:
    """The records with each ``prompt`` written in ``data.prompt_format`` by the evals' own
    :func:`~llm_limits.evals.lm.format_prompt`, and the format used (``chat`` or ``plain``). Under ``chat`` a prompt is
    one user turn of the tokenizer's chat template followed by the generation prompt, byte for byte what an eval with
    ``prompt_format: auto`` asks the model, and the completion (every other field too) is unchanged: it is the
    assistant's answer. ``plain`` returns the records themselves.

    Why strings and not TRL's conversational records (``[{"role": "user", ...}]``, which SFTTrainer renders itself):
    the chat-formatted prompt stays a plain string, so the same rows serve SFT, GRPO (whose rewards read ``prompts``
    as text) and reward models (whose step labels sit at character offsets past ``len(prompt)``,
    :func:`~llm_limits.evals.lm.step_positions`), and the training text is exactly the eval's prompt followed by the
    completion. Completion-only loss stays TRL's prompt/completion rule: the loss starts where the tokenized prompt
    and prompt + completion part ways (the generation prompt ends on a template token and a newline, so nothing
    merges across the boundary) and covers the completion and the EOS TRL appends. A conversational record would
    instead be rendered as a whole assistant turn by the template (for SmolLM2 ``...<|im_end|>\\n``), a string the
    evals never decode from."""
    try:
        fmt = resolve_prompt_format(tokenizer, prompt_format)
    except ValueError as err:
        raise UserError(f"data.{err}") from None
    if fmt == "plain":
        return records, fmt
    return [dict(r, prompt=format_prompt(tokenizer, r["prompt"], fmt)) for r in records], fmt


def trl_prompt(tokenizer: Any, prompt: str, prompt_format: str) -> str:
    """A chat-formatted prompt as TRL's SFT and GRPO trainers must get it: they tokenize strings with the tokenizer's
    special tokens (``tokenizer(text)``), so where the tokenizer adds its BOS itself and the template wrote it into the
    text already, the text's BOS is dropped (the ids then equal the evals' ``add_special_tokens=False`` encoding of the
    whole chat string, with one BOS). Plain prompts pass as they are (today's rows)."""
    bos = getattr(tokenizer, "bos_token", None)
    if prompt_format != "chat" or not bos or not prompt.startswith(bos):
        return prompt
    adds_bos = tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    return prompt[len(bos):] if adds_bos else prompt


def split(rows: list[dict[str, Any]], val_fraction: float) -> tuple[Dataset, Dataset | None]:
    """The last ``val_fraction`` of the rows (at least one row stays for training) as the validation set."""
    n_val = int(round(len(rows) * val_fraction))
    if n_val >= len(rows):
        n_val = 0
    train = Dataset.from_list(rows[: len(rows) - n_val])
    return train, (Dataset.from_list(rows[len(rows) - n_val :]) if n_val else None)


def grpo_rows(records: list[dict[str, Any]], prompt: Callable[[str], str] | None = None) -> list[dict[str, Any]]:
    """GRPO prompts (each passed through ``prompt`` when given: :func:`trl_prompt` for chat prompts) plus the columns
    the rewards read (``GRPO_COLUMNS``; ``modulus`` -1 when a record has none)."""
    rows = []
    for rec in records:
        row = {"prompt": rec["prompt"] if prompt is None else prompt(rec["prompt"]), "question": str(rec.get("question", "")), "gold_answer": str(rec.get("gold_answer", rec.get("answer", ""))),
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
    from llm_limits.evals.lm import step_positions

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
    ``records``: the prompt records already loaded (and passed through the mitigations' ``transform_records``); their
    prompts are written in ``data.prompt_format`` here (:func:`format_prompts`), after the mitigations built them."""
    algo = recipe.trainer.trl.algorithm
    if records is None:
        records = load_prompt_records(recipe.data, recipe.seed, tokenizer)
    records, fmt = format_prompts(records, tokenizer, recipe.data.prompt_format)
    task = records[0].get("task")
    if algo == "sft":
        rows = [{"prompt": trl_prompt(tokenizer, r["prompt"], fmt), "completion": r["completion"]} for r in records]
        return (*split(rows, recipe.data.val_fraction), task)
    if algo == "grpo":
        return (*split(grpo_rows(records, lambda p: trl_prompt(tokenizer, p, fmt)), 0.0), task)
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
        for i in tqdm(range(0, len(wanted), chunk), desc="monte-carlo rollouts", disable=not is_rank_zero()):
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
