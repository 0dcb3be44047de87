"""Positional under-training: next-token loss as a function of position, and the last position it stays good up to.

A model trained on short sequences has seen late positions rarely or never (learned absolute positions stay at their
initialisation; rotary angles beyond the trained range are out of distribution), so its loss climbs past some
position. This eval measures held-out next-token loss per bucket of positions and reads the limit as the end of the
last bucket before the first one whose loss exceeds ``(1 + tolerance)`` times the loss of the first
``reference_buckets`` buckets. The positional curricula of ``mitigations/`` (sequence-length warmup, PoSE) move it.

The "nothing learned" rule: an untrained model predicts near-uniformly, so its loss is flat at chance, ``ln(V)``, at
every position. Read naively, a flat curve clears any relative threshold and the limit would be "the whole window is
used". So when the reference loss is within ``min_gain_nats`` of chance, the limit is 0 and a note says why.

Everything the limit depends on is a pure function of tensors or dicts (:func:`token_nll`, :func:`bucket_means`,
:func:`positional_limit`); :class:`PositionalLoss` only builds the data, runs the model and calls them.

Prompt format: always ``plain``. The eval scores raw text at every position, not an answer to a prompt, so a chat
template has nothing to wrap (``prompt_format: auto`` is ``plain`` here whatever the tokenizer, and ``chat`` is
refused).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from tqdm import tqdm

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, LimitSpec, read_limit
from llm_limits.evals.lm import MAX_UNK_FRACTION, position_range, refuse_chat, unk_fraction
from llm_limits.evals.tasks import TASKS
from llm_limits.evals.tasks.synthetic_text import load_jsonl


@dataclass
class PositionalLossConfig(EvalConfig):
    seq_len: int = 128
    """Eval sequence length in tokens; must be a multiple of ``bucket_size`` and within the model's position range."""
    bucket_size: int = 16
    """Positions per bucket; the curve has one point per bucket, at the bucket's end."""
    num_examples: int = 64
    """Held-out sequences of ``seq_len`` tokens to score (from a JSONL file: at most this many)."""
    tolerance: float = 0.10
    """A bucket passes when its loss is <= ``(1 + tolerance) * reference``."""
    reference_buckets: int = 2
    """The first buckets whose mean loss is the reference; must be fewer than the number of buckets."""
    min_gain_nats: float = 0.5
    """The reference must be at least this far below chance, ``ln(len(tokenizer))``, or the limit is 0 (nothing
    learned)."""
    task: str = "synthetic_text"
    """Task (a key of ``evals.tasks.TASKS``) whose generator makes the held-out text."""
    path: str | None = None
    """A JSONL file of ``{"text": ...}`` lines to use instead of the generator (a user's own corpus)."""
    task_params: dict = field(default_factory=dict)
    """Fields passed to the task's config, e.g. ``{"doc_chars": 2048}``; ``num_docs`` and ``seed`` come from
    ``num_examples`` and ``seed``."""


# --- functional core -------------------------------------------------------------------------------------------------
def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token negative log-likelihood, in nats.

    ``logits``: ``[batch, seq, vocab]``; ``input_ids``: ``[batch, seq]``. Returns ``[batch, seq - 1]`` (float32)
    whose column ``j`` is the loss of predicting token ``j + 1`` from tokens ``0..j``, i.e. the loss at target
    position ``j + 1`` (position 0 has no prediction).

    >>> ids = torch.tensor([[0, 1, 2]])
    >>> token_nll(torch.zeros(1, 3, 4), ids).shape
    torch.Size([1, 2])
    >>> round(token_nll(torch.zeros(1, 3, 4), ids)[0, 0].item(), 4) == round(math.log(4), 4)
    True
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [batch, seq, vocab] and input_ids [batch, seq]; got "
                         f"{tuple(logits.shape)} and {tuple(input_ids.shape)}")
    pred = logits[:, :-1].float()  # [batch, seq-1, vocab]
    target = input_ids[:, 1:]  # [batch, seq-1]
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    return nll.view(target.shape)


def bucket_means(nll: torch.Tensor, bucket_size: int) -> dict[float, float]:
    """Mean loss per bucket of target positions: ``{bucket_end: mean_loss}``.

    ``nll``: ``[batch, seq_len - 1]`` as returned by :func:`token_nll` (column ``j`` is target position ``j + 1``).
    Bucket ``i`` covers target positions ``[i * bucket_size, (i + 1) * bucket_size)`` and is keyed by its end,
    ``(i + 1) * bucket_size``; bucket 0 has ``bucket_size - 1`` positions since position 0 has no loss. ``seq_len``
    must be a multiple of ``bucket_size``.

    >>> nll = torch.arange(1.0, 8.0).unsqueeze(0)  # positions 1..7 carry losses 1..7
    >>> bucket_means(nll, 4)
    {4.0: 2.0, 8.0: 5.5}
    """
    seq_len = nll.shape[-1] + 1
    if bucket_size < 1 or seq_len % bucket_size:
        raise ValueError(f"seq_len {seq_len} (nll has {nll.shape[-1]} positions + 1) is not a multiple of "
                         f"bucket_size {bucket_size}")
    # position 0 gets NaN so every bucket is one reshape; nanmean leaves it out
    padded = torch.cat([nll.new_full((*nll.shape[:-1], 1), float("nan")), nll.float()], dim=-1)  # [batch, seq_len]
    per_bucket = padded.reshape(-1, seq_len // bucket_size, bucket_size)  # [batch, buckets, bucket_size]
    means = per_bucket.transpose(0, 1).reshape(seq_len // bucket_size, -1).nanmean(dim=1)  # [buckets]
    return {float((i + 1) * bucket_size): float(m) for i, m in enumerate(means.tolist())}


def positional_limit(
    curve: Mapping[float, float], reference_buckets: int, tolerance: float, chance_loss: float, min_gain_nats: float
) -> tuple[float, float, float, list[str]]:
    """Read the limit off a loss-by-position curve: ``(limit, threshold, reference, notes)``.

    ``reference`` is the mean loss of the first ``reference_buckets`` points, ``threshold = (1 + tolerance) *
    reference`` and ``limit`` is :func:`~evals.base.read_limit` at that threshold (lower is better) over the points
    AFTER the reference buckets, unless the reference is within ``min_gain_nats`` of ``chance_loss``: then nothing was
    learned and the limit is 0. The reference buckets define "early" and count as passed: the first bucket has the
    least context, so its loss is naturally above the reference mean and must not end the scan (a model with loss
    1.9, 0.9, 1.1, then 6.8 from position 64 on has used 48 positions, not 0).

    >>> positional_limit({16: 2.0, 32: 2.0, 48: 2.9, 64: 3.5}, 2, 0.5, math.log(32), 0.5)[:3]
    (48, 3.0, 2.0)
    >>> positional_limit({16: 1.93, 32: 0.87, 48: 1.10, 64: 6.8, 80: 10.6}, 2, 0.1, math.log(100), 0.5)[0]
    48
    >>> positional_limit({16: 3.4, 32: 3.4, 48: 3.4}, 2, 0.1, math.log(32), 0.5)[0]
    0.0
    """
    xs = sorted(curve)
    reference = sum(curve[x] for x in xs[:reference_buckets]) / reference_buckets
    threshold = (1.0 + tolerance) * reference
    if not math.isfinite(reference):
        return 0.0, threshold, reference, [f"reference loss is {reference}: the model's loss is not finite, limit 0"]
    if reference > chance_loss - min_gain_nats:
        v = round(math.exp(chance_loss))
        return 0.0, threshold, reference, [
            f"reference loss {reference:.3f} is within min_gain_nats={min_gain_nats:g} of chance "
            f"ln(V)={chance_loss:.3f} (V={v}): nothing learned, limit 0"
        ]
    after_reference = {x: curve[x] for x in xs[reference_buckets:]}
    limit = read_limit(after_reference, threshold, higher_is_better=False, floor=xs[reference_buckets - 1])
    notes = []
    if xs and limit == xs[-1]:
        notes.append(f"every bucket is within {tolerance:.0%} of the reference loss {reference:.3f}: the limit is the "
                     f"whole eval length {xs[-1]:g}; a longer seq_len may measure further")
    return limit, threshold, reference, notes


# --- the eval --------------------------------------------------------------------------------------------------------
class PositionalLoss(Eval):
    """Held-out next-token loss per position bucket; the limit is the last position before the loss climbs above
    ``(1 + tolerance)`` times its early-position value (0 when the model has learned nothing)."""

    name = "positional_loss"
    version = "1"
    summary = "next-token loss by position; limit = last position before loss rises above (1+tol) x early loss"
    limit = "context"
    Config = PositionalLossConfig

    config: PositionalLossConfig

    def spec(self) -> LimitSpec:
        c = self.config
        self._validate()
        ends = tuple(float(b * c.bucket_size) for b in range(1, c.seq_len // c.bucket_size + 1))
        return LimitSpec(metric="loss", axis="position", axis_values=ends, higher_is_better=False, threshold=None,
                         limit="context", limit_unit="tokens")

    def _validate(self) -> None:
        c = self.config
        if c.bucket_size < 1:
            raise ValueError(f"positional_loss: bucket_size must be >= 1 (got {c.bucket_size})")
        if c.seq_len < 2 or c.seq_len % c.bucket_size:
            raise ValueError(f"positional_loss: seq_len must be a multiple of bucket_size and >= 2 "
                             f"(got seq_len={c.seq_len}, bucket_size={c.bucket_size})")
        buckets = c.seq_len // c.bucket_size
        if not 1 <= c.reference_buckets < buckets:
            raise ValueError(f"positional_loss: reference_buckets must be >= 1 and < the number of buckets "
                             f"seq_len/bucket_size = {buckets} (got {c.reference_buckets})")
        if c.num_examples < 1 or c.batch_size < 1:
            raise ValueError(f"positional_loss: num_examples and batch_size must be >= 1 "
                             f"(got {c.num_examples} and {c.batch_size})")
        if c.tolerance < 0 or c.min_gain_nats < 0:
            raise ValueError(f"positional_loss: tolerance and min_gain_nats must be >= 0 "
                             f"(got {c.tolerance} and {c.min_gain_nats})")
        if c.path is None and c.task not in TASKS:
            raise ValueError(f"positional_loss: unknown task {c.task!r} (known: {', '.join(sorted(TASKS))})")
        refuse_chat(c.prompt_format, "positional_loss", "it scores raw text, not a prompt")
        for key in ("num_docs", "seed"):
            if key in c.task_params:
                raise ValueError(f"positional_loss: task_params.{key} is set by the eval "
                                 f"({'num_examples' if key == 'num_docs' else 'seed'}); remove it")

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        n_pos = position_range(getattr(model, "config", None))
        if n_pos is not None and c.seq_len > n_pos:
            raise ValueError(f"positional_loss: seq_len {c.seq_len} exceeds the model's position range {n_pos} "
                             f"({getattr(model.config, 'model_type', '?')}); lower seq_len to at most {n_pos}")
        records = self._records(tokenizer)
        text = "".join(r["text"] for r in records[: c.num_examples])
        frac = unk_fraction(tokenizer, text)
        if frac > MAX_UNK_FRACTION:
            raise ValueError(f"positional_loss: the tokenizer maps {frac:.1%} of the {self._source()} characters to "
                             f"its unknown token (at most {MAX_UNK_FRACTION:.0%} allowed); use a tokenizer that "
                             f"covers the task's alphabet")
        self._input_ids(records, tokenizer)  # fails early when no document is long enough

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Score ``num_examples`` held-out sequences of ``seq_len`` tokens on ``model`` (already on ``device``)."""
        c = self.config
        spec = self.spec()
        input_ids, skipped = self._input_ids(self._records(tokenizer), tokenizer)  # [N, seq_len]

        nll_batches = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                starts = range(0, input_ids.shape[0], c.batch_size)
                for start in tqdm(starts, desc="positional_loss", unit="batch", disable=not progress, leave=False):
                    batch = input_ids[start : start + c.batch_size].to(device)  # [batch, seq_len]
                    logits = model(input_ids=batch, use_cache=False).logits  # [batch, seq_len, vocab]
                    nll_batches.append(token_nll(logits, batch).cpu())
        finally:
            model.train(was_training)
        nll = torch.cat(nll_batches)  # [N, seq_len - 1]

        curve = bucket_means(nll, c.bucket_size)
        chance = math.log(len(tokenizer))
        limit, threshold, reference, notes = positional_limit(
            curve, c.reference_buckets, c.tolerance, chance, c.min_gain_nats
        )
        if skipped:
            notes.append(f"{skipped} document(s) shorter than seq_len={c.seq_len} tokens were skipped")
        return self.result(
            spec=spec,
            curve=curve,
            limit_value=float(limit),
            threshold=threshold,
            prompt_format="plain",  # raw text, never a chat turn
            scalars={
                "reference_loss": reference,
                "chance_loss": chance,
                "mean_loss": float(nll.mean()),
                "num_examples": int(input_ids.shape[0]),
                "tokens": int(nll.numel()),  # scored (target) tokens: N * (seq_len - 1)
            },
            notes=notes,
        )

    # --- data ------------------------------------------------------------------------------------------------------
    def _source(self) -> str:
        return self.config.path if self.config.path is not None else self.config.task

    def _records(self, tokenizer: Any) -> list[dict]:
        """Held-out records: the JSONL file's, or the task generator's under the eval's own seed."""
        c = self.config
        if c.path is not None:
            return load_jsonl(c.path)
        config_cls, generate = TASKS[c.task]
        params = dict(c.task_params)
        known = [f.name for f in dataclasses.fields(config_cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"positional_loss: unknown task_params for {c.task}: {', '.join(unknown)} "
                             f"(known: {', '.join(known)})")
        if "doc_chars" in known and "doc_chars" not in params:
            params["doc_chars"] = self._doc_chars(tokenizer, config_cls, generate)
        return generate(config_cls(**params, num_docs=c.num_examples, seed=c.seed))

    def _doc_chars(self, tokenizer: Any, config_cls: type, generate: Any) -> int:
        """Characters per document enough for ``seq_len + 1`` tokens under this tokenizer, with a 50% margin
        (a character tokenizer needs ``seq_len + 1``; a BPE one several times fewer tokens per character)."""
        sample = generate(config_cls(num_docs=1, doc_chars=4096, seed=self.config.seed))[0]["text"]
        n_tokens = max(1, len(tokenizer(sample, add_special_tokens=False)["input_ids"]))
        chars_per_token = max(1.0, len(sample) / n_tokens)
        return math.ceil(1.5 * (self.config.seq_len + 1) * chars_per_token) + 16

    def _input_ids(self, records: list[dict], tokenizer: Any) -> tuple[torch.Tensor, int]:
        """``[N, seq_len]`` token ids from the first ``num_examples`` records long enough, and how many were
        skipped before those were found."""
        c = self.config
        rows, skipped = [], 0
        for record in records:
            ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
            if len(ids) < c.seq_len:
                skipped += 1
                continue
            rows.append(ids[: c.seq_len])
            if len(rows) == c.num_examples:
                break
        if not rows:
            raise ValueError(f"positional_loss: no document of {self._source()} has seq_len={c.seq_len} tokens "
                             f"(all {len(records)} are shorter); lower seq_len or use longer documents")
        return torch.tensor(rows, dtype=torch.long), skipped
