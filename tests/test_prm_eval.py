"""The reward-model eval (evals/prm.py) and the process reward model it reads (evals/lm.py: step_positions,
PRMScorer, ProcessBench F1): positions and batching on a character tokenizer, a tiny token classifier through the full
run with a policy to rerank, and a scripted verifier PRM that scores exactly."""

from __future__ import annotations

import doctest
import json
import math

import pytest

from llm_limits import evals
import llm_limits.evals.prm
from llm_limits.evals import EVALS, EvalResult, LimitSpec, read_limit
from llm_limits.evals.lm import PRMScorer, first_flagged, processbench_f1, step_positions
from llm_limits.evals.prm import ProcessReward, ProcessRewardConfig, roc_auc, sample_counts
from llm_limits.evals.tasks import chains
from llm_limits.trainers.build.tokenizers import build_char_tokenizer
from tests.chains_fixtures import ChainOracle, VerifierPRM, tiny_llama, tiny_prm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_doctests():
    result = doctest.testmod(evals.prm)
    assert result.attempted > 0 and result.failed == 0


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


def test_processbench_f1_by_hand():
    # 3 erroneous samples (1 located exactly), 2 correct ones (1 predicted -1): 1/3 and 1/2 -> F1 0.4
    got = processbench_f1([2, 0, -1, -1, 1], [2, 1, 0, -1, -1])
    assert got == pytest.approx({"f1": 0.4, "acc_error": 1 / 3, "acc_correct": 0.5})
    assert processbench_f1([-1, -1], [0, -1])["f1"] == 0.0
    assert math.isnan(processbench_f1([-1], [-1])["f1"])
    assert first_flagged([0.9, 0.6, 0.2, 0.1]) == 2
    with pytest.raises(ValueError, match="2 predictions for 1 gold labels"):
        processbench_f1([0, 1], [0])


# --- the eval ---------------------------------------------------------------------------------------------------------
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
    assert result.version == EVALS["prm"].version
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
    monkeypatch.setattr(evals.prm, "_load_policy", lambda path, device: (policy, tokenizer))
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
