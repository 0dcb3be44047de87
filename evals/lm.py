"""What more than one eval needs from a language model and its tokenizer, in one public module.

The evals share these helpers through here, never through each other's names (docs/architecture.md): an eval module
imports only :mod:`evals.base`, this module, :mod:`evals.vlm`, :mod:`evals.retrievers` and the tasks.

- models and tokenizers: what a model config declares (:func:`position_range`, :func:`has_rope`) and what a tokenizer
  can spell (:func:`unk_fraction`, :func:`spells`, :func:`count_tokens`, :func:`check_positions`);
- batching and decoding: :func:`length_buckets` sorts prompts by length so most batches need no padding,
  :func:`left_pad` pads the rest on the left with position ids that skip the pads, :func:`greedy_decode` decodes one
  batch with the KV cache, :func:`decode_texts` runs it over text prompts, and :class:`Sampler` turns the same
  decoder into a seeded sampler;
- the kb task's helpers the retrieval and hallucination evals share: the KB fields of their configs
  (:func:`kb_config`), the answer line of a completion (:func:`answer_of`), distractor passages
  (:func:`sample_distractors`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, Sequence

import torch

from llm_limits.evals.tasks import kb


# --- models and tokenizers -------------------------------------------------------------------------------------------
MAX_UNK_FRACTION = 0.01
"""The largest fraction of the task's characters a tokenizer may map to its unknown token (an eval's ``check``
refuses a tokenizer above it)."""


def has_rope(model_config: Any) -> bool:
    """Whether a model config declares rotary position embeddings (which extrapolate past ``max_position_embeddings``,
    however badly), as opposed to a learned table with a hard end (gpt2's ``n_positions``)."""
    if getattr(model_config, "position_embedding_type", None) == "rotary":
        return True
    return any(getattr(model_config, attr, None) is not None
               for attr in ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct"))


def position_range(model_config: Any) -> int | None:
    """The number of positions a model config declares (``max_position_embeddings``, or gpt2's ``n_positions``);
    ``None`` when it declares none."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int):
            return value
    return None


def unk_fraction(tokenizer: Any, text: str) -> float:
    """Fraction of the characters of ``text`` that ``tokenizer`` maps to its unknown token (0 if it has none).

    Fast tokenizers count the characters each unknown token covers (from offsets); others count one character per
    unknown token.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not text:
        return 0.0
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        covered = sum(end - start for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]) if tok == unk)
    except (NotImplementedError, TypeError, ValueError, KeyError):
        covered = tokenizer(text, add_special_tokens=False)["input_ids"].count(unk)
    return covered / len(text)


def spells(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` survives an encode/decode round trip (spaces a decoder adds between tokens ignored)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_positions(
    model: Any, longest: int, max_new_tokens: int, where: str, what: str, field_name: str | None,
) -> None:
    """Raise a one-line ``ValueError`` when the model's position range cannot hold the longest prompt (``longest``
    tokens, described by ``what``) plus ``max_new_tokens``, naming ``field_name`` (and ``max_new_tokens``) as the
    fields to lower.

    Rotary models are held to their declared range too: past it an answer measures length extrapolation, not
    reading."""
    n_pos = position_range(getattr(model, "config", None))
    needed = longest + max_new_tokens
    if n_pos is not None and needed > n_pos:
        raise ValueError(f"{where}: the longest prompt ({longest} tokens, {what}) plus max_new_tokens={max_new_tokens} "
                         f"needs {needed} positions but the model's position range is {n_pos}; lower "
                         f"{field_name + ' or ' if field_name else ''}max_new_tokens")


# --- batching and decoding -------------------------------------------------------------------------------------------
def accepts(model: Any, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword ``name`` (or any keyword, through ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run the block with ``model`` in eval mode and without gradients; its training flag is restored afterwards."""
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def stop_ids(tokenizer: Any) -> list[int]:
    """The token ids that end a decoded continuation: the tokenizer's EOS and pad ids, those it has."""
    return [t for t in (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "pad_token_id", None))
            if isinstance(t, int)]


def pad_id(tokenizer: Any) -> int:
    """The id to pad prompts with: the tokenizer's pad id, else its EOS id, else 0 (pads are masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        if isinstance(getattr(tokenizer, attr, None), int):
            return getattr(tokenizer, attr)
    return 0  # masked out anyway


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``(input_ids, attention_mask, position_ids)``, each ``[batch, max_len]``.

    Real tokens are right-aligned, so column ``-1`` is every row's last token; ``position_ids`` count real tokens only
    (pads get 0), so a padded row sees the positions it would see alone.

    >>> ids, mask, pos = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist(), pos.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]], [[0, 1, 2], [0, 0, 0]])
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` after a stable sort by length, so equal lengths share a
    batch and padding stays small.

    >>> length_buckets([5, 3, 5, 3, 4], 2)
    [[1, 3], [4, 0], [2]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def greedy_decode(
    model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, *, stop_ids: Sequence[int] = (),
    device: str = "cpu",
) -> list[list[int]]:
    """Greedy continuations of one batch of prompts (token id lists), each cut before its first ``stop_ids`` token.

    Prompts of different lengths are left padded (:func:`left_pad`); the model gets ``attention_mask`` and, when its
    ``forward`` takes them, ``position_ids``. With a KV cache only the new token is fed after the first step; a model
    that returns no ``past_key_values`` gets the whole sequence again.
    """
    ids, mask, pos = (t.to(device) for t in left_pad(prompts, pad_id))  # [batch, seq] each
    takes_positions = accepts(model, "position_ids")
    past, step_ids, step_pos = None, ids, pos
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    new, done = [], torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask, "use_cache": True}
        if takes_positions:
            kwargs["position_ids"] = step_pos
        if past is not None:
            kwargs["past_key_values"] = past
        out = model(**kwargs)
        nxt = out.logits[:, -1].argmax(-1)  # [batch]
        new.append(nxt)
        done |= torch.isin(nxt, stops)
        if bool(done.all()):
            break
        # the new token's position is the row's last position + 1 (pads never advance it)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        past = getattr(out, "past_key_values", None)
        step_ids, step_pos = (ids, pos) if past is None else (ids[:, -1:], pos[:, -1:])
    rows = torch.stack(new, 1).tolist()  # [batch, steps]
    stop_set = set(stop_ids)
    return [row[: next((j for j, t in enumerate(row) if t in stop_set), len(row))] for row in rows]


class Sampler(torch.nn.Module):
    """Wraps a causal LM so that :func:`greedy_decode` samples: the last position's logits are replaced by a one-hot
    of a token drawn from ``softmax(logits / temperature)`` with a seeded ``torch.Generator``. The KV cache passes
    through, so decoding costs what greedy decoding costs."""

    def __init__(self, model: Any, temperature: float, generator: torch.Generator):
        super().__init__()
        self.model, self.temperature, self.generator = model, temperature, generator

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if not accepts(self.model, "position_ids"):
            kwargs.pop("position_ids", None)
        out = self.model(input_ids=input_ids, **kwargs)
        last = out.logits[:, -1].float() / self.temperature  # [batch, vocab]
        drawn = torch.multinomial(last.softmax(-1), 1, generator=self.generator)  # [batch, 1]
        one_hot = torch.zeros_like(last).scatter_(1, drawn, 1.0)
        return SimpleNamespace(logits=one_hot[:, None, :], past_key_values=getattr(out, "past_key_values", None))


def decode_texts(
    model: Any, tokenizer: Any, prompts: Sequence[str], batch_size: int, max_new_tokens: int, device: str = "cpu",
    *, sampler: Sampler | None = None,
) -> list[str]:
    """Decoded continuations of text prompts (tokenized without special tokens), in prompt order, in length-bucketed
    left-padded batches; greedy, or sampled through ``sampler``. Each stops at EOS/pad or ``max_new_tokens``."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = [""] * len(prompts)
    runner = model if sampler is None else sampler
    with eval_mode(model):
        for batch in length_buckets([len(p) for p in encoded], batch_size):
            new = greedy_decode(runner, [encoded[i] for i in batch], max_new_tokens, pad_id(tokenizer),
                                stop_ids=stop_ids(tokenizer), device=device)
            for i, tokens in zip(batch, new):
                out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return out


# --- the kb task: helpers the retrieval and hallucination evals share ------------------------------------------------
RETRIEVER_KINDS = ("bm25", "dense", "hybrid")


def kb_config(c: Any, where: str) -> kb.KBConfig:
    """The ``kb.KBConfig`` of an eval config's KB fields (``kb_seed``, ``num_entities``, ``attributes``,
    ``values_per_attribute``, ``zipf``); its one-line errors come back starting with ``where`` instead of ``kb``."""
    try:
        return kb.KBConfig(kb_seed=c.kb_seed, num_entities=c.num_entities, attributes=list(c.attributes),
                           values_per_attribute=c.values_per_attribute, zipf=c.zipf)
    except (TypeError, ValueError) as err:
        message = str(err)
        raise ValueError(f"{where}: {message[4:] if message.startswith('kb: ') else message}") from None


def validate_kb_fields(c: Any, where: str) -> None:
    """Check the KB fields of an eval config (``kb.KBConfig``'s own validation, reworded for the eval)."""
    if not isinstance(c.attributes, (list, tuple)):
        raise ValueError(f"{where}: attributes must be a list (got {c.attributes!r})")
    kb_config(c, where)


def first_answer_line(text: str) -> str:
    """A completion up to the end of its first answer line (the first line that starts with ``A:`` after stripping);
    the whole text when it has none. What a model writes after its answer (another question) is not its answer.

    >>> first_answer_line("E:home of Vokar is teln.\\nA:teln\\nQ:job of Vokar?\\nA:cook")
    'E:home of Vokar is teln.\\nA:teln'
    >>> first_answer_line("E:none\\n")
    'E:none\\n'
    """
    pos = 0
    for line in text.split("\n"):
        if line.strip().startswith(kb.ANSWER_PREFIX):
            return text[: pos + len(line)]
        pos += len(line) + 1
    return text


def answer_of(completion: str) -> str | None:
    """The answer a completion gives: :func:`kb.parse_answer` of its :func:`first_answer_line` (``None``: no
    answer line)."""
    return kb.parse_answer(first_answer_line(completion))


def check_kb_spelling(tokenizer: Any, text: str, where: str) -> None:
    """Raise the one-line ``ValueError`` of a tokenizer that cannot spell the kb task (``text``: a sample prompt and
    completion; every character of :data:`kb.KB_ALPHABET` is checked too)."""
    missing = [ch for ch in dict.fromkeys(kb.KB_ALPHABET + text) if not spells(tokenizer, ch)]
    if missing or unk_fraction(tokenizer, text) > 0 or not spells(tokenizer, text):
        what = f" (missing: {''.join(missing)!r})" if missing else ""
        raise ValueError(f"{where}: the tokenizer cannot spell the kb task{what}; use a tokenizer that covers "
                         f"kb.KB_ALPHABET (letters, digits, space and '.:?\\n')")


def rate(flags: Sequence[bool]) -> float:
    """Mean of booleans (NaN when empty)."""
    return sum(map(bool, flags)) / len(flags) if flags else math.nan


def build_retriever(kind: str, knowledge: kb.KnowledgeBase) -> Any:
    """A retriever of ``kind`` over every passage of ``knowledge`` (ids ``entity/attribute``)."""
    from llm_limits.evals import retrievers  # bm25s / sentence-transformers load only when an eval builds contexts

    ids = list(knowledge.passages)
    return retrievers.build_retriever(kind, ids, [knowledge.passages[i] for i in ids])


def sample_distractors(
    mode: str, n: int, record: Mapping[str, Any], knowledge: kb.KnowledgeBase, ranked_ids: Sequence[str],
    rng: random.Random,
) -> list[str]:
    """``n`` distractor passage ids for a question (never its oracle ids), best first for ``retrieved`` (the ranked
    search results minus the oracles, topped up with random passages if the retriever returned too few), random for
    ``same_attribute`` (the asked attribute, other entities) and ``random`` (any passage)."""
    oracle = set(record["oracle_ids"])
    if mode == "retrieved":
        chosen = [i for i in ranked_ids if i not in oracle][:n]
    elif mode == "same_attribute":
        pool = [knowledge.passage_id(e, record["attribute"]) for e in knowledge.entities]
        pool = [i for i in pool if i not in oracle and i in knowledge.passages]
        return rng.sample(pool, min(n, len(pool)))
    elif mode == "random":
        chosen = []
    else:
        raise ValueError(f"retrieval: unknown distractor_mode {mode!r}")
    if len(chosen) < n:
        taken = oracle | set(chosen)
        pool = [i for i in knowledge.passages if i not in taken]
        chosen += rng.sample(pool, min(n - len(chosen), len(pool)))
    return chosen
