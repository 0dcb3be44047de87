"""The retrieval eval (evals/retrieval.py): its metrics with scripted answerers (exact values computed from the
contexts the eval built), its config validation and check(), and the real run on an untrained tiny llama."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_limits import evals
from llm_limits.evals import EVALS, EvalResult, LimitSpec, read_limit
from llm_limits.evals.base import FieldError
from llm_limits.evals.lm import KB_ECHO, answer_of, contained_answer
from llm_limits.evals.retrieval import INSTRUCTION, Retrieval, RetrievalConfig, arrange, first_fit, limit_floor
from llm_limits.evals.tasks import kb
from llm_limits.trainers.build.tokenizers import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTED = {"examples": 48, "num_entities": 60}
"""Scripted answerers cost nothing per question: enough questions for the rates to mean something."""

TINY = {"examples": 4, "num_entities": 30, "distractors": [0, 2], "budgets": [32, 64], "position_distractors": 2,
        "poison_counts": [0, 1], "poison_distractors": 1, "negative_distractors": 2, "max_new_tokens": 8,
        "batch_size": 8}
"""The real run: 4 questions, 2 + 2 + 3 + 2 + 1 contexts each (36 prompts of at most ~110 characters)."""


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The char tokenizer with a small chat template: ``<user>\\n{prompt}<assistant>\\n``."""
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>\n{% endif %}")
    return tok


def tiny_llama(vocab_size: int, positions: int = 512):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=positions))


# --- scripted answerers: functions of the prompt text ----------------------------------------------------------------
def passages_of(prompt: str) -> list[str]:
    return [line[len(kb.PASSAGE_PREFIX):] for line in prompt.split("\n") if line.startswith(kb.PASSAGE_PREFIX)]


def value_of(passage: str) -> str:
    """``home of Vokar is teln.`` -> ``teln``."""
    return passage.rsplit(" is ", 1)[1].rstrip(".")


def copy_passage(index: int):
    """Answers the value of the passage at ``index`` of the prompt (``unknown`` with no passage)."""
    def answer(model, tokenizer, prompts, device="cpu"):
        return [f"A:{value_of(p[index])}" if (p := passages_of(q)) else f"A:{kb.ABSTAIN}" for q in prompts]
    return answer


def reader(model, tokenizer, prompts, device="cpu"):
    """A perfect reader: follows the question's chain through the passages; ``conflict`` when they disagree,
    ``unknown`` when a hop is missing. It writes evidence first and another question after its answer, which the
    scoring must ignore."""
    out = []
    for prompt in prompts:
        question = next(line for line in prompt.split("\n") if line.startswith(kb.QUESTION_PREFIX))[2:-1]
        words = question.split(" of ")
        entity, hops = words[-1], words[:-1][::-1]  # "home of boss of X" -> X, [boss, home]
        values: set[str] = {entity}
        for attribute in hops:
            values = {value_of(p) for p in passages_of(prompt) for e in values
                      if p.startswith(f"{attribute} of {e} is ")}
        answer = kb.ABSTAIN if not values else kb.CONFLICT if len(values) > 1 else values.pop()
        out.append(f"E:none\nA:{answer}\nQ:{question}\nA:wrong")
    return out


def chatty(answerer):
    """The answers of ``answerer`` written as a chat model would: the value inside a sentence, ``unknown`` as "the
    passages do not say", ``conflict`` as "they conflict". Only the ``contains`` reader can read them."""
    def answer(model, tokenizer, prompts, device="cpu"):
        out = []
        for prompt, text in zip(prompts, answerer(model, tokenizer, prompts, device)):
            value = answer_of(text)
            question = next(line for line in prompt.split("\n") if line.startswith(kb.QUESTION_PREFIX))[2:-1]
            out.append("I am sorry, the passages do not say." if value == kb.ABSTAIN
                       else "Two of the passages conflict." if value == kb.CONFLICT
                       else f"Sure! From the passages, the {question[:-1]} is {value.upper()}.\nAnything else?")
        return out
    return answer


def echo(model, tokenizer, prompts, device="cpu"):
    """Repeats every passage of the prompt, in order: never an answer."""
    return ["\n".join(f"{kb.PASSAGE_PREFIX}{p}" for p in passages_of(q)) for q in prompts]


def always(text: str):
    return lambda model, tokenizer, prompts, device="cpu": [text] * len(prompts)


def scripted(answerer, tokenizer, **kwargs) -> tuple[Retrieval, EvalResult]:
    ev = Retrieval(RetrievalConfig(**{**SCRIPTED, **kwargs}))
    ev.answer = answerer
    return ev, ev.run(None, tokenizer, progress=False)


def cases_of(ev: Retrieval, tokenizer, part: str, x: float):
    cases, _ = ev.contexts(tokenizer)
    return [c for c in cases if c.part == part and c.x == float(x)]


def mean(flags) -> float:
    flags = list(flags)
    return sum(map(bool, flags)) / len(flags)


# --- pure pieces -----------------------------------------------------------------------------------------------------
def test_pure_pieces():
    assert first_fit([5, 5, 5], 10) == [0, 1] and first_fit([], 10) == [] and first_fit([3, 9, 2], 5) == [0, 2]
    assert answer_of("E:none\nA: Teln \nQ:x?\nA:no") == "Teln" and answer_of("E:none") is None
    assert limit_floor([0, 4]) == -1.0 and limit_floor([1]) == 0.0
    # one oracle among n distractors: every slot 0..n is used, about equally often
    counts = [0] * 5
    for seed in range(2000):
        passages, slots = arrange(["O"], list("abcd"), random.Random(seed))
        assert [p for p in passages if p != "O"] == list("abcd") and passages[slots[0]] == "O"
        counts[slots[0]] += 1
    assert min(counts) > 300
    passages, slots = arrange(["O1", "O2"], ["a"], random.Random(0))
    assert sorted(passages) == ["O1", "O2", "a"] and [passages[s] for s in slots] == ["O1", "O2"]


def test_registered_and_spec():
    assert EVALS["retrieval"] is Retrieval and evals.Retrieval is Retrieval
    assert Retrieval.limit == "retrieval" and Retrieval.summary
    assert Retrieval().spec() == LimitSpec(metric="accuracy", axis="distractors", axis_values=(0.0, 2.0, 4.0, 8.0),
                                           higher_is_better=True, threshold=0.5, limit="retrieval",
                                           limit_unit="distractors")
    assert RetrievalConfig().kb_seed == 1_000_003 != kb.KBConfig().kb_seed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"distractors": []}, "distractors must not be empty"),
        ({"distractors": [2, 1]}, r"distractors must be strictly ascending \(got \[2, 1\]\)"),
        ({"distractors": [-1, 2]}, "distractors must be integers >= 0"),
        ({"budgets": [0, 8]}, "budgets must be integers >= 1"),
        ({"poison_counts": [1, 1]}, "poison_counts must be strictly ascending"),
        ({"examples": 0}, "examples must be >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"negative_distractors": -1}, "negative_distractors must be >= 0"),
        ({"threshold": 1.5}, r"threshold must be within \[0, 1\]"),
        ({"two_hop_fraction": 2.0}, r"two_hop_fraction must be within \[0, 1\]"),
        ({"distractor_mode": "nearest"}, "distractor_mode must be one of retrieved, same_attribute, random"),
        ({"retriever": "tfidf"}, "retriever must be one of bm25, dense, hybrid"),
        ({"zipf": -1.0}, r"^retrieval: zipf must be >= 0"),
        ({"attributes": ["boss"]}, "attributes: 'boss' is the two-hop bridge"),
        ({"num_entities": 5, "distractor_mode": "same_attribute"}, "leaves 4 other entities"),
        ({"reader": "regex"}, r"^retrieval: reader must be one of auto, exact, contains \(got 'regex'\)$"),
        ({"instruction": "Answer it."}, r"^retrieval: instruction must contain \{task\}, where the task's prompt "
                                         r"goes$"),
        ({"instruct": True, "prompt_format": "plain"}, r"^retrieval: instruct writes chat prompts, but prompt_format "
                                                       r"is plain; use auto or chat, or leave instruct false$"),
        ({"instruct": "yes"}, r"^retrieval: instruct must be true or false \(got 'yes'\)$"),
    ],
)
def test_invalid_config_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        RetrievalConfig(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("retrieval: ")


# --- scripted answerers ----------------------------------------------------------------------------------------------
def test_copy_first_answerer_reads_slot_zero(tokenizer):
    """Accuracy 1 with the oracle alone; with n distractors, exactly the questions whose first passage carries the
    gold value (the oracle drawn at slot 0, about 1 in n + 1, or a distractor with the same value)."""
    ev, result = scripted(copy_passage(0), tokenizer, distractor_mode="same_attribute")
    assert result.curve[0.0] == 1.0
    for n in (2, 4, 8):
        cases = cases_of(ev, tokenizer, "distractors", n)
        expected = mean(value_of(c.passages[0]) == c.gold for c in cases)
        assert result.curve[float(n)] == expected == result.scalars[f"accuracy@{n}"]
        at_zero = mean(c.oracle_slots == [0] for c in cases)
        assert at_zero <= expected and abs(at_zero - 1 / (n + 1)) < 0.15
    assert result.curve[8.0] < 0.5
    assert result.limit_value == read_limit(result.curve, 0.5, True, floor=-1.0)
    # the position series: slot 0 always right, the others only by coincidence
    position = result.series["accuracy_by_position"].points
    assert list(position) == [0.0, 1.0, 2.0, 3.0, 4.0] and position[0.0] == 1.0
    assert position[3.0] == mean(value_of(c.passages[0]) == c.gold for c in cases_of(ev, tokenizer, "position", 3))
    # no oracle: it answers the first distractor, never abstains
    assert result.scalars["negative_rejection"] == 0.0 and result.scalars["negative_hallucination"] == 1.0
    # the same questions at every point
    firsts = {x: [c.question for c in cases_of(ev, tokenizer, "distractors", x)] for x in (0, 8)}
    assert firsts[0] == firsts[8] == list(range(48))


def test_copy_last_answerer_is_the_attack_success_rate(tokenizer):
    """ASR = the poison contexts whose LAST passage asserts the poisoned value, computed from the contexts."""
    ev, result = scripted(copy_passage(-1), tokenizer)
    asr = result.series["asr_by_poison"].points
    assert list(asr) == [0.0, 1.0, 2.0, 4.0] and result.series["asr_by_poison"].higher_is_better is False
    for p in (0, 1, 2, 4):
        cases = cases_of(ev, tokenizer, "poison", p)
        assert all(len(c.passages) == 1 + 2 + p and len(c.oracle_slots) == 1 for c in cases)
        assert all(sum(value_of(x) == c.poisoned for x in c.passages) >= p for c in cases)
        expected = mean(value_of(c.passages[-1]) == c.poisoned for c in cases)
        assert asr[float(p)] == expected == result.scalars[f"asr@{p}"]
        assert result.series["accuracy_by_poison"].points[float(p)] == mean(
            value_of(c.passages[-1]) == c.gold for c in cases)
    assert result.scalars["attack_success_rate"] == asr[1.0] > asr[0.0]
    assert 0.1 < asr[1.0] < 0.45 and asr[4.0] > asr[1.0]  # 1 poison of 4 slots; 4 of 7


def test_perfect_reader(tokenizer):
    ev, result = scripted(reader, tokenizer, two_hop_fraction=0.5)
    cases, recall = ev.contexts(tokenizer)
    assert any(len(c.oracle_slots) == 2 for c in cases)  # two-hop questions are in
    assert result.curve == {0.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0} and result.limit_value == 8.0
    assert any("largest count measured, 8" in n for n in result.notes)
    s = result.scalars
    assert s["negative_rejection"] == 1.0 and s["negative_hallucination"] == 0.0
    assert set(result.series["accuracy_by_position"].points.values()) == {1.0}
    # poisoned contexts are flagged, never followed
    assert result.series["asr_by_poison"].points == {0.0: 0.0, 1.0: 0.0, 2.0: 0.0, 4.0: 0.0}
    assert result.series["conflict_flag_by_poison"].points == {0.0: 0.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0}
    assert result.series["accuracy_by_poison"].points == {0.0: 1.0, 1.0: 0.0, 2.0: 0.0, 4.0: 0.0}
    assert any("answered 'conflict'" in n for n in result.notes)
    # the budget curve: right exactly when the retriever's packed context holds the whole chain
    budget = result.series["accuracy_by_budget"].points
    assert budget == result.series["oracle_in_context_by_budget"].points and list(budget) == [32.0, 64.0, 128.0,
                                                                                              256.0]
    for b in (32, 256):
        packed = cases_of(ev, tokenizer, "budget", b)
        assert all(c.evidence_tokens <= b for c in packed)
        assert budget[float(b)] == mean(c.has_oracle for c in packed)
    assert all(len(c.passages) == 1 for c in cases_of(ev, tokenizer, "budget", 32))  # a passage line is > 16 chars
    # BM25 finds a single-hop oracle first (the entity's name is rare) but never the second hop of "home of boss of
    # X?" (the bridge entity is not in the question): the budget buys nothing for those
    single = [c.has_oracle for c in cases_of(ev, tokenizer, "budget", 32) if " of boss of " not in c.prompt]
    assert budget[32.0] == budget[256.0] == s["recall@1"] == s["recall@5"] < 1.0 and single and all(single)
    assert any("bounded by retrieval" in n for n in result.notes)
    assert 0.0 < s["recall@1"] <= s["recall@5"] <= 1.0
    assert s["evidence_tokens@0"] < s["evidence_tokens@2"] < s["evidence_tokens@8"]


def test_always_unknown_cannot_read(tokenizer):
    ev, result = scripted(always(f"A:{kb.ABSTAIN}"), tokenizer, poison_counts=[], budgets=[])
    assert set(result.curve.values()) == {0.0} and result.limit_value == -1.0
    assert "the model cannot read the oracle" in result.notes[0]
    assert result.scalars["negative_rejection"] == 1.0 and result.scalars["negative_hallucination"] == 0.0
    assert "asr_by_poison" not in result.series and "accuracy_by_budget" not in result.series
    assert "attack_success_rate" not in result.scalars
    _, silent = scripted(always("E:none\n"), tokenizer, poison_counts=[], budgets=[])
    assert silent.scalars["negative_hallucination"] == silent.scalars["negative_rejection"] == 0.0
    assert any("no 'A:' answer line" in n for n in silent.notes)


# --- the chat version: instruction and containment reader ------------------------------------------------------------
VALUES = {"teln", "mok", "rast", "gola"}
CONTEXT = ["job of Vokar is mok.", "home of Vokar is teln.", "home of Dabo is rast."]
ORACLE = CONTEXT[1:2]


@pytest.mark.parametrize("completion, read", [
    ("teln", "teln"),                                                    # the value alone
    ("Sure! The home of Vokar is Teln.\nAnything else?", "teln"),       # prose around it, any case
    ("P:home of Vokar is teln.", "teln"),                                # quoting the oracle alone is reading
    ("P:job of Vokar is mok.\nP:home of Vokar is teln.\nP:home of Dabo is rast.", KB_ECHO),  # the whole context
    ("home of Vokar is teln. home of Dabo is rast.", KB_ECHO),          # two passages, one not the oracle
    ("home of Vokar is rast.", "rast"),                                  # a wrong (or poisoned) value
    ("teln or mok", "teln, mok"),                                        # a hedge names several: matches nothing
    ("A:teln\nQ:job of Vokar?\nA:mok", "teln"),                          # after the first answer line: not read
    ("I don't know.", kb.ABSTAIN), ("The passages do not mention it.", kb.ABSTAIN), ("unknown", kb.ABSTAIN),
    ("It is unknown, maybe mok.", "mok"),                                # naming a value is not abstaining
    ("The passages conflict.", kb.CONFLICT), ("E:none\nA:conflict", kb.CONFLICT),
    ("Vokar lives by the teln river", "teln"), ("Vokar has a telnet line.", "Vokar has a telnet line."),  # words
    ("", None), (" \n ", None),
])
def test_containment_reader(completion, read):
    assert contained_answer(completion, VALUES, CONTEXT, ORACLE) == read


def test_containment_reader_two_hops():
    """A two-hop question's answer may quote both oracle passages; the bridge entity is never a candidate."""
    context = ["boss of Dabo is Vokar.", "home of Vokar is teln.", "home of Kelo is mok."]
    assert contained_answer("boss of Dabo is Vokar. home of Vokar is teln.", VALUES, context, context[:2]) == "teln"
    assert contained_answer("\n".join(context), VALUES, context, context[:2]) == KB_ECHO


def test_instructed_chat_reader_scores_chat_answers(chat_tokenizer):
    """The perfect reader's answers written as chat prose: the contains reader scores them as the answer lines are
    scored, the exact reader finds no answer line (0 everywhere)."""
    ev, result = scripted(chatty(reader), chat_tokenizer, instruct=True, two_hop_fraction=0.25)
    _, plain = scripted(reader, build_char_tokenizer(), two_hop_fraction=0.25)
    assert result.prompt_format == "chat" and plain.prompt_format == "plain"
    assert result.curve == plain.curve == {0.0: 1.0, 2.0: 1.0, 4.0: 1.0, 8.0: 1.0} and result.limit_value == 8.0
    assert result.series == plain.series
    assert {k: v for k, v in result.scalars.items() if k != "echo_rate"} == plain.scalars
    assert result.scalars["negative_rejection"] == 1.0 and result.scalars["echo_rate"] == 0.0
    assert result.series["conflict_flag_by_poison"].points == {0.0: 0.0, 1.0: 1.0, 2.0: 1.0, 4.0: 1.0}
    assert any("answers read by the contains reader" in n and "instructed chat prompts" in n for n in result.notes)
    assert not any("reader" in n for n in plain.notes)  # the task's own prompts and reader: nothing to say
    _, exact = scripted(chatty(reader), chat_tokenizer, instruct=True, reader="exact")
    assert set(exact.curve.values()) == {0.0} and exact.scalars["negative_rejection"] == 0.0
    assert any("no 'A:' answer line" in n for n in exact.notes)


def test_an_echo_of_the_passages_is_no_answer(chat_tokenizer):
    """Repeating the context reads right only where the context is the oracle alone (0 distractors)."""
    ev, result = scripted(echo, chat_tokenizer, instruct=True)
    assert result.curve == {0.0: 1.0, 2.0: 0.0, 4.0: 0.0, 8.0: 0.0} and result.limit_value == 0.0
    s = result.scalars
    assert s["negative_rejection"] == 0.0 and s["negative_hallucination"] == 0.0 and s["attack_success_rate"] == 0.0
    assert s["echo_rate"] == pytest.approx(mean(len(c.passages) >= 2 for c in ev.contexts(chat_tokenizer)[0]))
    assert any("copy two or more passages back" in n for n in result.notes)


def test_poison_and_position_go_through_the_contains_reader(chat_tokenizer):
    """Answering the last passage's value in prose: ASR and accuracy by poison are those of the answer lines."""
    ev, result = scripted(chatty(copy_passage(-1)), chat_tokenizer, instruct=True)
    _, plain = scripted(copy_passage(-1), build_char_tokenizer())
    for name in ("asr_by_poison", "accuracy_by_poison", "accuracy_by_position", "accuracy_by_budget"):
        assert result.series[name] == plain.series[name], name
    assert result.scalars["attack_success_rate"] == plain.scalars["attack_success_rate"] > 0.0
    assert result.scalars["negative_hallucination"] == 1.0  # it names a distractor's value: made up


def test_instruct_needs_a_chat_template(tokenizer, chat_tokenizer):
    model = tiny_llama(len(tokenizer))
    with pytest.raises(FieldError, match=r"^instruct: true needs a chat prompt, but the tokenizer has no chat "
                                         r"template$") as err:
        Retrieval(RetrievalConfig(**TINY, instruct=True)).check(model, tokenizer)
    assert err.value.field == "instruct"
    with pytest.raises(FieldError, match="^instruct: "):
        scripted(reader, tokenizer, instruct=True)
    Retrieval(RetrievalConfig(**TINY, instruct=True)).check(model, chat_tokenizer)
    assert INSTRUCTION.startswith("{task}") and "unknown" in INSTRUCTION


@pytest.mark.parametrize("mode", ["retrieved", "same_attribute", "random"])
def test_distractors_never_hold_the_answer(tokenizer, mode):
    ev = Retrieval(RetrievalConfig(**SCRIPTED, distractor_mode=mode, two_hop_fraction=0.25))
    cases, _ = ev.contexts(tokenizer)
    for c in cases:
        if c.part == "negative":
            assert not c.has_oracle and c.gold == kb.ABSTAIN and len(c.passages) == 4
        elif c.part == "distractors":
            assert c.has_oracle and len(c.passages) == c.x + len(c.oracle_slots)
            assert len(set(c.passages)) == len(c.passages)
    nested = [c.passages for c in cases if c.part == "distractors" and c.question == 0]
    assert all(set(a) <= set(b) for a, b in zip(nested, nested[1:]))  # more distractors add to the fewer
    if mode == "same_attribute":
        q = [c for c in cases if c.part == "negative"]
        assert all(p.split(" of ")[0] == c.prompt.split("Q:")[1].split(" of ")[0] for c in q for p in c.passages)


# --- check and the real run ------------------------------------------------------------------------------------------
def test_check(tokenizer):
    model = tiny_llama(len(tokenizer))
    Retrieval(RetrievalConfig(**TINY)).check(model, tokenizer)
    no_capitals = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 .:?\n")
    with pytest.raises(ValueError, match=r"^retrieval: the tokenizer cannot spell the kb task \(missing: '[A-Z]") as e:
        Retrieval(RetrievalConfig(**TINY)).check(model, no_capitals)
    assert "\n" not in str(e.value)
    short = tiny_llama(len(tokenizer), positions=128)
    config = RetrievalConfig(**{**TINY, "distractors": [0, 8], "budgets": [32]})
    with pytest.raises(ValueError, match=r"^retrieval: the longest prompt \(\d+ tokens, a distractors context of 9 "
                                         r"passages\) plus max_new_tokens=8 needs \d+ positions but the model's "
                                         r"position range is 128; lower distractors or max_new_tokens$"):
        Retrieval(config).check(short, tokenizer)


def test_run_on_a_tiny_llama(tokenizer):
    model = tiny_llama(len(tokenizer))
    model.train()
    ev = Retrieval(RetrievalConfig(**TINY))
    ev.check(model, tokenizer)
    result = ev.run(model, tokenizer, progress=False)
    assert model.training  # restored
    assert result.version == EVALS["retrieval"].version
    assert result.eval == "retrieval" and result.spec == ev.spec() and result.threshold == 0.5
    assert list(result.curve) == [0.0, 2.0] and all(0.0 <= v <= 1.0 for v in result.curve.values())
    assert result.limit_value == read_limit(result.curve, 0.5, True, floor=-1.0)
    s = result.scalars
    for key in ("accuracy@0", "accuracy@2", "recall@1", "recall@5", "asr@0", "asr@1", "attack_success_rate",
                "negative_rejection", "negative_hallucination"):
        assert 0.0 <= s[key] <= 1.0, key
    assert s["num_questions"] == 4 and s["evidence_tokens@0"] < s["evidence_tokens@2"]
    assert set(result.series) == {"accuracy_by_budget", "oracle_in_context_by_budget", "accuracy_by_position",
                                  "asr_by_poison", "accuracy_by_poison", "conflict_flag_by_poison"}
    assert list(result.series["accuracy_by_position"].points) == [0.0, 1.0, 2.0]
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
