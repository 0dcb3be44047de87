"""The reasoning eval (evals/reasoning.py): its pure scoring pieces on hand-made strings, the PRM scorer's positions
and batching, scripted oracle models (a chain solver, a reward model that runs the verifier) through the full run,
and the run on an untrained tiny llama with every stage switched on."""

from __future__ import annotations

import doctest
import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

from llm_limits import evals
import llm_limits.evals.reasoning
from llm_limits.evals import EVALS, EvalResult, LimitSpec, read_limit
from llm_limits.evals.reasoning import (
    PRMScorer,
    ProcessReward,
    ProcessRewardConfig,
    Reasoning,
    ReasoningConfig,
    cut_after_answer,
    early_answer_bucket,
    early_answer_prompt,
    filler_prompt,
    first_flagged,
    majority_vote,
    mediation_outcome,
    pick_best,
    processbench_f1,
    roc_auc,
    sample_counts,
    score_chain,
    step_positions,
)
from llm_limits.evals.lm import Sampler, decode_texts
from llm_limits.evals.tasks import chains
from llm_limits.trainers.build.tokenizers import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"lengths": [2, 3], "examples_per_length": 4, "max_new_tokens": 16, "batch_size": 8}
"""2 lengths x 4 problems: 8 prompts."""


# --- fixtures: the char tokenizer, 2-layer models, scripted oracles -------------------------------------------------
def tiny_config(vocab_size: int, **kwargs):
    return AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab_size,
                                max_position_embeddings=256, **kwargs)


def tiny_llama(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(vocab_size))


def tiny_prm(vocab_size: int, num_labels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForTokenClassification.from_config(tiny_config(vocab_size, num_labels=num_labels,
                                                                   initializer_range=0.5))


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _split(text: str) -> tuple[str, str, str]:
    """``(prompt, question, completion)`` of a decoded ``Q:...\\n...`` text (the last question in it)."""
    q = text.rindex(chains.PROMPT_PREFIX)
    nl = text.index("\n", q)
    return text[: nl + 1], text[q + 2 : nl], text[nl + 1 :]


class ChainOracle(torch.nn.Module):
    """A scripted chain solver. It continues from whatever is written: each step starts from the last written step's
    result (lines without ``=``, e.g. filler dots, are skipped) and applies the question's next operation; after the
    last operation, or after a forced ``A:``, it answers the running value (``answer="follow"``) or the gold answer
    whatever was written (``answer="gold"``: its steps are disposable). From step ``fail_from`` on it writes result
    + 1. With ``coin=True`` every step's result is a coin flip between the right value and value + 1 (the right one
    has the higher logit, so greedy decoding takes it). It returns no KV cache, so the decoder feeds it the whole
    text."""

    def __init__(self, tokenizer, answer: str = "follow", fail_from: int | None = None, coin: bool = False,
                 modulus: int = 10):
        super().__init__()
        self.tok, self.answer, self.fail_from, self.coin, self.modulus = tokenizer, answer, fail_from, coin, modulus
        self.config = SimpleNamespace(max_position_embeddings=4096, model_type="oracle")

    def _next(self, text: str) -> list[str]:
        """The next characters it may write (several for a coin flip), ``"<eos>"`` to stop."""
        m = self.modulus
        _, question, generated = _split(text)
        start, operations = chains.parse_question(question, m)
        *lines, partial = generated.split("\n")
        value, i = start, 0
        for line in lines:
            if "=" in line:
                value, i = int(line.rsplit("=", 1)[1]), i + 1
        final = chains.gold_steps(question, m)[1] if self.answer == "gold" else str(value)
        if partial.startswith(chains.ANSWER_PREFIX) or i >= len(operations):
            targets = [chains.ANSWER_PREFIX + final]
        else:
            op, b = operations[i]
            c = chains.apply_op(value, op, b, m)
            if self.fail_from is not None and i >= self.fail_from:
                c = (c + 1) % m
            results = [c, (c + 1) % m] if self.coin else [c]
            targets = [f"{value}{op}{b}={r}" for r in results]
        out = []
        for target in targets:
            if partial == target:
                out.append("<eos>" if target.startswith(chains.ANSWER_PREFIX) else "\n")
            elif target.startswith(partial):
                out.append(target[len(partial)])
        return list(dict.fromkeys(out)) or ["<eos>"]

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, len(self.tok))  # [batch, seq, vocab]
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            # the right character first: it gets the top logit, so greedy decoding stays right; a coin's other side
            # gets nearly as much, so sampling takes either about half the time (anything else ~1e-7)
            for rank, ch in enumerate(self._next(self.tok.decode(ids.tolist()))):
                logits[b, -1, self.tok.convert_tokens_to_ids(ch)] = 20.0 - 0.1 * rank
        return SimpleNamespace(logits=logits)


class VerifierPRM(torch.nn.Module):
    """A scripted process reward model over the char tokenizer (one token per character): logit +5 at each step end
    whose step the task's verifier accepts, -5 where it rejects it, and at the answer's last character +5 when the
    answer is right; 0 elsewhere."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer
        self.config = SimpleNamespace(num_labels=1)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, 1)  # [batch, seq, 1]
        for b in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[b][attention_mask[b].bool()].tolist())
            prompt, question, completion = _split(text)
            steps, answer = chains.parse_completion(completion)
            verdicts = chains.verify_steps(question, steps)
            verdicts.append(chains.check_answer(answer, chains.gold_steps(question)[1]))
            for ok, off in zip(verdicts, chains.step_end_offsets(completion)):
                logits[b, len(prompt) + off, 0] = 5.0 if ok else -5.0
        return SimpleNamespace(logits=logits)


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


def test_processbench_f1_by_hand():
    # 3 erroneous samples (1 located exactly), 2 correct ones (1 predicted -1): 1/3 and 1/2 -> F1 0.4
    got = processbench_f1([2, 0, -1, -1, 1], [2, 1, 0, -1, -1])
    assert got == pytest.approx({"f1": 0.4, "acc_error": 1 / 3, "acc_correct": 0.5})
    assert processbench_f1([-1, -1], [0, -1])["f1"] == 0.0
    assert math.isnan(processbench_f1([-1], [-1])["f1"])
    assert first_flagged([0.9, 0.6, 0.2, 0.1]) == 2
    with pytest.raises(ValueError, match="2 predictions for 1 gold labels"):
        processbench_f1([0, 1], [0])


def test_majority_vote_and_pick_best():
    assert majority_vote(["4", "7", "7", None]) == "7"
    assert majority_vote(["4", "7", "7", "4"]) == "4"  # tie: first seen
    assert majority_vote([None, None]) is None
    assert pick_best([0.1, 0.7, 0.3]) == 1 and pick_best([-math.inf, -math.inf]) == 0


# --- the process reward model -----------------------------------------------------------------------------------------
def test_step_positions_on_a_char_tokenizer(tokenizer):
    prompt, completion = "Q:3+4*2\n", "3+4=7\n7*2=4\nA:4"  # prompt: 8 characters, completion: 15
    ids, positions = step_positions(tokenizer, prompt, completion)
    assert ids == tokenizer(prompt + completion, add_special_tokens=False)["input_ids"] and len(ids) == 23
    assert positions == [13, 19, 22]  # the two "\n" closing the steps (completion 5, 11), the answer's "4" (14)
    assert [(prompt + completion)[p] for p in positions] == ["\n", "\n", "4"]
    _, no_answer = step_positions(tokenizer, prompt, "3+4=7\n7*2")
    assert no_answer == [13, 16]  # a last step without an answer line ends at its last character


def _pairs():
    records = chains.generate(chains.ChainsConfig(num_examples=4, min_steps=2, max_steps=4, seed=7))
    return [r["prompt"] for r in records], [r["completion"] for r in records]


@pytest.mark.parametrize("num_labels", [1, 2])
def test_prm_scorer_batched_equals_one_at_a_time(tokenizer, num_labels):
    prompts, completions = _pairs()
    assert len({len(p + c) for p, c in zip(prompts, completions)}) > 1  # right padding happens
    model = tiny_prm(len(tokenizer), num_labels)
    batched = PRMScorer(model, tokenizer, batch_size=4).score(prompts, completions)
    single = PRMScorer(model, tokenizer, batch_size=1).score(prompts, completions)
    for b, s, c in zip(batched, single, completions):
        assert len(b) == len(chains.step_end_offsets(c)) == c.count("\n") + 1
        assert all(0.0 < p < 1.0 for p in b)
        assert b == pytest.approx(s, abs=1e-5)
    assert len({round(p, 4) for row in batched for p in row}) > 1  # not a constant


def test_prm_scorer_loads_a_directory(tmp_path, tokenizer):
    prompts, completions = _pairs()
    model = tiny_prm(len(tokenizer))
    model.save_pretrained(tmp_path / "prm")
    tokenizer.save_pretrained(tmp_path / "prm")
    loaded = PRMScorer(str(tmp_path / "prm")).score(prompts, completions)
    built = PRMScorer(model, tokenizer).score(prompts, completions)
    assert [len(row) for row in loaded] == [len(row) for row in built]
    assert sum(loaded, []) == pytest.approx(sum(built, []), abs=1e-5)
    with pytest.raises(ValueError, match="num_labels 1 or 2"):
        PRMScorer(tiny_prm(len(tokenizer), num_labels=3), tokenizer)


def test_verifier_prm_locates_the_corrupted_step(tokenizer):
    """The scripted PRM scores through step_positions: on a char tokenizer every step end lands where it should."""
    record = chains.make_record("3+4*2-5", "wrong_step", 1, 0)  # 3+4=7, 7*2=0 (wrong), 4-5=9, A:9
    scores = PRMScorer(VerifierPRM(tokenizer), tokenizer).score([record["prompt"]], [record["completion"]])[0]
    assert len(scores) == 4 and first_flagged(scores[:-1]) == 1 == chains.first_error(record["question"],
                                                                                      record["steps"])
    assert scores[-1] > 0.5  # the answer is right


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


# --- the reward-model eval (prm) --------------------------------------------------------------------------------------
PRM_SMALL = {"lengths": [2, 3], "examples_per_length": 8, "max_new_tokens": 16, "batch_size": 8}
"""2 lengths x 8 ProcessBench-style chains (2 wrong-step, 2 propagated, 4 correct each)."""


def test_prm_registered_and_spec():
    assert EVALS["prm"] is ProcessReward and evals.ProcessReward is ProcessReward
    assert ProcessReward.limit == "reasoning" and ProcessReward.name == "prm" and ProcessReward.summary
    assert ProcessReward().spec() == LimitSpec(metric="step_f1", axis="num_steps",
                                               axis_values=(2.0, 3.0, 4.0, 5.0, 6.0), higher_is_better=True,
                                               threshold=0.5, limit="reasoning", limit_unit="steps")
    assert ProcessReward(ProcessRewardConfig(lengths=[3, 5], threshold=0.8)).spec().axis_values == (3.0, 5.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lengths": []}, "lengths must not be empty"),
        ({"lengths": [3, 2]}, r"lengths must be strictly ascending \(got \[3, 2\]\)"),
        ({"lengths": [0, 2]}, "lengths must be integers >= 1"),
        ({"threshold": -0.1}, r"threshold must be within \[0, 1\]"),
        ({"examples_per_length": 0}, "examples_per_length must be >= 1"),
        ({"modulus": 1}, "modulus must be >= 2"),
        ({"ops": "+/"}, "ops must be a non-empty subset"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
        ({"best_of_n": 0}, "best_of_n must be >= 1"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"policy_path": ""}, "policy_path must be a non-empty directory path or null"),
    ],
)
def test_prm_invalid_config_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        ProcessRewardConfig(**kwargs)
    assert "\n" not in str(info.value) and str(info.value).startswith("prm: ")


def test_roc_auc_and_sample_counts():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # sklearn's example
    assert roc_auc([0.3, 0.3, 0.3], [1, 0, 1]) == 0.5 and math.isnan(roc_auc([0.3], [0]))
    assert roc_auc([float("nan"), 0.2, 0.9], [0, 0, 1]) == 1.0
    assert sample_counts(2) == [1, 2] and sample_counts(5) == [1, 2, 4, 5]


def test_prm_check(tmp_path, tokenizer):
    ev = ProcessReward(ProcessRewardConfig(**PRM_SMALL))
    ev.check(tiny_prm(len(tokenizer)), tokenizer)
    ev.check(tiny_prm(len(tokenizer), num_labels=2), tokenizer)
    ev.check(VerifierPRM(tokenizer), tokenizer)  # a scripted stand-in is judged by its num_labels
    with pytest.raises(ValueError, match=r"^prm: the prm eval measures a reward model "
                                         r"\(AutoModelForTokenClassification\); got LlamaForCausalLM$"):
        ev.check(tiny_llama(len(tokenizer)), tokenizer)
    with pytest.raises(ValueError, match="num_labels 1 or 2 \\(got 3"):
        ev.check(tiny_prm(len(tokenizer), num_labels=3), tokenizer)
    no_digits = build_char_tokenizer("abcdefghijklmnopqrstuvwxyzQA:+-*=\n")
    with pytest.raises(ValueError, match=r"^prm: the tokenizer cannot spell the chains task \(missing: '0123456789'"):
        ev.check(tiny_prm(len(tokenizer)), no_digits)
    (tmp_path / "empty").mkdir()
    for field in ("policy_path", "orm_path"):
        with pytest.raises(ValueError, match=f"prm: {field} .*nowhere is not a directory"):
            ProcessReward(ProcessRewardConfig(**PRM_SMALL, **{field: str(tmp_path / "nowhere")})).check(
                tiny_prm(len(tokenizer)), tokenizer)
        with pytest.raises(ValueError, match=f"prm: {field} .*empty has no config.json"):
            ProcessReward(ProcessRewardConfig(**PRM_SMALL, **{field: str(tmp_path / "empty")})).check(
                tiny_prm(len(tokenizer)), tokenizer)


def test_prm_run_on_a_tiny_token_classifier_with_a_policy(tmp_path, tokenizer):
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    tiny_prm(len(tokenizer), num_labels=2, seed=1).save_pretrained(tmp_path / "orm")
    tokenizer.save_pretrained(tmp_path / "orm")
    model = tiny_prm(len(tokenizer))
    model.train()
    ev = ProcessReward(ProcessRewardConfig(**PRM_SMALL, best_of_n=2, policy_path=str(tmp_path / "policy"),
                                           orm_path=str(tmp_path / "orm")))
    ev.check(model, tokenizer)
    result = ev.run(model, tokenizer, progress=False)
    assert model.training  # restored
    assert result.eval == "prm" and result.spec == ev.spec() and result.threshold == 0.5
    assert list(result.curve) == [2.0, 3.0] and all(0.0 <= v <= 1.0 for v in result.curve.values())
    assert result.limit_value == read_limit(result.curve, 0.5, True)
    s = result.scalars
    for key in ("step_f1", "acc_error", "acc_correct", "step_auc", "answer_auc", "step_f1@2", "step_f1@3",
                "bon_prm", "bon_orm", "bon_majority", "bon_pass_at_n", "bon_first"):
        assert key in s and 0.0 <= s[key] <= 1.0, key
    assert s["num_examples"] == 16 and s["bon_num_problems"] == 16
    assert s["bon_first"] <= s["bon_pass_at_n"] and s["bon_prm"] <= s["bon_pass_at_n"]
    for name in ("best_of_n", "best_of_n_majority", "best_of_n_orm", "best_of_n_pass_at_n"):
        assert set(result.series[name].points) == {1.0, 2.0} and result.series[name].axis == "num_samples"
    assert result.series["best_of_n"].points[2.0] == s["bon_prm"]
    assert result.series["best_of_n"].points[1.0] == s["bon_first"]  # one sample: nothing to rerank
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_prm_run_without_a_policy(tokenizer):
    result = ProcessReward(ProcessRewardConfig(**PRM_SMALL, orm_path="unused")).run(
        tiny_prm(len(tokenizer)), tokenizer, progress=False)
    assert list(result.curve) == [2.0, 3.0] and not result.series
    assert not any(k.startswith("bon_") for k in result.scalars)
    assert any("orm_path is set but policy_path is not" in n for n in result.notes)


def test_prm_verifier_oracle_scores_exactly(tokenizer, monkeypatch):
    """The scripted verifier PRM is perfect: F1, step AUC and answer AUC 1 at every length. Reranking the coin-flip
    oracle's samples by it picks a right one exactly when any is right (``+``/``-`` only: a wrong step always changes
    the answer), at every number of samples."""
    policy = ChainOracle(tokenizer, coin=True)
    monkeypatch.setattr(evals.reasoning, "_load_policy", lambda path, device: (policy, tokenizer))
    config = ProcessRewardConfig(lengths=[2, 3], examples_per_length=8, ops="+-", max_new_tokens=24, best_of_n=4,
                                 policy_path="scripted")
    result = ProcessReward(config).run(VerifierPRM(tokenizer), tokenizer, progress=False)
    s = result.scalars
    assert result.curve == {2.0: 1.0, 3.0: 1.0} and result.limit_value == 3.0
    assert s["step_f1"] == s["acc_error"] == s["acc_correct"] == s["step_auc"] == s["answer_auc"] == 1.0
    assert 0.0 < s["bon_first"] < s["bon_pass_at_n"] == s["bon_prm"]
    prm_curve = result.series["best_of_n"].points
    assert prm_curve == result.series["best_of_n_pass_at_n"].points and list(prm_curve) == [1.0, 2.0, 4.0]
    assert prm_curve[1.0] == s["bon_first"] and list(prm_curve.values()) == sorted(prm_curve.values())
    assert "best_of_n_orm" not in result.series and "bon_orm" not in s
