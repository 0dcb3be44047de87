"""The one hook driver, seen from both backends: setup exactly once, the same StepContext, one state format.

Three defects of the two-backend code each have a test here that failed before the driver existed:
1. ``setup`` ran twice on the TRL backend (the run's ``apply_setup``, then the backend's own loop);
2. a TRL mitigation never saw ``tokens_seen`` or ``max_tokens`` (a warmup counted in tokens never advanced);
3. a positional mitigation on the TRL backend crashed at its first checkpoint (its generator state is a tensor, and
   the TRL backend wrote mitigation state as JSON).
"""

from __future__ import annotations


import pytest
import torch

from llm_limits.mitigations.base import StepContext
from llm_limits.mitigations.noop import NoOp
from llm_limits.trainers.backends.hooks import STATE_FILE, HookDriver, load_state, save_state
from llm_limits.trainers.run import train

from tests.test_trl_backend import backend_recipe, resume_after_crash, trl_recipe, weights, write

pytestmark = pytest.mark.usefixtures("one_thread")

BUDGET = 10**6  # a token budget far beyond the steps: the runs end at max_steps, and ctx.max_tokens must show it


@pytest.fixture
def recorded(monkeypatch):
    """Every NoOp's setup calls and the contexts its transform_batch sees, across the instances a run builds."""
    seen: dict = {"setup": 0, "contexts": []}
    setup, transform = NoOp.setup, NoOp.transform_batch

    def counting_setup(self, model, tokenizer=None):
        seen["setup"] += 1
        return setup(self, model, tokenizer)

    def recording_transform(self, batch, ctx):
        seen["contexts"].append(ctx)
        return transform(self, batch, ctx)

    monkeypatch.setattr(NoOp, "setup", counting_setup)
    monkeypatch.setattr(NoOp, "transform_batch", recording_transform)
    return seen


def noop_recipe(tmp_path, backend: str) -> dict:
    r = backend_recipe(tmp_path, backend)
    r["trainer"].update(max_steps=3, max_tokens=BUDGET, warmup_steps=0, log_every=1)
    r["mitigations"] = [{"name": "noop"}]
    return r


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["lightning", "trl"])
def test_setup_once_and_the_same_step_context_on_both_backends(tmp_path, recorded, backend):
    train(str(write(tmp_path, noop_recipe(tmp_path, backend))), progress=False, echo=lambda s: None)
    assert recorded["setup"] == 1  # defect 1: the TRL backend ran it twice
    ctxs: list[StepContext] = recorded["contexts"]
    assert [c.step for c in ctxs] == [0, 1, 2]
    assert all(c.max_steps == 3 and c.rank == 0 and c.world_size == 1 for c in ctxs)
    # defect 2: on the TRL backend tokens_seen stayed 0 and max_tokens was never passed
    assert all(c.max_tokens == BUDGET for c in ctxs)
    tokens = [c.tokens_seen for c in ctxs]
    assert tokens[0] == 0 and tokens[0] < tokens[1] < tokens[2], tokens


def test_a_driver_sets_up_once():
    noop = NoOp()
    model, hooks = HookDriver.prepare(torch.nn.Linear(2, 2), [noop])
    assert noop.calls["setup"] == 1
    with pytest.raises(RuntimeError, match="exactly once"):
        hooks.setup(model)


def test_state_survives_tensors_and_generator_states(tmp_path):
    """One format for both backends: torch.save of the driver's dict, read back with weights_only."""
    g = torch.Generator().manual_seed(3)
    g.manual_seed(7)
    state = {"mitigations": {"m": {"gen": g.get_state(), "hist": torch.arange(4), "n": 2, "name": "x", "xs": [1.5]}},
             "tokens_seen": 123, "history": [{"step": 1.0, "loss": 2.5}]}
    save_state(tmp_path / STATE_FILE, state)
    back = load_state(tmp_path / STATE_FILE)
    assert torch.equal(back["mitigations"]["m"]["gen"], g.get_state()) and back["tokens_seen"] == 123
    assert back["mitigations"]["m"]["n"] == 2 and back["history"] == state["history"]
    fresh = torch.Generator()
    fresh.set_state(back["mitigations"]["m"]["gen"])
    assert torch.equal(torch.rand(3, generator=fresh), torch.rand(3, generator=g))


@pytest.mark.slow
def test_positional_on_trl_checkpoints_and_resumes_bitwise(tmp_path):
    """Defect 3: PoSE and a warmup counted in tokens on the TRL backend train, checkpoint (the generator states are
    tensors) and resume to bitwise the same weights; the warmup advances with the tokens."""
    r = trl_recipe(tmp_path, "sft")
    r["evals"] = []
    r["trainer"].update(max_steps=4, checkpoint_every=2, warmup_steps=0, log_every=1)
    r["mitigations"] = [{"name": "positional",
                         "warmup": {"enabled": True, "min_len": 16, "count_in": "tokens", "warmup_tokens": 300},
                         "pose": {"enabled": True, "target_len": 128, "num_chunks": 2}}]
    run_dir = train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)
    state = load_state(run_dir / "checkpoints" / "checkpoint-2" / STATE_FILE)
    assert state["tokens_seen"] > 0
    assert any(torch.is_tensor(v) for v in state["mitigations"]["positional"].values())
    lengths = [h["positional/seq_len"] for h in load_state(run_dir / "checkpoints" / "checkpoint-4" / STATE_FILE)["history"]
               if "positional/seq_len" in h]
    assert len(lengths) >= 2 and lengths[-1] > lengths[0], lengths  # the warmup moved with the tokens seen

    resumed = resume_after_crash(run_dir, tmp_path, lost="checkpoint-4")
    a, b = weights(run_dir), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
