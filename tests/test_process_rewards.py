"""The process_rewards mitigation: aggregation, group-normalised step advantages, Math-Shepherd labels, consensus,
test-time selection, TRL reward factories and the hook object with fake injected verifiers."""

from __future__ import annotations

import io

import pytest
import torch

from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import hooks_overridden
from llm_limits.mitigations.process_rewards import (
    LabelsConfig,
    ProcessRewards,
    ProcessRewardsConfig,
    aggregate,
    best_of_n,
    char_ends_to_token_ends,
    consensus,
    first_error_index,
    majority_vote,
    make_outcome_reward,
    make_process_reward,
    math_shepherd_labels,
    normalize_group_step_rewards,
    step_advantages,
)

PROMPT = "Q:3+4*2-5\n"
RIGHT = "3+4=7\n7*2=14\n14-5=9\nA:9"
WRONG = "3+4=7\n7*2=4\n4-5=9\nA:9"  # a wrong step, then the right answer anyway: the chain does not cause it


# --- fake injected callables (what the trainer builds from the task's verifier) -------------------------------------
def step_ends(completion: str) -> list[int]:
    ends = [i for i, ch in enumerate(completion) if ch == "\n"]
    return ends + [len(completion) - 1] if completion else ends


def _step_ok(step: str) -> bool:
    if step.startswith("A:"):
        return True
    lhs, rhs = step.split("=")
    return eval(lhs) == int(rhs)  # the tiny task's steps are "a op b = c" over small ints


def score_steps(prompts, completions, answer, **_):
    return [
        [1.0 if _step_ok(s) else 0.0 for s in c.split("\n")[:-1]] + [float(c.split("\n")[-1] == "A:" + a)]
        for c, a in zip(completions, answer)
    ]


def outcome(prompts, completions, answer, **_):
    return [float(c.split("\n")[-1] == "A:" + a) for c, a in zip(completions, answer)]


TRL_KW = dict(completion_ids=[[1], [2]], trainer_state=object(), log_extra=print, log_metric=print)


def make(**cfg) -> ProcessRewards:
    return ProcessRewards(ProcessRewardsConfig(**cfg), outcome=outcome, score_steps=score_steps, step_ends=step_ends)


# --- core ------------------------------------------------------------------------------------------------------------
def test_aggregate():
    s = [0.9, 0.5, 1.0]
    assert aggregate(s) == 0.5 and aggregate(s, "product") == pytest.approx(0.45)
    assert aggregate(s, "mean") == pytest.approx(0.8) and aggregate(s, "last") == 1.0
    assert all(aggregate([], how) == 0.0 for how in ("min", "product", "mean", "last"))
    with pytest.raises(ValueError, match="aggregate: expected one of min, product, mean, last"):
        aggregate(s, "max")


def test_group_normalisation_mean_zero_unbiased_std():
    rows = [[1.0, 0.0, 1.0], [0.5], [0.0, 0.0], [0.2, 0.9, 0.4, 0.4]]
    out = normalize_group_step_rewards(rows, group_size=2)
    assert [len(r) for r in out] == [len(r) for r in rows]
    for g in (0, 2):
        flat = torch.tensor(out[g] + out[g + 1], dtype=torch.float64)
        raw = torch.tensor(rows[g] + rows[g + 1], dtype=torch.float64)
        assert abs(float(flat.mean())) < 1e-9
        assert float(flat[0]) == pytest.approx(float((raw[0] - raw.mean()) / (raw.std(unbiased=True) + 1e-4)))
    # a group with one reward value: std 0, the reward normalises to 0 (not nan), even with eps = 0
    assert normalize_group_step_rewards([[0.7], []], 2, eps=0.0) == [[0.0], []]
    assert normalize_group_step_rewards([[1.0, 1.0], [1.0]], 2, eps=0.0) == [[0.0, 0.0], [0.0]]
    with pytest.raises(ValueError, match="group_size"):
        normalize_group_step_rewards([[1.0]] * 3, group_size=2)


def test_step_advantages_hand_computed():
    # group 0: R = {1, 0.5, 0}, mean 0.5, unbiased std 0.5 -> A [1, 0], B [-1]
    # group 1: R = {0, 1, 0.5}, same stats               -> C [-1, 1], D [0]
    rewards = [[1.0, 0.5], [0.0], [0.0, 1.0], [0.5]]
    ends = [[1, 3], [2], [0, 9], [2]]  # C's last end (9) is past the completion: clipped to token 4
    adv = step_advantages(rewards, ends, completion_len=5, group_size=2, eps=0.0)
    expected = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0, 0.0],  # A: tokens 0-1 see both steps (1 + 0), 2-3 the second (0), 4 none
            [-1.0, -1.0, -1.0, 0.0, 0.0],  # B: tokens 0-2 see its step, tokens after the last end get 0
            [0.0, 1.0, 1.0, 1.0, 1.0],  # C: token 0 sees -1 + 1, tokens 1-4 the clipped second step
            [0.0, 0.0, 0.0, 0.0, 0.0],  # D: its step normalises to 0
        ]
    )
    assert adv.dtype == torch.float32 and adv.shape == (4, 5)
    assert torch.equal(adv, expected)
    with_eps = step_advantages(rewards, ends, completion_len=5, group_size=2)  # default eps only shrinks a little
    assert torch.allclose(with_eps, expected, atol=1e-3)
    with pytest.raises(ValueError, match="row 0: 2 step rewards but 1 step ends"):
        step_advantages([[1.0, 0.0], [1.0]], [[1], [1]], 4, 2)


def test_char_ends_to_token_ends():
    # "3+4=7\nA:7": tokens "3+4" "=7" "\n" "A:7", then BOS-like and EOS specials with empty spans
    offsets = [(0, 0), (0, 3), (3, 5), (5, 6), (6, 9), (0, 0)]
    assert char_ends_to_token_ends([5, 8], offsets) == [3, 4]
    assert char_ends_to_token_ends([0, 4, 30], offsets) == [1, 2, 4]  # first char, inside a token, beyond the end
    # a character in a gap (a tokenizer that leaves the space out of its offsets) maps to the token before it
    assert char_ends_to_token_ends([3], [(0, 3), (4, 6)]) == [0]
    with pytest.raises(ValueError, match="non-empty"):
        char_ends_to_token_ends([0], [(0, 0)])


def test_math_shepherd_labels_hard_and_soft():
    calls = []

    def complete(prefixes, n):
        calls.append((list(prefixes), n))
        # after k steps, continuation j is right when j < 3 - k (so 3, 2, 1 of 4 right), except after the bad step
        return [
            [f"ok{j}" if j < 3 - k and "7*2=4" not in p else "bad" for j in range(n)] for k, p in enumerate(prefixes)
        ]

    def is_correct(text):
        return text.split("\n")[-1].startswith("ok")

    labels = math_shepherd_labels(PROMPT, ["3+4=7", "7*2=14", "14-5=9"], is_correct, complete, n=4)
    assert labels == [(1, 0.75), (1, 0.5), (1, 0.25)]
    assert len(calls) == 1 and calls[0][1] == 4  # one batched call for all steps
    assert calls[0][0] == [PROMPT + "3+4=7\n", PROMPT + "3+4=7\n7*2=14\n", PROMPT + "3+4=7\n7*2=14\n14-5=9\n"]
    labels = math_shepherd_labels(PROMPT, ["3+4=7", "7*2=4", "4-5=9"], is_correct, complete, n=4)
    assert labels == [(1, 0.75), (0, 0.0), (0, 0.0)]
    assert math_shepherd_labels(PROMPT, [], is_correct, complete, n=4) == []

    def recovers(prefixes, n):  # each step estimated on its own: a later step can be 1 after a 0
        return [["ok"] if i != 1 else ["bad"] for i, _ in enumerate(prefixes)]

    assert [h for h, _ in math_shepherd_labels(PROMPT, ["a", "b", "c"], is_correct, recovers, n=1)] == [1, 0, 1]
    with pytest.raises(ValueError, match="complete: expected 2 continuations"):
        math_shepherd_labels(PROMPT, ["a"], is_correct, lambda p, n: [["x"]], n=2)


def test_first_error_and_consensus():
    assert first_error_index([1, 1, 0, 1]) == 2 and first_error_index([1, 1]) == -1 and first_error_index([]) == -1
    assert consensus([1, 0, 0], [1, 0, 1])  # same first error, later steps may differ
    assert consensus([1, 1], [1, 1])  # both find none
    assert not consensus([0, 1], [1, 0]) and not consensus([1, 1], [1, 0])
    with pytest.raises(ValueError, match="consensus"):
        consensus([1], [1, 1])


def test_majority_vote_and_best_of_n():
    assert majority_vote(["9", None, "7", "7", "9"]) == "9"  # tie: first seen
    assert majority_vote(["7", "9", "9"]) == "9"
    assert majority_vote([None, None]) is None and majority_vote([]) is None
    assert best_of_n([0.2, 0.9, 0.9, 0.1]) == 1 and best_of_n([0.5]) == 0
    with pytest.raises(ValueError):
        best_of_n([])


def test_reward_factories_drop_trl_kwargs_and_pass_columns():
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(columns)
        return score_steps(prompts, completions, **columns)

    comps = [RIGHT, WRONG]
    r = make_outcome_reward(outcome)
    assert r.__name__ == "outcome_reward"
    assert r(prompts=[PROMPT] * 2, completions=comps, answer=["9", "9"], **TRL_KW) == [1.0, 1.0]
    p = make_process_reward(spy, "min")
    assert p.__name__ == "process_reward"
    assert p(prompts=[PROMPT] * 2, completions=comps, answer=["9", "9"], level=[1, 1], **TRL_KW) == [1.0, 0.0]
    assert set(seen) == {"answer", "level"}
    assert make_process_reward(score_steps, "mean")([PROMPT], [WRONG], answer=["9"]) == [0.5]
    conversational = [[{"role": "assistant", "content": WRONG}]]
    assert make_process_reward(score_steps, "last")([PROMPT], conversational, answer=["9"]) == [1.0]
    with pytest.raises(ValueError, match="aggregate"):
        make_process_reward(score_steps, "max")


# --- the hook object -------------------------------------------------------------------------------------------------
def test_reward_fns_per_mode():
    kw = dict(prompts=[PROMPT] * 2, completions=[RIGHT, WRONG], answer=["9", "9"], **TRL_KW)
    (fn,) = make(reward="outcome").reward_fns()
    assert fn.__name__ == "outcome_reward" and fn(**kw) == [1.0, 1.0]  # outcome cannot tell the chains apart
    (fn,) = make(reward="process", aggregate="min").reward_fns()
    assert fn.__name__ == "process_reward" and fn(**kw) == [1.0, 0.0]
    (fn,) = make(reward="step").reward_fns()  # logged only: the mean step score
    assert fn(**kw) == [1.0, 0.5]
    with pytest.raises(ValueError, match="process_rewards needs the trainer to inject `outcome`"):
        ProcessRewards(ProcessRewardsConfig(reward="outcome")).reward_fns()
    with pytest.raises(ValueError, match="inject `score_steps`"):
        ProcessRewards(ProcessRewardsConfig(reward="process"), outcome=outcome).reward_fns()


def test_step_rewards_output_cache_and_truncation():
    m = make(reward="step")
    comps = [RIGHT, WRONG]
    out = m.step_rewards([PROMPT] * 2, comps, answer=["9", "9"], trainer_state=None)
    assert out == [
        [(5, 1.0), (12, 1.0), (19, 1.0), (22, 1.0)],
        [(5, 1.0), (11, 0.0), (17, 0.0), (20, 1.0)],
    ]
    assert [comps[1][e] for e, _ in out[1]] == ["\n", "\n", "\n", "9"]
    assert m.scored == 2
    (fn,) = m.reward_fns()  # the logged reward scores the same batch: served from the cache, not scored again
    fn(prompts=[PROMPT] * 2, completions=comps, answer=["9", "9"], **TRL_KW)
    assert m.scored == 2
    fn(prompts=[PROMPT], completions=[WRONG], answer=["9"])
    assert m.scored == 3
    assert make(reward="process").step_rewards([PROMPT], [RIGHT], answer=["9"]) is None
    assert make(reward="outcome").step_rewards([PROMPT], [RIGHT], answer=["9"]) is None

    short = ProcessRewards(ProcessRewardsConfig(), score_steps=lambda p, c, **_: [[0.5], [0.1, 0.2, 0.3, 0.4, 0.5]],
                           step_ends=step_ends)  # fmt: skip
    out = short.step_rewards([PROMPT] * 2, ["1+1=2\nA:2", "A:2"])  # scores and ends differ in length: the shorter
    assert out == [[(5, 0.5)], [(2, 0.1)]]
    with pytest.raises(ValueError, match="inject `step_ends`"):
        ProcessRewards(ProcessRewardsConfig(), score_steps=score_steps).step_rewards([PROMPT], [RIGHT], answer=["9"])


def test_step_rewards_feed_step_advantages():
    # the backend's path: step_rewards -> token ends (one token per char here) -> advantages
    comps = [RIGHT, WRONG]
    steps = make().step_rewards([PROMPT] * 2, comps, answer=["9", "9"])
    offsets = [[(i, i + 1) for i in range(len(c))] for c in comps]
    ends = [char_ends_to_token_ends([e for e, _ in s], o) for s, o in zip(steps, offsets)]
    adv = step_advantages([[r for _, r in s] for s in steps], ends, completion_len=24, group_size=2)
    assert adv.shape == (2, 24)
    assert float(adv[1, 15]) < 0 < float(adv[0, 15])  # WRONG's tokens before its bad steps are pushed down
    assert float(adv[0, 23]) == 0.0  # past RIGHT's last step


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"reward: expected one of outcome, process, step \(got 'x'\)"):
        ProcessRewardsConfig(reward="x")
    with pytest.raises(ValueError, match="prm_path: required when scorer is prm"):
        ProcessRewardsConfig(scorer="prm")
    with pytest.raises(ValueError, match="aggregate"):
        ProcessRewardsConfig(aggregate="max")
    with pytest.raises(ValueError, match="labels.rollouts"):
        LabelsConfig(rollouts=0)
    with pytest.raises(ValueError, match="labels.target"):
        LabelsConfig(target="medium")
    with pytest.raises(ValueError, match="labels.kind"):
        LabelsConfig(kind="oracle")
    with pytest.raises(ValueError, match="labels.consensus"):
        LabelsConfig(consensus=True)
    cfg = ProcessRewardsConfig(scorer="prm", prm_path="runs/prm", labels={"kind": "monte_carlo", "consensus": True})
    assert isinstance(cfg.labels, LabelsConfig) and cfg.labels.rollouts == 8


def test_recipe_entry_validates():
    from llm_limits.trainers.recipe.schema import strict_model_for, to_dataclass  # the recipe path: nested dicts -> dataclasses

    entry = {"reward": "process", "aggregate": "product", "labels": {"kind": "monte_carlo", "rollouts": 4}}
    cfg = to_dataclass(ProcessRewardsConfig, strict_model_for(ProcessRewardsConfig).model_validate(entry))
    assert cfg.labels.rollouts == 4 and cfg.aggregate == "product"
    with pytest.raises(ValueError, match="prm_path"):
        to_dataclass(ProcessRewardsConfig, strict_model_for(ProcessRewardsConfig).model_validate({"scorer": "prm"}))


def test_registered_hooks_describe_and_state_round_trip():
    assert MITIGATIONS["process_rewards"] is ProcessRewards
    assert ProcessRewards.limit == "reasoning" and ProcessRewards.name == "process_rewards"
    assert hooks_overridden(make()) == ["reward_fns", "step_rewards", "state_dict", "load_state_dict"]
    assert make().describe()["labels"]["kind"] == "verifier"
    a = make()
    a.step_rewards([PROMPT] * 2, [RIGHT, WRONG], answer=["9", "9"])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert b.scored == 2
    b.step_rewards([PROMPT], [WRONG], answer=["9"])
    assert b.scored == 3  # resume continues the counter
