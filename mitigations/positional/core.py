"""Pure functions of the positional curricula: sequence-length warmup, PoSE position ids, position-balanced needles
and Scalable-Softmax (log-length) attention.

Batches are dicts of ``[batch, seq]`` tensors (``input_ids``, ``attention_mask``, ``labels``, optional
``position_ids``) plus, for structured (needle) rows, ``[batch]`` int metadata: ``context_start``/``context_end``
(the haystack region, end exclusive) and ``needle_start``/``needle_end`` (the answer-bearing needle inside it); all
four are -1 for plain LM rows. Every function returns a new dict and never writes into its input tensors.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from llm_limits.mitigations.base import Batch

SPAN_KEYS = ("context_start", "context_end", "needle_start", "needle_end")
"""The ``[batch]`` metadata keys of a structured (needle) row; -1 everywhere on plain LM rows."""

SCHEDULES = ("linear", "root", "discrete")
CHUNK_LENGTHS = ("authors", "random", "equal")


# --- 1. sequence-length warmup (Li et al., arXiv 2108.06084) ---------------------------------------------------------
def curriculum_seq_len(
    step: int,
    total_steps: int,
    min_len: int,
    max_len: int,
    schedule: str = "linear",
    root_degree: int = 2,
    multiple_of: int = 8,
    discrete_lengths: Sequence[int] = (),
    discrete_steps: Sequence[int] = (),
) -> int:
    """The training sequence length at ``step`` of a warmup lasting ``total_steps`` (steps or tokens: any counter).

    ``linear`` and ``root``: ``min + (max - min) * (step / total) ** (1 / root_degree)`` (linear is root degree 1),
    rounded down to a multiple of ``multiple_of`` but never below ``min_len``, and exactly ``max_len`` once
    ``step >= total_steps``. ``discrete``: ``discrete_lengths[i]`` while ``step <= discrete_steps[i]``, then the last
    length (``len(discrete_steps) == len(discrete_lengths) - 1``), exactly as DeepSpeed's ``fixed_discrete``
    (``difficulty[i]`` while ``global_steps <= max_step[i]``); lengths are capped at ``max_len`` and not rounded.

    >>> [curriculum_seq_len(s, 100, 64, 512) for s in (0, 25, 50, 100, 200)]
    [64, 176, 288, 512, 512]
    >>> curriculum_seq_len(25, 100, 64, 512, schedule="root", root_degree=2)
    288
    >>> [curriculum_seq_len(s, 0, 0, 512, "discrete", discrete_lengths=(64, 128, 256), discrete_steps=(10, 20))
    ...  for s in (0, 10, 11, 20, 21)]
    [64, 64, 128, 128, 256]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)} (got {schedule!r})")
    if schedule == "discrete":
        if len(discrete_lengths) == 0 or len(discrete_steps) != len(discrete_lengths) - 1:
            raise ValueError(
                "a discrete schedule needs len(discrete_steps) == len(discrete_lengths) - 1 "
                f"(got {len(discrete_lengths)} lengths, {len(discrete_steps)} steps)"
            )
        for length, until in zip(discrete_lengths, discrete_steps):
            if step <= until:  # DeepSpeed's fixed_discrete: the boundary step still has the shorter length
                return min(int(length), max_len)
        return min(int(discrete_lengths[-1]), max_len)
    if min_len < 1 or max_len < min_len:
        raise ValueError(f"need 1 <= min_len <= max_len (got min_len={min_len}, max_len={max_len})")
    if multiple_of < 1 or root_degree < 1:
        raise ValueError(f"multiple_of and root_degree must be >= 1 (got {multiple_of}, {root_degree})")
    if total_steps <= 0 or step >= total_steps:
        return max_len
    degree = 1 if schedule == "linear" else root_degree
    raw = min_len + (max_len - min_len) * (max(step, 0) / total_steps) ** (1.0 / degree)
    rounded = int(raw) // multiple_of * multiple_of
    return min(max_len, max(min_len, rounded))


def _spans(batch: Batch) -> tuple[torch.Tensor, ...] | None:
    """The four ``[batch]`` span tensors as CPU longs, or ``None`` when the batch carries no metadata."""
    if not all(k in batch for k in SPAN_KEYS):
        return None
    return tuple(batch[k].detach().to("cpu", torch.long) for k in SPAN_KEYS)


def _check_row(row: int, cs: int, ce: int, ns: int, ne: int, seq: int) -> None:
    if not (0 <= cs <= ns <= ne <= ce <= seq):
        raise ValueError(
            f"row {row}: metadata spans must satisfy 0 <= context_start <= needle_start <= needle_end <= context_end "
            f"<= seq ({seq}) (got context {cs}..{ce}, needle {ns}..{ne})"
        )


def _gather_rows(batch: Batch, index: torch.Tensor, skip: Sequence[str] = ()) -> Batch:
    """A new batch whose ``[batch, seq, ...]`` tensors are re-indexed along ``seq`` by ``index`` ``[batch, new_seq]``;
    other entries are carried over as they are."""
    b, seq = batch["input_ids"].shape[:2]
    out: Batch = {}
    for key, value in batch.items():
        if key not in skip and isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[:2] == (b, seq):
            idx = index.to(value.device)
            out[key] = value[torch.arange(b, device=value.device)[:, None], idx]
        else:
            out[key] = value
    return out


def _set_spans(out: Batch, like: Batch, spans: Sequence[torch.Tensor]) -> None:
    for key, value in zip(SPAN_KEYS, spans):
        out[key] = value.to(device=like[key].device, dtype=like[key].dtype)


def truncate_batch(batch: Batch, length: int) -> Batch:
    """Cut every row of ``batch`` to ``length`` tokens (``[batch, seq]`` -> ``[batch, length]``).

    Plain LM rows (``needle_start == -1`` or no metadata) keep their first ``length`` tokens. A structured row keeps
    its needle, query and answer: it first sheds its padding (``attention_mask == 0``, from the right), then drops the
    remaining excess from the haystack outside the needle, split before/after the needle in proportion to the haystack
    on each side (so the needle's relative depth is preserved) and taken from the region's outer edges (the text right
    around the needle stays whole). Spans are updated; ``position_ids``, if present, become ``0..length-1``.
    Raises ``ValueError`` when a structured row's haystack is too short.

    >>> b = {"input_ids": torch.arange(12)[None], "attention_mask": torch.ones(1, 12, dtype=torch.long),
    ...      "context_start": torch.tensor([2]), "context_end": torch.tensor([10]),
    ...      "needle_start": torch.tensor([4]), "needle_end": torch.tensor([6])}
    >>> out = truncate_batch(b, 8)
    >>> out["input_ids"].tolist(), [int(out[k]) for k in SPAN_KEYS]
    ([[0, 1, 3, 4, 5, 6, 10, 11]], [2, 6, 3, 5])
    """
    ids = batch["input_ids"]
    b, seq = ids.shape[:2]
    if length < 1:
        raise ValueError(f"cannot truncate to {length} tokens (need >= 1)")
    if length >= seq:
        return dict(batch)
    spans = _spans(batch)
    mask = batch.get("attention_mask")
    new_spans = [s.clone() for s in spans] if spans is not None else None
    rows = []
    for r in range(b):
        if spans is None or int(spans[2][r]) < 0:
            rows.append(torch.arange(length))
            continue
        cs, ce, ns, ne = (int(s[r]) for s in spans)
        _check_row(r, cs, ce, ns, ne, seq)
        keep = torch.ones(seq, dtype=torch.bool)
        drop = seq - length
        if mask is not None:
            pads = (mask[r].detach().cpu() == 0).nonzero().flatten()
            shed = pads[len(pads) - min(drop, len(pads)) :]
            keep[shed] = False
            drop -= len(shed)
        if drop > 0:
            before, after = ns - cs, ce - ne
            if drop > before + after:
                raise ValueError(
                    f"row {r}: cannot truncate a structured row of {seq} tokens to {length}: its haystack has "
                    f"{before + after} tokens outside the needle but {drop} must go (raise the warmup's min_len or "
                    "give the example a longer haystack)"
                )
            # proportional split keeps (needle_start - context_start) / haystack constant, i.e. the relative depth
            d_before = min(before, max(drop - after, int(drop * before / (before + after) + 0.5)))
            d_after = drop - d_before
            keep[cs : cs + d_before] = False
            keep[ce - d_after : ce] = False
        rows.append(keep.nonzero().flatten())
        kept_before = torch.cat([torch.zeros(1, dtype=torch.long), keep.long().cumsum(0)])  # kept_before[x] = #kept < x
        for s_new, old in zip(new_spans, (cs, ce, ns, ne)):
            s_new[r] = kept_before[old]
    out = _gather_rows(batch, torch.stack(rows), skip=("position_ids",))
    if "position_ids" in batch:
        pos = batch["position_ids"]
        out["position_ids"] = torch.arange(length, device=pos.device, dtype=pos.dtype).expand(b, length).clone()
    if new_spans is not None:
        _set_spans(out, batch, new_spans)
    return out


# --- 2. PoSE (Zhu et al., arXiv 2309.10400) ---------------------------------------------------------------------------
def pose_position_ids(
    window_len: int,
    target_len: int,
    num_chunks: int = 2,
    generator: torch.Generator | None = None,
    chunk_lengths: str = "authors",
) -> torch.Tensor:
    """Position ids ``[window_len]`` (long) for one training window that cover a target length (PoSE).

    The window is split into ``num_chunks`` contiguous chunks of >= 1 token (``authors``: as the authors' code, the
    first chunk ~ ``U{1..ceil(W/2)}``, the rest cut at uniform random points; ``random``: all ``num_chunks - 1`` cut
    points uniform; ``equal``: as even as possible), resampled per call. Chunk ``i`` gets ids
    ``start_i + u_i + (0..len_i-1)`` with ``u_0 = 0`` and ``u_i ~ U{u_{i-1}, ..., target_len - window_len}`` (the
    paper's skip biases; non-decreasing, so ids are strictly increasing, start at 0 and stay < ``target_len``).

    >>> ids = pose_position_ids(8, 32, 2, torch.Generator().manual_seed(0))
    >>> int(ids[0]), bool((ids.diff() > 0).all()), int(ids[-1]) < 32
    (0, True, True)
    >>> pose_position_ids(4, 4).tolist()
    [0, 1, 2, 3]
    """
    if window_len < 1 or target_len < window_len:
        raise ValueError(f"need 1 <= window_len <= target_len (got window {window_len}, target {target_len})")
    if not 1 <= num_chunks <= window_len:
        raise ValueError(f"num_chunks must be in 1..window_len ({window_len}) (got {num_chunks})")
    if chunk_lengths == "authors" and num_chunks > 1:
        # the authors' code (N = 2): first chunk ~ U{1..ceil(W/2)}; further chunks cut the rest at random
        longest_first = min((window_len + 1) // 2, window_len - num_chunks + 1)
        first = 1 + int(torch.randint(0, longest_first, (1,), generator=generator))
        lengths = torch.cat([torch.tensor([first]), _random_cuts(window_len - first, num_chunks - 1, generator)])
    elif chunk_lengths in ("random", "authors"):
        lengths = _random_cuts(window_len, num_chunks, generator)
    elif chunk_lengths == "equal":
        base, extra = divmod(window_len, num_chunks)
        lengths = torch.tensor([base + (i < extra) for i in range(num_chunks)], dtype=torch.long)
    else:
        raise ValueError(f"chunk_lengths must be one of {', '.join(CHUNK_LENGTHS)} (got {chunk_lengths!r})")
    max_skip = target_len - window_len
    skips = [0]  # u_0 = 0: the first chunk starts at position 0, as in the authors' code
    for _ in range(num_chunks - 1):
        low = skips[-1]
        skips.append(low + int(torch.randint(0, max_skip - low + 1, (1,), generator=generator)))
    # (torch.repeat_interleave would do, but costs milliseconds per call on a busy CPU; chunks are few)
    offsets = torch.cat([torch.full((int(n),), u, dtype=torch.long) for n, u in zip(lengths, skips)])
    return torch.arange(window_len) + offsets


def _random_cuts(total: int, parts: int, generator: torch.Generator | None) -> torch.Tensor:
    """``parts`` positive lengths summing to ``total``: ``parts - 1`` distinct cut points drawn uniformly."""
    cuts = torch.randperm(total - 1, generator=generator)[: parts - 1].sort().values + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([total])]).diff()


# --- 3. position-balanced needles (IN2 training, An et al., arXiv 2404.16811) -----------------------------------------
def needle_depth(batch: Batch) -> torch.Tensor:
    """Relative depth ``[batch]`` (float) of each row's needle in its haystack: 0 = before all haystack tokens, 1 =
    after all of them; ``nan`` for plain rows, rows with an empty haystack, or a batch without metadata."""
    b = batch["input_ids"].shape[0]
    spans = _spans(batch)
    out = torch.full((b,), float("nan"))
    if spans is None:
        return out
    cs, ce, ns, ne = spans
    hay = (ce - cs) - (ne - ns)
    ok = (ns >= 0) & (hay > 0)
    out[ok] = (ns - cs)[ok].float() / hay[ok].float()
    return out


def balance_needles(batch: Batch, generator: torch.Generator | None = None) -> Batch:
    """Move each structured row's needle to a uniformly random offset in its haystack (token level).

    The needle's tokens are cut out and re-inserted before haystack token ``k``, ``k ~ U{0..H}`` (``H`` haystack
    tokens), so every depth is equally likely. Only the context region is permuted: the query, answer and padding
    stay in place, every ``[batch, seq]`` tensor (labels included) moves with its token, ``position_ids`` keep their
    slots, and the needle spans are updated. Plain rows are untouched. One draw per structured row, in row order.

    >>> b = {"input_ids": torch.arange(8)[None], "context_start": torch.tensor([1]), "context_end": torch.tensor([7]),
    ...      "needle_start": torch.tensor([5]), "needle_end": torch.tensor([7])}
    >>> out = balance_needles(b, torch.Generator().manual_seed(0))
    >>> sorted(out["input_ids"][0].tolist()) == list(range(8)), out["input_ids"][0, int(out["needle_start"])].item()
    (True, 5)
    """
    spans = _spans(batch)
    if spans is None:
        return dict(batch)
    b, seq = batch["input_ids"].shape[:2]
    index = torch.arange(seq).expand(b, seq).clone()
    new_spans = [s.clone() for s in spans]
    for r in range(b):
        cs, ce, ns, ne = (int(s[r]) for s in spans)
        if ns < 0:
            continue
        _check_row(r, cs, ce, ns, ne, seq)
        hay = torch.cat([torch.arange(cs, ns), torch.arange(ne, ce)])
        k = int(torch.randint(0, len(hay) + 1, (1,), generator=generator))
        index[r, cs:ce] = torch.cat([hay[:k], torch.arange(ns, ne), hay[k:]])
        new_spans[2][r] = cs + k
        new_spans[3][r] = cs + k + (ne - ns)
    out = _gather_rows(batch, index, skip=("position_ids",))
    _set_spans(out, batch, new_spans)
    return out


# --- 4. Scalable-Softmax / log-length attention scaling (Nakanishi, arXiv 2501.19399) --------------------------------
def ssmax_init(init_len: int) -> float:
    """The ``s`` with ``s * log(init_len) == 1``, so training starts at standard attention for that many keys.

    >>> round(ssmax_init(64) * math.log(64), 6)
    1.0
    """
    if init_len < 2:
        raise ValueError(f"init_len must be >= 2 (log 1 = 0) (got {init_len})")
    return 1.0 / math.log(init_len)


def ssmax_scale(n_keys: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """SSMax logit multiplier ``s * log(n)`` (broadcast), where ``n`` is the number of keys a query attends to
    (clamped to >= 1: a query with no key gets 0, which changes nothing).

    >>> [round(v, 4) for v in ssmax_scale(torch.tensor([1.0, math.e, 8.0]), torch.tensor(0.5)).tolist()]
    [0.0, 0.5, 1.0397]
    """
    return s * torch.log(n_keys.to(s.dtype).clamp(min=1))


def count_keys(
    attention_mask: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    is_causal: bool = True,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Keys each query attends to, ``[batch or 1, 1, q_len, 1]`` (float), read off the 4D mask the attention
    receives (bool: True = attend; float: additive, masked entries near the dtype's minimum). Without a mask: causal
    counts (``kv_len - q_len + i + 1``) or ``kv_len``. Counting the mask (not position ids) keeps it exact under PoSE
    and padding."""
    if attention_mask is None:
        if is_causal:
            n = torch.arange(q_len, device=device, dtype=torch.float32) + (kv_len - q_len + 1)
        else:
            n = torch.full((q_len,), float(kv_len), device=device)
        return n.view(1, 1, q_len, 1)
    if attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > torch.finfo(attention_mask.dtype).min / 2
    return allowed.sum(-1, keepdim=True, dtype=torch.float32).amax(1, keepdim=True)


def repeat_kv(hidden: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[batch, kv_heads, seq, dim]`` -> ``[batch, kv_heads * n_rep, seq, dim]`` (grouped-query attention)."""
    if n_rep == 1:
        return hidden
    b, h, t, d = hidden.shape
    return hidden[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def ssmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    s: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention whose logits for query ``i`` are multiplied by ``s * log(n_i)`` (SSMax).

    ``query`` ``[batch, heads, q, dim]``, ``key``/``value`` ``[batch, kv_heads, kv, dim]``, ``attention_mask``
    ``[batch or 1, 1, q, kv]`` (bool or additive float) or ``None`` (causal by ``is_causal``); ``s`` ``[1]`` (per
    layer) or ``[heads]`` (per head), ``None`` = standard attention. Returns ``[batch, q, heads, dim]``. Scaling the
    query row by ``s * log(n_i)`` is the same as scaling that row's logits, and lets SDPA's fused kernels do the rest.
    """
    b, h, q_len, _ = query.shape
    n_rep = h // key.shape[1]
    key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    kv_len = key.shape[2]
    if s is not None:
        n = count_keys(attention_mask, q_len, kv_len, is_causal, query.device)
        scale = ssmax_scale(n, s.float().view(1, -1, 1, 1))  # [batch or 1, heads or 1, q, 1]
        query = query * scale.to(query.dtype)
    causal = attention_mask is None and is_causal and q_len > 1
    if causal and kv_len != q_len:  # SDPA's is_causal aligns top-left; decode with a cache needs the explicit mask
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        causal = False
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal
    )
    return out.transpose(1, 2).contiguous()
