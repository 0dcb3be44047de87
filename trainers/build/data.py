"""Training data for causal LMs: task records -> token stream -> fixed-length blocks -> DataLoaders.

Records come from a task generator of ``evals/tasks`` (seeded by the recipe seed, so the evals' held-out data, which
use their own seed, stay apart) or from the user's JSONL file. Documents are tokenized without special tokens,
joined with the tokenizer's EOS token when it has one, and cut into ``seq_len`` blocks (Hugging Face's ``group_texts``
packing; the tail shorter than a block is dropped).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from llm_limits.evals.tasks import TASKS, TaskDataError
from llm_limits.evals.tasks.ruler import load_jsonl as ruler_load_jsonl
from llm_limits.evals.tasks.synthetic_text import load_jsonl
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import DataSpec


class BlockDataset(Dataset):
    """Fixed-length token blocks ``[num_blocks, seq_len]`` served as causal-LM examples, with per-document
    ``position_ids`` when given (``data.packing: per_document``). Such rows carry no ``attention_mask``: given
    ``position_ids`` and no mask, transformers reads each run of consecutive positions as its own sequence and keeps
    attention inside it (``masking_utils.find_packed_sequence_indices``; sdpa, eager and flash attention alike)."""

    def __init__(self, blocks: torch.Tensor, position_ids: torch.Tensor | None = None) -> None:
        self.blocks = blocks
        self.position_ids = position_ids

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        if self.position_ids is not None:
            return {"input_ids": ids, "position_ids": self.position_ids[i], "labels": ids.clone(), **NO_SPANS}
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), **NO_SPANS}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a batch that are not padding: the attention mask's sum, or for packed rows (no mask) their
    ``n_tokens``, or every token (blocks have no padding)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "n_tokens" in batch:
        return int(batch["n_tokens"].sum())
    return int(batch["input_ids"].numel())


def document_positions(blocks: torch.Tensor, eos: int) -> torch.Tensor:
    """Position ids that restart at 0 after every ``eos`` token (and at each block's start): ``[n, seq_len]``.

    >>> document_positions(torch.tensor([[5, 6, 3, 7, 8, 3, 9]]), eos=3).tolist()
    [[0, 1, 2, 0, 1, 2, 0]]
    """
    n, length = blocks.shape
    idx = torch.arange(length).expand(n, length)
    # a document starts at 0 and right after each eos; the position is the distance to the latest start
    starts = torch.zeros_like(blocks, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = blocks[:, :-1] == eos
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start


def document_rows(records: list[dict[str, Any]], tokenizer: Any, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """``data.packing: none``: one row per document (EOS appended, cut at ``seq_len``), right-padded; no loss on
    the padding."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for rec in records:
        ids = (tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + eos)[:seq_len]
        if len(ids) < 2:
            continue
        row = torch.full((seq_len,), pad, dtype=torch.long)
        row[: len(ids)] = torch.tensor(ids)
        mask = torch.zeros(seq_len, dtype=torch.long)
        mask[: len(ids)] = 1
        labels = torch.where(mask.bool(), row, torch.full_like(row, -100))
        rows.append({"input_ids": row, "attention_mask": mask, "labels": labels, **NO_SPANS})
    return rows


SPAN_KEYS = ("context_start", "context_end", "needle_start", "needle_end")
NO_SPANS = {k: torch.tensor(-1) for k in SPAN_KEYS}
"""Plain text rows carry the metadata keys too (all -1), so a batch never mixes shapes of dicts."""


class RowDataset(Dataset):
    """Rows built ahead of time, each a dict of same-shape tensors, so the default collate stacks them."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def pack_rows(rows: list[dict[str, list[int]]], seq_len: int, pad: int) -> list[dict[str, torch.Tensor]]:
    """``data.packing: per_document`` for rows (question/answer examples): TRL's best-fit-decreasing packing
    (``trl.data_utils.pack_dataset``, the one ``SFTTrainer`` uses) puts whole examples into rows of ``seq_len``;
    ``position_ids`` restart at 0 for each example (and for the padding at a row's end) and rows carry no attention
    mask, so attention stays inside each example, as in one row per example. ``rows``: unpadded ``input_ids`` and
    ``labels`` lists, each at most ``seq_len`` long.

    >>> packed = pack_rows([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
    ...                     {"input_ids": [6], "labels": [6]}], seq_len=4, pad=0)
    >>> [(r["input_ids"].tolist(), r["position_ids"].tolist(), int(r["n_tokens"])) for r in packed]
    [([1, 2, 3, 6], [0, 1, 2, 0], 4), ([4, 5, 0, 0], [0, 1, 0, 1], 2)]
    """
    from datasets import Dataset as HFDataset
    from trl.data_utils import pack_dataset

    import datasets

    if not rows:
        return []
    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a "Map" bar over a pass that takes milliseconds says nothing
    try:
        packed = pack_dataset(HFDataset.from_list(rows), seq_len, strategy="bfd")
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    out = []
    for ex in packed:
        ids, labels, lengths = ex["input_ids"], ex["labels"], ex["seq_lengths"]
        n = len(ids)
        positions = [p for length in lengths for p in range(length)] + list(range(seq_len - n))
        out.append({
            "input_ids": torch.tensor(ids + [pad] * (seq_len - n)),
            "position_ids": torch.tensor(positions),
            "labels": torch.tensor(labels + [-100] * (seq_len - n)),
            "n_tokens": torch.tensor(n),
            **NO_SPANS,
        })
    return out


class QADataset(RowDataset):
    """Question/answer rows (``ruler`` records): ``context + query + answer + eos``, right-padded to ``seq_len``, with
    the token spans of the context and of the answer-bearing needle as metadata for the positional mitigations."""


def qa_rows(records: list[dict[str, Any]], tokenizer: Any, seq_len: int, loss_on: str) -> tuple[list[dict], int]:
    """Tokenize question/answer records into fixed-length rows; returns the rows and how many records did not fit.

    The pieces are tokenized apart (context, query, answer), so the spans are exact token boundaries; with a
    subword tokenizer this may split differently from tokenizing the whole string (documented, harmless for training).
    ``loss_on="answer"`` masks every label but the answer's and the closing EOS.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows, dropped = [], 0
    for rec in records:
        enc = tokenizer(rec["context"], add_special_tokens=False, return_offsets_mapping=True)
        ctx, offsets = enc["input_ids"], enc["offset_mapping"]
        q = tokenizer(rec["query"], add_special_tokens=False)["input_ids"]
        a = tokenizer(rec["answer"], add_special_tokens=False)["input_ids"] + eos
        ids = ctx + q + a
        if len(ids) > seq_len:
            dropped += 1
            continue
        n_pad = seq_len - len(ids)
        labels = list(ids) if loss_on == "all" else [-100] * (len(ctx) + len(q)) + a
        spans = rec.get("needle_spans") or []
        ns, ne = _token_span(offsets, spans[0]) if spans else (-1, -1)
        rows.append({
            "input_ids": torch.tensor(ids + [pad] * n_pad),
            "attention_mask": torch.tensor([1] * len(ids) + [0] * n_pad),
            "labels": torch.tensor(labels + [-100] * n_pad),
            "context_start": torch.tensor(0),
            "context_end": torch.tensor(len(ctx)),
            "needle_start": torch.tensor(ns),
            "needle_end": torch.tensor(ne),
        })
    return rows, dropped


def _unpadded(rows: list[dict[str, torch.Tensor]]) -> list[dict[str, list[int]]]:
    """The real tokens of padded rows (``input_ids`` and ``labels`` up to the attention mask's end)."""
    out = []
    for r in rows:
        n = int(r["attention_mask"].sum())
        out.append({"input_ids": r["input_ids"][:n].tolist(), "labels": r["labels"][:n].tolist()})
    return out


def _token_span(offsets: list[tuple[int, int]], span: list[int]) -> tuple[int, int]:
    """Token indices ``[start, end)`` of the tokens overlapping the character span ``[s, e)``."""
    s, e = span
    hits = [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
    return (hits[0], hits[-1] + 1) if hits else (-1, -1)


def fit_context_chars(config_cls: type, generate: Any, params: dict[str, Any], tokenizer: Any, seq_len: int) -> int:
    """``context_chars`` that makes ``context + query + answer + eos`` fill ``seq_len`` tokens, measured on a sample
    under this tokenizer (exact for a character tokenizer)."""
    probe = generate(config_cls(**{**params, "num_examples": 4, "context_chars": 4 * seq_len}))
    ctx_tokens = sum(len(tokenizer(r["context"], add_special_tokens=False)["input_ids"]) for r in probe)
    chars_per_token = sum(len(r["context"]) for r in probe) / max(1, ctx_tokens)
    tail = max(len(tokenizer(r["query"] + r["answer"], add_special_tokens=False)["input_ids"]) for r in probe) + 1
    budget = seq_len - tail
    if budget < 8:
        raise UserError(f"data.seq_len: {seq_len} tokens leave no room for a context (question + answer take {tail})")
    return int(budget * chars_per_token) if chars_per_token > 1 else budget


def load_records(spec: DataSpec, seed: int, tokenizer: Any = None) -> list[dict[str, Any]]:
    """The records of the recipe's data section: text records ``{"text"}`` or question/answer records
    ``{"context", "query", "answer", ...}`` (the ``ruler`` schema), from the user's JSONL file or a task generator.

    A generator whose config has ``context_chars`` (``ruler``) and no value for it in ``data.params`` gets the value
    that fills ``data.seq_len`` tokens under ``tokenizer``."""
    if spec.path is not None:
        loader = ruler_load_jsonl if _first_record_has(spec.path, "query") else load_jsonl
        try:
            return loader(spec.path)
        except TaskDataError as e:
            raise UserError(f"data.path: {e}") from None
    config_cls, generate = TASKS[spec.task]
    params = {"seed": seed, **spec.params}
    _check_params(spec, config_cls, params)
    try:  # the fit builds probe configs, so a bad value (an unknown ruler task) surfaces there first
        if "context_chars" in {f.name for f in dataclasses.fields(config_cls)} and "context_chars" not in params:
            params["context_chars"] = fit_context_chars(config_cls, generate, params, tokenizer, spec.seq_len)
        return generate(config_cls(**params))
    except (TypeError, ValueError) as e:
        raise UserError(f"data.params: {e}") from None


def _first_record_has(path: str, field: str) -> bool:
    """Whether the first non-blank JSON line of ``path`` has ``field`` (a missing or bad file answers False and the
    loader then reports it properly)."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first record
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    return isinstance(rec, dict) and field in rec
    except (OSError, ValueError):
        return False
    return False


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


def build_datasets(spec: DataSpec, tokenizer: Any, seed: int) -> tuple[Dataset, Dataset | None]:
    """Train and validation datasets; validation takes the last ``val_fraction`` of the blocks (or examples).

    Text records are packed into blocks; question/answer records become one padded row each."""
    records = load_records(spec, seed, tokenizer)
    if records and "query" in records[0]:
        if spec.packing == "blocks":
            raise UserError("data.packing: blocks cuts a token stream of text documents; question/answer examples "
                            "pack with per_document (whole examples per row) or none (one row each)")
        rows, _ = qa_rows(records, tokenizer, spec.seq_len, spec.loss_on)
        if not rows:
            raise UserError(f"data: none of the {len(records)} question/answer examples fits data.seq_len={spec.seq_len} tokens")
        n_val = int(round(len(rows) * spec.val_fraction))
        val_rows = rows[len(rows) - n_val :] if n_val and len(rows) > n_val else []
        train_rows = rows[: len(rows) - len(val_rows)]
        if spec.packing == "per_document":  # the split is by example, before packing: validation stays apart
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            train_rows, val_rows = (pack_rows(_unpadded(r), spec.seq_len, pad) for r in (train_rows, val_rows))
        return QADataset(train_rows), (QADataset(val_rows) if val_rows else None)
    if records and "text" not in records[0]:  # e.g. the chains task's prompt/completion examples
        field = "data.path" if spec.path is not None else "data.task"
        raise UserError(f"{field}: {spec.path or spec.task!r} gives examples without text (fields: "
                        f"{', '.join(sorted(records[0]))}); the lightning backend trains on text documents or question/answer "
                        "rows: prompt/completion examples train with trainer.backend: trl")
    if spec.packing == "none":  # "auto" packs text documents into blocks
        rows = document_rows(records, tokenizer, spec.seq_len)
        if not rows:
            raise UserError(f"data: no document of {len(records)} has 2 tokens or more (data.packing: none)")
        n_val = int(round(len(rows) * spec.val_fraction))
        if n_val and len(rows) - n_val < 1:
            n_val = 0
        return RowDataset(rows[: len(rows) - n_val]), (RowDataset(rows[len(rows) - n_val :]) if n_val else None)
    blocks = tokenize_to_blocks(records, tokenizer, spec.seq_len)
    positions = None
    if spec.packing == "per_document":
        if tokenizer.eos_token_id is None:
            raise UserError("data.packing: per_document needs a tokenizer with an EOS token (it marks where documents end)")
        positions = document_positions(blocks, tokenizer.eos_token_id)
    n_val = int(round(blocks.shape[0] * spec.val_fraction))
    if n_val and blocks.shape[0] - n_val < 1:
        n_val = 0
    cut = blocks.shape[0] - n_val
    train = BlockDataset(blocks[:cut], positions[:cut] if positions is not None else None)
    val = BlockDataset(blocks[cut:], positions[cut:] if positions is not None else None) if n_val else None
    return train, val


def _check_params(spec: DataSpec, config_cls: type, params: dict[str, Any]) -> None:
    """Unknown keys and wrong types in ``data.params``, checked against the task's config dataclass."""
    from pydantic import ValidationError

    from llm_limits.trainers.recipe.schema import _format_error, strict_model_for

    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise UserError(f"data.params.{unknown[0]}: unknown key for task {spec.task} (expected one of: {', '.join(sorted(names))})")
    model = strict_model_for(config_cls)
    try:
        model.model_validate(params)
    except ValidationError as e:
        raise UserError(f"data.params.{_format_error(e, model, params)}") from None


class ResumableRandomSampler(Sampler[int]):
    """The order of ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``, restartable mid-epoch.

    Per epoch it makes the same two draws from its generator that such a loader makes (the loader's int64 base seed,
    then the permutation), so a run's data order is the same as with a plain shuffled loader. ``epoch_state`` is the
    generator's state when the current epoch began; ``resume(state, skip)`` makes the next epoch restart from it and
    skip the first ``skip`` indices (if they cover the whole epoch, that epoch is replayed silently and the following
    one served whole). A run resumed from a mid-epoch checkpoint so sees exactly the batches the uninterrupted run saw.
    Under DDP every rank draws the same permutation and serves its share of it (DistributedSampler's split), so the
    position a checkpoint stores is exact there too; the Lightning trainer keeps this sampler
    (``use_distributed_sampler=False``).

    >>> s = ResumableRandomSampler(10, batch_size=3, drop_last=True, seed=5)
    >>> first = list(s); state = s.epoch_state; second = list(s)
    >>> s.resume(state, 3); list(s) == first[3:]
    True
    >>> s.resume(state, 9); list(s) == second   # a checkpoint at the end of an epoch: the next epoch comes whole
    True
    """

    def __init__(self, n: int, *, batch_size: int, drop_last: bool, seed: int) -> None:
        self.n = n
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_state: torch.Tensor = self.generator.get_state()
        self._resume: tuple[torch.Tensor, int] | None = None

    @staticmethod
    def _world() -> tuple[int, int]:
        """(rank, world size) of the process group when one is running (DDP), else (0, 1). Read when the epoch starts:
        a launcher that starts the ranks after the loader was built (Lightning's) has made the group by then."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _share_size(self) -> int:
        rank, world = self._world()
        if world == 1:
            return self.n
        return self.n // world if self.drop_last else -(-self.n // world)

    @property
    def per_epoch(self) -> int:
        """Indices this rank serves per epoch in whole batches (what a checkpoint compares its position with)."""
        k = self._share_size()
        return (k // self.batch_size) * self.batch_size if self.drop_last else k

    def __len__(self) -> int:
        return self._share_size()

    def resume(self, state: torch.Tensor, skip: int) -> None:
        self._resume = (state, int(skip))

    def _draw(self) -> list[int]:
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the loader's base seed, as before
        perm = torch.randperm(self.n, generator=self.generator).tolist()
        rank, world = self._world()
        if world == 1:
            return perm
        # DistributedSampler's split of one permutation every rank draws alike (same seed): drop the tail that does
        # not divide (drop_last) or pad with the first indices, then rank r takes every world-th index from r.
        k = self._share_size() * world
        perm = perm[:k] if self.drop_last else (perm + perm[: k - self.n])
        return perm[rank:k:world]

    def _tail(self) -> None:
        torch.randperm(self.n, generator=self.generator)  # RandomSampler's trailing (empty) slice, drawn when exhausted

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            state, skip = self._resume
            self._resume = None
            self.generator.set_state(state)
            if skip >= self.per_epoch:
                self._draw()
                self._tail()
                skip = 0
        self.epoch_state = self.generator.get_state()
        yield from self._draw()[skip:]
        self._tail()


class ShardSampler(Sampler[int]):
    """Validation order: every row in order in one process; under DDP rank ``r`` of ``w`` takes rows ``r, r+w, ...``
    (no row twice, none padded in, so the shares may differ by one). Read when iteration starts, like
    :class:`ResumableRandomSampler`, because Lightning starts the process group after the loader is built.

    >>> list(ShardSampler(5))
    [0, 1, 2, 3, 4]
    """

    def __init__(self, n: int) -> None:
        self.n = n

    def _indices(self) -> range:
        rank, world = ResumableRandomSampler._world()
        return range(rank, self.n, world)

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self):
        yield from self._indices()


def build_loaders(
    spec: DataSpec, tokenizer: Any, seed: int
) -> tuple[DataLoader, DataLoader | None]:
    """Shuffled (seeded, resumable mid-epoch) training loader and an ordered validation loader."""
    train, val = build_datasets(spec, tokenizer, seed)
    return loaders(train, val, spec.batch_size, seed)


def loaders(train: Dataset, val: Dataset | None, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader | None]:
    """The shuffled (seeded, resumable mid-epoch) training loader of ``train`` and an ordered one of ``val``."""
    drop_last = len(train) >= batch_size
    sampler = ResumableRandomSampler(len(train), batch_size=batch_size, drop_last=drop_last, seed=seed)
    # The loader draws its (unused, no workers) base seed from its own generator: the sampler owns the data order.
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val, batch_size=batch_size, sampler=ShardSampler(len(val))) if val is not None else None
    return train_loader, val_loader
