"""Training data for causal LMs: task records -> token stream -> fixed-length blocks -> DataLoaders.

Records come from a task generator of ``evals/tasks`` (seeded by the recipe seed, so the evals' held-out data, which
use their own seed, stay apart) or from the user's JSONL file. Documents are tokenized without special tokens,
joined with the tokenizer's EOS token when it has one, and cut into ``seq_len`` blocks (Hugging Face's ``group_texts``
packing; the tail shorter than a block is dropped).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from evals.tasks import TASKS, TaskDataError
from evals.tasks.synthetic_text import load_jsonl
from trainers.errors import UserError
from trainers.recipe import DataSpec


class BlockDataset(Dataset):
    """Fixed-length token blocks ``[num_blocks, seq_len]`` served as causal-LM examples."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def load_records(spec: DataSpec, seed: int) -> list[dict[str, Any]]:
    """The text records of the recipe's data section."""
    if spec.path is not None:
        try:
            return load_jsonl(spec.path)
        except TaskDataError as e:
            raise UserError(f"data.path: {e}") from None
    config_cls, generate = TASKS[spec.task]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(spec.params) - names)
    if unknown:
        raise UserError(f"data.params.{unknown[0]}: unknown key for task {spec.task} (expected one of: {', '.join(sorted(names))})")
    params = dict(spec.params)
    params.setdefault("seed", seed)
    try:
        return generate(config_cls(**params))
    except (TypeError, ValueError) as e:
        raise UserError(f"data.params: {e}") from None


def tokenize_to_blocks(records: list[dict[str, Any]], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Concatenate the documents' token ids (EOS between documents) and cut them into blocks.

    Returns ``[num_blocks, seq_len]`` int64.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for rec in records:
        stream.extend(tokenizer(rec["text"], add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise UserError(
            f"data: {len(stream)} tokens in all, fewer than one block of data.seq_len={seq_len} (add data or lower seq_len)"
        )
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_datasets(spec: DataSpec, tokenizer: Any, seed: int) -> tuple[BlockDataset, BlockDataset | None]:
    """Train and validation block datasets; the validation blocks are the last ``val_fraction`` of the stream."""
    blocks = tokenize_to_blocks(load_records(spec, seed), tokenizer, spec.seq_len)
    n_val = int(round(blocks.shape[0] * spec.val_fraction))
    if n_val and blocks.shape[0] - n_val < 1:
        n_val = 0
    train = BlockDataset(blocks[: blocks.shape[0] - n_val])
    val = BlockDataset(blocks[blocks.shape[0] - n_val :]) if n_val else None
    return train, val


def build_loaders(
    spec: DataSpec, tokenizer: Any, seed: int
) -> tuple[DataLoader, DataLoader | None]:
    """Shuffled (seeded) training loader and an ordered validation loader."""
    train, val = build_datasets(spec, tokenizer, seed)
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train, batch_size=spec.batch_size, shuffle=True, generator=g, drop_last=len(train) >= spec.batch_size)
    val_loader = DataLoader(val, batch_size=spec.batch_size, shuffle=False) if val is not None else None
    return train_loader, val_loader
