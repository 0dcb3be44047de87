"""The reasoning eval (evals/reasoning.py): its pure scoring pieces on hand-made strings, seeded sampling, scripted
oracle models (a chain solver, a reward model that runs the verifier) through the full run, and the run on an untrained
tiny llama with every stage switched on. The reward-model eval and the PRM scorer: tests/test_prm_eval.py."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_limits import evals
import llm_limits.evals.reasoning
from llm_limits.evals import EVALS, EvalResult, LimitSpec, read_limit
from llm_limits.evals.lm import PRMScorer, Sampler, cut_after_answer, decode_texts, majority_vote, pick_best
from llm_limits.evals.reasoning import (
    INSTRUCTION,
    Reasoning,
    ReasoningConfig,
    early_answer_bucket,
    early_answer_prompt,
    filler_prompt,
    instruction_text,
    mediation_outcome,
    prose_step,
    read_chain,
    read_prose,
    score_chain,
)
from llm_limits.evals.tasks import chains
from llm_limits.trainers.build.tokenizers import build_char_tokenizer
from tests.chains_fixtures import ChainOracle, VerifierPRM, tiny_llama, tiny_prm

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"lengths": [2, 3], "examples_per_length": 4, "max_new_tokens": 16, "batch_size": 8}
"""2 lengths x 4 problems: 8 prompts."""


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# --- pure functions --------------------------------------------------------------------------------------------------
def test_doctests():
    result = doctest.testmod(evals.reasoning)
    assert result.attempted > 0 and result.failed == 0


def test_score_chain_on_hand_made_completions():
    record = chains.make_record("3+4*2-5")  # gold: 3+4=7, 7*2=4, 4-5=9, A:9
    gold = score_chain(record, "3+4=7\n7*2=4\n4-5=9\nA:9")
    assert gold == {"steps": ["3+4=7", "7*2=4", "4-5=9"], "answer": "9", "correct": True, "valid_steps": 3,
                    "step_slots": 3}
    # text after the answer line is not part of the chain
    assert score_chain(record, "3+4=7\n7*2=4\n4-5=9\nA:9\nQ:1+1\n1+1=2") == gold
    # one wrong step, then a step that does not continue from it: right answer, 1 of 3 steps valid
    wrong = score_chain(record, "3+4=8\n7*2=4\n4-5=9\nA:9")
    assert (wrong["correct"], wrong["valid_steps"], wrong["step_slots"]) == (True, 1, 3)
    # a missing step counts as invalid, and so does an extra one
    short = score_chain(record, "3+4=7\nA:9")
    assert (short["correct"], short["valid_steps"], short["step_slots"]) == (True, 1, 3)
    extra = score_chain(record, "3+4=7\n7*2=4\n4-5=9\n9+0=9\nA:9")
    assert (extra["valid_steps"], extra["step_slots"]) == (3, 4)
    # no answer line: wrong; "09" is not "9"
    assert score_chain(record, "3+4=7\n7*2=4")["answer"] is None
    assert not score_chain(record, "3+4=7\n7*2=4")["correct"] and not score_chain(record, "A:09")["correct"]


@pytest.mark.parametrize("completion, steps, answer", [
    ("3+4=7\n7*2=4\n4-5=9\nA:9", ["3+4=7", "7*2=4", "4-5=9"], "9"),            # the task's own format
    ("Sure! Step by step:\nStep 1: 3 + 4 = 7\nStep 2: 7 * 2 = 4.\n- 4-5=9\nA: 9", ["3+4=7", "7*2=4", "4-5=9"], "9"),
    ("3+4=7\n7*2=4\n4-5=9\nSo the answer is 9.", ["3+4=7", "7*2=4", "4-5=9"], "9"),  # no A: line
    ("A: 3+4*2-5 = 9\nThe answer is 4.", [], "9"),                             # the first A: line with a number
    ("A:\nLet me think.\n3+4=7\nA: 7", ["3+4=7"], "7"),                      # an empty A: line is skipped
    ("A:3+4*2-5", [], None),                                                   # restating the problem is no answer
    ("3+4*2=14\n1. 7x2=4\nThe result: 9", [], None),                           # neither a step nor an answer
    ("The answer is 9.\nThe answer is 5.", [], "5"),                           # the last "answer is N"
    ("A: -1", [], "-1"),
])
def test_prose_reader_on_hand_made_completions(completion, steps, answer):
    assert read_prose(completion) == read_chain(completion, "prose") == (steps, answer)


def test_prose_reader_against_the_exact_one():
    record = chains.make_record("3+4*2-5")  # gold: 3+4=7, 7*2=4, 4-5=9, A:9
    prose = "Let me compute it.\n3 + 4 = 7\n7 * 2 = 4\n4 - 5 = 9\nThe answer is 9."
    assert score_chain(record, prose, "prose") == {"steps": ["3+4=7", "7*2=4", "4-5=9"], "answer": "9",
                                                    "correct": True, "valid_steps": 3, "step_slots": 3}
    exact = score_chain(record, prose)
    assert (exact["correct"], exact["valid_steps"], exact["step_slots"]) == (False, 0, 5)
    # the prose reader scores the task's own format exactly as the exact reader does
    for text in ("3+4=7\n7*2=4\n4-5=9\nA:9\nQ:1+1", "3+4=8\n7*2=4\nA:9", "A:9", "3+4=7"):
        assert score_chain(record, text, "prose") == score_chain(record, text)
    assert prose_step("7*2=4") == "7*2=4" and prose_step("7 × 2 = 4") == "7*2=4" and prose_step("4-5=9 then") is None


def test_instruction_text():
    assert "{task}" in INSTRUCTION and "{modulus}" in INSTRUCTION and "{example}" in INSTRUCTION
    text = instruction_text(INSTRUCTION, 10)
    assert "modulo 10" in text and "Q:3+4*2-5\n3+4=7\n7*2=4\n4-5=9\nA:9" in text and text.endswith("\n\n{task}")
    seven = instruction_text("{example}", 7)  # the example is computed at the eval's modulus: 7*2=14 -> 0
    assert seven == "Q:3+4*2-5\n3+4=0\n0*2=0\n0-5=2\nA:2"
    assert instruction_text("{example}", 3) == "Q:0+1*2-2\n0+1=1\n1*2=2\n2-2=0\nA:0"  # numbers taken mod 3


def test_prose_chains_end_to_end(tokenizer, monkeypatch):
    """Gold chains written as chat prose: the prose reader scores them right, the exact reader wrong; the note says
    which reader was used."""
    def prose(model, tok, prompts, *args, **kwargs):
        out = []
        for prompt in prompts:
            question = prompt[prompt.rindex(chains.PROMPT_PREFIX) + 2:].split("\n")[0]
            steps, answer = chains.gold_steps(question)
            out.append("Sure!\n" + "\n".join(f"Step {i + 1}: {s.replace('=', ' = ')}" for i, s in enumerate(steps))
                       + f"\nSo the answer is {answer}.")
        return out

    monkeypatch.setattr(evals.reasoning, "decode_texts", prose)
    config = dict(SMALL, mediation=False, probes=False)
    read = Reasoning(ReasoningConfig(**config, reader="prose")).run(None, tokenizer, progress=False)
    assert read.curve == {2.0: 1.0, 3.0: 1.0} and read.scalars["step_validity"] == 1.0
    assert any("answers read by the prose reader" in n for n in read.notes)
    exact = Reasoning(ReasoningConfig(**config)).run(None, tokenizer, progress=False)
    assert exact.curve == {2.0: 0.0, 3.0: 0.0} and exact.scalars["step_validity"] == 0.0
    assert not any("reader" in n for n in exact.notes)


def test_reader_comes_from_the_config(tokenizer):
    """Every measurement reads with the reader the config means, whether or not run() came first: auto is prose
    for instructed prompts, exact otherwise, and the prose reader decodes 8 more answer tokens."""
    def reader(**fields):
        return Reasoning(ReasoningConfig(**SMALL, **fields)).reader

    assert [reader(), reader(instruct=True), reader(reader="prose"), reader(instruct=True, reader="exact")] == \
        ["exact", "prose", "prose", "exact"]
    plain, prose = Reasoning(ReasoningConfig(**SMALL)), Reasoning(ReasoningConfig(**SMALL, reader="prose"))
    assert prose._answer_tokens(tokenizer) == plain._answer_tokens(tokenizer) + 8


def test_mediation_pieces():
    question, steps = "3+4*2-5", ["3+4=7", "7*2=4", "4-5=9"]
    prefix, expected = chains.intervene(question, steps, 0, 8)  # 8*2=6, 6-5=1
    assert (prefix, expected) == (["3+4=8"], "1")
    assert mediation_outcome("1", expected, "9") == (True, False)  # follows the intervention
    assert mediation_outcome("9", expected, "9") == (False, True)  # ignores it: the step was disposable
    assert mediation_outcome("5", expected, "9") == (False, False)
    assert evals.reasoning.step_start("8*2=6") == 8


def test_probe_prompts_and_buckets():
    steps = ["3+4=7", "7*2=4", "4-5=9"]
    assert early_answer_prompt("Q:3+4*2-5\n", steps, 2) == "Q:3+4*2-5\n3+4=7\n7*2=4\nA:"
    assert early_answer_prompt("Q:3+4*2-5\n", steps, 3) == "Q:3+4*2-5\n3+4=7\n7*2=4\n4-5=9\nA:"
    assert [early_answer_bucket(j, 4) for j in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [early_answer_bucket(j, 2) for j in range(3)] == [0.0, 0.5, 1.0]
    assert early_answer_bucket(1, 6) == 0.25  # 4/6 = 0.67 quarters, rounded to 1
    assert filler_prompt("Q:3+4*2-5\n", steps) == "Q:3+4*2-5\n" + "." * 17 + "\nA:"
    assert cut_after_answer("1+1=2\nA:2\n\nQ:") == "1+1=2\nA:2"


def test_majority_vote_and_pick_best():
    assert majority_vote(["4", "7", "7", None]) == "7"
    assert majority_vote(["4", "7", "7", "4"]) == "4"  # tie: first seen
    assert majority_vote([None, None]) is None
    assert pick_best([0.1, 0.7, 0.3]) == 1 and pick_best([-math.inf, -math.inf]) == 0


# --- sampling ---------------------------------------------------------------------------------------------------------
def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tokenizer):
    model = tiny_llama(len(tokenizer))
    prompts = ["Q:3+4\n", "Q:1*2-3\n"] * 2
    state = torch.random.get_rng_state()

    def sample(seed):
        sampler = Sampler(model, 1.0, torch.Generator().manual_seed(seed))
        return decode_texts(model, tokenizer, prompts, 4, 8, sampler=sampler)

    first = sample(0)
    assert first == sample(0) and first != sample(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert decode_texts(model, tokenizer, prompts, 4, 8) != first  # greedy is not what the sampler gives


# --- the eval ---------------------------------------------------------------------------------------------------------
def test_registered():
    assert EVALS["reasoning"] is Reasoning and evals.Reasoning is Reasoning
    assert Reasoning.limit == "reasoning" and Reasoning.name == "reasoning" and Reasoning.summary


def test_spec():
    assert Reasoning().spec() == LimitSpec(metric="accuracy", axis="num_steps", axis_values=(2.0, 3.0, 4.0, 5.0, 6.0),
                                           higher_is_better=True, threshold=0.5, limit="reasoning",
                                           limit_unit="steps")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lengths": []}, "lengths must not be empty"),
        ({"lengths": [3, 2]}, r"lengths must be strictly ascending \(got \[3, 2\]\)"),
        ({"lengths": [0, 2]}, "lengths must be integers >= 1"),
        ({"threshold": 1.5}, r"threshold must be within \[0, 1\]"),
        ({"examples_per_length": 0}, "examples_per_length must be >= 1"),
        ({"modulus": 1}, "modulus must be >= 2"),
        ({"ops": "/"}, "ops must be a non-empty subset of '\\+-\\*'"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"best_of_n": -1}, "best_of_n must be >= 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"reader": "contains"}, r"^reasoning: reader must be one of auto, exact, prose \(got 'contains'\)$"),
        ({"instruction": "Solve it."}, r"^reasoning: instruction must contain \{task\}, where the task's prompt goes$"),
        ({"instruct": True, "prompt_format": "plain"}, r"^reasoning: instruct writes chat prompts, but prompt_format "
                                                       r"is plain; use auto or chat, or leave instruct false$"),
    ],
)
def test_invalid_config_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        ReasoningConfig(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("reasoning: ")


def test_check(tmp_path, tokenizer):
    model = tiny_llama(len(tokenizer))
    Reasoning(ReasoningConfig(**SMALL)).check(model, tokenizer)
    no_digits = build_char_tokenizer("abcdefghijklmnopqrstuvwxyzQA:+-*=\n")
    with pytest.raises(ValueError, match=r"cannot spell the chains task \(missing: '0123456789'\)") as info:
        Reasoning(ReasoningConfig(**SMALL)).check(model, no_digits)
    assert "\n" not in str(info.value)
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2,
                                                                  vocab_size=len(tokenizer), n_positions=20,
                                                                  bos_token_id=2, eos_token_id=3))
    with pytest.raises(ValueError, match=r"needs 26 positions but the model's position range is 20"):
        Reasoning(ReasoningConfig(**SMALL)).check(gpt2, tokenizer)  # 10-char prompt + 16
    for field in ("prm_path", "orm_path"):
        with pytest.raises(ValueError, match=f"{field} .*nowhere is not a directory"):
            Reasoning(ReasoningConfig(**SMALL, **{field: str(tmp_path / "nowhere")})).check(model, tokenizer)
    with pytest.raises(ValueError, match="data_path .*missing.jsonl not found"):
        Reasoning(ReasoningConfig(**SMALL, data_path=str(tmp_path / "missing.jsonl"))).check(model, tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no question"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: unknown schema"):
        Reasoning(ReasoningConfig(**SMALL, data_path=str(bad))).check(model, tokenizer)


def test_oracle_solves_every_length(tokenizer):
    ev = Reasoning(ReasoningConfig(lengths=[2, 3, 4], examples_per_length=4, max_new_tokens=32))
    result = ev.run(ChainOracle(tokenizer), tokenizer, progress=False)
    assert result.curve == {2.0: 1.0, 3.0: 1.0, 4.0: 1.0} and result.limit_value == 4.0
    assert "longest length measured, 4" in result.notes[0]
    s = result.scalars
    assert s["accuracy"] == 1.0 and s["step_validity"] == 1.0
    assert result.series["step_validity"].points == {2.0: 1.0, 3.0: 1.0, 4.0: 1.0}
    # it continues from whatever is written: every intervention reaches the answer
    assert s["mediation"] == 1.0 and s["disposable_fraction"] == 0.0 and s["mediation_step_following"] == 1.0
    assert set(result.series["mediation"].points) == {2.0, 3.0, 4.0}
    # forced to answer early it answers its running value: with the whole chain shown that is its answer
    early = result.series["early_answering"].points
    assert early[1.0] == 1.0 == s["early_answer_agreement@1"] and early[0.0] == s["early_answer_agreement@0"] < 1.0
    # filler dots are not steps: it answers the start value
    records = [r for n in (2, 3, 4) for r in ev._records(n)]
    starts = [chains.parse_question(r["question"])[0] for r in records]
    assert s["filler_accuracy"] == pytest.approx(sum(str(v) == r["gold_answer"]
                                                     for v, r in zip(starts, records)) / len(records))
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_oracle_that_fails_from_a_step_on(tokenizer):
    result = Reasoning(ReasoningConfig(lengths=[2, 3, 4], examples_per_length=4, max_new_tokens=32, mediation=False,
                                       probes=False)).run(ChainOracle(tokenizer, fail_from=3), tokenizer,
                                                          progress=False)
    assert result.curve == {2.0: 1.0, 3.0: 1.0, 4.0: 0.0} and result.limit_value == 3.0
    assert result.limit_value == read_limit(result.curve, 0.5, True)
    assert result.series["step_validity"].points == {2.0: 1.0, 3.0: 1.0, 4.0: 0.75}
    assert set(result.scalars) >= {"accuracy", "step_validity"} and "mediation" not in result.scalars


def test_disposable_chains_are_caught(tokenizer):
    """An oracle that answers the gold answer whatever its chain says: accurate, but its steps do not mediate."""
    result = Reasoning(ReasoningConfig(lengths=[3], examples_per_length=6, max_new_tokens=32)).run(
        ChainOracle(tokenizer, answer="gold"), tokenizer, progress=False)
    s = result.scalars
    assert s["accuracy"] == 1.0 and s["mediation"] == 0.0 and s["disposable_fraction"] == 1.0
    assert s["early_answer_agreement@0"] == 1.0 and s["filler_accuracy"] == 1.0
    assert any("post-hoc" in n for n in result.notes) and any("filler" in n for n in result.notes)
    assert any("largely disposable" in n for n in result.notes)


def test_best_of_n_and_processbench_with_scripted_models(tokenizer, monkeypatch):
    """Coin-flip steps under sampling, scored by the verifier PRM. With ``+`` and ``-`` only, a wrong step always
    changes the answer, so the sample the PRM (or the answer-scoring ORM) picks is right exactly when any is."""
    def fake_scorer(path, *args, **kwargs):
        return PRMScorer(VerifierPRM(tokenizer), tokenizer, batch_size=kwargs.get("batch_size", 16))

    monkeypatch.setattr(evals.reasoning, "PRMScorer", fake_scorer)
    config = ReasoningConfig(lengths=[2, 3], examples_per_length=8, max_new_tokens=24, ops="+-", best_of_n=4,
                             mediation=False, probes=False, prm_path="scripted", orm_path="scripted")
    model = ChainOracle(tokenizer, coin=True)
    result = Reasoning(config).run(model, tokenizer, progress=False)
    s = result.scalars
    assert result.curve == {2.0: 1.0, 3.0: 1.0}  # greedy takes the right side of every coin
    assert s["prm_step_f1"] == 1.0 and s["prm_acc_error"] == 1.0 and s["prm_acc_correct"] == 1.0
    assert 0.0 < s["bon_first"] < s["bon_pass_at_n"]  # the coins do vary between samples
    assert s["bon_prm"] == s["bon_orm"] == s["bon_pass_at_n"]
    assert Reasoning(config).run(model, tokenizer, progress=False).scalars == s  # seeded: the same samples again


def test_run_on_a_tiny_llama_with_every_stage(tmp_path, tokenizer):
    for name, labels in (("prm", 1), ("orm", 2)):
        tiny_prm(len(tokenizer), labels).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"{a}\n#### {a}"}) + "\n"
                            for q, a in (("Tom has 3 apples and eats 1. How many are left?", "2"),
                                         ("What is 6 times 7?", "42"))))
    model = tiny_llama(len(tokenizer))
    model.train()
    ev = Reasoning(ReasoningConfig(**SMALL, best_of_n=2, prm_path=str(tmp_path / "prm"),
                                   orm_path=str(tmp_path / "orm"), data_path=str(data)))
    ev.check(model, tokenizer)
    result = ev.run(model, tokenizer, progress=False)
    assert model.training  # restored
    assert result.version == EVALS["reasoning"].version
    assert result.eval == "reasoning" and result.spec == ev.spec() and result.threshold == 0.5
    assert list(result.curve) == [2.0, 3.0] and all(0.0 <= v <= 1.0 for v in result.curve.values())
    assert result.limit_value == read_limit(result.curve, 0.5, True) == 0.0  # a random model solves nothing
    s = result.scalars
    for key in ("accuracy", "accuracy@2", "accuracy@3", "step_validity", "mediation", "disposable_fraction",
                "filler_accuracy", "prm_step_f1", "prm_acc_error", "prm_acc_correct", "bon_majority",
                "bon_pass_at_n", "bon_first", "bon_prm", "bon_orm", "user_accuracy"):
        assert key in s and 0.0 <= s[key] <= 1.0, key
    assert s["num_examples"] == 8 and s["user_num_examples"] == 2
    assert set(result.series) >= {"step_validity", "mediation"}
    assert "early_answering" in result.series or any("early answering skipped" in n for n in result.notes)
    assert any("accuracy is 0 at every length" in n for n in result.notes)
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
