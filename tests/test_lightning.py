"""The Lightning backend: every mitigation hook is called, weights train, state rides in checkpoints; DDP on CPU."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from llm_limits.mitigations.base import Mitigation, MitigationConfig, StepContext
from llm_limits.mitigations.noop import NoOp
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.backends.hooks import HookDriver
from llm_limits.trainers.backends.lightning import CausalLMModule, LightningBackend, build_trainer
from llm_limits.trainers.recipe.schema import validate_recipe
from llm_limits.trainers.build.assemble import build

from tests.conftest import TINY
from tests.test_cli import run_cli, run_dirs


@dataclass
class RecorderConfig(MitigationConfig):
    weight: float = 0.5


class Recorder(Mitigation):
    """Test double: records every context it sees, truncates the batch, and adds a known extra loss."""

    name = "recorder"
    Config = RecorderConfig

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.contexts: list[StepContext] = []
        self.seen_seq_len: list[int] = []
        self.loaded: dict | None = None

    def transform_batch(self, batch, ctx):
        self.contexts.append(ctx)
        ctx.log("recorder/step", float(ctx.step))
        out = {k: (v[:, :16] if v.ndim == 2 else v) for k, v in batch.items()}  # a new dict; metadata stays
        return out

    def extra_loss(self, outputs, batch, ctx):
        self.seen_seq_len.append(outputs.logits.shape[1])
        return torch.tensor(self.config.weight)

    def state_dict(self):
        return {"n": len(self.contexts)}

    def load_state_dict(self, state):
        self.loaded = dict(state)


def module_for(model, mitigations, spec):
    """The module as a run builds it: the backend's check, the hook driver's setup (once), then the module."""
    LightningBackend(None).check(mitigations)
    model, hooks = HookDriver.prepare(model, mitigations, max_tokens=spec.max_tokens)
    return CausalLMModule(model, hooks, spec)


def _built():
    resolved = validate_recipe(json.loads(json.dumps(TINY)), "tiny")
    built, train_loader, val_loader = build(resolved)
    return resolved, built, train_loader, val_loader


def test_every_hook_is_called_and_weights_train(tmp_path):
    resolved, built, train_loader, _ = _built()
    noop, rec = NoOp(), Recorder()
    before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    module = module_for(built.model, [noop, rec], resolved.recipe.trainer.model_copy(update={"max_steps": 3}))
    trainer = build_trainer(module.spec, tmp_path, logger=None, has_val=False, progress=False)
    trainer.fit(module, train_dataloaders=train_loader)

    assert noop.calls == {"setup": 1, "transform_batch": 3, "extra_loss": 3, "reward_fns": 1}
    assert [c.step for c in rec.contexts] == [0, 1, 2]
    assert all(c.max_steps == 3 and c.world_size == 1 for c in rec.contexts)
    assert rec.contexts[1].tokens_seen == 8 * 16  # batch 8 x the 16 tokens left after transform_batch
    assert rec.seen_seq_len == [16, 16, 16]  # the model saw the transformed batch
    # the extra loss is added to the LM loss
    logged = trainer.callback_metrics
    assert float(logged["train/loss"]) == pytest.approx(float(logged["train/lm_loss"]) + 0.5, rel=1e-5)
    assert "recorder/step" in logged and "recorder/extra_loss" in logged
    changed = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before), "every trainable parameter should move"


def test_gradient_accumulation_and_bf16_on_cpu(tmp_path):
    resolved, built, train_loader, _ = _built()
    noop = NoOp()
    spec = resolved.recipe.trainer.model_copy(update={"max_steps": 2, "grad_accum": 2, "precision": "bf16-mixed"})
    module = module_for(built.model, [noop], spec)
    trainer = build_trainer(spec, tmp_path, logger=None, has_val=False, progress=False)
    trainer.fit(module, train_dataloaders=train_loader)
    assert trainer.global_step == 2
    assert noop.calls["transform_batch"] == 4  # two micro-batches per optimizer step
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_token_budget_stops_the_run_and_drives_the_lr(tmp_path):
    """max_tokens = 3 full batches (8 x 32 tokens): the run stops after 3 steps, not at max_steps, and the LR schedule
    follows tokens (cosine to zero at the budget)."""
    resolved, built, train_loader, _ = _built()
    spec = resolved.recipe.trainer.model_copy(
        update={"max_steps": 50, "max_tokens": 3 * 8 * 32, "warmup_steps": 0, "lr_schedule": "linear"}
    )
    rec = Recorder(RecorderConfig(weight=0.0))
    rec.transform_batch = lambda batch, ctx: (rec.contexts.append(ctx), batch)[1]  # keep full-length batches
    module = module_for(built.model, [rec], spec)
    trainer = build_trainer(spec, tmp_path, logger=None, has_val=False, progress=False)
    trainer.fit(module, train_dataloaders=train_loader)
    assert trainer.global_step == 3 and module.tokens_seen == 3 * 8 * 32
    assert [c.max_tokens for c in rec.contexts] == [768] * 3
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)  # linear decay hit 0 at the budget


def test_disabled_mitigation_is_skipped():
    _, built, _, _ = _built()
    rec = Recorder(RecorderConfig(enabled=False))
    module = module_for(built.model, [rec], validate_recipe(json.loads(json.dumps(TINY))).recipe.trainer)
    assert module.hooks.mitigations == []


def test_mitigation_state_rides_in_checkpoints():
    _, built, _, _ = _built()
    rec = Recorder()
    rec.contexts = [None, None]  # type: ignore[list-item]
    module = module_for(built.model, [rec], validate_recipe(json.loads(json.dumps(TINY))).recipe.trainer)
    ckpt: dict = {}
    module.hooks.tokens_seen = 77
    module.on_save_checkpoint(ckpt)
    assert ckpt["llm_limits"]["mitigations"]["recorder"] == {"n": 2}
    fresh = Recorder()
    module2 = module_for(built.model, [fresh], module.spec)
    module2.on_load_checkpoint(ckpt)
    assert fresh.loaded == {"n": 2} and module2.tokens_seen == 77


def test_lora_trains_adapters_only(tmp_path):
    data = json.loads(json.dumps(TINY))
    data["model"]["lora"] = {"r": 4, "alpha": 8}
    resolved = validate_recipe(data, "tiny")
    built, train_loader, _ = build(resolved)
    before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    module = module_for(built.model, [], resolved.recipe.trainer.model_copy(update={"max_steps": 2}))
    build_trainer(module.spec, tmp_path, None, has_val=False, progress=False).fit(module, train_dataloaders=train_loader)
    for n, p in module.model.named_parameters():
        moved = not torch.equal(p, before[n])
        if "lora_" in n:
            assert p.requires_grad
        else:
            assert not p.requires_grad and not moved, n
    assert any("lora_B" in n and not torch.equal(p, before[n]) for n, p in module.model.named_parameters())


def test_reward_functions_are_refused_by_the_lm_backend():
    class Rewarder(Mitigation):
        name = "rewarder"

        def reward_fns(self):
            return [lambda completions, **kw: [0.0] * len(completions)]

    _, built, _, _ = _built()
    with pytest.raises(UserError, match="rewarder provides reward functions"):
        module_for(built.model, [Rewarder()], validate_recipe(json.loads(json.dumps(TINY))).recipe.trainer)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(write_recipe, tiny_recipe, tmp_path):
    """Lightning's launcher starts the second rank; only rank 0 makes the run directory, runs evals and reports."""
    path = write_recipe(tiny_recipe)
    out = run_cli("train", str(path), "trainer.strategy=ddp", "trainer.devices=2", "trainer.max_steps=4", "--no-progress")
    assert out.returncode == 0, out.stderr[-4000:]
    (run_dir,) = run_dirs(tmp_path / "runs")  # one run directory, not one per rank
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["steps"] == 4
    # tokens are counted over both ranks: 4 steps x 2 ranks x batch 8 x 32 tokens
    assert results["train"]["tokens_seen"] == 4 * 2 * 8 * 32
    assert set(results["evals"]["positional_loss"]) >= {"before", "after", "compare"}
    assert out.stdout.count("eval before:") == 1 and out.stdout.count("eval after:") == 1
