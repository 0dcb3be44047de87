"""Ulysses sequence parallelism for the TRL backend's SFT (``trainer.sequence_parallel: N``; DeepSpeed-Ulysses,
arXiv 2309.14509, through DeepSpeed's ``UlyssesSPAttentionHF``).

Each group of N consecutive ranks trains one micro-batch together: every rank of the group holds the whole batch
(gathered from the group's data loaders, :class:`GroupBatches`), runs the mitigations' ``transform_batch`` on it (so
PoSE draws its skipped position ids over the whole sequence), then keeps its own slice of N equal slices
(:func:`shard_batch`): ``input_ids``, ``position_ids`` and the labels shifted *before* slicing, so the token at the
end of a slice is still scored against the first token of the next. Inside each attention layer DeepSpeed's
all-to-all trades the slices of the sequence for slices of the heads, attention runs over the whole sequence on
heads / N heads, and a second all-to-all trades back. Everything else (embeddings, MLPs, the LM head) runs on the
rank's slice, so activations per rank shrink by N.

The loss is reduced exactly: each rank's loss is the sum of its slice's token losses over the micro-batch's token
count (counted once per group), times the world size that data-parallel averaging divides by again, and the
all-to-all's backward returns each slice's gradient to the rank that computed it; so the summed gradient is the
gradient of the whole sequence's loss, and a group of N ranks follows one process on the same batch step for step
(``tests/test_sequence_parallel.py``).

Departures from the DeepSpeed/accelerate integration (``ParallelismConfig(sp_backend="deepspeed")``): that path
shards batches in the data loader, before ``compute_loss``, so a mitigation's ``transform_batch`` would see a slice
(PoSE would draw skips per slice); here the slicing happens after it. And DeepSpeed's wrapper drops every attention
mask, which is wrong for packed rows (sdpa's plain causal attention would cross documents): the core attention here
masks by document, a document starting wherever ``position_ids`` restart at 0, and evaluation forwards (model in
eval mode: the after-evals, the validation loss) bypass Ulysses with their own mask intact.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

DROPPED_KEYS = ("attention_mask", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
"""Batch keys that describe the whole row and mean nothing on a slice: the padding mask (right padding only, so
causal attention already keeps real tokens off the pads) and the packed-row boundaries of TRL's padding-free
collator (the document mask is rebuilt from the gathered ``position_ids``)."""


# --- the batch: pad, shift, slice (pure) -----------------------------------------------------------------------------
def shard_batch(batch: dict[str, Any], rank: int, size: int, pad_id: int = 0) -> dict[str, Any]:
    """Rank ``rank``'s slice of a whole micro-batch for a sequence-parallel group of ``size`` ranks.

    ``batch``: ``[batch, seq]`` tensors ``input_ids``, ``labels`` and optionally ``position_ids`` (default
    ``arange(seq)`` per row) and ``attention_mask`` (right padding; pads get the positions that continue the row, so
    a causal mask over the row is the padding mask for every real token); ``[batch]`` metadata is kept as it is.
    The row is right-padded to a multiple of ``size`` (label -100), the labels are shifted one to the left over the
    whole row (``shift_labels``, what the model scores at each position, -100 at the end), and every ``[batch, seq]``
    tensor is cut into ``size`` equal slices along ``seq``.

    >>> b = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), "labels": torch.tensor([[5, 6, 7, 8, 9]])}
    >>> s0, s1 = shard_batch(b, 0, 2), shard_batch(b, 1, 2)
    >>> s0["input_ids"].tolist(), s1["input_ids"].tolist()
    ([[5, 6, 7]], [[8, 9, 0]])
    >>> s0["shift_labels"].tolist(), s1["shift_labels"].tolist()
    ([[6, 7, 8]], [[9, -100, -100]])
    >>> s1["position_ids"].tolist()
    [[3, 4, 5]]
    """
    ids = batch["input_ids"]
    rows, seq = ids.shape
    width = -(-seq // size) * size
    pad = width - seq
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(seq, device=ids.device).expand(rows, seq)
    mask = batch.get("attention_mask")
    if mask is not None:
        real = mask.bool()
        if bool((real[:, 1:] & ~real[:, :-1]).any()):
            raise ValueError("sequence parallelism needs right-padded rows (a pad precedes a real token)")
        # pads continue the row's positions, so the causal mask over the row is its padding mask too
        last = torch.where(real, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
        running = last + real.logical_not().long().cumsum(dim=1)
        positions = torch.where(real, positions, running)
    labels = batch["labels"]
    if pad:
        ids = torch.nn.functional.pad(ids, (0, pad), value=pad_id)
        labels = torch.nn.functional.pad(labels, (0, pad), value=-100)
        after = positions[:, -1:] + torch.arange(1, pad + 1, device=positions.device)
        positions = torch.cat([positions, after], dim=1)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    chunk = width // size
    cut = slice(rank * chunk, (rank + 1) * chunk)
    out = {k: v for k, v in batch.items() if k not in DROPPED_KEYS and k not in ("input_ids", "labels", "position_ids")}
    for k, v in list(out.items()):  # other [batch, seq] tensors follow the slicing; [batch] metadata stays
        if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == (rows, seq):
            out[k] = torch.nn.functional.pad(v, (0, pad))[:, cut] if pad else v[:, cut]
    out.update(input_ids=ids[:, cut], position_ids=positions[:, cut].contiguous(), shift_labels=shift[:, cut])
    return out


def document_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """``[batch, 1, seq, seq]`` boolean mask (True = attend) for whole rows whose documents start where
    ``position_ids`` is 0 (TRL's padding-free packing), causal inside each document; ``None`` when every row is one
    document (plain causal attention, the fast path). PoSE's skipping ids never return to 0 mid-row, so a PoSE row
    stays one document.

    >>> document_mask(torch.tensor([[0, 1, 2, 3]])) is None
    True
    >>> document_mask(torch.tensor([[0, 1, 0, 1]]))[0, 0].int().tolist()
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    doc = starts.long().cumsum(dim=1)
    seq = position_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


# --- the process group and the attention ------------------------------------------------------------------------------
@dataclasses.dataclass
class SequenceParallel:
    """A rank's place in its sequence-parallel group (``size`` consecutive ranks)."""

    size: int
    rank: int
    """Rank inside the group (which slice this rank holds)."""
    group: Any
    """The group's process group (DeepSpeed's ``parallel_state_sp``)."""
    attention: Any = None
    """DeepSpeed's ``UlyssesSPAttentionHF`` module."""
    restore: Callable[[], None] | None = None
    """Puts transformers' attention function back (the run's evals after training use the plain one)."""
    pad_id: int = 0

    def shard(self, batch: dict[str, Any]) -> dict[str, Any]:
        check_same_batch(batch, self.group)
        return shard_batch(batch, self.rank, self.size, self.pad_id)


def setup(model: Any, size: int, micro_batch_size: int, pad_id: int = 0) -> SequenceParallel:
    """Make groups of ``size`` ranks and route the model's attention through Ulysses (training forwards only).

    The process group must exist (the HF Trainer's accelerator made it); DeepSpeed's communication layer is
    initialised over it. The model's ``attn_implementation`` (``sdpa`` or a flash kernel) is the core attention
    DeepSpeed calls on the whole sequence; for ``sdpa`` it is wrapped to mask by document (:func:`document_mask`)."""
    import deepspeed.comm as ds_dist
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not dist.is_initialized():
        raise RuntimeError("sequence parallelism needs the process group of a multi-process launch")
    if not ds_dist.is_initialized():
        ds_dist.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False)
    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(sequence_parallel_size=size)
    config = model.config.get_text_config()
    impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if impl == "eager":
        raise ValueError("sequence parallelism needs sdpa or a flash attention kernel, not eager")
    original = ALL_ATTENTION_FUNCTIONS[impl]
    core = _document_masked(original) if impl == "sdpa" else original
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = UlyssesSPAttentionHF(
        attn=core, batch_size=micro_batch_size, attn_head_count=config.num_attention_heads, attn_head_size=head_dim,
        kv_head_count=config.num_key_value_heads, num_hidden_layers=config.num_hidden_layers,
        process_group=mpu.get_sequence_parallel_group(), seq_length_is_variable=True, disable_in_eval=True,
    )
    attention.core_attn_implementation = impl

    def ulysses(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
                *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        if not module.training:  # evals and the validation loss: whole rows on one rank, their own mask
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        _fit_batch(attention, query.shape[0])
        # the mask transformers built belongs to the slice; the core rebuilds one for the whole row
        return attention(module, query, key, value, None, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[impl] = ulysses

    def restore() -> None:
        ALL_ATTENTION_FUNCTIONS[impl] = original

    return SequenceParallel(size=size, rank=mpu.get_sequence_parallel_rank(), group=mpu.get_sequence_parallel_group(),
                            attention=attention, restore=restore, pad_id=pad_id)


def _fit_batch(attention: Any, rows: int) -> None:
    """DeepSpeed's module fixes the batch size at construction; a smaller last batch of an epoch changes it."""
    if attention.batch_size == rows:
        return
    attention.batch_size = rows
    q, kv, ctx = attention.required_query_shape, attention.required_key_value_shape, attention.required_context_shape
    attention.required_query_shape = torch.Size([q[0], rows, *q[2:]])
    attention.required_key_value_shape = torch.Size([kv[0], rows, *kv[2:]])
    attention.required_context_shape = torch.Size([ctx[0], rows, *ctx[2:]])


def _document_masked(sdpa: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' sdpa attention, given the whole row's ``position_ids`` (gathered by Ulysses): plain causal for
    one document per row, else causal within each document."""

    def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        positions = kwargs.get("position_ids")
        if attention_mask is None and positions is not None:
            attention_mask = document_mask(positions)
        return sdpa(module, query, key, value, attention_mask, *args, **kwargs)

    return attend


def check_same_batch(batch: dict[str, Any], group: Any) -> None:
    """Every rank of a group must hold the same whole batch after ``transform_batch`` (the mitigations' generators
    are seeded alike on every rank); a cheap checksum of ``input_ids`` and ``position_ids`` says so, or raises."""
    ids = batch["input_ids"].double()
    weights = torch.arange(1, ids.shape[-1] + 1, dtype=torch.double, device=ids.device)
    sums = [ids.sum(), (ids * weights).sum(), torch.tensor(float(ids.shape[-1]), dtype=torch.double, device=ids.device)]
    if batch.get("position_ids") is not None:
        pos = batch["position_ids"].double()
        sums += [pos.sum(), (pos * weights).sum()]
    mine = torch.stack(sums)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError("sequence-parallel ranks hold different batches after transform_batch (a mitigation draws "
                           "per rank); every rank of a group must see the same whole sequence")


# --- the data: every rank of a group gets the group's batches in turn --------------------------------------------------
class GroupBatches:
    """Wraps the train data loader of one rank of a sequence-parallel group: each batch it loads is gathered from
    all ``size`` ranks of the group and handed out whole, one after another (rank 0's, then rank 1's, ...), so the
    group trains on every rank's batches and, with ``size`` = the world size, in exactly the order one process
    would (the HF sampler gives rank r the r-th batch of each run of ``size`` consecutive batches). DeepSpeed's
    ``UlyssesSPDataLoaderAdapter`` does the same but slices each batch right away; here the slicing waits for the
    mitigations (:func:`shard_batch`)."""

    def __init__(self, loader: Any, sp: SequenceParallel) -> None:
        self.loader = loader
        self.sp = sp

    def __len__(self) -> int:
        return len(self.loader) * self.sp.size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield from gather_batches(batch, self.sp.group, self.sp.size)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:  # batch_size, dataset, sampler... as the wrapped loader has them
        return getattr(self.loader, name)


def gather_batches(batch: dict[str, Any], group: Any, size: int) -> list[dict[str, Any]]:
    """Every group rank's batch, in group-rank order (tensors of any shape: each is padded to the largest, gathered
    and cut back; other values travel as objects)."""
    shapes: list[Any] = [None] * size
    mine = {k: (tuple(v.shape), str(v.dtype)) if torch.is_tensor(v) else ("object", v) for k, v in batch.items()}
    dist.all_gather_object(shapes, mine, group=group)
    out: list[dict[str, Any]] = [{} for _ in range(size)]
    for key in batch:
        value = batch[key]
        if not torch.is_tensor(value):
            for r in range(size):
                out[r][key] = shapes[r][key][1]
            continue
        dims = [shapes[r][key][0] for r in range(size)]
        big = tuple(max(d[i] for d in dims) for i in range(len(dims[0])))
        padded = torch.zeros(big, dtype=value.dtype, device=value.device)
        padded[tuple(slice(0, n) for n in value.shape)] = value
        received = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(received, padded.contiguous(), group=group)
        for r in range(size):
            out[r][key] = received[r][tuple(slice(0, n) for n in dims[r])]
    return out
