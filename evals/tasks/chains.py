"""Verifiable multi-step arithmetic chains: gold step-by-step solutions, an exact step verifier, corrupted chains for
process supervision, and loaders for GSM8K-style and PRM800K-style JSONL.

Format (no spaces, friendly to a character tokenizer). A question is a start value then operations, evaluated left
to right with every result taken mod ``modulus`` (default 10, so every number is one digit; 100 gives up to two)::

    question:   "3+4*2-5"
    prompt:     "Q:3+4*2-5\\n"
    completion: "3+4=7\\n7*2=4\\n4-5=9\\nA:9"      (7*2=14 -> 4, 4-5=-1 -> 9)

Each step is ``{a}{op}{b}={c}`` on its own line, and the answer line ``A:{answer}`` closes the completion. The
verifier (:func:`verify_steps`) checks every written step exactly: its format, that it continues from the previous
written step's result, that it applies the question's next operation, and its arithmetic.

Records, from :func:`generate` and both loaders alike (every key always present)::

    {"task": "arith_chain", "question": "3+4*2-5", "prompt": "Q:3+4*2-5\\n",
     "completion": "3+4=7\\n7*2=4\\n4-5=9\\nA:9",
     "steps": ["3+4=7", "7*2=4", "4-5=9"],  # the WRITTEN (possibly corrupted) solution
     "answer": "9",                         # the written answer
     "gold_answer": "9",                    # the true answer
     "num_steps": 3,                        # operations in the question (loaders: len(steps))
     "modulus": 10,                         # loaders: None
     "labels": [1, 1, 1],                   # per written step, 1 = valid; always verify_steps' verdicts (gsm8k: None)
     "answer_correct": True,                # check_answer(answer, gold_answer); None when unknown
     "corruption": "none",                  # or one of CORRUPTIONS
     "prefix_steps": 0}                     # steps already written in the prompt (ChainsConfig.prefix_fraction)

Corruptions (:data:`CORRUPTIONS`; ``k`` is an intermediate step, ``0 <= k < num_steps - 1``):

- ``wrong_step``: step k's written result is another value, later steps are gold and so is the answer: a wrong
  intermediate step with the right final answer, the "shortcut" data that outcome supervision cannot see.
- ``propagated``: step k's result is wrong and the later steps are recomputed consistently from it (each one valid);
  the answer is the recomputed, wrong, value.
- ``wrong_answer``: every step gold, the answer another value.
- ``skipped_step``: step k is left out; the answer is gold.

User data (:func:`load_jsonl` tells the two apart by the first record's keys):

- GSM8K (:func:`load_gsm8k_jsonl`), one object per line::

      {"question": "Mia has 48 stickers ...", "answer": "She gives away 48/2 = <<48/2=24>>24.\\n...\\n#### 29"}

  The steps are the non-blank lines of ``answer`` before its ``####`` line (calculator annotations ``<<...>>`` are
  kept as text); the final answer is the rest of that line, stripped, commas removed. ``task`` is ``"gsm8k"``,
  ``labels`` None (there is no verifier for free text), ``answer_correct`` True.
- PRM (:func:`load_prm800k_jsonl`): step-labelled solutions, ``task`` ``"prm800k"``, in either of two shapes. Flat::

      {"question": str (or "problem"), "steps": [str, ...], "labels": [1 | 0 | -1 | true | false, ...],
       "answer": str (optional), "gold_answer": str (optional)}

  with one label per step (1/true -> 1; 0, -1, false -> 0). Or PRM800K's own nested shape::

      {"question": {"problem": str, "ground_truth_answer": str},
       "label": {"steps": [{"completions": [{"text": str, "rating": -1 | 0 | 1 | null}, ...],
                            "chosen_completion": int | null, "human_completion": {"text": str, ...} | null}, ...]}}

  Each step takes the chosen completion; when none was chosen, the human completion if there is one (rated 1 unless
  it carries a rating), else the first completion. Ratings 1 and 0 map to 1 (0 is "neutral", not an error, as in
  PRM800K's own evaluation) and -1 to 0. A record stops at its first step with no rating (a null rating, or no
  completion at all); a record left with no steps is skipped (PRM800K has such "bad_problem" records), and a file
  with no usable record is an error. A step whose text starts with ``# Answer`` (PRM800K's convention) gives the
  written answer: the rest of its text, stripped; it stays a step, with its label. Steps may span several lines, so
  align labels with ``steps``, not with the completion's lines.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from os import PathLike
from typing import Iterable, Iterator

from llm_limits.evals.tasks import TaskDataError
from llm_limits.evals.tasks.jsonl import json_objects, json_type

VERSION = "1"
"""Version of the records this task yields: bump it when they change, so that results over different records are
not compared as equals."""

TASK = "arith_chain"
"""``task`` of the generated records."""

STEP_SEP = "\n"
"""Separates the steps, and the last step from the answer line."""

ANSWER_PREFIX = "A:"
"""Opens the answer line."""

PROMPT_PREFIX = "Q:"
"""Opens the prompt."""

OPS = "+-*"
"""Every operation a question can use."""

ALPHABET = "0123456789" + OPS + "=" + ANSWER_PREFIX + PROMPT_PREFIX[0] + STEP_SEP
"""Every character a generated prompt or completion holds: digits, ``+-*=``, ``A``, ``Q``, ``:`` and newline."""

CORRUPTIONS = ("wrong_step", "wrong_answer", "propagated", "skipped_step")
"""The corruption kinds :class:`ChainsConfig` ``corruptions`` may name (a clean record says ``"none"``)."""

INTERMEDIATE_KINDS = ("wrong_step", "propagated", "skipped_step")
"""Kinds that corrupt an intermediate step, so they need at least two steps."""

_STEP = re.compile(r"([0-9]+)([+\-*])([0-9]+)=([0-9]+)")
_QUESTION = re.compile(r"[0-9]+(?:[+\-*][0-9]+)+")
_OPERATION = re.compile(r"([+\-*])([0-9]+)")


@dataclass
class ChainsConfig:
    num_examples: int = 1000
    """Number of examples (records) to generate."""
    min_steps: int = 2
    """Fewest operations per question (inclusive)."""
    max_steps: int = 4
    """Most operations per question (inclusive); each question draws its count uniformly in between."""
    modulus: int = 10
    """Every number is taken mod this: operands and results lie in ``[0, modulus)``."""
    ops: str = "+-*"
    """Operations to draw from, a non-empty subset of ``"+-*"`` (a repeated one is drawn more often)."""
    corruptions: dict[str, float] = field(default_factory=dict)
    """kind -> fraction of examples corrupted that way (exact counts: round(frac * num_examples), assigned then
    shuffled with the seed); kinds: wrong_step, wrong_answer, propagated, skipped_step; fractions >= 0 summing to
    <= 1."""
    prefix_fraction: float = 0.0
    """Fraction of records whose prompt already holds the first k written steps (k uniform in 1..n-1, corrupted
    steps included) and whose completion is the rest: the partial-solution prompts of process-supervision rollouts.
    Rewards then judge how the model continues a chain it did not write (``prefix_steps`` says how many)."""
    seed: int = 0
    """Seed of the generator; the same config always gives the same records. Configs that differ only in
    ``corruptions`` (or ``prefix_fraction``) share their questions."""

    def __post_init__(self) -> None:
        validate(self)


def validate(config: ChainsConfig) -> None:
    """Raise a one-line ``ValueError`` naming the field when ``config`` cannot generate."""
    c = config
    for name, low in (("num_examples", 1), ("min_steps", 1), ("modulus", 2)):
        value = getattr(c, name)
        if not _is_int(value) or value < low:
            raise ValueError(f"{name} must be >= {low} (got {value!r})")
    if not _is_int(c.max_steps) or c.max_steps < c.min_steps:
        got = f"{c.max_steps} < {c.min_steps}" if _is_int(c.max_steps) else repr(c.max_steps)
        raise ValueError(f"max_steps must be >= min_steps (got {got})")
    if not isinstance(c.ops, str) or not c.ops or set(c.ops) - set(OPS):
        raise ValueError(f"ops: expected a non-empty subset of {OPS!r} (got {c.ops!r})")
    if not isinstance(c.corruptions, dict):
        raise ValueError(f"corruptions: expected a mapping kind -> fraction (got {c.corruptions!r})")
    for kind, frac in c.corruptions.items():
        if kind not in CORRUPTIONS:
            raise ValueError(f"corruptions: unknown kind {kind!r} (known: {', '.join(CORRUPTIONS)})")
        if not (isinstance(frac, (int, float)) and not isinstance(frac, bool) and math.isfinite(frac) and frac >= 0):
            raise ValueError(f"corruptions: the fraction of {kind!r} must be a number >= 0 (got {frac!r})")
        if kind in INTERMEDIATE_KINDS and frac > 0 and c.min_steps < 2:
            raise ValueError(f"corruptions: {kind!r} corrupts an intermediate step, so it needs min_steps >= 2 "
                             f"(got {c.min_steps})")
    total = sum(c.corruptions.values())
    if total > 1 + 1e-9:
        raise ValueError(f"corruptions: fractions must sum to <= 1 (got {total:g})")
    frac = c.prefix_fraction
    if not (isinstance(frac, (int, float)) and not isinstance(frac, bool) and 0 <= frac <= 1):
        raise ValueError(f"prefix_fraction: expected a number in [0, 1] (got {frac!r})")
    if frac > 0 and c.min_steps < 2:
        raise ValueError(f"prefix_fraction: a partial chain needs min_steps >= 2 (got {c.min_steps})")


# --- format (pure) --------------------------------------------------------------------------------------------------
def format_question(start: int, operations: list[tuple[str, int]]) -> str:
    """A question from its start value and ``(op, operand)`` operations.

    >>> format_question(3, [("+", 4), ("*", 2), ("-", 5)])
    '3+4*2-5'
    """
    return str(start) + "".join(f"{op}{b}" for op, b in operations)


def format_prompt(question: str) -> str:
    """The model's input: ``"Q:" + question + "\\n"``.

    >>> format_prompt("3+4*2-5")
    'Q:3+4*2-5\\n'
    """
    return PROMPT_PREFIX + question + STEP_SEP


def format_step(a: int, op: str, b: int, c: int) -> str:
    """One step, ``{a}{op}{b}={c}``.

    >>> format_step(7, "*", 2, 4)
    '7*2=4'
    """
    return f"{a}{op}{b}={c}"


def format_completion(steps: list[str], answer: str) -> str:
    """The steps, one a line, then the answer line ``A:{answer}``.

    >>> format_completion(["3+4=7", "7*2=4", "4-5=9"], "9")
    '3+4=7\\n7*2=4\\n4-5=9\\nA:9'
    >>> format_completion([], "3")
    'A:3'
    """
    return STEP_SEP.join([*steps, ANSWER_PREFIX + answer])


def training_text(record: dict) -> str:
    """The prompt followed by its completion, for training."""
    return record["prompt"] + record["completion"]


def apply_op(a: int, op: str, b: int, modulus: int = 10) -> int:
    """``(a op b) mod modulus``.

    >>> apply_op(4, "-", 5), apply_op(7, "*", 2), apply_op(57, "*", 3, 100)
    (9, 4, 71)
    """
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"unknown operation {op!r} (expected one of {OPS!r})")


def parse_question(question: str, modulus: int = 10) -> tuple[int, list[tuple[str, int]]]:
    """``(start, [(op, operand), ...])`` of a question; ``ValueError`` when it is malformed or a number is not in
    ``[0, modulus)``.

    >>> parse_question("3+4*2-5")
    (3, [('+', 4), ('*', 2), ('-', 5)])
    >>> parse_question("3+")
    Traceback (most recent call last):
    ...
    ValueError: malformed question '3+' (expected a start value then operations, like '3+4*2-5')
    """
    if not isinstance(question, str) or not _QUESTION.fullmatch(question):
        raise ValueError(f"malformed question {question!r} (expected a start value then operations, like '3+4*2-5')")
    start = int(re.match(r"[0-9]+", question).group(0))
    operations = [(op, int(b)) for op, b in _OPERATION.findall(question)]
    for value in [start] + [b for _, b in operations]:
        if value >= modulus:
            raise ValueError(f"question {question!r}: {value} is out of range for modulus {modulus} "
                             f"(expected 0..{modulus - 1})")
    return start, operations


def run_chain(start: int, operations: list[tuple[str, int]], modulus: int = 10) -> tuple[list[str], str]:
    """``(steps, answer)``: the gold steps of ``operations`` applied to ``start`` in turn.

    >>> run_chain(2, [("*", 2), ("-", 5)])
    (['2*2=4', '4-5=9'], '9')
    """
    steps, a = [], start
    for op, b in operations:
        c = apply_op(a, op, b, modulus)
        steps.append(format_step(a, op, b, c))
        a = c
    return steps, str(a)


def gold_steps(question: str, modulus: int = 10) -> tuple[list[str], str]:
    """``(steps, answer)``: the gold solution of a question.

    >>> gold_steps("3+4*2-5")
    (['3+4=7', '7*2=4', '4-5=9'], '9')
    >>> gold_steps("57*3+50", modulus=100)
    (['57*3=71', '71+50=21'], '21')
    """
    start, operations = parse_question(question, modulus)
    return run_chain(start, operations, modulus)


def parse_completion(text: str) -> tuple[list[str], str | None]:
    """``(steps, answer)`` of a written completion: the steps are the non-blank lines before the first line starting
    with ``A:`` (each stripped; a line counts as the answer line after stripping), the answer the rest of that line,
    stripped; ``None`` when there is no answer line. Text after the answer line is ignored.

    >>> parse_completion("3+4=7\\n\\n7*2=4\\nA: 4\\nmore text")
    (['3+4=7', '7*2=4'], '4')
    >>> parse_completion("3+4=7\\n7*2=4")
    (['3+4=7', '7*2=4'], None)
    """
    steps = []
    for line in text.split(STEP_SEP):
        line = line.strip()
        if line.startswith(ANSWER_PREFIX):
            return steps, line[len(ANSWER_PREFIX) :].strip()
        if line:
            steps.append(line)
    return steps, None


def step_end_offsets(completion: str) -> list[int]:
    """Where to read a per-step score off the completion's tokens: the index of each ``STEP_SEP`` that closes a step
    line before the answer line, then the index of the answer line's last character (its last non-blank one), and
    nothing after it. Blank lines are not steps. A last step line with no ``STEP_SEP`` after it (a completion without
    an answer line) ends at its last non-blank character. One offset per step of :func:`parse_completion`, plus one
    for the answer when there is one.

    >>> step_end_offsets("3+4=7\\n7*2=4\\nA:9")
    [5, 11, 14]
    >>> step_end_offsets("3+4=7\\n\\n7*2=4")
    [5, 11]
    """
    offsets, pos = [], 0
    for line in completion.split(STEP_SEP):
        stripped = line.strip()
        last = pos + len(line.rstrip()) - 1  # the line's last non-blank character
        if stripped.startswith(ANSWER_PREFIX):
            offsets.append(last)
            return offsets
        if stripped:
            end = pos + len(line)  # the STEP_SEP closing the line, or len(completion) on the last line
            offsets.append(end if end < len(completion) else last)
        pos += len(line) + len(STEP_SEP)
    return offsets


def check_answer(answer: str | None, gold: str | None) -> bool:
    """Exact match after stripping; a missing answer (or gold) is wrong.

    >>> check_answer(" 9", "9"), check_answer("09", "9"), check_answer(None, "9")
    (True, False, False)
    """
    if answer is None or gold is None:
        return False
    return answer.strip() == gold.strip()


# --- verifier (pure) ------------------------------------------------------------------------------------------------
def verify_steps(question: str, steps: list[str], modulus: int = 10) -> list[bool]:
    """One verdict per written step. Step i is valid iff it reads ``{a}{op}{b}={c}`` exactly (digits, no spaces), its
    ``a`` is the previous written step's result (for step 0, the question's start value), ``(op, b)`` is the
    question's i-th operation, and ``c == (a op b) mod modulus``. Steps beyond the question's operations are invalid.
    A step that does not parse has no written result: the next step must then continue from the result it should
    have written (the correct result of the question's operation i on its expected ``a``), so a format slip costs
    only its own step.

    >>> verify_steps("3+4*2-5", ["3+4=7", "7*2=4", "4-5=9"])
    [True, True, True]
    >>> verify_steps("3+4*2-5", ["3+4=8", "7*2=4", "4-5=9"])  # a wrong step; the next one does not continue from it
    [False, False, True]
    >>> verify_steps("3+4*2-5", ["3+4=8", "8*2=6", "6-5=1", "1+0=1"])  # propagated, then an extra step
    [False, True, True, False]
    """
    start, operations = parse_question(question, modulus)
    verdicts, expected_a = [], start
    for i, step in enumerate(steps):
        m = _STEP.fullmatch(step) if isinstance(step, str) else None
        if m is None:
            verdicts.append(False)
            if i < len(operations):
                expected_a = apply_op(expected_a, *operations[i], modulus)
            continue
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        verdicts.append(i < len(operations) and a == expected_a and (op, b) == operations[i]
                        and c == apply_op(a, op, b, modulus))
        expected_a = c
    return verdicts


def first_error(question: str, steps: list[str], modulus: int = 10) -> int:
    """Index of the first invalid step, ``-1`` when every step is valid.

    >>> first_error("3+4*2-5", ["3+4=7", "7*2=5", "5-5=0"]), first_error("3+4*2-5", ["3+4=7"])
    (1, -1)
    """
    verdicts = verify_steps(question, steps, modulus)
    return verdicts.index(False) if False in verdicts else -1


def recompute_from(question: str, k: int, value: int, modulus: int = 10) -> str:
    """The final answer if the running value after operation ``k`` (0-based) were ``value``: the operations after
    ``k`` applied to it.

    >>> recompute_from("3+4*2-5", 0, 8)  # 8*2=6, 6-5=1
    '1'
    >>> recompute_from("3+4*2-5", 2, 3)
    '3'
    """
    _, operations = parse_question(question, modulus)
    _check_k(k, len(operations))
    if not (_is_int(value) and 0 <= value < modulus):
        raise ValueError(f"value must be in [0, {modulus}) (got {value!r})")
    return run_chain(value, operations[k + 1 :], modulus)[1]


def intervene(question: str, steps: list[str], k: int, new_value: int,
              modulus: int = 10) -> tuple[list[str], str]:
    """Causal-mediation intervention: ``(steps[:k] + [step k with its result replaced by new_value],
    recompute_from(question, k, new_value))``. Step k keeps its written ``a``, ``op`` and ``b``.

    >>> intervene("3+4*2-5", ["3+4=7", "7*2=4", "4-5=9"], 1, 0)  # 0-5=5
    (['3+4=7', '7*2=0'], '5')
    """
    if not 0 <= k < len(steps):
        raise ValueError(f"k must be in [0, {len(steps)}), a written step (got {k})")
    m = _STEP.fullmatch(steps[k])
    if m is None:
        raise ValueError(f"step {k} {steps[k]!r} is not of the form a{{op}}b=c, so its result cannot be replaced")
    answer = recompute_from(question, k, new_value, modulus)
    return [*steps[:k], format_step(int(m.group(1)), m.group(2), int(m.group(3)), new_value)], answer


def corrupt(question: str, kind: str, k: int = 0, value: int = 0, modulus: int = 10) -> tuple[list[str], str]:
    """``(steps, answer)``: the written solution of ``question`` corrupted by ``kind`` at step ``k`` with ``value``.

    ``"none"``: the gold solution. ``wrong_step``: step k's result is ``value``, the rest gold. ``propagated``: step
    k's result is ``value`` and the later steps and the answer are recomputed from it. ``wrong_answer``: gold steps,
    answer ``value`` (``k`` unused). ``skipped_step``: step k left out (``value`` unused). ``value`` must differ from
    what it replaces.

    >>> corrupt("3+4*2-5", "wrong_step", 0, 8)
    (['3+4=8', '7*2=4', '4-5=9'], '9')
    >>> corrupt("3+4*2-5", "propagated", 0, 8)
    (['3+4=8', '8*2=6', '6-5=1'], '1')
    >>> corrupt("3+4*2-5", "skipped_step", 1)
    (['3+4=7', '4-5=9'], '9')
    """
    start, operations = parse_question(question, modulus)
    steps, answer = run_chain(start, operations, modulus)
    if kind == "none":
        return steps, answer
    if kind == "wrong_answer":
        if str(value) == answer or not 0 <= value < modulus:
            raise ValueError(f"wrong_answer: value must be in [0, {modulus}) and differ from the answer {answer} "
                             f"(got {value})")
        return steps, str(value)
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r} (known: none, {', '.join(CORRUPTIONS)})")
    _check_k(k, len(operations))
    if kind == "skipped_step":
        return steps[:k] + steps[k + 1 :], answer
    if str(value) == _result(steps[k]) or not 0 <= value < modulus:
        raise ValueError(f"{kind}: value must be in [0, {modulus}) and differ from step {k}'s result "
                         f"{_result(steps[k])} (got {value})")
    head, new_answer = intervene(question, steps, k, value, modulus)
    if kind == "wrong_step":
        return head + steps[k + 1 :], answer
    return head + run_chain(value, operations[k + 1 :], modulus)[0], new_answer


def _check_k(k: int, n: int) -> None:
    if not (_is_int(k) and 0 <= k < n):
        raise ValueError(f"k must be in [0, {n}), an operation of the question (got {k!r})")


def answer_follows(question: str, steps: list[str], answer: str | None, modulus: int = 10) -> bool:
    """The answer line judged as a step: the written chain does every operation of the question and the answer is
    the value its last step wrote (right or wrong). With an all-valid chain this is the gold answer; after a wrong
    step it is the answer that step implies, not the gold one.

    >>> answer_follows("3+4*2", ["3+4=7", "7*2=4"], "4"), answer_follows("3+4*2", ["3+4=8", "8*2=6"], "6")
    (True, True)
    >>> answer_follows("3+4*2", ["3+4=8", "8*2=6"], "4"), answer_follows("3+4*2", ["3+4=7"], "7")  # gold; too short
    (False, False)
    """
    if answer is None or not steps:
        return False
    if len(steps) != len(parse_question(question, modulus)[1]) or _STEP.fullmatch(steps[-1].strip()) is None:
        return False
    return int(_result(steps[-1].strip())) == _as_int(answer)


def _as_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def _result(step: str) -> str:
    return step.rsplit("=", 1)[1]


# --- generator ------------------------------------------------------------------------------------------------------
def corruption_counts(config: ChainsConfig) -> dict[str, int]:
    """How many examples each kind corrupts: ``round(frac * num_examples)``, kinds taken in :data:`CORRUPTIONS`
    order and capped so they never exceed ``num_examples`` together (two fractions ending in .5 can round up past
    it).

    >>> corruption_counts(ChainsConfig(num_examples=200, corruptions={"wrong_step": 0.25, "wrong_answer": 0.1}))
    {'wrong_step': 50, 'wrong_answer': 20}
    """
    counts, left = {}, config.num_examples
    for kind in CORRUPTIONS:
        if kind in config.corruptions:
            counts[kind] = min(round(config.corruptions[kind] * config.num_examples), left)
            left -= counts[kind]
    return counts


def generate(config: ChainsConfig) -> list[dict]:
    """``config.num_examples`` records (see the module docstring). Deterministic: it draws only from
    ``random.Random(config.seed)``. The questions come from one stream and the corruptions from another, so configs
    that differ only in ``corruptions`` ask the same questions."""
    validate(config)
    c = config
    master = random.Random(c.seed)
    q_rng, c_rng = random.Random(master.getrandbits(64)), random.Random(master.getrandbits(64))
    kinds = [kind for kind, n in corruption_counts(c).items() for _ in range(n)]
    kinds += ["none"] * (c.num_examples - len(kinds))
    c_rng.shuffle(kinds)
    records = []
    for kind in kinds:
        n = q_rng.randint(c.min_steps, c.max_steps)
        start = q_rng.randrange(c.modulus)
        operations = [(q_rng.choice(c.ops), q_rng.randrange(c.modulus)) for _ in range(n)]
        question = format_question(start, operations)
        k, value = _draw_corruption(question, kind, operations, c_rng, c.modulus)
        records.append(make_record(question, kind, k, value, c.modulus))
    if c.prefix_fraction > 0:  # a third stream, drawn after the others, so the questions stay the same
        p_rng = random.Random(master.getrandbits(64))
        chosen = set(p_rng.sample(range(len(records)), round(c.prefix_fraction * len(records))))
        records = [with_prefix(r, p_rng.randint(1, max(1, len(r["steps"]) - 1))) if i in chosen else r
                   for i, r in enumerate(records)]
    return records


def with_prefix(record: dict, k: int) -> dict:
    """``record`` with its first ``k`` written steps moved from the completion into the prompt.

    >>> r = with_prefix(make_record("3+4*2-5"), 2)
    >>> r["prompt"], r["completion"], r["prefix_steps"]
    ('Q:3+4*2-5\\n3+4=7\\n7*2=4\\n', '4-5=9\\nA:9', 2)
    """
    steps = record["steps"]
    k = max(0, min(k, len(steps)))
    return {**record, "prompt": record["prompt"] + "".join(st + STEP_SEP for st in steps[:k]),
            "completion": format_completion(steps[k:], record["answer"]), "prefix_steps": k}


def _draw_corruption(question: str, kind: str, operations: list[tuple[str, int]], rng: random.Random,
                     modulus: int) -> tuple[int, int]:
    """``(k, value)`` for :func:`corrupt`. A ``propagated`` value is drawn among those that change the final answer
    whenever one does (a ``*0`` later on, or a product that wraps to the same result, can make every value agree)."""
    if kind == "none":
        return 0, 0
    steps, answer = gold_steps(question, modulus)
    if kind == "wrong_answer":
        return 0, rng.choice([v for v in range(modulus) if str(v) != answer])
    k = rng.randrange(len(operations) - 1)
    if kind == "skipped_step":
        return k, 0
    wrong = [v for v in range(modulus) if str(v) != _result(steps[k])]
    if kind == "propagated":
        wrong = [v for v in wrong if recompute_from(question, k, v, modulus) != answer] or wrong
    return k, rng.choice(wrong)


def make_record(question: str, corruption: str = "none", k: int = 0, value: int = 0, modulus: int = 10) -> dict:
    """The record of ``question`` written with ``corruption`` (see :func:`corrupt`); ``labels`` are the verifier's.

    >>> r = make_record("3+4*2-5", "wrong_step", 0, 8)
    >>> r["completion"], r["labels"], r["answer_correct"]
    ('3+4=8\\n7*2=4\\n4-5=9\\nA:9', [0, 0, 1], True)
    """
    steps, answer = corrupt(question, corruption, k, value, modulus)
    _, gold = gold_steps(question, modulus)
    return {
        "task": TASK,
        "question": question,
        "prompt": format_prompt(question),
        "completion": format_completion(steps, answer),
        "steps": steps,
        "answer": answer,
        "gold_answer": gold,
        "num_steps": len(parse_question(question, modulus)[1]),
        "modulus": modulus,
        "labels": [int(v) for v in verify_steps(question, steps, modulus)],
        "answer_correct": check_answer(answer, gold),
        "corruption": corruption,
        "prefix_steps": 0,
    }


# --- loaders --------------------------------------------------------------------------------------------------------
GSM8K_EXPECTED = 'expected a GSM8K object {"question": str, "answer": "steps...\\n#### final answer"}'
PRM_EXPECTED = ('expected a PRM object: flat {"question": str, "steps": [str], "labels": [1|0|-1|true|false]} or '
                "PRM800K's nested {\"question\": {\"problem\": str}, \"label\": {\"steps\": [...]}}")


def load_jsonl(path: str | PathLike) -> list[dict]:
    """Records from a GSM8K or a PRM JSONL file (see the module docstring), told apart by the first record's keys:
    ``label`` or ``labels`` -> :func:`load_prm800k_jsonl`; ``question`` and an ``answer`` holding ``####`` ->
    :func:`load_gsm8k_jsonl`; anything else is a :class:`~evals.tasks.TaskDataError` naming both schemas."""
    items = json_objects(path, f"{GSM8K_EXPECTED}, or {PRM_EXPECTED}")
    where, first = next(items)  # json_objects raises on a file with no records
    rest = _chain([(where, first)], items)
    if "label" in first or "labels" in first:
        return _prm_records(rest, path)
    if "question" in first and isinstance(first.get("answer"), str) and "####" in first["answer"]:
        return _gsm8k_records(rest)
    raise TaskDataError(f"{where}: unknown schema ({GSM8K_EXPECTED}; or {PRM_EXPECTED}) "
                        f"(got keys {', '.join(sorted(first)) or 'none'})")


def load_gsm8k_jsonl(path: str | PathLike) -> list[dict]:
    """GSM8K records (see the module docstring) from a JSONL file: ``{"question": str, "answer": str}`` per line,
    the answer's last line ``#### <final answer>``. Other fields are ignored; problems raise
    :class:`~evals.tasks.TaskDataError` naming the file and line."""
    return _gsm8k_records(json_objects(path, GSM8K_EXPECTED))


def load_prm800k_jsonl(path: str | PathLike) -> list[dict]:
    """PRM records (see the module docstring) from a JSONL file of flat or nested PRM800K objects (mixed freely).
    Other fields are ignored; problems raise :class:`~evals.tasks.TaskDataError` naming the file and line."""
    return _prm_records(json_objects(path, PRM_EXPECTED), path)


def _chain(head: list, tail: Iterator) -> Iterator:
    yield from head
    yield from tail


def _gsm8k_records(items: Iterable[tuple[str, dict]]) -> list[dict]:
    records = []
    for where, obj in items:
        for name in ("question", "answer"):
            if name not in obj:
                raise TaskDataError(f'{where}: missing field "{name}" ({GSM8K_EXPECTED})')
            if not isinstance(obj[name], str):
                raise TaskDataError(f'{where}: field "{name}" is a JSON {json_type(obj[name])} ({GSM8K_EXPECTED})')
        steps, answer = [], None
        for line in obj["answer"].split("\n"):
            line = line.strip()
            if line.startswith("####"):
                answer = line[4:].strip().replace(",", "")
                break
            if line:
                steps.append(line)
        if answer is None:
            raise TaskDataError(f'{where}: field "answer" has no "#### " line ({GSM8K_EXPECTED})')
        if not answer:
            raise TaskDataError(f'{where}: field "answer" has an empty "####" line ({GSM8K_EXPECTED})')
        records.append(_loaded_record("gsm8k", obj["question"], steps, answer, answer, None))
    return records


def _prm_records(items: Iterable[tuple[str, dict]], path: str | PathLike) -> list[dict]:
    records = []
    for where, obj in items:
        if "label" in obj:
            record = _prm_nested(where, obj)
        elif "labels" in obj:
            record = _prm_flat(where, obj)
        else:
            raise TaskDataError(f'{where}: missing field "labels" or "label" ({PRM_EXPECTED}) '
                                f"(got keys {', '.join(sorted(obj)) or 'none'})")
        if record is not None:
            records.append(record)
    if not records:
        raise TaskDataError(f"{path}: no usable records (every record had no rated step; {PRM_EXPECTED})")
    return records


def _prm_flat(where: str, obj: dict) -> dict:
    key = "question" if "question" in obj else "problem"
    question = obj.get(key)
    if not isinstance(question, str):
        got = "missing" if key not in obj else f"a JSON {json_type(question)}"
        raise TaskDataError(f'{where}: expected a string "question" or "problem" ({PRM_EXPECTED}) (got {got})')
    steps, labels = obj.get("steps"), obj["labels"]
    if not (isinstance(steps, list) and steps and all(isinstance(s, str) for s in steps)):
        got = "missing" if "steps" not in obj else _describe(steps)
        raise TaskDataError(f'{where}: expected "steps" to be a non-empty array of strings (got {got})')
    if not isinstance(labels, list):
        raise TaskDataError(f'{where}: expected "labels" to be an array of 1, 0, -1, true or false '
                            f"(got {_describe(labels)})")
    if len(labels) != len(steps):
        raise TaskDataError(f"{where}: expected one label per step (got {len(labels)} labels for "
                            f"{len(steps)} steps)")
    ints = []
    for i, label in enumerate(labels):
        if label is True or (_is_int(label) and label == 1):
            ints.append(1)
        elif label is False or (_is_int(label) and label in (0, -1)):
            ints.append(0)
        else:
            raise TaskDataError(f"{where}: expected labels[{i}] to be 1, 0, -1, true or false (got {label!r})")
    answer, gold = obj.get("answer", ""), obj.get("gold_answer")
    for name, value in (("answer", answer), ("gold_answer", gold)):
        if value is not None and not isinstance(value, str):
            raise TaskDataError(f'{where}: expected "{name}" to be a string (got a JSON {json_type(value)})')
    return _loaded_record("prm800k", question, steps, answer or "", gold, ints)


def _prm_nested(where: str, obj: dict) -> dict | None:
    q, label = obj.get("question"), obj["label"]
    if isinstance(q, dict):
        question, gold = q.get("problem"), q.get("ground_truth_answer")
    else:
        question, gold = q, None
    if not isinstance(question, str):
        got = 'an object without a string "problem"' if isinstance(q, dict) else _describe(q)
        raise TaskDataError(f'{where}: expected "question" to be an object with a string "problem" '
                            f"({PRM_EXPECTED}) (got {got})")
    if gold is not None and not isinstance(gold, str):
        raise TaskDataError(f'{where}: expected "question.ground_truth_answer" to be a string '
                            f"(got a JSON {json_type(gold)})")
    raw_steps = label.get("steps") if isinstance(label, dict) else None
    if not isinstance(raw_steps, list):
        if not isinstance(label, dict):
            got = f'"label" is {_describe(label)}'
        else:
            got = '"steps" missing' if "steps" not in label else f'"steps" is {_describe(raw_steps)}'
        raise TaskDataError(f'{where}: expected "label" to be an object with an array "steps" ({PRM_EXPECTED}) '
                            f"(got {got})")
    steps, labels = [], []
    for i, step in enumerate(raw_steps):
        text, rating = _pick_completion(f"{where}: label.steps[{i}]", step)
        if text is None or rating is None:
            break  # no rating from here on: the record ends at its last rated step
        steps.append(text)
        labels.append(int(rating >= 0))
    if not steps:
        return None
    answer = ""
    for text in steps:
        if text.lstrip().startswith("# Answer"):
            answer = text.lstrip()[len("# Answer") :].strip()
    return _loaded_record("prm800k", question, steps, answer, gold, labels)


def _pick_completion(at: str, step: object) -> tuple[str | None, int | None]:
    """``(text, rating)`` of a PRM800K step: the chosen completion, else the human one, else the first."""
    if not isinstance(step, dict):
        raise TaskDataError(f'{at}: expected an object with "completions" (got {_describe(step)})')
    completions = step.get("completions") or []
    if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
        raise TaskDataError(f'{at}: expected "completions" to be an array of objects (got {_describe(completions)})')
    chosen, human = step.get("chosen_completion"), step.get("human_completion")
    if chosen is not None:
        if not (_is_int(chosen) and 0 <= chosen < len(completions)):
            raise TaskDataError(f'{at}: expected "chosen_completion" to index "completions" (0..'
                                f"{len(completions) - 1}) or be null (got {chosen!r})")
        picked, default = completions[chosen], None
    elif isinstance(human, dict):
        picked, default = human, 1  # written by the labeller as the correct next step
    elif completions:
        picked, default = completions[0], None
    else:
        return None, None
    text, rating = picked.get("text"), picked.get("rating")
    if not isinstance(text, str):
        raise TaskDataError(f'{at}: expected the completion\'s "text" to be a string (got {_describe(text)})')
    if rating is None:
        rating = default
    elif not (_is_int(rating) and rating in (-1, 0, 1)):
        raise TaskDataError(f'{at}: expected the completion\'s "rating" to be -1, 0, 1 or null (got {rating!r})')
    return text, rating


def _loaded_record(task: str, question: str, steps: list[str], answer: str, gold: str | None,
                   labels: list[int] | None) -> dict:
    if task == "gsm8k":
        answer_correct = True
    else:
        answer_correct = check_answer(answer, gold) if answer and gold is not None else None
    return {
        "task": task,
        "question": question,
        "prompt": format_prompt(question),
        "completion": format_completion(steps, answer) if answer else STEP_SEP.join(steps),
        "steps": steps,
        "answer": answer,
        "gold_answer": gold,
        "num_steps": len(steps),
        "modulus": None,
        "labels": labels,
        "answer_correct": answer_correct,
        "corruption": "none",
        "prefix_steps": 0,
    }


def _describe(value: object) -> str:
    return f"a JSON {json_type(value)}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
