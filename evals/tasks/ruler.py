"""RULER-style long-context tasks (Hsieh et al. 2024, arXiv 2404.06654): needles hidden at a chosen depth of a
haystack, and a query whose gold continuation is read out of them. Seeded and deterministic.

Four sub-tasks (:data:`TASK_NAMES`), in a compact format that suits tiny character-level models: like RULER's NIAH,
each is structurally an induction (copy) problem, with no natural-language instruction to learn first.

- ``niah_single``: one needle ``#{key}:{value}.``; the query ``\\n#{key}:`` is the needle's own prefix, so the gold
  continuation is ``{value}``.
- ``niah_multikey``: the same, among ``num_distractors`` needles with other keys (and other values).
- ``niah_multivalue``: ``num_values`` needles share the key, each with its own value; the answer is every value in
  order of appearance, joined by ``","``. ``num_distractors`` needles with other keys may be added.
- ``variable_tracking``: a chain of ``num_hops + 1`` variables, as in RULER (``num_hops`` is the number of
  variable-to-variable links): ``{v0}={value}.``, ``{v1}={v0}.``, ..., in chain order through the context; the query
  ``\\n?={value}:`` asks which variables hold the value, and the answer is ``v0,v1,...`` in chain order.
  ``num_distractors`` adds whole chains of the same length with other variables and other values.

Keys and variables are ``key_len`` lowercase letters, unique within an example; values are ``value_len`` digits
(leading zeros allowed), unique within an example. With the default sizes a ``niah_single`` record reads::

    context: "... the old tree. #qzk:4821. the red fox sees ..."      (exactly context_chars characters)
    query:   "\\n#qzk:"
    answer:  "4821"

The model's input is ``context + query`` (:func:`prompt_text`); the gold continuation is ``answer``
(:func:`training_text` is the three joined, for training).

Placement. The haystack is the ``synthetic_text`` stream (``haystack="generated"``) or the words of a local UTF-8
prose file (white space collapsed to single spaces, repeated from a random word as needed), cut at exactly the length
that, with the needles, makes ``context_chars``. Needles go only at word boundaries (:func:`word_boundaries`: the
start of the haystack or right after a word), each with one separating space, so no haystack word is ever split; the
haystack's last word may be cut short by the length cut, as in ``synthetic_text``. ``depth`` places the first
answer-bearing needle: its start lands as close as word boundaries allow to ``depth * (context_chars - block)``, where
``block`` is the length of all answer-bearing needles packed together, so 0 is the very start and 1 puts them flush
against the end. The other answer-bearing needles follow it at random word boundaries between it and the end;
distractors go at random word boundaries anywhere. Every example draws from its own seed (taken in turn from
``random.Random(seed)``), and the depth is applied last: two configs that differ only in ``depth`` give the same
needles, haystack and distractor positions, with only the answer moved.

Records, from :func:`generate` and :func:`load_jsonl` (a user's own long-context data) alike::

    {"task": str, "context": str, "query": str, "answer": str,
     "needle_spans": [[start, end], ...],   # answer-bearing needles in context, ascending; context[start:end] == needle
     "depth": float,                        # start of the first answer-bearing needle / len(context); -1.0 = unknown
     "context_chars": int}
"""

from __future__ import annotations

import bisect
import json
import math
import random
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from llm_limits.evals.tasks import TaskDataError
from llm_limits.evals.tasks import synthetic_text
from llm_limits.evals.tasks.jsonl import json_objects, json_type
from llm_limits.evals.tasks.synthetic_text import SyntheticTextConfig

VERSION = "1"
"""Version of the records this task yields: bump it when they change, so that results over different records are
not compared as equals."""

TASK_NAMES = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking")
"""The sub-tasks :class:`RulerConfig` ``task`` may name."""

ALPHABET = synthetic_text.ALPHABET + "0123456789#:=?"
"""Every character a record with the generated haystack can hold: the ``synthetic_text`` alphabet, digits and the
needle and query punctuation ``#:=?``."""

KEY_LETTERS = "abcdefghijklmnopqrstuvwxyz"
"""Letters of keys and variable names."""

VALUE_DIGITS = "0123456789"
"""Digits of values."""


@dataclass
class RulerConfig:
    task: str = "niah_single"
    """Sub-task: ``niah_single``, ``niah_multikey``, ``niah_multivalue`` or ``variable_tracking``."""
    num_examples: int = 100
    """Number of examples (records) to generate."""
    context_chars: int = 256
    """Exact length of every ``context`` in characters, needles included."""
    depth: float | None = None
    """Where the first answer-bearing needle starts, as a fraction of the context: 0 = the start, 1 = the answer-bearing
    needles end at the end of the context; ``None``: uniform random per example."""
    num_distractors: int = 0
    """Needles with other keys (``niah_multikey``: at least 1; ``niah_single``: none), or for ``variable_tracking``
    whole chains with other variables and values."""
    num_values: int = 2
    """``niah_multivalue`` only: values stored under the one key (at least 2)."""
    num_hops: int = 2
    """``variable_tracking`` only: variable-to-variable links of the chain, so ``num_hops + 1`` variables."""
    key_len: int = 3
    """Letters of every key and variable name."""
    value_len: int = 4
    """Digits of every value."""
    haystack: str = "generated"
    """Filler: ``"generated"`` (the seeded ``synthetic_text`` stream) or the path of a local UTF-8 prose file, whose
    words are repeated as needed."""
    seed: int = 0
    """Seed of the generator; the same config always gives the same records."""

    def __post_init__(self) -> None:
        validate(self)


# --- needle and query formats (pure) ------------------------------------------------------------------------------
def niah_needle(key: str, value: str) -> str:
    """A NIAH needle: ``#`` key ``:`` value ``.``.

    >>> niah_needle("qzk", "4821")
    '#qzk:4821.'
    """
    return f"#{key}:{value}."


def niah_query(key: str) -> str:
    """A NIAH query: a line break, then the needle's prefix, so the continuation is the value.

    >>> niah_query("qzk")
    '\\n#qzk:'
    """
    return f"\n#{key}:"


def vt_needle(var: str, source: str) -> str:
    """A variable-tracking statement: ``var=source.``, where the source is a value or the previous variable.

    >>> vt_needle("abc", "40217"), vt_needle("def", "abc")
    ('abc=40217.', 'def=abc.')
    """
    return f"{var}={source}."


def vt_query(value: str) -> str:
    """A variable-tracking query: which variables ``=`` this value? The continuation lists them.

    >>> vt_query("40217")
    '\\n?=40217:'
    """
    return f"\n?={value}:"


def needle_counts(config: RulerConfig) -> tuple[int, int]:
    """``(keys, values)``: how many distinct keys (or variables) and values one example of ``config`` uses.

    >>> needle_counts(RulerConfig(task="niah_multivalue", num_values=3, num_distractors=2))
    (3, 5)
    """
    c = config
    if c.task == "niah_single":
        return 1, 1
    if c.task == "niah_multikey":
        return 1 + c.num_distractors, 1 + c.num_distractors
    if c.task == "niah_multivalue":
        return 1 + c.num_distractors, c.num_values + c.num_distractors
    return (c.num_hops + 1) * (1 + c.num_distractors), 1 + c.num_distractors


def min_context_chars(config: RulerConfig) -> int:
    """The shortest ``context_chars`` that holds every needle of an example of ``config`` (each needle plus its one
    separating space, no haystack).

    >>> min_context_chars(RulerConfig())  # one '#abc:1234.' and a space
    11
    """
    c = config
    niah = c.key_len + c.value_len + 3 + 1
    if c.task == "variable_tracking":
        chain = (c.key_len + c.value_len + 2 + 1) + c.num_hops * (2 * c.key_len + 2 + 1)
        return chain * (1 + c.num_distractors)
    if c.task == "niah_multivalue":
        return niah * (c.num_values + c.num_distractors)
    return niah * (1 + c.num_distractors)


def validate(config: RulerConfig) -> None:
    """Raise a one-line ``ValueError`` naming the field when ``config`` cannot generate."""
    c = config
    if c.task not in TASK_NAMES:
        raise ValueError(f"ruler: unknown task {c.task!r} (known: {', '.join(TASK_NAMES)})")
    for name in ("num_examples", "num_distractors", "num_hops"):
        if getattr(c, name) < 0:
            raise ValueError(f"ruler: {name} must be >= 0 (got {getattr(c, name)})")
    for name in ("key_len", "value_len", "num_values"):
        if getattr(c, name) < 1:
            raise ValueError(f"ruler: {name} must be >= 1 (got {getattr(c, name)})")
    if c.depth is not None and not 0.0 <= c.depth <= 1.0:  # NaN fails both comparisons
        raise ValueError(f"ruler: depth must be within [0, 1], or None for a random depth (got {c.depth})")
    if c.task == "niah_single" and c.num_distractors:
        raise ValueError(f"ruler: niah_single has no distractors (got num_distractors={c.num_distractors}); "
                         f"use niah_multikey")
    if c.task == "niah_multikey" and not c.num_distractors:
        raise ValueError("ruler: niah_multikey needs num_distractors >= 1 (got 0); with none it is niah_single")
    if c.task == "niah_multivalue" and c.num_values < 2:
        raise ValueError(f"ruler: niah_multivalue needs num_values >= 2 (got {c.num_values}); with one it is "
                         f"niah_single")
    if not isinstance(c.haystack, str) or not c.haystack:
        raise ValueError(f'ruler: haystack must be "generated" or the path of a text file (got {c.haystack!r})')
    n_keys, n_values = needle_counts(c)
    if len(KEY_LETTERS) ** c.key_len < n_keys:
        raise ValueError(f"ruler: key_len={c.key_len} gives {len(KEY_LETTERS) ** c.key_len} distinct keys, fewer than "
                         f"the {n_keys} an example of {c.task} needs; raise key_len")
    if len(VALUE_DIGITS) ** c.value_len < n_values:
        raise ValueError(f"ruler: value_len={c.value_len} gives {len(VALUE_DIGITS) ** c.value_len} distinct values, "
                         f"fewer than the {n_values} an example of {c.task} needs; raise value_len")
    if c.context_chars < min_context_chars(c):
        raise ValueError(f"ruler: context_chars={c.context_chars} is too short for the needles of {c.task}; the "
                         f"minimum context_chars is {min_context_chars(c)}")


# --- placement (pure) -----------------------------------------------------------------------------------------------
def word_boundaries(text: str) -> list[int]:
    """Offsets where a needle can go without splitting a word, ascending: 0, and every word's end (the offset of the
    white space after it, or ``len(text)`` when the text ends in a word).

    >>> word_boundaries("the fox.  runs")
    [0, 3, 8, 14]
    >>> word_boundaries("")
    [0]
    """
    slots = [0]
    for i in range(1, len(text) + 1):
        if not text[i - 1].isspace() and (i == len(text) or text[i].isspace()):
            slots.append(i)
    return slots


def insert_needles(filler: str, placed: list[tuple[int, str]]) -> tuple[str, list[list[int]]]:
    """``filler`` with each ``(slot, needle)`` inserted at its word boundary, and each needle's ``[start, end]`` in
    the result (in the order given). ``placed`` is sorted by slot; needles sharing a slot keep their order.

    Every needle brings one space: ``needle + " "`` at slot 0, ``" " + needle`` after a word, so the result is
    ``len(filler) + sum(len(needle) + 1)`` characters long.

    >>> insert_needles("the fox runs.", [(0, "#ab:12."), (7, "#cd:34.")])
    ('#ab:12. the fox #cd:34. runs.', [[0, 7], [16, 23]])
    """
    pieces, spans, done, out_len = [], [], 0, 0
    for slot, needle in placed:
        assert done <= slot <= len(filler), "slots must be ascending word boundaries of the filler"
        pieces.append(filler[done:slot])
        out_len += slot - done
        done = slot
        if slot == 0:
            spans.append([out_len, out_len + len(needle)])
            pieces.append(needle + " ")
        else:
            spans.append([out_len + 1, out_len + 1 + len(needle)])
            pieces.append(" " + needle)
        out_len += len(needle) + 1
    pieces.append(filler[done:])
    return "".join(pieces), spans


def closest_start(slots: list[int], distractor_slots: list[int], distractor_sizes: list[int],
                  target: float) -> tuple[int, int]:
    """Where the first answer-bearing needle starts closest to ``target`` (the earlier on a tie): ``(slot, k)``, the
    word boundary and how many of the distractors sharing that slot go before it. Distractors (each ``size`` = its
    needle length + 1) at a slot keep their order; those at smaller slots all precede the answer.

    >>> closest_start([0, 3, 8, 14], [3], [8], 10.0)  # slot 3 starts at 4, or 12 after the distractor; slot 8 at 17
    (3, 1)
    """
    order = sorted(range(len(distractor_slots)), key=lambda j: (distractor_slots[j], j))
    best, best_err, i, shift = (slots[0], 0), math.inf, 0, 0
    for s in slots:
        while i < len(order) and distractor_slots[order[i]] < s:  # distractors before this slot
            shift += distractor_sizes[order[i]]
            i += 1
        start, k = s + (1 if s > 0 else 0) + shift, 0
        while True:
            if abs(start - target) < best_err:
                best, best_err = (s, k), abs(start - target)
            if i + k == len(order) or distractor_slots[order[i + k]] != s:
                break
            start += distractor_sizes[order[i + k]]
            k += 1
    return best


# --- generator ------------------------------------------------------------------------------------------------------
def generate(config: RulerConfig) -> list[dict]:
    """``config.num_examples`` records (see the module docstring), each ``context`` exactly ``config.context_chars``
    characters. Deterministic: it draws only from ``random.Random(config.seed)``."""
    validate(config)
    c = config
    words = None if c.haystack == "generated" else _haystack_words(c.haystack)
    rng = random.Random(c.seed)
    return [_example(c, random.Random(rng.getrandbits(64)), words) for _ in range(c.num_examples)]


def _example(c: RulerConfig, rng: random.Random, words: list[str] | None) -> dict:
    # Draw everything that does not depend on the depth first, so configs differing only in depth stay aligned.
    n_keys, n_values = needle_counts(c)
    keys = _distinct(rng, n_keys, KEY_LETTERS, c.key_len)
    values = _distinct(rng, n_values, VALUE_DIGITS, c.value_len)
    if c.task == "variable_tracking":
        n = c.num_hops + 1
        chains = [(keys[i * n : (i + 1) * n], values[i]) for i in range(1 + c.num_distractors)]
        answers = [vt_needle(v, chains[0][1] if j == 0 else chains[0][0][j - 1]) for j, v in enumerate(chains[0][0])]
        query, answer = vt_query(chains[0][1]), ",".join(chains[0][0])
        # a distractor chain keeps its chain order too: (chain index, needles in order)
        groups = [[vt_needle(v, val if j == 0 else vs[j - 1]) for j, v in enumerate(vs)] for vs, val in chains[1:]]
    else:
        n_answers = c.num_values if c.task == "niah_multivalue" else 1
        answers = [niah_needle(keys[0], v) for v in values[:n_answers]]
        query, answer = niah_query(keys[0]), ",".join(values[:n_answers])
        groups = [[niah_needle(k, v)] for k, v in zip(keys[1:], values[n_answers:])]
    distractors = [n for g in groups for n in g]

    filler_len = c.context_chars - sum(len(n) + 1 for n in answers + distractors)
    filler = _filler(rng, filler_len, words)
    slots = word_boundaries(filler)
    d_slots = []
    for g in groups:
        d_slots += sorted(_slot_at(slots, rng.random()) for _ in g)
    later = [rng.random() for _ in answers[1:]]
    depth = rng.random()  # drawn always, used only when config.depth is None
    depth = depth if c.depth is None else c.depth

    block = sum(len(n) + 1 for n in answers) - 1  # the answer-bearing needles packed together
    first, k = closest_start(slots, d_slots, [len(n) + 1 for n in distractors], depth * (c.context_chars - block))
    after = slots[bisect.bisect_left(slots, first) :]
    a_slots = [first] + sorted(_slot_at(after, u) for u in later)
    # Order: by slot; at the first answer's slot it goes after the first k distractors there and the other answers
    # right after it; at any other slot answers go before distractors; distractors keep their own order.
    rank: dict[int, int] = {}
    d_keys = []
    for j in sorted(range(len(distractors)), key=lambda j: (d_slots[j], j)):
        rank[d_slots[j]] = rank.get(d_slots[j], -1) + 1
        d_keys.append(((d_slots[j], rank[d_slots[j]], 1, j), distractors[j], False))
    a_keys = [((s, k if s == first else 0, 0, i), n, True) for i, (s, n) in enumerate(zip(a_slots, answers))]
    placed = sorted(a_keys + d_keys)
    context, spans = insert_needles(filler, [(key[0], n) for key, n, _ in placed])
    needle_spans = [span for span, (_, _, is_answer) in zip(spans, placed) if is_answer]
    assert len(context) == c.context_chars
    return {
        "task": c.task,
        "context": context,
        "query": query,
        "answer": answer,
        "needle_spans": needle_spans,
        "depth": needle_spans[0][0] / len(context),
        "context_chars": len(context),
    }


def _distinct(rng: random.Random, n: int, alphabet: str, length: int) -> list[str]:
    """``n`` distinct random strings of ``length`` characters of ``alphabet`` (``validate`` checks there are enough)."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        s = "".join(rng.choice(alphabet) for _ in range(length))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _slot_at(slots: list[int], u: float) -> int:
    """The slot at fraction ``u`` in [0, 1) of ``slots`` (uniform over word boundaries)."""
    return slots[min(int(u * len(slots)), len(slots) - 1)]


def _filler(rng: random.Random, n: int, words: list[str] | None) -> str:
    """``n`` characters of haystack: the ``synthetic_text`` stream, or the file's words from a random one on."""
    seed = rng.getrandbits(32)
    start = rng.randrange(len(words)) if words else 0
    if n <= 0:
        return ""
    if words is None:
        return synthetic_text.generate(SyntheticTextConfig(num_docs=1, doc_chars=n, seed=seed))[0]["text"]
    parts, length, i = [], -1, start
    while length < n:
        parts.append(words[i % len(words)])
        length += len(parts[-1]) + 1
        i += 1
    return " ".join(parts)[:n]


def _haystack_words(path: str) -> list[str]:
    """The words of a UTF-8 prose file (split on any white space)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise TaskDataError(f"{path}: file not found (expected a UTF-8 text file as haystack)") from None
    except IsADirectoryError:
        raise TaskDataError(f"{path}: is a directory (expected a UTF-8 text file as haystack)") from None
    except UnicodeDecodeError as err:
        raise TaskDataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise TaskDataError(f"{path}: cannot read ({err.strerror or err})") from None
    words = text.split()
    if not words:
        raise TaskDataError(f"{path}: no text (expected prose to use as haystack)")
    return words


# --- text for the model -----------------------------------------------------------------------------------------------
def prompt_text(record: dict) -> str:
    """The model's input: ``context + query``.

    >>> prompt_text({"context": "a #qzk:4821. b", "query": "\\n#qzk:", "answer": "4821"})
    'a #qzk:4821. b\\n#qzk:'
    """
    return record["context"] + record["query"]


def training_text(record: dict) -> str:
    """The prompt followed by its gold continuation: ``context + query + answer``."""
    return prompt_text(record) + record["answer"]


# --- loader -------------------------------------------------------------------------------------------------------
def load_jsonl(path: str | PathLike) -> list[dict]:
    """Records (see the module docstring) from a JSONL file with one JSON object per line.

    Required: strings ``context``, ``query`` and ``answer``. Optional: ``needle_spans`` (default ``[]``; ascending,
    non-overlapping ``[start, end]`` character offsets within the context), ``task`` (default ``"custom"``),
    ``depth`` (default ``-1.0``, unknown; else within [0, 1]) and ``context_chars`` (default ``len(context)``; another
    value is a nominal length to group by). Other fields are ignored. Blank lines are skipped. Any other problem raises
    :class:`~evals.tasks.TaskDataError` with a one-line message naming the file and line, e.g.
    ``data.jsonl:3: missing field "answer" (expected a JSON object with strings "context", "query" and "answer")``.
    """
    expected = 'expected a JSON object with strings "context", "query" and "answer"'
    records = []
    for where, obj in json_objects(path, expected):
        for field in ("context", "query", "answer"):
            if field not in obj:
                raise TaskDataError(f'{where}: missing field "{field}" ({expected})')
            if not isinstance(obj[field], str):
                raise TaskDataError(f'{where}: field "{field}" is a JSON {json_type(obj[field])} ({expected})')
        context = obj["context"]
        task = obj.get("task", "custom")
        if not isinstance(task, str):
            raise TaskDataError(f'{where}: field "task" is a JSON {json_type(task)} (expected a string)')
        depth = obj.get("depth", -1.0)
        if not _is_number(depth):
            raise TaskDataError(f'{where}: field "depth" is a JSON {json_type(depth)} (expected a number)')
        if not (0.0 <= depth <= 1.0 or depth == -1):
            raise TaskDataError(f'{where}: field "depth" is {depth} (expected a number within [0, 1], or -1 for '
                                f'unknown)')
        context_chars = obj.get("context_chars", len(context))
        if not _is_int(context_chars) or context_chars < 0:
            got = context_chars if _is_int(context_chars) else f"a JSON {json_type(context_chars)}"
            raise TaskDataError(f'{where}: field "context_chars" is {got} (expected an integer >= 0)')
        records.append({
            "task": task,
            "context": context,
            "query": obj["query"],
            "answer": obj["answer"],
            "needle_spans": _spans(obj.get("needle_spans", []), len(context), where),
            "depth": float(depth),
            "context_chars": context_chars,
        })
    return records


def _spans(value: object, n: int, where: str) -> list[list[int]]:
    """Check ``needle_spans``: ascending, non-overlapping ``[start, end]`` integer pairs with ``0 <= start < end <=
    n``."""
    expected = f"expected ascending [start, end] pairs with 0 <= start < end <= {n}, the context's length"
    if not isinstance(value, list):
        raise TaskDataError(f'{where}: field "needle_spans" is a JSON {json_type(value)} ({expected})')
    spans, prev_end = [], 0
    for i, span in enumerate(value):
        if not (isinstance(span, list) and len(span) == 2 and all(_is_int(x) for x in span)):
            raise TaskDataError(f"{where}: needle_spans[{i}] is {json.dumps(span)}, not a pair of integers "
                                f"({expected})")
        start, end = span
        if not 0 <= start < end <= n:
            raise TaskDataError(f"{where}: needle_spans[{i}] = [{start}, {end}] is out of range ({expected})")
        if start < prev_end:
            raise TaskDataError(f"{where}: needle_spans[{i}] = [{start}, {end}] starts before needle_spans[{i - 1}] "
                                f"ends ({expected}, not overlapping)")
        spans.append([start, end])
        prev_end = end
    return spans


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
