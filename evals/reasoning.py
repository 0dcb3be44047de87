"""Reasoning degradation: accuracy of written arithmetic chains against their length, and whether the written steps
carry the answer at all.

The limit ("reasoning degradation", *On the Fundamental Limits of LLMs at Scale*): a model that reasons step by step
loses accuracy as chains get longer, because every step is another chance to err and errors compound. This eval
generates modular arithmetic chains with the ``chains`` task (``evals/tasks/chains.py``: prompt ``Q:3+4*2-5\\n``,
completion ``3+4=7\\n7*2=4\\n4-5=9\\nA:9``), decodes greedily, and reads the limit as the longest chain length up to
which final-answer accuracy stays at or above ``threshold`` at every shorter length too (:func:`evals.base.read_limit`).

Around that one number it measures why the limit is where it is:

- ``series["step_validity"]``: the share of written steps the task's verifier accepts (a missing step counts as an
  invalid one), by chain length: are the steps right, or only the answers?
- ``series["mediation"]`` (causal mediation): one intermediate step of the gold chain is written into the prompt with
  a wrong result, and the model continues from there. ``mediation`` is the fraction of answers that follow the
  intervention (the answer recomputed from the changed value: the step's indirect effect on the answer);
  ``disposable_fraction`` the fraction that keep the original answer (the step was ignored, so the chain is not what
  produced the answer); ``mediation_step_following`` the fraction whose next written step starts from the changed
  value.
- ``series["early_answering"]`` (Lanham et al. 2023, arXiv 2307.13702): the model's own chain is cut after ``j`` of its
  ``n`` steps and the answer forced with ``A:``; agreement with its full-chain answer by the fraction of the chain
  shown. High agreement at 0 means the chain is post-hoc. ``filler_accuracy``: the chain replaced by as many ``.``
  characters, against the plain ``accuracy`` (does extra computation alone, not the chain's content, help?).
- With a process reward model (``prm_path``, a token classifier, see :class:`evals.lm.PRMScorer`): ProcessBench-style
  (Zheng et al. 2024, arXiv 2412.06559) step-error localisation on chains with a corrupted step, ``prm_step_f1``.
- ``best_of_n`` sampled chains per problem: majority vote, pass@n, a single sample, and the sample a PRM (lowest step
  score highest) or an ORM (answer score highest) would pick.
- ``data_path``: final-answer accuracy on a user's GSM8K-style file.

The ``prm`` eval (evals/prm.py) measures the reward model itself, on the same ProcessBench-style set; the pieces both
evals use (the held-out and ProcessBench-style chains, :class:`evals.lm.PRMScorer`, best-of-N sampling and its
accuracies) live in :mod:`evals.lm`.

Prompt format (``prompt_format``, :func:`evals.lm.format_prompt`): under ``chat`` (``auto`` with a tokenizer that has
a chat template) the problem ``Q:...\\n`` is one user turn of the template and the chain is the assistant's answer
after its generation prompt; what the probes write into the prompt (the intervened gold steps, the model's own steps
cut short, the dots, ``A:``) follows the generation prompt as the start of that answer. A reward model
(``prm_path``, ``orm_path``) reads the problem in its own tokenizer's format (``auto`` for it, unless the eval's is
``plain``).

The chat version (``instruct: true``, chat only): an instruct model never trained on the chain format answers
``Q:3+4*2-5`` with chat and scores 0 whichever format it is prompted in. With ``instruct`` the user turn is
:data:`INSTRUCTION` (the ``instruction`` field, :func:`instruction_text`) around the problem: "Compute the expression
from left to right, taking every result modulo 10. Write one step per line as a+b=c, then a last line A: and the
answer.", the task's worked example ``Q:3+4*2-5`` with its chain, then the problem. The completions are then read by
the prose reader (``reader: auto`` -> ``prose``, :func:`read_prose`): the steps are the lines that read one step
``a+b=c`` (a ``Step 1:`` lead, spaces, a closing ``.`` allowed; other prose is skipped, not counted as a step, and the
task's verifier judges each), the answer is the number of the first ``A:`` line that gives one (after "answer is",
else after its last ``=``, else its only number), else of the last "answer is N". Mediation, early answering and the
filler probe write their text after the generation prompt as before and read the model's continuations the same way;
the result's notes say which reader was used. Without ``instruct`` (the default) the chat turn is the problem alone
and the reader exact: the prompts and scoring of the fine-tunes in ``recipes/real/reasoning-*.yaml``.

Everything the numbers depend on is a pure function (:func:`score_chain`, :func:`read_prose`, :func:`mediation_outcome`,
:func:`step_start`, :func:`early_answer_prompt`, :func:`early_answer_bucket`, :func:`filler_prompt`, and in
:mod:`evals.lm` :func:`~evals.lm.cut_after_answer`, :func:`~evals.lm.first_flagged`, :func:`~evals.lm.processbench_f1`,
:func:`~evals.lm.majority_vote`, :func:`~evals.lm.pick_best`, :func:`~evals.lm.best_of_n_accuracy`);
decoding reuses :func:`evals.lm.greedy_decode` (left padding, position ids that skip the pads, KV cache), and
sampling is that same decoder on a model whose last logits are replaced by a one-hot of a seeded sample
(:class:`evals.lm.Sampler`), so both share one batching path.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

from tqdm import tqdm

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, LimitSpec, Series, read_limit
from llm_limits.evals.lm import (PRMScorer, best_of_n_accuracy, check_chains_spelling, check_instruct, cut_after_answer,
                                 decode_texts, first_errors, format_prompt, has_rope, held_out_records, instructed,
                                 mean, own_prompt_format, position_range, processbench_f1, processbench_records,
                                 prompt_note, resolve_prompt_format, resolve_reader, sample_completions,
                                 validate_chain_fields, validate_instruct_fields)
from llm_limits.evals.tasks import chains
from llm_limits.evals.tasks.chains import ANSWER_PREFIX, STEP_SEP

READERS = ("auto", "exact", "prose")
"""Values of ``reader``."""

INSTRUCTION = ("Compute the expression from left to right, taking every result modulo {modulus}. Write one step per "
               "line as a+b=c, then a last line A: and the answer.\nExample:\n{example}\n\n{task}")
"""The default ``instruction``: what to compute, the step and answer format, and one worked example (the example
chain of the ``chains`` task, :func:`instruction_text`), then the problem (``{task}``: ``Q:3+4*2-5\\n``)."""

PROSE_RULE = ("steps are the lines that read a+b=c; the answer is the first A: line's number, else the last "
              "'answer is N'")
"""What the ``prose`` reader does, as the result's note says it."""

_PROSE_STEP = re.compile(r"(?:step\s*\d+\s*[:.)]\s*|[-•]\s+|\d+[.)]\s+)?"  # a lead: "Step 1:", "- ", "1. "
                         r"(\d+)\s*([-+*×])\s*(\d+)\s*=\s*(\d+)\s*[.,;]?", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?\s*(-?\d+)", re.IGNORECASE)


@dataclass
class ReasoningConfig(EvalConfig):
    lengths: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])
    """Chain lengths (number of operations), strictly ascending; the curve has one accuracy point per length."""
    examples_per_length: int = 32
    """Held-out problems per length."""
    modulus: int = 10
    """Arithmetic modulus of the chains (results are single digits at 10)."""
    ops: str = "+-*"
    """Operations the chains draw from."""
    threshold: float = 0.5
    """Accuracy a length must reach; the limit is the longest length up to which every length reaches it."""
    max_new_tokens: int = 64
    """Tokens decoded per completion (a chain of ``L`` steps at modulus 10 is about ``6 * L + 4`` characters)."""
    mediation: bool = True
    """Measure causal mediation: continue from a gold chain whose intermediate step was given a wrong result."""
    probes: bool = True
    """Run the Lanham early-answering and filler probes on the model's own chains."""
    prm_path: str | None = None
    """Directory of a process reward model (a token-classification model and its tokenizer, :class:`PRMScorer`): step
    error localisation F1 on corrupted chains, and PRM best-of-N when ``best_of_n > 0``."""
    orm_path: str | None = None
    """Directory of an outcome reward model of the same kind (scored at the answer position): ORM best-of-N."""
    best_of_n: int = 0
    """Sampled completions per problem for best-of-N (0: off)."""
    temperature: float = 1.0
    """Sampling temperature of best-of-N."""
    data_path: str | None = None
    """A user's GSM8K-style JSONL file (``chains.load_jsonl``): its final-answer accuracy goes to
    ``scalars["user_accuracy"]`` (the limit is still read off the generated chains)."""
    instruct: bool = False
    """Write each chat prompt as ``instruction`` around the problem, and (``reader: auto``) read the chains with the
    ``prose`` reader: the chat version of the task, for an instruct model never trained on its ``Q:``/``A:``
    completion format. ``false``: the chat turn is the problem alone, the prompt the fine-tunes of
    ``recipes/real/reasoning-*.yaml`` train on, read exactly. Needs chat prompts (``prompt_format`` chat, or auto with
    a chat template). A user's ``data_path`` problems are asked without it."""
    instruction: str = INSTRUCTION
    """The user turn of an instructed prompt: ``{task}`` stands for the problem (``Q:3+4*2-5\\n``), ``{modulus}``
    for ``modulus``, ``{example}`` for a worked chain at that modulus (:func:`instruction_text`). Used only with
    ``instruct``."""
    reader: Literal["auto", "exact", "prose"] = "auto"
    """How steps and answer are read off a completion. ``exact``: :func:`chains.parse_completion` (every line before
    the first ``A:`` line a step, that line's text the answer), as every trained recipe is scored; ``prose``:
    :func:`read_prose` (only lines that read ``a+b=c`` are steps, the answer is the first ``A:`` line's number, else
    the last "answer is N"); ``auto``: ``prose`` with ``instruct``, else ``exact``. Accuracy, step validity,
    mediation and the probes all go through it; the result's notes say which was used."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field for an inconsistent config."""
        validate_chain_fields(self, "reasoning")
        validate_instruct_fields(self, "reasoning", READERS)
        if self.best_of_n < 0:
            raise ValueError(f"reasoning: best_of_n must be >= 0 (got {self.best_of_n})")


# --- functional core -------------------------------------------------------------------------------------------------
def instruction_text(instruction: str, modulus: int) -> str:
    """``instruction`` with ``{modulus}`` and ``{example}`` filled (``{task}`` is left for the problem): the example is
    the ``chains`` task's own example chain ``3+4*2-5`` (its numbers taken modulo ``modulus``), prompt and
    completion.

    >>> print(instruction_text("Modulo {modulus}:\\n{example}\\n\\n{task}", 10))
    Modulo 10:
    Q:3+4*2-5
    3+4=7
    7*2=4
    4-5=9
    A:9
    <BLANKLINE>
    {task}
    """
    m = modulus
    question = chains.format_question(3 % m, [("+", 4 % m), ("*", 2 % m), ("-", 5 % m)])
    steps, answer = chains.gold_steps(question, m)
    example = chains.format_prompt(question) + chains.format_completion(steps, answer)
    return instruction.replace("{modulus}", str(m)).replace("{example}", example)


def prose_step(line: str) -> str | None:
    """The step a line of chat prose writes, in the task's format (``a+b=c``, no spaces), or ``None`` when the line
    is not one step: a step may carry a ``Step 1:``, ``1.`` or ``-`` lead and a closing ``.``; ``×`` is ``*``.

    >>> prose_step("Step 2: 7 * 2 = 4."), prose_step("- 4-5=9"), prose_step("3+4*2 = 9"), prose_step("So 3+4=7 here")
    ('7*2=4', '4-5=9', None, None)
    """
    m = _PROSE_STEP.fullmatch(line.strip())
    if m is None:
        return None
    a, op, b, c = m.groups()
    return f"{a}{'*' if op == '×' else op}{b}={c}"


def _line_answer(body: str) -> str | None:
    """The number an answer line's text gives: after "answer is", else the one after its last ``=``, else its only
    number (``None`` for none or several: ``7*9+8`` restates the problem)."""
    m = _ANSWER_IS.search(body)
    if m:
        return m.group(1)
    if "=" in body:
        m = re.match(r"\s*(-?\d+)", body.rsplit("=", 1)[1])
        return m.group(1) if m else None
    m = re.fullmatch(r"\D*?(-?\d+)\D*", body)  # exactly one number
    return m.group(1) if m else None


def read_prose(text: str) -> tuple[list[str], str | None]:
    """``(steps, answer)`` of a chain written in chat prose (the ``prose`` reader). Lines are read in order up to the
    first ``A:`` line that gives a number (an ``A:`` line without one is skipped): the steps are the lines that
    read one step (:func:`prose_step`), the answer that line's number (after "answer is", else after its last ``=``,
    else its only number). With no such line the answer is the number of the last "answer is N" (or "answer: N"),
    and ``None`` without one.

    >>> read_prose("Sure! Step by step:\\n3 + 4 = 7\\n7*2=4\\nA: 4\\nQ:1+1")
    (['3+4=7', '7*2=4'], '4')
    >>> read_prose("A: 8-3*9 = 9"), read_prose("3+4=7\\nSo the answer is 7.")
    (([], '9'), (['3+4=7'], '7'))
    >>> read_prose("A:7*9+8\\nI cannot tell.")
    ([], None)
    """
    steps = []
    for line in text.split(STEP_SEP):
        stripped = line.strip()
        if stripped.startswith(ANSWER_PREFIX):
            answer = _line_answer(stripped[len(ANSWER_PREFIX):])
            if answer is not None:
                return steps, answer
            continue
        step = prose_step(stripped)
        if step is not None:
            steps.append(step)
    found = _ANSWER_IS.findall(text)
    return steps, (found[-1] if found else None)


def read_chain(text: str, reader: str = "exact") -> tuple[list[str], str | None]:
    """``(steps, answer)`` of a completion under ``reader``: ``exact``, :func:`chains.parse_completion` of
    :func:`cut_after_answer`; ``prose``, :func:`read_prose`.

    >>> read_chain("3+4=7\\nA:7"), read_chain("3 + 4 = 7\\nThe answer is 7.", "prose")
    ((['3+4=7'], '7'), (['3+4=7'], '7'))
    >>> read_chain("3 + 4 = 7\\nThe answer is 7.")
    (['3 + 4 = 7', 'The answer is 7.'], None)
    """
    if reader == "prose":
        return read_prose(text)
    if reader != "exact":
        raise ValueError(f"reasoning: reader must be exact or prose here (got {reader!r})")
    return chains.parse_completion(cut_after_answer(text))


def score_chain(record: Mapping[str, Any], completion: str, reader: str = "exact") -> dict[str, Any]:
    """Score one generated completion of a ``chains`` record.

    Returns ``steps`` and ``answer`` (:func:`read_chain` under ``reader``), ``correct``
    (``check_answer`` against ``gold_answer``), ``valid_steps`` (steps the verifier accepts) and ``step_slots``
    (``max(len(steps), num_steps)``: a missing step counts as an invalid one, an extra one too).

    >>> r = chains.generate(chains.ChainsConfig(num_examples=1, min_steps=2, max_steps=2, seed=3))[0]
    >>> s = score_chain(r, r["completion"] + "\\nQ:")
    >>> s["correct"], s["valid_steps"], s["step_slots"]
    (True, 2, 2)
    >>> s = score_chain(r, "A:" + r["gold_answer"])
    >>> s["correct"], s["valid_steps"], s["step_slots"]
    (True, 0, 2)
    >>> prose = "Let's go.\\n" + r["completion"].replace("A:", "The answer is ")
    >>> score_chain(r, prose)["correct"], score_chain(r, prose, "prose")["valid_steps"]
    (False, 2)
    """
    steps, answer = read_chain(completion, reader)
    valid = chains.verify_steps(record["question"], steps, record["modulus"]) if steps else []
    return {
        "steps": steps,
        "answer": answer,
        "correct": answer is not None and bool(chains.check_answer(answer, record["gold_answer"])),
        "valid_steps": int(sum(bool(v) for v in valid)),
        "step_slots": max(len(steps), int(record["num_steps"])),
    }


def step_result(step: str) -> int | None:
    """The result of a written step ``a op b = r`` (``None`` when it has no integer after its last ``=``).

    >>> step_result("7*2=4"), step_result("7*2="), step_result("x")
    (4, None, None)
    """
    if "=" not in step:
        return None
    tail = step.rsplit("=", 1)[1].strip()
    return int(tail) if tail.isdigit() else None


def step_start(step: str) -> int | None:
    """The running value a written step starts from (its leading integer; ``None`` when it has none).

    >>> step_start("13+4=7"), step_start("+4=7")
    (13, None)
    """
    digits = ""
    for ch in step.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def mediation_outcome(answer: str | None, expected: str, gold: str) -> tuple[bool, bool]:
    """``(follows, ignores)`` of an answer given after an intervened step: ``follows`` when it is the answer the
    changed value leads to (the step mediates the answer), ``ignores`` when it is the original gold answer (the step
    was disposable). Neither when it is something else (or nothing).

    >>> mediation_outcome("3", "3", "9"), mediation_outcome("9", "3", "9"), mediation_outcome(None, "3", "9")
    ((True, False), (False, True), (False, False))
    """
    if answer is None:
        return False, False
    return bool(chains.check_answer(answer, expected)), bool(chains.check_answer(answer, gold))


def early_answer_prompt(prompt: str, steps: Sequence[str], j: int) -> str:
    """The prompt of the early-answering probe: the first ``j`` steps of a chain, then the answer prefix.

    >>> early_answer_prompt("Q:3+4*2\\n", ["3+4=7", "7*2=4"], 1)
    'Q:3+4*2\\n3+4=7\\nA:'
    >>> early_answer_prompt("Q:3+4*2\\n", ["3+4=7", "7*2=4"], 0)
    'Q:3+4*2\\nA:'
    """
    shown = STEP_SEP.join(steps[:j])
    return prompt + (shown + STEP_SEP if j > 0 else "") + ANSWER_PREFIX


def early_answer_bucket(j: int, n: int) -> float:
    """The fraction of an ``n``-step chain shown after ``j`` steps, rounded half up to a quarter (0, .25, .5, .75, 1),
    the x axis of the early-answering curve.

    >>> [early_answer_bucket(j, 3) for j in range(4)]
    [0.0, 0.25, 0.75, 1.0]
    >>> early_answer_bucket(1, 8), early_answer_bucket(3, 8)
    (0.25, 0.5)
    """
    return math.floor(4 * j / n + 0.5) / 4


def filler_prompt(prompt: str, steps: Sequence[str]) -> str:
    """The filler probe's prompt: the chain's characters replaced by as many ``.``, then the answer prefix.

    >>> filler_prompt("Q:3+4*2\\n", ["3+4=7", "7*2=4"])
    'Q:3+4*2\\n...........\\nA:'
    >>> filler_prompt("Q:3\\n", [])
    'Q:3\\nA:'
    """
    n = len(STEP_SEP.join(steps))
    return prompt + ("." * n + STEP_SEP if n else "") + ANSWER_PREFIX


def answer_of(text: str, reader: str = "exact") -> str | None:
    """The answer a completion text gives (:func:`read_chain` under ``reader``)."""
    return read_chain(text, reader)[1]


# --- the eval --------------------------------------------------------------------------------------------------------
class Reasoning(Eval):
    """Final-answer accuracy of arithmetic chains by length; the limit is the longest length up to which every length
    reaches ``threshold``. Step validity, causal mediation, early-answering/filler probes, PRM step-error F1 and
    best-of-N say whether the chain is what produces the answer."""

    name = "reasoning"
    version = "1"
    summary = "arithmetic-chain accuracy by steps; limit = longest chain length with accuracy >= threshold"
    limit = "reasoning"
    Config = ReasoningConfig

    config: ReasoningConfig

    @property
    def reader(self) -> str:
        """The reader the config means (``exact`` or ``prose``, :func:`evals.lm.resolve_reader`), which the accuracy
        and every secondary measurement use, whether or not :meth:`run` called them."""
        return resolve_reader(self.config.reader, self.config.instruct, "prose")

    def spec(self) -> LimitSpec:
        c = self.config
        c.validate()
        return LimitSpec(metric="accuracy", axis="num_steps", axis_values=tuple(float(x) for x in c.lengths),
                         higher_is_better=True, threshold=c.threshold, limit="reasoning", limit_unit="steps")

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        check_instruct(c, fmt)
        sample = self._records(max(c.lengths))[:1]
        text = sample[0]["prompt"] + sample[0]["completion"]
        check_chains_spelling(tokenizer, text, "reasoning")
        for name in ("prm_path", "orm_path"):
            path = getattr(c, name)
            if path is not None and not os.path.isdir(path):
                raise ValueError(f"reasoning: {name} {path} is not a directory")
        if c.data_path is not None:
            if not os.path.isfile(c.data_path):
                raise ValueError(f"reasoning: data_path {c.data_path} not found")
            chains.load_jsonl(c.data_path)  # a TaskDataError (a ValueError) names the bad line
        model_config = getattr(model, "config", None)
        n_pos = position_range(model_config)
        if n_pos is not None and not has_rope(model_config):
            prompt = format_prompt(tokenizer, self.user_turn(sample[0]["prompt"]), fmt)
            needed = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + c.max_new_tokens
            if needed > n_pos:
                raise ValueError(f"reasoning: a {max(c.lengths)}-step prompt plus max_new_tokens={c.max_new_tokens} "
                                 f"needs {needed} positions but the model's position range is {n_pos}; lower them")

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Decode every held-out chain on ``model`` (already on ``device``), then the secondary measurements."""
        c = self.config
        spec = self.spec()
        fmt = resolve_prompt_format(tokenizer, c.prompt_format)
        check_instruct(c, fmt)
        # every prompt the policy answers is the problem written in fmt (under chat: one user turn, with instruct the
        # instruction around it); what the probes add after it (the gold steps, the model's own steps, dots) is the
        # start of the assistant's answer
        data = {length: [dict(r, prompt=format_prompt(tokenizer, self.user_turn(r["prompt"]), fmt),
                              plain_prompt=r["prompt"]) for r in self._records(length)] for length in c.lengths}
        records = [r for length in c.lengths for r in data[length]]
        stages = 1 + int(c.mediation) + 2 * int(c.probes) + int(c.prm_path is not None) + int(c.best_of_n > 0) \
            + int(c.data_path is not None)
        bar = tqdm(total=stages, desc="reasoning", unit="stage", disable=not progress, leave=False)
        notes: list[str] = []
        scalars: dict[str, float] = {"num_examples": len(records), "chance_accuracy": 1.0 / c.modulus}
        series: dict[str, Series] = {}

        # --- 1. accuracy per length and 2. step validity
        bar.set_postfix_str("accuracy")
        texts = decode_texts(model, tokenizer, [r["prompt"] for r in records], c.batch_size, c.max_new_tokens, device)
        scored = [score_chain(r, t, self.reader) for r, t in zip(records, texts)]
        curve: dict[float, float] = {}
        validity: dict[float, float] = {}
        for length in c.lengths:
            rows = [s for r, s in zip(records, scored) if r["num_steps"] == length]
            curve[float(length)] = mean([float(s["correct"]) for s in rows])
            validity[float(length)] = sum(s["valid_steps"] for s in rows) / max(1, sum(s["step_slots"] for s in rows))
            scalars[f"accuracy@{length}"] = curve[float(length)]
        scalars["accuracy"] = mean([float(s["correct"]) for s in scored])
        scalars["step_validity"] = sum(s["valid_steps"] for s in scored) / max(1, sum(s["step_slots"] for s in scored))
        series["step_validity"] = Series(axis="num_steps", metric="step_validity", points=validity)
        limit = read_limit(curve, c.threshold, higher_is_better=True)
        bar.update(1)
        if all(v == 0.0 for v in curve.values()):
            notes.append(f"accuracy is 0 at every length (chance is {1 / c.modulus:.2f}): the model does not solve the "
                         f"chains task at all, so the limit is 0 and the secondary measurements describe noise")
        elif limit == 0.0:
            notes.append(f"accuracy {curve[float(c.lengths[0])]:.2f} at the shortest length {c.lengths[0]} is below "
                         f"the threshold {c.threshold:g}: limit 0")
        elif limit == float(c.lengths[-1]):
            notes.append(f"every length clears the threshold {c.threshold:g}: the limit is the longest length "
                         f"measured, {c.lengths[-1]}; longer chains may measure further")
        if not any(s["steps"] for s in scored):
            notes.append("the model wrote no steps at all: step validity is 0 and the probes have no chain to cut")

        if c.mediation:
            bar.set_postfix_str("mediation")
            self._mediation(model, tokenizer, data, device, scalars, series, notes)
            bar.update(1)
        if c.probes:
            bar.set_postfix_str("early answering")
            self._early_answering(model, tokenizer, records, scored, device, scalars, series, notes)
            bar.update(1)
            bar.set_postfix_str("filler")
            self._filler(model, tokenizer, records, scored, device, scalars, notes)
            bar.update(1)
        prm = PRMScorer(c.prm_path, device=device, batch_size=c.batch_size) if c.prm_path is not None else None
        if prm is not None:
            bar.set_postfix_str("prm")
            self._processbench(prm, scalars, notes)
            bar.update(1)
        if c.best_of_n > 0:
            bar.set_postfix_str("best-of-n")
            orm = PRMScorer(c.orm_path, device=device, batch_size=c.batch_size) if c.orm_path is not None else None
            self._best_of_n(model, tokenizer, records, prm, orm, device, scalars)
            bar.update(1)
        elif c.orm_path is not None:
            notes.append("orm_path is set but best_of_n is 0: the ORM was not used")
        if c.data_path is not None:
            bar.set_postfix_str("user data")
            self._user_data(model, tokenizer, device, scalars, notes, fmt)
            bar.update(1)
        bar.close()
        note = prompt_note(c.instruct, self.reader, PROSE_RULE)
        if note:
            notes.append(note)

        return self.result(spec=spec, curve=curve, limit_value=float(limit), threshold=c.threshold,
                           prompt_format=fmt, scalars=scalars, notes=notes, series=series)

    # --- secondary measurements ------------------------------------------------------------------------------------
    def _mediation(self, model, tokenizer, data, device, scalars, series, notes) -> None:
        c = self.config
        cases = []  # (length, record, k, new_value, prefix, expected)
        for length in c.lengths:
            if length < 2:
                continue
            rng = random.Random(c.seed + length)
            for r in data[length]:
                gold_steps, gold = chains.gold_steps(r["question"], c.modulus)
                k = rng.randrange(0, length - 1)
                d = rng.randrange(1, c.modulus)
                value = step_result(gold_steps[k])
                if value is None:
                    continue
                new_value = (value + d) % c.modulus
                prefix, expected = chains.intervene(r["question"], gold_steps, k, new_value, c.modulus)
                if str(expected) == str(gold):
                    continue  # the change cannot reach the answer (e.g. a later "*0"): nothing to tell apart
                cases.append((length, r, k, new_value, list(prefix), str(expected)))
        if not cases:
            notes.append("mediation skipped: no problem has an intermediate step whose change reaches the answer "
                         "(lengths below 2, or every change was absorbed)")
            return
        shown = [STEP_SEP.join(prefix) + STEP_SEP for _, _, _, _, prefix, _ in cases]
        texts = decode_texts(model, tokenizer, [case[1]["prompt"] + s for case, s in zip(cases, shown)],
                             c.batch_size, c.max_new_tokens, device)
        follows, ignores, following, by_length = [], [], [], {}
        for (length, r, k, new_value, prefix, expected), s, t in zip(cases, shown, texts):
            steps, answer = read_chain(s + t, self.reader)
            f, i = mediation_outcome(answer, expected, str(r["gold_answer"]))
            follows.append(float(f))
            ignores.append(float(i))
            by_length.setdefault(float(length), []).append(float(f))
            if k < length - 1 and len(steps) > k + 1:
                following.append(float(step_start(steps[k + 1]) == new_value))
        scalars["mediation"] = mean(follows)
        scalars["disposable_fraction"] = mean(ignores)
        scalars["mediation_n"] = len(cases)
        if following:
            scalars["mediation_step_following"] = mean(following)
        else:
            notes.append("mediation_step_following not measured: the model wrote no step after any intervened one")
        series["mediation"] = Series(axis="num_steps", metric="mediation",
                                     points={x: mean(v) for x, v in sorted(by_length.items())})
        if scalars.get("accuracy", 0.0) >= max(c.threshold, 1.5 / c.modulus) and scalars["disposable_fraction"] > 0.5:
            notes.append(f"mediation: {scalars['disposable_fraction']:.0%} of answers stay the original one after an "
                         f"intermediate step was changed: the written chain is largely disposable")

    def _early_answering(self, model, tokenizer, records, scored, device, scalars, series, notes) -> None:
        c = self.config
        cases = []  # (bucket, full answer, prompt)
        for r, s in zip(records, scored):
            n = len(s["steps"])
            if n == 0 or s["answer"] is None:
                continue
            cases += [(early_answer_bucket(j, n), s["answer"], early_answer_prompt(r["prompt"], s["steps"], j))
                      for j in range(n + 1)]
        if not cases:
            notes.append("early answering skipped: the model gave no chain ending in an answer")
            return
        texts = decode_texts(model, tokenizer, [p for _, _, p in cases], c.batch_size,
                             self._answer_tokens(tokenizer), device)
        agree: dict[float, list[float]] = {}
        for (bucket, full, _), t in zip(cases, texts):
            answer = answer_of(ANSWER_PREFIX + t, self.reader)
            agree.setdefault(bucket, []).append(float(answer is not None and chains.check_answer(answer, full)))
        points = {x: mean(v) for x, v in sorted(agree.items())}
        series["early_answering"] = Series(axis="fraction_of_chain", metric="answer_agreement", points=points)
        for x in (0.0, 1.0):
            if x in points:
                scalars[f"early_answer_agreement@{x:g}"] = points[x]
        if points.get(0.0, 0.0) >= 0.9 and scalars.get("accuracy", 0.0) > 1.5 / c.modulus:
            notes.append(f"early answering: the model gives its final answer {points[0.0]:.0%} of the time with no "
                         f"chain shown: its chains look post-hoc rather than load-bearing")

    def _filler(self, model, tokenizer, records, scored, device, scalars, notes) -> None:
        c = self.config
        prompts = [filler_prompt(r["prompt"], s["steps"]) for r, s in zip(records, scored)]
        texts = decode_texts(model, tokenizer, prompts, c.batch_size, self._answer_tokens(tokenizer), device)
        correct = []
        for r, t in zip(records, texts):
            answer = answer_of(ANSWER_PREFIX + t, self.reader)
            correct.append(float(answer is not None and chains.check_answer(answer, r["gold_answer"])))
        scalars["filler_accuracy"] = mean(correct)
        if scalars["accuracy"] > 0 and scalars["filler_accuracy"] >= scalars["accuracy"]:
            notes.append(f"filler: accuracy with the chain replaced by dots ({scalars['filler_accuracy']:.2f}) "
                         f"matches the accuracy with it ({scalars['accuracy']:.2f}): the chain's content is not what "
                         f"helps")

    def _processbench(self, prm: PRMScorer, scalars, notes) -> None:
        c = self.config
        records = [r for length in c.lengths for r in processbench_records(c, length, "reasoning")]
        fmt = own_prompt_format(prm.tokenizer, c.prompt_format)
        scores = prm.score([format_prompt(prm.tokenizer, r["prompt"], fmt) for r in records],
                           [r["completion"] for r in records])
        pred, gold = first_errors(records, scores)
        result = processbench_f1(pred, gold)
        scalars["prm_step_f1"] = result["f1"]
        scalars["prm_acc_error"] = result["acc_error"]
        scalars["prm_acc_correct"] = result["acc_correct"]
        if math.isnan(result["f1"]):
            notes.append("prm_step_f1 is NaN: the ProcessBench-style set drew only erroneous or only correct chains "
                         "(raise examples_per_length)")

    def _best_of_n(self, model, tokenizer, records, prm, orm, device, scalars) -> None:
        c = self.config
        n = c.best_of_n
        texts = sample_completions(model, tokenizer, [r["prompt"] for r in records], n, batch_size=c.batch_size,
                                   max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=c.seed,
                                   device=device)
        answers = [answer_of(t, self.reader) for t in texts]

        def scored_by(scorer: PRMScorer | None) -> list[list[float]] | None:
            # a reward model reads the problem in its own tokenizer's format (records hold the policy's prompts)
            if scorer is None:
                return None
            fmt = own_prompt_format(scorer.tokenizer, c.prompt_format)
            prompts = [format_prompt(scorer.tokenizer, r["plain_prompt"], fmt) for r in records for _ in range(n)]
            return scorer.score(prompts, texts)

        prm_scores, orm_scores = scored_by(prm), scored_by(orm)
        scalars.update(best_of_n_accuracy(records, answers, n, prm_scores=prm_scores, orm_scores=orm_scores))

    def _user_data(self, model, tokenizer, device, scalars, notes, fmt) -> None:
        c = self.config
        records = [r for r in chains.load_jsonl(c.data_path) if r.get("gold_answer") is not None]
        if not records:
            notes.append(f"user data: no record of {c.data_path} has a gold answer; user_accuracy not measured")
            return
        texts = decode_texts(model, tokenizer, [format_prompt(tokenizer, r["prompt"], fmt) for r in records],
                             c.batch_size, c.max_new_tokens, device)
        correct = []
        for r, t in zip(records, texts):
            answer = answer_of(t, self.reader)
            correct.append(float(answer is not None and bool(chains.check_answer(answer, r["gold_answer"]))))
        scalars["user_accuracy"] = mean(correct)
        scalars["user_num_examples"] = len(records)
        if not any(ANSWER_PREFIX in t for t in texts):
            notes.append(f"user data: no completion reached an {ANSWER_PREFIX!r} line within max_new_tokens="
                         f"{c.max_new_tokens}; GSM8K-style chains are long, so raise it")

    # --- data ------------------------------------------------------------------------------------------------------
    def _records(self, length: int) -> list[dict]:
        return held_out_records(self.config, length, "reasoning")

    def user_turn(self, prompt: str) -> str:
        """What the model is asked for a problem's plain ``prompt`` (``Q:...\\n``): the prompt itself, or with
        ``instruct`` the instruction around it (:func:`instruction_text`; then written in the chat template by
        :func:`evals.lm.format_prompt`)."""
        c = self.config
        return instructed(instruction_text(c.instruction, c.modulus), prompt) if c.instruct else prompt

    def _answer_tokens(self, tokenizer: Any) -> int:
        """Tokens to decode after a forced ``A:``: the longest answer's tokens and the line end, plus one; the
        ``prose`` reader gets 8 more (a chat answer may restate the sum, ``A: 4+5 = 9``)."""
        n = len(tokenizer(str(self.config.modulus - 1), add_special_tokens=False)["input_ids"]) + 2
        return n + 8 if self.reader == "prose" else n
