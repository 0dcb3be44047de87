"""What more than one eval needs from a language model and its tokenizer, in one public module.

The evals share these helpers through here, never through each other's names (docs/architecture.md): an eval module
imports only :mod:`evals.base`, this module, :mod:`evals.vlm`, :mod:`evals.retrievers` and the tasks.

- models and tokenizers: what a model config declares (:func:`position_range`, :func:`has_rope`) and what a tokenizer
  can spell (:func:`unk_fraction`, :func:`spells`, :func:`count_tokens`, :func:`check_positions`);
- prompt formats: how an eval writes a prompt for the tokenizer, in its chat template or as plain text
  (:func:`resolve_prompt_format`, :func:`format_prompt`), the one definition the evals and the TRL backend's training
  prompts share;
- batching and decoding: :func:`length_buckets` sorts prompts by length so most batches need no padding,
  :func:`left_pad` pads the rest on the left with position ids that skip the pads, :func:`greedy_decode` decodes one
  batch with the KV cache, :func:`decode_texts` runs it over text prompts, and :class:`Sampler` turns the same
  decoder into a seeded sampler;
- the chains task's helpers the reasoning and prm evals share: their held-out and ProcessBench-style chains
  (:func:`held_out_records`, :func:`processbench_records`), seeded best-of-N samples (:func:`sample_completions`), the
  process reward model reader the PRM trainer uses too (:func:`step_positions`, :class:`PRMScorer`), and the scores
  of its step predictions and of best-of-N (:func:`processbench_f1`, :func:`best_of_n_accuracy`);
- the kb task's helpers the retrieval and hallucination evals share: the KB fields of their configs
  (:func:`kb_config`), the answer line of a completion (:func:`answer_of`), distractor passages
  (:func:`sample_distractors`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
import re
from collections import Counter
from types import SimpleNamespace
from typing import Any, Collection, Iterator, Mapping, Sequence

import torch

from llm_limits.evals.base import FieldError
from llm_limits.evals.tasks import chains, kb
from llm_limits.evals.tasks.chains import ANSWER_PREFIX, STEP_SEP, ChainsConfig


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


# --- prompt formats --------------------------------------------------------------------------------------------------
PROMPT_FORMATS = ("auto", "chat", "plain")
"""Values of an eval's (and the recipe's ``data``) ``prompt_format``."""


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` has a chat template (``tokenizer.chat_template`` set and not empty)."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_format(tokenizer: Any, fmt: str) -> str:
    """``chat`` or ``plain``: the prompt format ``fmt`` (``auto``, ``chat`` or ``plain``) means for ``tokenizer``.
    ``auto`` is ``chat`` when the tokenizer has a chat template, else ``plain``. ``chat`` asked of a tokenizer without
    a template is a :class:`~evals.base.FieldError` on ``prompt_format``; an unknown value a ``ValueError``.

    >>> from types import SimpleNamespace
    >>> chat, plain = SimpleNamespace(chat_template="{{ x }}"), SimpleNamespace(chat_template=None)
    >>> resolve_prompt_format(chat, "auto"), resolve_prompt_format(plain, "auto"), resolve_prompt_format(chat, "plain")
    ('chat', 'plain', 'plain')
    >>> resolve_prompt_format(plain, "chat")
    Traceback (most recent call last):
    ...
    llm_limits.evals.base.FieldError: prompt_format: chat, but the tokenizer has no chat template
    """
    if fmt not in PROMPT_FORMATS:
        raise FieldError("prompt_format", f"expected one of {', '.join(PROMPT_FORMATS)} (got {fmt!r})")
    if fmt == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if fmt == "chat" and not has_chat_template(tokenizer):
        raise FieldError("prompt_format", "chat, but the tokenizer has no chat template")
    return fmt


def format_prompt(tokenizer: Any, text: str, fmt: str) -> str:
    """``text`` as the model reads it under the prompt format ``fmt`` (:func:`resolve_prompt_format`): ``plain``
    returns ``text`` itself; ``chat`` makes it one user turn of the tokenizer's chat template followed by the
    generation prompt (``apply_chat_template(..., add_generation_prompt=True, tokenize=False)``), so the answer written
    after it is the assistant's turn.

    The chat string already holds whatever the template writes (its BOS, role tokens, a default system turn): tokenize
    it with ``add_special_tokens=False``, as every eval does, or the BOS is doubled. ``text`` is kept whole inside the
    turn (with a template that does not rewrite the content), so character offsets into ``text`` move by
    ``format_prompt(...).find(text)``.

    >>> format_prompt(None, "Q:3+4\\n", "plain")
    'Q:3+4\\n'
    """
    if resolve_prompt_format(tokenizer, fmt) == "plain":
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def own_prompt_format(tokenizer: Any, fmt: str) -> str:
    """The prompt format for a second model's ``tokenizer`` (a reward model or a policy the eval loads itself, trained
    on prompts in its own format): ``plain`` when ``fmt`` is ``plain``, else that tokenizer's ``auto``.

    >>> from types import SimpleNamespace
    >>> own_prompt_format(SimpleNamespace(chat_template=None), "chat"), own_prompt_format(SimpleNamespace(), "plain")
    ('plain', 'plain')
    """
    return "plain" if fmt == "plain" else resolve_prompt_format(tokenizer, "auto")


def refuse_chat(fmt: str, where: str, why: str) -> None:
    """The one-line ``ValueError`` of an eval whose input is not a prompt (``why``) when ``chat`` is asked of it;
    ``auto`` and ``plain`` pass (such an eval is always ``plain``).

    >>> refuse_chat("auto", "positional_loss", "it scores raw text")
    >>> refuse_chat("chat", "positional_loss", "it scores raw text")
    Traceback (most recent call last):
    ...
    ValueError: positional_loss: prompt_format: chat does not apply (it scores raw text); use auto or plain
    """
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"{where}: prompt_format: expected one of {', '.join(PROMPT_FORMATS)} (got {fmt!r})")
    if fmt == "chat":
        raise ValueError(f"{where}: prompt_format: chat does not apply ({why}); use auto or plain")


# --- instructed chat prompts and their readers -----------------------------------------------------------------------
TASK_SLOT = "{task}"
"""Where an eval's ``instruction`` puts the task's own prompt text."""


def instructed(instruction: str, text: str) -> str:
    """The user turn of an instructed prompt: ``instruction`` with the task's ``text`` in place of its
    :data:`TASK_SLOT` (the other placeholders an eval documents are filled before).

    >>> instructed("{task}Answer in one word.", "Q:home of Vokar?\\n")
    'Q:home of Vokar?\\nAnswer in one word.'
    """
    return instruction.replace(TASK_SLOT, text)


def validate_instruct_fields(c: Any, where: str, readers: Sequence[str]) -> None:
    """The checks of an eval's ``instruct``, ``instruction`` and ``reader`` fields, each a one-line ``ValueError``
    starting with ``where`` and naming the field. ``instruct`` asked with ``prompt_format: plain`` is refused here
    (the plain prompts are the task's text, byte for byte); ``auto`` that resolves to plain is refused by
    :func:`check_instruct` once the tokenizer is known.

    >>> from types import SimpleNamespace
    >>> validate_instruct_fields(SimpleNamespace(instruct=True, instruction="Do it.", reader="auto",
    ...                                          prompt_format="chat"), "reasoning", ("auto", "exact", "prose"))
    Traceback (most recent call last):
    ...
    ValueError: reasoning: instruction must contain {task}, where the task's prompt goes
    """
    if not isinstance(c.instruct, bool):
        raise ValueError(f"{where}: instruct must be true or false (got {c.instruct!r})")
    if not isinstance(c.instruction, str) or TASK_SLOT not in c.instruction:
        raise ValueError(f"{where}: instruction must contain {TASK_SLOT}, where the task's prompt goes")
    if c.reader not in readers:
        raise ValueError(f"{where}: reader must be one of {', '.join(readers)} (got {c.reader!r})")
    if c.instruct and c.prompt_format == "plain":
        raise ValueError(f"{where}: instruct writes chat prompts, but prompt_format is plain; use auto or chat, or "
                         f"leave instruct false")


def check_instruct(c: Any, fmt: str) -> None:
    """The :class:`~evals.base.FieldError` on ``instruct`` of an eval whose prompt format ``fmt`` (resolved for the
    tokenizer) is ``plain`` while ``instruct`` is asked: the instruction goes into a chat turn only.

    >>> from types import SimpleNamespace
    >>> check_instruct(SimpleNamespace(instruct=True), "plain")
    Traceback (most recent call last):
    ...
    llm_limits.evals.base.FieldError: instruct: true needs a chat prompt, but the tokenizer has no chat template
    """
    if c.instruct and fmt != "chat":
        raise FieldError("instruct", "true needs a chat prompt, but the tokenizer has no chat template")


def resolve_reader(reader: str, instruct: bool, chat_reader: str) -> str:
    """The reader an eval's ``reader`` field means: ``auto`` is ``chat_reader`` (the eval's reader of free chat
    answers) for instructed prompts and ``exact`` (the task's answer line) otherwise, so the prompts a fine-tune
    trains on (no instruction) keep the reader they were scored with.

    >>> [resolve_reader(r, i, "contains") for r, i in (("auto", True), ("auto", False), ("exact", True))]
    ['contains', 'exact', 'exact']
    """
    if reader == "auto":
        return chat_reader if instruct else "exact"
    return reader


def prompt_note(instruct: bool, reader: str, how: str) -> str | None:
    """The note a result carries when its prompts or its reader are not the task's own (``None`` when both are):
    ``how`` says what the non-exact reader does.

    >>> prompt_note(False, "exact", "")
    >>> print(prompt_note(True, "contains", "x"))
    instructed chat prompts (the instruction field around the task's text); answers read by the contains reader: x
    """
    parts = []
    if instruct:
        parts.append("instructed chat prompts (the instruction field around the task's text)")
    if reader != "exact":
        parts.append(f"answers read by the {reader} reader: {how}")
    return "; ".join(parts) if parts else None


# --- batching and decoding -------------------------------------------------------------------------------------------
def accepts(model: Any, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword ``name`` (or any keyword, through ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def keeps_last_logits(model: Any) -> bool:
    """Whether ``model`` (or the causal LM inside a :class:`Sampler` or a PEFT wrapper) takes transformers'
    ``logits_to_keep``, so a decode step can ask for the last position's logits only: the prefill otherwise writes
    ``[batch, prompt, vocab]`` floats (3.2 GB for 4 prompts of 4,096 tokens on a 49,152-token vocabulary) to read one
    row of each."""
    seen: set[int] = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        try:
            if "logits_to_keep" in inspect.signature(model.forward).parameters:
                return True
        except (AttributeError, TypeError, ValueError):
            return False
        if isinstance(model, Sampler):
            model = model.model
        elif callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        else:
            return False
    return False


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
    last_only = {"logits_to_keep": 1} if keeps_last_logits(model) else {}
    past, step_ids, step_pos = None, ids, pos
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    new, done = [], torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        kwargs: dict[str, Any] = {"input_ids": step_ids, "attention_mask": mask, "use_cache": True, **last_only}
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


# --- the chains task: helpers the reasoning and prm evals share ------------------------------------------------------
PRM_CORRUPTIONS = {"wrong_step": 0.25, "propagated": 0.25}
"""Corruptions of the ProcessBench-style set: half the chains have one wrong step (a quarter with the right answer
anyway, a quarter with the error carried to the answer), half are correct."""

PRM_SEED_OFFSET = 100_000
"""Added to the eval seed for the ProcessBench-style set, so its problems are not the accuracy set's."""

CHAINS_ALPHABET = "0123456789+-*=Q:A\n"
"""Characters a tokenizer must spell for the chain task."""


def validate_chain_fields(c: Any, where: str) -> None:
    """The checks :class:`evals.reasoning.ReasoningConfig` and :class:`evals.prm.ProcessRewardConfig` share (their
    common fields), each a one-line ``ValueError`` starting with ``where`` and naming the field."""
    if not c.lengths:
        raise ValueError(f"{where}: lengths must not be empty")
    if any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in c.lengths):
        raise ValueError(f"{where}: lengths must be integers >= 1 (steps) (got {c.lengths})")
    if any(b <= a for a, b in zip(c.lengths, c.lengths[1:])):
        raise ValueError(f"{where}: lengths must be strictly ascending (got {c.lengths})")
    if c.examples_per_length < 1:
        raise ValueError(f"{where}: examples_per_length must be >= 1 (got {c.examples_per_length})")
    if c.batch_size < 1:
        raise ValueError(f"{where}: batch_size must be >= 1 (got {c.batch_size})")
    if c.modulus < 2:
        raise ValueError(f"{where}: modulus must be >= 2 (got {c.modulus})")
    if not c.ops or set(c.ops) - set(chains.OPS):
        raise ValueError(f"{where}: ops must be a non-empty subset of {chains.OPS!r} (got {c.ops!r})")
    if not 0.0 <= c.threshold <= 1.0:
        raise ValueError(f"{where}: threshold must be within [0, 1] (got {c.threshold})")
    if c.max_new_tokens < 1:
        raise ValueError(f"{where}: max_new_tokens must be >= 1 (got {c.max_new_tokens})")
    if not c.temperature > 0.0:
        raise ValueError(f"{where}: temperature must be > 0 (got {c.temperature})")


def cut_after_answer(text: str) -> str:
    """A decoded completion up to the end of its answer line (the first line starting with ``A:`` after stripping,
    the rule of :func:`chains.parse_completion`); the whole text when it has none.

    What a model writes after its answer (another question, padding characters) is not part of its chain, and a
    reward model should not read it.

    >>> cut_after_answer("3+4=7\\nA:7\\nQ:1+1\\n")
    '3+4=7\\nA:7'
    >>> cut_after_answer(" A:12\\n")
    ' A:12'
    >>> cut_after_answer("3+4=7\\n7*")
    '3+4=7\\n7*'
    """
    pos = 0
    for line in text.split(STEP_SEP):
        if line.strip().startswith(ANSWER_PREFIX):
            return text[: pos + len(line)]
        pos += len(line) + len(STEP_SEP)
    return text


def held_out_records(c: Any, length: int, where: str) -> list[dict]:
    """The eval's held-out chain problems of one length (``c``: a config with ``examples_per_length``, ``modulus``,
    ``ops`` and ``seed``), seeded ``seed + length``: the problems the ``reasoning`` eval measures accuracy on and both
    evals sample best-of-N on."""
    try:
        return chains.generate(ChainsConfig(num_examples=c.examples_per_length, min_steps=length, max_steps=length,
                                            modulus=c.modulus, ops=c.ops, seed=c.seed + length))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def processbench_records(c: Any, length: int, where: str) -> list[dict]:
    """The ProcessBench-style chains of one length: ``examples_per_length`` problems written with the
    :data:`PRM_CORRUPTIONS` (one wrong step, its error kept local or carried to the answer) or correctly, seeded
    ``seed + PRM_SEED_OFFSET + length`` so they are not the :func:`held_out_records` problems."""
    try:
        return chains.generate(ChainsConfig(
            num_examples=c.examples_per_length, min_steps=length, max_steps=length, modulus=c.modulus, ops=c.ops,
            corruptions=dict(PRM_CORRUPTIONS), seed=c.seed + PRM_SEED_OFFSET + length))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def check_chains_spelling(tokenizer: Any, text: str, where: str) -> None:
    """Raise the one-line ``ValueError`` of a tokenizer that cannot spell the chains task (``text``: a sample)."""
    missing = [ch for ch in dict.fromkeys(CHAINS_ALPHABET + text) if not spells(tokenizer, ch)]
    if missing or unk_fraction(tokenizer, text) > 0 or not spells(tokenizer, text):
        what = f" (missing: {''.join(missing)!r})" if missing else ""
        raise ValueError(f"{where}: the tokenizer cannot spell the chains task{what}; use a tokenizer that "
                         f"covers digits, '+-*=' and 'Q:A\\n'")


def sample_completions(
    model: Any, tokenizer: Any, prompts: Sequence[str], n: int, *, batch_size: int, max_new_tokens: int,
    temperature: float, seed: int, device: str = "cpu",
) -> list[str]:
    """``n`` sampled completions per prompt, prompt-major (prompt ``i``'s at ``i * n`` to ``i * n + n - 1``), each cut
    after its answer line (:func:`cut_after_answer`): :func:`decode_texts` through a :class:`Sampler` seeded with
    ``seed``, so the same model, prompts and seed give the same samples."""
    repeated = [p for p in prompts for _ in range(n)]
    sampler = Sampler(model, temperature, torch.Generator(device=device).manual_seed(seed))
    return [cut_after_answer(t) for t in
            decode_texts(model, tokenizer, repeated, batch_size, max_new_tokens, device, sampler=sampler)]


def step_positions(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt + completion`` (no special tokens) and, for each entry of
    ``chains.step_end_offsets(completion)`` (each step's closing ``\\n``, then the answer line's last character), the
    index of the token covering character ``len(prompt) + offset`` (from ``return_offsets_mapping``).

    A PRM is trained with its labels at exactly these positions and scored there (:class:`PRMScorer`). Where no token
    covers the character (a tokenizer that drops it), the last token starting at or before it is used.
    """
    text = prompt + completion
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as err:
        raise ValueError(f"reasoning: the reward model's tokenizer gives no offset mapping (use a fast tokenizer): "
                         f"{err}") from None
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    positions = []
    for off in chains.step_end_offsets(completion):
        c = len(prompt) + off
        pos = next((i for i, (a, b) in enumerate(offsets) if a <= c < b), None)
        if pos is None:
            starts = [i for i, (a, b) in enumerate(offsets) if b > a and a <= c]
            pos = starts[-1] if starts else 0
        positions.append(pos)
    return ids, positions


class PRMScorer:
    """A process reward model: a ``transformers`` ``AutoModelForTokenClassification`` with ``num_labels=1``
    (``sigmoid`` of the logit = P(step correct)) or ``2`` (``softmax[..., 1]``), scored at each step end.

    ``path_or_model`` is a local directory (the model and its tokenizer are loaded from it, no remote code, and the
    model moved to ``device``) or an already built model, then with its ``tokenizer`` (left where it is: it must
    already be on ``device``, where its inputs go). An outcome reward model of the same kind is read at the last
    position (the answer's).
    """

    def __init__(self, path_or_model: Any, tokenizer: Any = None, *, device: str = "cpu", batch_size: int = 16):
        if isinstance(path_or_model, (str, os.PathLike)):
            from transformers import AutoModelForTokenClassification, AutoTokenizer

            path = str(path_or_model)
            if not os.path.isdir(path):
                raise ValueError(f"reasoning: reward model directory {path} not found")
            model = AutoModelForTokenClassification.from_pretrained(path, trust_remote_code=False).to(device)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False) if tokenizer is None else tokenizer
        else:
            model = path_or_model
            if tokenizer is None:
                raise ValueError("reasoning: PRMScorer needs the tokenizer of an already built model")
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels not in (1, 2):
            raise ValueError(f"reasoning: a reward model needs num_labels 1 or 2 (got {num_labels})")
        if batch_size < 1:
            raise ValueError(f"reasoning: PRMScorer batch_size must be >= 1 (got {batch_size})")
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        self.num_labels = num_labels

    @torch.no_grad()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[float]]:
        """Per ``(prompt, completion)`` pair: one probability per ``step_end_offsets`` entry (the steps, then the
        answer). Batched by length with right padding (no generation, so the real tokens never see a pad)."""
        if len(prompts) != len(completions):
            raise ValueError(f"reasoning: {len(prompts)} prompts for {len(completions)} completions")
        encoded = [step_positions(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        out: list[list[float]] = [[] for _ in encoded]
        pad = pad_id(self.tokenizer)
        with eval_mode(self.model):
            for batch in length_buckets([len(ids) for ids, _ in encoded], self.batch_size):
                batch = [i for i in batch if encoded[i][1] and encoded[i][0]]
                if not batch:
                    continue
                width = max(len(encoded[i][0]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    n = len(encoded[i][0])
                    ids[row, :n] = torch.as_tensor(encoded[i][0], dtype=torch.long)
                    mask[row, :n] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logits = logits.float()  # [batch, seq, num_labels]
                probs = torch.sigmoid(logits[..., 0]) if self.num_labels == 1 else logits.softmax(-1)[..., 1]
                for row, i in enumerate(batch):
                    out[i] = probs[row, encoded[i][1]].tolist()
        return out


def first_flagged(step_scores: Sequence[float], cut: float = 0.5) -> int:
    """Index of the first step a PRM scores below ``cut`` (-1: none), the predicted first error.

    >>> first_flagged([0.9, 0.3, 0.1]), first_flagged([0.9, 0.8]), first_flagged([])
    (1, -1, -1)
    """
    return next((i for i, s in enumerate(step_scores) if s < cut), -1)


def first_errors(
    records: Sequence[Mapping[str, Any]], scores: Sequence[Sequence[float]],
) -> tuple[list[int], list[int]]:
    """``(predicted, gold)`` first-error indices of scored ProcessBench-style records: :func:`first_flagged` over each
    record's step scores (its last score is the answer's, not a step's) and the verifier's
    :func:`chains.first_error`."""
    pred = [first_flagged(s[:-1]) for s in scores]
    gold = [chains.first_error(r["question"], r["steps"], r["modulus"]) for r in records]
    return pred, gold


def processbench_f1(pred: Sequence[int], gold: Sequence[int]) -> dict[str, float]:
    """ProcessBench's score of first-error predictions (-1: no error): ``acc_error``, exact-index accuracy on the
    erroneous samples (gold >= 0); ``acc_correct``, accuracy on the correct ones (gold -1, predicted -1); ``f1``, their
    harmonic mean (0 when both are 0). A side with no samples is NaN, and so is ``f1`` then.

    >>> processbench_f1([1, -1, 2, -1], [1, 0, -1, -1])
    {'f1': 0.5, 'acc_error': 0.5, 'acc_correct': 0.5}
    >>> processbench_f1([0], [0])["acc_correct"]
    nan
    """
    if len(pred) != len(gold):
        raise ValueError(f"processbench_f1: {len(pred)} predictions for {len(gold)} gold labels")
    err = [p == g for p, g in zip(pred, gold) if g >= 0]
    ok = [p == -1 for p, g in zip(pred, gold) if g < 0]
    acc_error = sum(err) / len(err) if err else math.nan
    acc_correct = sum(ok) / len(ok) if ok else math.nan
    if math.isnan(acc_error) or math.isnan(acc_correct):
        f1 = math.nan
    else:
        f1 = 0.0 if acc_error + acc_correct == 0 else 2 * acc_error * acc_correct / (acc_error + acc_correct)
    return {"f1": f1, "acc_error": acc_error, "acc_correct": acc_correct}


def mean(values: Sequence[float]) -> float:
    """The mean of ``values`` (NaN when empty)."""
    return sum(values) / len(values) if values else math.nan


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent parsed answer (``None``s do not vote); a tie goes to the one seen first.

    >>> majority_vote(["3", "5", "5", "3", None, None, None]), majority_vote([None]), majority_vote(["7", "2"])
    ('3', None, '7')
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def pick_best(scores: Sequence[float]) -> int:
    """Index of the highest score, the first on ties (NaN never wins; 0 when every score is NaN).

    >>> pick_best([0.2, 0.9, 0.9]), pick_best([float("nan"), 0.1])
    (1, 1)
    """
    best, best_score = 0, -math.inf
    for i, s in enumerate(scores):
        if s > best_score:
            best, best_score = i, s
    return best


def best_of_n_accuracy(
    records: Sequence[Mapping[str, Any]], answers: Sequence[str | None], n: int, k: int | None = None,
    prm_scores: Sequence[Sequence[float]] | None = None, orm_scores: Sequence[Sequence[float]] | None = None,
) -> dict[str, float]:
    """Best-of-N accuracies over ``n`` samples per record (``answers`` record-major: record ``i``'s samples at
    ``i * n`` to ``i * n + n - 1``), using the first ``k`` (default all ``n``) of each.

    ``bon_majority`` (:func:`majority_vote`), ``bon_pass_at_n`` (any sample right), ``bon_first`` (the first sample),
    and with scores ``bon_prm`` (the sample whose lowest score, steps and answer, is highest) and ``bon_orm`` (the
    sample whose last score, the answer's, is highest). A sample with no answer line has no answer position and cannot
    be right: a reward model never picks it before one that has.

    >>> recs = [{"gold_answer": "3"}, {"gold_answer": "5"}]
    >>> answers = ["1", "3", "3", None, "2", "5"]  # 3 samples each
    >>> best_of_n_accuracy(recs, answers, 3)
    {'bon_majority': 0.5, 'bon_pass_at_n': 1.0, 'bon_first': 0.0}
    >>> best_of_n_accuracy(recs, answers, 3, k=1, prm_scores=[[0.9], [0.8], [0.1], [0.9], [0.8], [0.1]])
    {'bon_majority': 0.0, 'bon_pass_at_n': 0.0, 'bon_first': 0.0, 'bon_prm': 0.0}
    >>> best_of_n_accuracy(recs, answers, 3, prm_scores=[[0.2, 0.9], [0.8], [0.1], [0.9], [0.1], [0.8]])["bon_prm"]
    1.0
    """
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"best_of_n_accuracy: k must be within [1, {n}] (got {k})")
    if len(answers) != n * len(records):
        raise ValueError(f"best_of_n_accuracy: {len(answers)} answers for {len(records)} records x {n} samples")

    def right(answer: str | None, r: Mapping[str, Any]) -> float:
        return float(answer is not None and bool(chains.check_answer(answer, r["gold_answer"])))

    majority, any_right, first, by_prm, by_orm = [], [], [], [], []
    for i, r in enumerate(records):
        group = slice(i * n, i * n + k)
        ans = answers[group]
        majority.append(right(majority_vote(ans), r))
        any_right.append(max(right(a, r) for a in ans))
        first.append(right(ans[0], r))
        if prm_scores is not None:
            picked = pick_best([min(s) if s and a is not None else -math.inf for s, a in zip(prm_scores[group], ans)])
            by_prm.append(right(ans[picked], r))
        if orm_scores is not None:
            picked = pick_best([s[-1] if s and a is not None else -math.inf for s, a in zip(orm_scores[group], ans)])
            by_orm.append(right(ans[picked], r))
    out = {"bon_majority": mean(majority), "bon_pass_at_n": mean(any_right), "bon_first": mean(first)}
    if prm_scores is not None:
        out["bon_prm"] = mean(by_prm)
    if orm_scores is not None:
        out["bon_orm"] = mean(by_orm)
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


KB_ABSTENTION_MARKERS = (
    "unknown", "not know", "no idea", "not sure", "unclear", "no information", "not enough information",
    "not mention", "not mentioned", "no mention", "not say", "not state", "not stated", "not given", "not provide",
    "not provided", "not specified", "not specify", "not contain", "not available", "cannot determine",
    "cannot be determined", "cannot answer", "cannot find", "unable to", "no passage", "none of the passages",
    "no passages", "no answer",
)
"""Phrases (after :func:`normalize_words`: lowercase words, ``n't`` spelled ``not``) by which a chat answer says the
passages do not give the value: an abstention when it names no candidate value (:func:`contained_answer`)."""

KB_CONFLICT_MARKERS = ("conflict", "contradict", "disagree", "inconsistent")
"""Word beginnings by which a chat answer flags passages that disagree (:data:`kb.CONFLICT` when it names no value)."""


def normalize_words(text: str) -> str:
    """``text`` as lowercase words split by single spaces: ``can't`` is ``cannot``, any other ``n't`` is `` not``,
    every run of other characters than letters and digits one space.

    >>> normalize_words("P:home of Vokar is TELN.\\nThe passages don't say.")
    'p home of vokar is teln the passages do not say'
    """
    text = text.lower().replace("\u2019", "'").replace("can't", "cannot").replace("n't", " not")
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text).split())


KB_ECHO = "<echo>"
"""What :func:`contained_answer` reads from a completion that copies the context back: it matches no gold."""


def contained_answer(
    completion: str, candidates: Collection[str], passages: Sequence[str] = (), oracles: Sequence[str] = (),
) -> str | None:
    """The answer a free chat completion gives, read by containment (RULER, Hsieh et al. 2024, arXiv 2404.06654: the
    value counts when the output holds it) but not fooled by an echo. ``candidates`` are the values an answer can
    name (lowercase words: every value of the asked attributes' pools), ``passages`` the context's passages and
    ``oracles`` those that answer the question. Up to the end of the :func:`first_answer_line` (the whole completion
    when it has none), in :func:`normalize_words`:

    - it copies two or more of the passages whole, one of them not an oracle: :data:`KB_ECHO` (an echo of the
      context is not an answer; quoting the oracle alone, or a two-hop question's two oracles, is reading);
    - else exactly one candidate named as a word: that value;
    - several: their names joined by ``", "``, which matches no gold (a hedge);
    - none: :data:`kb.CONFLICT` when a word begins with one of :data:`KB_CONFLICT_MARKERS`, else :data:`kb.ABSTAIN`
      when it holds one of :data:`KB_ABSTENTION_MARKERS`, else the completion's text stripped (an answer that names
      no candidate), or ``None`` when that is empty.

    >>> values, context = {"teln", "mok", "rast"}, ["boss of Dabo is Vokar.", "home of Vokar is teln."]
    >>> contained_answer("The home of Vokar is teln.", values), contained_answer("A:teln\\nQ:job?\\nA:mok", values)
    ('teln', 'teln')
    >>> contained_answer("P:boss of Dabo is Vokar.\\nP:home of Vokar is teln.", values, context, context[1:])
    '<echo>'
    >>> contained_answer("P:home of Vokar is teln.", values, context, context[1:])
    'teln'
    >>> contained_answer("It is teln or mok.", values)
    'teln, mok'
    >>> contained_answer("The passages do not say.", values), contained_answer("They conflict.", values)
    ('unknown', 'conflict')
    >>> contained_answer("Vokar lives by the sea.", values), contained_answer("  ", values)
    ('Vokar lives by the sea.', None)
    """
    text = first_answer_line(completion)
    words = normalize_words(text).split()
    spaced = f" {' '.join(words)} "
    copied = {p for p in passages if f" {normalize_words(p)} " in spaced}
    if len(copied) >= 2 and not copied <= set(oracles):
        return KB_ECHO
    wanted = {v.lower() for v in candidates}
    named = list(dict.fromkeys(w for w in words if w in wanted))
    if len(named) == 1:
        return named[0]
    if named:
        return ", ".join(named)
    if any(w.startswith(KB_CONFLICT_MARKERS) for w in words):
        return kb.CONFLICT
    if any(f" {m} " in spaced for m in KB_ABSTENTION_MARKERS):
        return kb.ABSTAIN
    return text.strip() or None


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
