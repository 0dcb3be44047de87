"""Effective context (RULER): needle-in-a-haystack accuracy over context length x needle depth, and the longest length
the model still retrieves at.

Following RULER (Hsieh et al. 2024, arXiv 2404.06654), a model's *effective* context length is not the window it
accepts but the largest length up to which its retrieval accuracy, averaged over needle depths, stays at or above a
threshold (0.85 by default, RULER's bar) at every shorter length too. This eval generates retrieval prompts with the
``ruler`` task (``evals/tasks/ruler.py``: a needle ``key -> value`` hidden at a given depth of a haystack, a query
naming the key), decodes greedily, scores exact match, and reads the limit with :func:`evals.base.read_limit`.

Around that one number it measures why the limit is where it is:

- ``grids["accuracy"]``: the depth x length heatmap the curve averages;
- ``series["lost_in_the_middle"]``: accuracy by depth at one length (a U shape is "lost in the middle");
- ``series["attention_mass"]``: the share of attention the last prompt token (the position that predicts the first
  answer token) puts on the needle's tokens, against the number of non-needle context tokens. This is the softmax
  crowding measurement: with N distractor keys whose logits stay within a fixed margin of the needle's, the needle's
  share of a softmax falls like ``1 / N`` unless its logit margin grows like ``ln N``, so the curve shows whether
  retrieval fails because attention is spread over the haystack;
- ``series["position_loss"]``: the ``positional_loss`` eval's curve (:class:`~evals.positional_loss.PositionalLoss`)
  up to the largest length (is the model even trained at those positions?).

Everything the numbers depend on is a pure function (:func:`cut_prediction`, :func:`evals.lm.left_pad`,
:func:`needle_token_mask`, :func:`needle_attention_mass`, :func:`depth_averaged`, :func:`effective_length`), and the
model-facing pieces are plain functions a benchmark can call on its own (:func:`evals.lm.greedy_decode`,
:func:`score_records`, :func:`needle_attention`); :class:`Context` only builds the grid and calls them.

Batching: prompts are sorted by token length and batched in that order (length bucketing), so most batches need no
padding. Where lengths differ inside a batch they are LEFT padded (every row's last prompt token lands in the last
column), with an attention mask that hides the pads and position ids that count real tokens only (``cumsum(mask) -
1``), so every row sees exactly the positions and keys it would see alone; ``tests/test_context_eval.py`` checks that
batched and one-at-a-time decoding give the same tokens.

Prompt format (``prompt_format``, :func:`evals.lm.format_prompt`): under ``chat`` (``auto`` with a tokenizer that has a
chat template) the haystack and the query are one user turn of the template and the answer is decoded after its
generation prompt; the needle spans move with the context, found in the wrapped prompt. ``plain`` is ``context +
query`` as it is. The lengths stay context lengths: the template's tokens come on top.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from tqdm import tqdm

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, Grid, LimitSpec, Series, read_limit
from llm_limits.evals.lm import (MAX_UNK_FRACTION, accepts, decode_texts, eval_mode, format_prompt, has_rope, left_pad,
                                 length_buckets, pad_id, position_range, resolve_prompt_format, unk_fraction)
from llm_limits.evals.tasks import TASKS
from llm_limits.evals.tasks.ruler import TASK_NAMES, load_jsonl, prompt_text

TASK = "ruler"
"""The key of ``evals.tasks.TASKS`` whose generator makes the held-out prompts (``ContextConfig.task`` picks the
RULER sub-task inside it)."""

SET_BY_EVAL = ("task", "num_examples", "context_chars", "depth", "seed")
"""``RulerConfig`` fields the eval sets itself, so ``task_params`` may not."""

CHARS_PER_TOKEN_SAMPLE = 4096
"""Characters of generated context measured to convert token lengths to character lengths."""


@dataclass
class ContextConfig(EvalConfig):
    task: str = "niah_single"
    """RULER sub-task: ``niah_single``, ``niah_multikey``, ``niah_multivalue`` or ``variable_tracking``."""
    lengths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    """Context lengths in tokens, ascending; the curve has one point per length (the measured mean is in scalars)."""
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Needle depths, where the first answer-bearing needle starts as a fraction of the room the needles leave (the
    ruler generator's ``depth``: 0 = the start of the context, 1 = the needles end flush with it)."""
    examples_per_cell: int = 8
    """Prompts per (length, depth) cell."""
    threshold: float = 0.85
    """Depth-averaged accuracy a length must reach (RULER's bar); the limit is the largest length up to which every
    length reaches it."""
    middle_length: int | None = None
    """Length (one of ``lengths``) of the lost-in-the-middle curve; ``None``: the largest length."""
    attention_mass: bool = True
    """Measure the needle's share of the last prompt token's attention per length (an extra eager-attention forward
    per prompt; eager attention keeps ``[batch, heads, seq, seq]`` weights per layer, so mind the memory on large
    models)."""
    position_loss: bool = True
    """Also run ``positional_loss`` (on ``synthetic_text``, as many sequences as one length has prompts) at the
    largest multiple of ``position_loss_bucket`` within both the largest length and the model's position range, and
    add its curve as ``series["position_loss"]`` (is the model trained at those positions at all?)."""
    position_loss_bucket: int = 16
    """Bucket size of that positional-loss curve."""
    task_params: dict = field(default_factory=dict)
    """Extra ``RulerConfig`` fields, e.g. ``{"num_distractors": 4}``; ``task``, ``num_examples``, ``context_chars``,
    ``depth`` and ``seed`` come from the eval."""
    path: str | None = None
    """A JSONL file of ruler records to use instead of the generator; the grid's cells then come from the records' own
    lengths (grouped by ``context_chars``, each group keyed by its measured mean context token length) and depths
    (each record in the row of the ``depths`` value nearest its :func:`placement_depth`; unknown depths, ``-1``, in a
    row of their own), and ``lengths`` and ``examples_per_cell`` are not used."""
    max_new_tokens: int | None = None
    """Tokens to decode per prompt; ``None``: the token length of the longest gold answer + 2."""


# --- functional core -------------------------------------------------------------------------------------------------
def cut_prediction(text: str, answer: str) -> str:
    """The predicted answer in a decoded continuation, compared by exact match with ``answer.strip()``.

    The rule: drop leading white space, then cut at the first character that cannot belong to an answer of this
    shape, and drop trailing white space. A character can belong to the answer when it is a letter or a digit, or one
    of the non-alphanumeric characters the gold answer itself contains (the ``,`` of a multi-value or
    variable-tracking answer). So the needle's own ``.``, a newline or a space after a value ends the prediction,
    while an extra digit or an extra list item does not (and makes it wrong).

    >>> cut_prediction(" 4821.\\n#", "4821")
    '4821'
    >>> cut_prediction("4821 is", "4821")
    '4821'
    >>> cut_prediction("48213", "4821")
    '48213'
    >>> cut_prediction("1234,5678.", "1234,5678"), cut_prediction("abc,def,ghi", "abc,def")
    ('1234,5678', 'abc,def,ghi')
    """
    allowed = {ch for ch in answer.strip() if not ch.isalnum()}
    text = text.lstrip()
    end = 0
    while end < len(text) and (text[end].isalnum() or text[end] in allowed):
        end += 1
    return text[:end].rstrip()


def is_correct(continuation: str, answer: str) -> bool:
    """Exact match of :func:`cut_prediction` with the gold answer.

    >>> is_correct(" 4821.", "4821"), is_correct("482", "4821")
    (True, False)
    """
    return cut_prediction(continuation, answer) == answer.strip()


def needle_token_mask(offsets: Sequence[Sequence[int]], spans: Sequence[Sequence[int]]) -> list[bool]:
    """Which tokens carry a needle: token ``i`` covering characters ``[a, b)`` is a needle token when it overlaps a
    span ``[s, e)`` (both in the same text's character offsets). Zero-width tokens (special tokens) never are.

    >>> needle_token_mask([(0, 2), (2, 4), (4, 6), (6, 6)], [[3, 5]])
    [False, True, True, False]
    """
    return [b > a and any(a < e and b > s for s, e in spans) for a, b in offsets]


def needle_attention_mass(attentions: Sequence[torch.Tensor], needle_mask: torch.Tensor) -> torch.Tensor:
    """Share of the last query position's attention that falls on needle keys, averaged over layers and heads.

    ``attentions``: one ``[batch, heads, q, k]`` tensor per layer (the last query row is the last prompt token, the
    one that predicts the first answer token); ``needle_mask``: ``[batch, k]`` bool. Returns ``[batch]`` (float32).
    Each row is renormalised by its own sum, so the value is a fraction even where a model's rows do not sum to 1.

    >>> att = torch.tensor([0.1, 0.6, 0.3]).view(1, 1, 1, 3)
    >>> [round(v, 4) for v in needle_attention_mass([att, att], torch.tensor([[False, True, False]])).tolist()]
    [0.6]
    """
    last = torch.stack([a[:, :, -1, :].float() for a in attentions])  # [layers, batch, heads, k]
    on_needle = (last * needle_mask[None, :, None, :].to(last.dtype)).sum(-1)  # [layers, batch, heads]
    return (on_needle / last.sum(-1).clamp_min(1e-12)).mean(dim=(0, 2))


def placement_depth(record: Mapping[str, Any]) -> float:
    """Where a record's answer-bearing needles sit, on the scale the ruler generator's ``depth`` places them: the first
    needle's start over the room the needles leave, ``start / (len(context) - block)`` with ``block`` the needles
    packed together (0 = at the start, 1 = flush against the end). The record's own ``depth`` is the start over the
    whole context, which reads below 1 for a needle at the end of a short context. Without ``needle_spans``: the
    record's ``depth`` (-1 = unknown).

    >>> placement_depth({"context": "x" * 40, "needle_spans": [[30, 40]], "depth": 0.75})
    1.0
    >>> placement_depth({"context": "x" * 40, "needle_spans": [], "depth": -1.0})
    -1.0
    """
    spans = record.get("needle_spans") or []
    if not spans:
        return float(record.get("depth", -1.0))
    room = len(record["context"]) - (sum(e - s + 1 for s, e in spans) - 1)
    return min(1.0, spans[0][0] / room) if room > 0 else 0.0


def depth_averaged(cells: Mapping[tuple[float, float], float]) -> dict[float, float]:
    """``{length: mean accuracy over the depths measured at that length}`` from ``{(length, depth): accuracy}``,
    lengths ascending.

    >>> depth_averaged({(64, 0.0): 1.0, (64, 1.0): 0.5, (32, 0.5): 1.0})
    {32.0: 1.0, 64.0: 0.75}
    """
    per_length: dict[float, list[float]] = {}
    for (length, _), acc in cells.items():
        per_length.setdefault(float(length), []).append(acc)
    return {x: sum(v) / len(v) for x, v in sorted(per_length.items())}


RULER_THRESHOLDS = (0.85, 0.5)
"""Every context result also reads its effective length at these accuracies (``effective_length@0.85``, ``@0.5``):
RULER's own threshold and a lenient one, so runs with different ``threshold`` settings stay comparable."""


def effective_length(curve: Mapping[float, float], threshold: float) -> float:
    """RULER's effective context length: the largest length up to which every depth-averaged accuracy is at least
    ``threshold`` (0 when the shortest length already fails).

    >>> effective_length({64: 1.0, 128: 0.9, 256: 0.6, 512: 0.95}, 0.85)
    128
    >>> effective_length({64: 0.5, 128: 1.0}, 0.85)
    0.0
    """
    return read_limit(curve, threshold, higher_is_better=True)


# --- model-facing functions ------------------------------------------------------------------------------------------
def predict_records(
    model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], batch_size: int, max_new_tokens: int,
    device: str = "cpu", prompt_format: str = "plain",
) -> list[str]:
    """Decoded greedy continuations of ``prompt_text(record)`` written in ``prompt_format``
    (:func:`evals.lm.format_prompt`: the haystack and the query as one user turn under ``chat``) and tokenized without
    special tokens, in record order, computed in length-bucketed batches of at most ``batch_size`` (``batch_size=1``:
    one prompt at a time)."""
    prompts = [format_prompt(tokenizer, prompt_text(r), prompt_format) for r in records]
    return decode_texts(model, tokenizer, prompts, batch_size, max_new_tokens, device)


def score_records(
    model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], batch_size: int, max_new_tokens: int,
    device: str = "cpu", prompt_format: str = "plain",
) -> list[bool]:
    """Whether the model's greedy continuation of each record's prompt (in ``prompt_format``) is its answer
    (:func:`is_correct`)."""
    predictions = predict_records(model, tokenizer, records, batch_size, max_new_tokens, device, prompt_format)
    return [is_correct(p, r["answer"]) for p, r in zip(predictions, records)]


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[bool]:
    """Run the block with eager attention, the one implementation that returns attention weights; yields whether the
    switch worked.

    transformers 5.23: ``PreTrainedModel.set_attn_implementation("eager")`` re-dispatches the attention of the model
    and its sub-models at run time (no reload); the current choice is ``model.config._attn_implementation`` (``sdpa``
    by default), which is restored afterwards. A model without that method (not a transformers model, or one that
    refuses the switch) yields ``False``.
    """
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if previous == "eager":
        yield True
        return
    if setter is None or previous is None:
        yield False
        return
    try:
        setter("eager")
        switched = config._attn_implementation == "eager"
    except (ValueError, ImportError, NotImplementedError):
        switched = False
    try:
        yield switched
    finally:
        setter(previous)


def needle_tokens(
    tokenizer: Any, record: Mapping[str, Any], prompt_format: str = "plain"
) -> tuple[list[int], list[bool], int] | None:
    """The token ids of a record's prompt written in ``prompt_format`` (no special tokens added), which of them carry a
    needle, and how many context tokens do not. ``None`` when the tokenizer gives no offsets, or a chat template
    rewrote the context (it cannot be found in the prompt).

    Needle tokens come from ``needle_spans`` (character offsets in ``record["context"]``, moved to where the context
    sits in the prompt: its start under ``plain``, after the template's head under ``chat``) through the tokenizer's
    ``offset_mapping``: a token is a needle token when its characters overlap a span (:func:`needle_token_mask`).
    """
    text = format_prompt(tokenizer, prompt_text(record), prompt_format)
    shift = text.find(record["context"])
    if shift < 0:
        return None
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    needle = needle_token_mask(offsets, [(s + shift, e + shift) for s, e in record["needle_spans"]])
    in_context = needle_token_mask(offsets, [(shift, shift + len(record["context"]))])
    return list(enc["input_ids"]), needle, sum(in_context) - sum(n and c for n, c in zip(needle, in_context))


def needle_attention(
    model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]], batch_size: int, device: str = "cpu",
    prompt_format: str = "plain",
) -> tuple[list[float], list[int]] | None:
    """Per record: the needle's share of the last prompt token's attention (:func:`needle_attention_mass`) and the
    number of non-needle context tokens, on the prompt written in ``prompt_format`` (:func:`needle_tokens`). ``None``
    when the model gives no attention weights (or the tokenizer no offsets, or a chat template rewrote the context).
    """
    prompts, masks, distractors = [], [], []
    for r in records:
        got = needle_tokens(tokenizer, r, prompt_format)
        if got is None:
            return None
        prompts.append(got[0])
        masks.append(got[1])
        distractors.append(got[2])
    masses = [0.0] * len(records)
    with eval_mode(model), eager_attention(model) as eager:
        if not eager:
            return None
        for batch in length_buckets([len(p) for p in prompts], batch_size):
            ids, mask, pos = left_pad([prompts[i] for i in batch], pad_id(tokenizer))  # [batch, seq] each
            needle = left_pad([masks[i] for i in batch], 0)[0].bool()  # [batch, seq]; pads are not needle
            kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                                      "output_attentions": True, "use_cache": False}
            if accepts(model, "position_ids"):
                kwargs["position_ids"] = pos.to(device)
            attentions = model(**kwargs).attentions
            if not attentions or any(a is None for a in attentions):
                return None
            for i, m in zip(batch, needle_attention_mass(attentions, needle.to(device)).tolist()):
                masses[i] = m
    return masses, distractors


# --- the eval --------------------------------------------------------------------------------------------------------
class Context(Eval):
    """RULER-style retrieval accuracy over context length x needle depth; the limit is the effective context length,
    the largest length up to which the depth-averaged accuracy stays >= ``threshold``."""

    name = "context"
    version = "1"
    summary = "RULER needle retrieval by length x depth; limit = longest length with depth-mean accuracy >= threshold"
    limit = "context"
    Config = ContextConfig

    config: ContextConfig

    def spec(self) -> LimitSpec:
        """Declared before running. With ``path`` the lengths are only known once the tokenizer has measured the
        records, so ``axis_values`` is empty here and the result's ``spec`` carries them."""
        c = self.config
        self._validate()
        axis_values = () if c.path is not None else tuple(float(x) for x in c.lengths)
        return LimitSpec(metric="niah_acc", axis="context_len", axis_values=axis_values, higher_is_better=True,
                         threshold=c.threshold, limit="context", limit_unit="tokens")

    def _validate(self) -> None:
        c = self.config
        if not c.lengths:
            raise ValueError("context: lengths must not be empty")
        if any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in c.lengths):
            raise ValueError(f"context: lengths must be positive integers (tokens) (got {c.lengths})")
        if any(b <= a for a, b in zip(c.lengths, c.lengths[1:])):
            raise ValueError(f"context: lengths must be strictly ascending (got {c.lengths})")
        if not c.depths or any(not 0.0 <= d <= 1.0 for d in c.depths):
            raise ValueError(f"context: depths must be a non-empty list of fractions within [0, 1] (got {c.depths})")
        if len(set(c.depths)) != len(c.depths):
            raise ValueError(f"context: depths must not repeat (got {c.depths})")
        if not 0.0 < c.threshold <= 1.0:
            raise ValueError(f"context: threshold must be within (0, 1] (got {c.threshold})")
        if c.examples_per_cell < 1 or c.batch_size < 1 or c.position_loss_bucket < 1:
            raise ValueError(f"context: examples_per_cell, batch_size and position_loss_bucket must be >= 1 (got "
                             f"{c.examples_per_cell}, {c.batch_size} and {c.position_loss_bucket})")
        if c.max_new_tokens is not None and c.max_new_tokens < 1:
            raise ValueError(f"context: max_new_tokens must be >= 1 or unset (got {c.max_new_tokens})")
        if c.path is None and c.middle_length is not None and c.middle_length not in c.lengths:
            raise ValueError(f"context: middle_length {c.middle_length} must be one of lengths {c.lengths}")
        if TASK not in TASKS:
            raise ValueError(f"context: the {TASK!r} task is not registered in evals.tasks.TASKS")
        config_cls, _ = TASKS[TASK]
        known = [f.name for f in dataclasses.fields(config_cls)]
        for key in SET_BY_EVAL:
            if key in c.task_params:
                raise ValueError(f"context: task_params.{key} is set by the eval; remove it")
        unknown = sorted(set(c.task_params) - set(known))
        if unknown:
            raise ValueError(f"context: unknown task_params for {TASK}: {', '.join(unknown)} "
                             f"(known: {', '.join(k for k in known if k not in SET_BY_EVAL)})")
        if c.task not in TASK_NAMES:
            raise ValueError(f"context: unknown task {c.task!r} (known: {', '.join(TASK_NAMES)})")
        if c.path is None:
            try:  # the task's own rules on task_params (e.g. niah_multikey needs num_distractors >= 1)
                config_cls(**c.task_params, task=c.task, num_examples=1, context_chars=1 << 20, seed=c.seed)
            except (TypeError, ValueError) as err:
                raise ValueError(f"context: {err}") from None

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        sample = self._sample(tokenizer)
        text = "".join(prompt_text(r) + r["answer"] for r in sample)
        frac = unk_fraction(tokenizer, text)
        if frac > MAX_UNK_FRACTION:
            raise ValueError(f"context: the tokenizer maps {frac:.1%} of the {self._source()} characters to its "
                             f"unknown token (at most {MAX_UNK_FRACTION:.0%} allowed); use a tokenizer that covers "
                             f"the task's alphabet")
        model_config = getattr(model, "config", None)
        n_pos = position_range(model_config)
        if n_pos is not None and not has_rope(model_config):
            needed = max(_n_tokens(tokenizer, format_prompt(tokenizer, prompt_text(r), fmt)) for r in sample)
            needed += self._max_new_tokens(tokenizer, sample)
            if needed > n_pos:
                longest = max(c.lengths) if c.path is None else "the file's"
                raise ValueError(f"context: lengths up to {longest} tokens need {needed} positions (prompt + answer) "
                                 f"but the model's position range is {n_pos} "
                                 f"({getattr(model_config, 'model_type', '?')}); lower lengths")

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Score every (length, depth) cell on ``model`` (already on ``device``), then the attention and positional
        measurements at each length."""
        c = self.config
        spec = self.spec()
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        notes: list[str] = []
        cells, chars_per_token = self._cells(tokenizer)  # {(length, depth): records}, in grid order
        lengths = sorted({x for x, _ in cells})
        depths = sorted({d for _, d in cells})
        all_records = [r for recs in cells.values() for r in recs]
        max_new = self._max_new_tokens(tokenizer, all_records)

        # --- accuracy per cell: one length at a time, every depth of it in length-bucketed batches
        accuracy: dict[tuple[float, float], float] = {}
        bar = tqdm(total=len(cells), desc="context", unit="cell", disable=not progress, leave=False)
        for length in lengths:
            keys = [k for k in cells if k[0] == length]
            records = [r for k in keys for r in cells[k]]
            correct = score_records(model, tokenizer, records, c.batch_size, max_new, device, fmt)
            start = 0
            for k in keys:
                n = len(cells[k])
                accuracy[k] = sum(correct[start : start + n]) / n
                start += n
            bar.update(len(keys))
        bar.close()

        curve = depth_averaged(accuracy)
        limit = effective_length(curve, c.threshold)
        if limit == 0.0:
            notes.append(f"depth-averaged accuracy {curve[lengths[0]]:.2f} at the shortest length {lengths[0]:g} is "
                         f"below the threshold {c.threshold:g}: limit 0")
        elif limit == lengths[-1]:
            notes.append(f"every length clears the threshold {c.threshold:g}: the limit is the longest length "
                         f"measured, {lengths[-1]:g}; longer lengths may measure further")
        spec = dataclasses.replace(spec, axis_values=tuple(lengths))

        context_tokens = {k: sum(_n_tokens(tokenizer, r["context"]) for r in recs) / len(recs)
                          for k, recs in cells.items()}
        nan = float("nan")
        grids = {
            "accuracy": Grid(x_axis="context_len", y_axis="depth", metric="niah_acc", x=lengths, y=depths,
                             values=[[accuracy.get((x, y), nan) for x in lengths] for y in depths]),
            "context_tokens": Grid(x_axis="context_len", y_axis="depth", metric="context_tokens", x=lengths,
                                   y=depths, values=[[context_tokens.get((x, y), nan) for x in lengths]
                                                     for y in depths]),
        }
        # with a file the lengths are measured, so the middle length is the one nearest the asked one
        middle = lengths[-1] if c.middle_length is None else min(lengths, key=lambda x: abs(x - c.middle_length))
        series = {"lost_in_the_middle": Series(axis="depth", metric="niah_acc",
                                               points={d: accuracy[(x, d)] for x, d in cells if x == middle and d >= 0})}
        scalars: dict[str, float] = {"num_examples": len(all_records), "max_new_tokens": max_new,
                                     "mean_accuracy": sum(accuracy[k] * len(cells[k]) for k in cells) / len(all_records)}
        if chars_per_token is not None:
            scalars["chars_per_token"] = chars_per_token
        for x in lengths:
            scalars[f"niah_acc@{x:g}"] = curve[x]
            toks = [context_tokens[k] * len(cells[k]) for k in cells if k[0] == x]
            scalars[f"context_tokens@{x:g}"] = sum(toks) / sum(len(cells[k]) for k in cells if k[0] == x)
        for t in RULER_THRESHOLDS:  # RULER's strict reading and the lenient one, whatever the limit's threshold
            scalars[f"effective_length@{t:g}"] = effective_length(curve, t)

        model_config = getattr(model, "config", None)
        n_pos = position_range(model_config)
        if n_pos is not None and has_rope(model_config) and lengths[-1] > n_pos:
            notes.append(f"lengths above the model's max_position_embeddings={n_pos} run on RoPE extrapolated past "
                         f"the position range it declares")

        if c.attention_mass:
            self._attention_series(model, tokenizer, cells, lengths, device, progress, series, scalars, notes, fmt)
        if c.position_loss:
            self._position_loss_series(model, tokenizer, lengths[-1], n_pos, device, series, scalars, notes)

        return self.result(spec=spec, curve=curve, limit_value=float(limit), threshold=c.threshold,
                           prompt_format=fmt, scalars=scalars, notes=notes, series=series, grids=grids)

    # --- secondary measurements ------------------------------------------------------------------------------------
    def _attention_series(self, model, tokenizer, cells, lengths, device, progress, series, scalars, notes,
                          fmt) -> None:
        points, masses_all = {}, []
        for length in tqdm(lengths, desc="context attention", unit="length", disable=not progress, leave=False):
            # a file's records may not say where their needles are; those cannot be measured
            records = [r for k, recs in cells.items() if k[0] == length for r in recs if r.get("needle_spans")]
            if not records:
                continue
            got = needle_attention(model, tokenizer, records, self.config.batch_size, device, fmt)
            if got is None:
                notes.append("attention_mass skipped: the model gives no attention weights under eager attention "
                             "(or the tokenizer gives no offsets, or the chat template rewrote the context)")
                return
            masses, distractors = got
            mean_mass = sum(masses) / len(masses)
            points[sum(distractors) / len(distractors)] = mean_mass
            scalars[f"needle_attention_mass@{length:g}"] = mean_mass
            masses_all += masses
        if not points:
            notes.append("attention_mass skipped: no record has needle_spans")
            return
        series["attention_mass"] = Series(axis="distractor_tokens", metric="needle_attention_mass", points=points)
        scalars["needle_attention_mass"] = sum(masses_all) / len(masses_all)

    def _position_loss_series(self, model, tokenizer, longest, n_pos, device, series, scalars, notes) -> None:
        c = self.config
        top = int(min(longest, n_pos)) if n_pos is not None else int(longest)
        seq_len = top // c.position_loss_bucket * c.position_loss_bucket
        buckets = seq_len // c.position_loss_bucket
        if buckets < 2:
            notes.append(f"position_loss skipped: the longest length {top} holds fewer than 2 buckets of "
                         f"{c.position_loss_bucket} tokens")
            return
        # the positional_loss eval, looked up by its registry name as a recipe names it: evals do not import each
        # other, and the registry is imported here because it imports this module
        from llm_limits.evals import EVALS

        positional_loss = EVALS["positional_loss"]
        pl = positional_loss(positional_loss.Config(
            seq_len=seq_len, bucket_size=c.position_loss_bucket, reference_buckets=min(2, buckets - 1),
            num_examples=c.examples_per_cell * len(c.depths), batch_size=c.batch_size, seed=c.seed,
        ))
        try:
            pl.check(model, tokenizer)
        except ValueError as err:
            notes.append(f"position_loss skipped: {err}")
            return
        result = pl.run(model, tokenizer, device=device, progress=False)
        series["position_loss"] = Series(axis="position", metric="loss", points=result.curve, higher_is_better=False)
        scalars["position_loss_limit"] = result.limit_value
        notes.extend(f"position_loss: {n}" for n in result.notes)

    # --- data ------------------------------------------------------------------------------------------------------
    def _source(self) -> str:
        return self.config.path if self.config.path is not None else f"{TASK}/{self.config.task}"

    def _generate(self, context_chars: int, depth: float | None, num_examples: int) -> list[dict]:
        c = self.config
        config_cls, generate = TASKS[TASK]
        try:
            return generate(config_cls(**c.task_params, task=c.task, num_examples=num_examples,
                                       context_chars=context_chars, depth=depth, seed=c.seed))
        except ValueError as err:  # e.g. a length too short for the needles; TaskDataError names its file already
            raise ValueError(f"context: {err}") from None

    def _chars_per_token(self, tokenizer: Any) -> float:
        """Characters per token of generated context under this tokenizer (1.0 for a character tokenizer)."""
        context = self._generate(CHARS_PER_TOKEN_SAMPLE, 0.5, 1)[0]["context"]
        return len(context) / max(1, _n_tokens(tokenizer, context))

    def _cells(self, tokenizer: Any) -> tuple[dict[tuple[float, float], list[dict]], float | None]:
        """``{(length, depth): records}`` and the characters per token used (``None`` for a file).

        Generated: every cell has ``examples_per_cell`` records of ``round(length * chars_per_token)`` context
        characters, all under the eval's seed, so cells differ only in length and depth (the ruler generator keeps
        needles and haystack fixed across depths). From a file: see ``ContextConfig.path``.
        """
        c = self.config
        if c.path is not None:
            records = load_jsonl(c.path)
            if not records:
                raise ValueError(f"context: {c.path} has no records")
            by_chars: dict[int, list[dict]] = {}
            for r in records:
                by_chars.setdefault(int(r["context_chars"]), []).append(r)
            cells: dict[tuple[float, float], list[dict]] = {}
            for _, group in sorted(by_chars.items()):
                length = float(round(sum(_n_tokens(tokenizer, r["context"]) for r in group) / len(group)))
                for r in group:
                    depth = placement_depth(r)
                    row = -1.0 if depth < 0 else float(min(c.depths, key=lambda d: abs(d - depth)))
                    cells.setdefault((length, row), []).append(r)
            return dict(sorted(cells.items())), None
        cpt = self._chars_per_token(tokenizer)
        cells = {}
        for length in c.lengths:
            for depth in c.depths:
                cells[(float(length), float(depth))] = self._generate(max(1, round(length * cpt)), depth,
                                                                      c.examples_per_cell)
        return cells, cpt

    def _sample(self, tokenizer: Any) -> list[dict]:
        """A few records for ``check``: one per depth at the largest length and one at the smallest (a length too
        short for the task's needles fails here), or the file's longest few."""
        c = self.config
        if c.path is not None:
            records = load_jsonl(c.path)
            if not records:
                raise ValueError(f"context: {c.path} has no records")
            return sorted(records, key=lambda r: -len(r["context"]))[: max(len(c.depths), 8)]
        cpt = self._chars_per_token(tokenizer)
        shortest = self._generate(max(1, round(min(c.lengths) * cpt)), c.depths[0], 1)
        return [r for d in c.depths for r in self._generate(max(1, round(max(c.lengths) * cpt)), d, 1)] + shortest

    def _max_new_tokens(self, tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> int:
        if self.config.max_new_tokens is not None:
            return self.config.max_new_tokens
        return max(_n_tokens(tokenizer, r["answer"]) for r in records) + 2


def _n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])

