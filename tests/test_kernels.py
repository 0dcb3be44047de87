"""The training switches (``trainer.compile``, ``trainer.fused_optimizer``, ``trainer.liger``; trainers/build/kernels.py)
on both backends: where the CPU can run one, the loss curve and the trained weights match the plain path's within a
stated tolerance; where it cannot (Liger), the wiring is checked with a stand-in and the refusals are one line.

Tolerances: torch.compile (inductor) fuses and reorders float ops, and fused AdamW updates in another order than the
foreach one, so bitwise equality is not promised. A 2-layer, hidden-32 model in fp32 at lr 3e-3 agrees to
``LOSS_RTOL`` in its losses and to ``WEIGHT_ATOL`` in every weight after 3-4 steps.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llm_limits.trainers.build import kernels
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import validate_recipe
from llm_limits.trainers.run import train
from tests.test_trl_backend import backend_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL = 1e-4
"""Relative tolerance on the losses (fp32)."""
WEIGHT_ATOL = 1e-4
"""Absolute tolerance on every trained weight after 3-4 steps."""


def _run(tmp_path: Path, backend: str, name: str, **trainer: Any) -> Path:
    r = backend_recipe(tmp_path, backend)
    r["name"] = name
    r["trainer"].update(max_steps=4, log_every=1, warmup_steps=0, **trainer)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(r))
    return train(str(path), progress=False, echo=lambda s: None)


def _losses(run_dir: Path) -> list[float]:
    """The training losses results.json records (the final training loss and the validation loss)."""
    training = json.loads((run_dir / "results.json").read_text())["train"]
    return [training["final_loss"], training["val_loss"]]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_training(a: Path, b: Path) -> None:
    la, lb = _losses(a), _losses(b)
    assert all(x == x for x in la + lb)  # logged, not NaN
    assert la == pytest.approx(lb, rel=LOSS_RTOL)
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()  # compiling the forward adds no _orig_mod. prefix to the saved names
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=WEIGHT_ATOL, rtol=0, msg=k)


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory) -> dict[str, Path]:
    """One plain run per backend, the reference of every switch (the TRL one with the unfused AdamW)."""
    tmp = tmp_path_factory.mktemp("plain")
    return {"lightning": _run(tmp, "lightning", "plain-lightning"),
            "trl": _run(tmp, "trl", "plain-trl", fused_optimizer=False)}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["lightning", "trl"])
def test_fused_adamw_gives_the_plain_loss_and_compile_reaches_training(backend, plain_runs, tmp_path, monkeypatch):
    """``fused_optimizer: true`` against the unfused AdamW on each backend; the same run has ``compile: true`` with
    torch.compile replaced by a spy that returns the forward unchanged (the real compile's numbers are checked below,
    on the model alone: inductor compiling a Lightning or TRL run takes minutes on this CPU)."""
    compiled: list[Any] = []

    def spy(fn):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(kernels.torch, "compile", spy)
    fused = _run(tmp_path, backend, f"fused-{backend}", fused_optimizer=True, compile=True)
    _assert_same_training(plain_runs[backend], fused)
    assert len(compiled) == 1 and getattr(compiled[0], "__self__", None) is not None  # the model's bound forward


@pytest.mark.slow
def test_compile_gives_the_plain_loss(monkeypatch):
    """torch.compile of a tiny Llama's forward, 3 AdamW steps: the same losses and weights as eager within
    ``LOSS_RTOL`` and ``WEIGHT_ATOL``. The compile uses the ``aot_eager`` backend: Dynamo's graph capture and AOT
    autograd's joint forward/backward as in a real compile, without inductor's C++ code generation, which took more
    than 10 minutes on this shared 2-core machine (inductor's own numbers come from scripts/bench_mfu.py on a GPU)."""
    import functools

    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(kernels.torch, "compile", functools.partial(torch.compile, backend="aot_eager"))

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
    ids = torch.randint(0, 50, (4, 3, 32), generator=torch.Generator().manual_seed(0))

    def train(compile: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        opt = kernels.adamw(model.parameters(), lr=3e-3, fused=None)
        losses = []
        with kernels.compiled_forward(model, enabled=compile):
            for batch in ids:
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}

    (eager_losses, eager_w), (comp_losses, comp_w) = train(False), train(True)
    assert comp_losses == pytest.approx(eager_losses, rel=LOSS_RTOL)
    assert comp_w.keys() == eager_w.keys()
    for k in eager_w:
        torch.testing.assert_close(comp_w[k], eager_w[k], atol=WEIGHT_ATOL, rtol=0, msg=k)


def test_compile_is_undone_after_training():
    """The evals after training run the plain forward, and the state dict keeps its names."""
    model = torch.nn.Linear(3, 2)
    names = list(model.state_dict())
    with kernels.compiled_forward(model):
        assert "forward" in model.__dict__
    assert "forward" not in model.__dict__ and list(model.state_dict()) == names
    patched = lambda x: x  # noqa: E731 -- a forward a trainer patched on the instance (TRL's fused LM head does)
    model.forward = patched
    with kernels.compiled_forward(model):
        assert model.forward is not patched
    assert model.forward is patched


def test_fused_optimizer_reaches_both_optimizers(tmp_path):
    from llm_limits.trainers.backends.trl import training_kwargs

    r = validate_recipe(backend_recipe(tmp_path, "trl"), check_hardware=False).recipe
    for fused, optim in ((True, "adamw_torch_fused"), (False, "adamw_torch")):
        spec = r.trainer.model_copy(update={"fused_optimizer": fused})
        assert training_kwargs(spec, r.data, tmp_path, 0, progress=False, has_val=False)["optim"] == optim
    assert "optim" not in training_kwargs(r.trainer, r.data, tmp_path, 0, progress=False, has_val=False)
    p = [torch.nn.Parameter(torch.ones(2))]
    assert kernels.adamw(p, lr=1e-3, fused=True).defaults["fused"] is True
    assert not kernels.adamw(p, lr=1e-3, fused=None).defaults["fused"]


# --- Liger: GPU only; the wiring with a stand-in for liger_kernel ---------------------------------------------------------
@pytest.fixture
def fake_liger(monkeypatch):
    calls: list[dict[str, Any]] = []
    pkg = types.ModuleType("liger_kernel")
    sub = types.ModuleType("liger_kernel.transformers")
    sub._apply_liger_kernel_to_instance = lambda model, **kw: calls.append({"model": model, **kw})
    pkg.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    return calls


def test_liger_patches_causal_lms_with_the_fused_cross_entropy_only_where_asked(fake_liger):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=11,
                      num_labels=1)
    lm, prm = LlamaForCausalLM(cfg), LlamaForTokenClassification(cfg)
    kernels.apply_liger(lm, fused_linear_cross_entropy=True)
    kernels.apply_liger(lm, fused_linear_cross_entropy=False)
    kernels.apply_liger(prm, fused_linear_cross_entropy=True)  # a reward model's head is no LM head
    assert [(c["model"], c["fused_linear_cross_entropy"]) for c in fake_liger] == [(lm, True), (lm, False), (prm, False)]


def test_liger_refuses_a_model_type_without_kernels(fake_liger):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UserError, match="liger-kernel has no kernels for gpt2 models"):
        kernels.apply_liger(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=11)),
                            fused_linear_cross_entropy=True)
    assert not fake_liger


def _recipe(**trainer: Any) -> dict[str, Any]:
    from tests.conftest import TINY

    r = copy.deepcopy(TINY)
    r["trainer"].update(trainer)
    return r


def test_refusals_where_the_machine_cannot_run_a_switch(monkeypatch):
    from llm_limits.trainers.recipe import schema

    monkeypatch.setattr(schema, "_cuda_available", lambda: True)
    monkeypatch.setattr(schema, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    with pytest.raises(UserError, match=r"^r\.yaml: trainer\.liger: needs the liger-kernel package, which is not "):
        validate_recipe(_recipe(accelerator="gpu", liger=True), "r.yaml")
    monkeypatch.setattr(kernels, "fused_adamw_supported", lambda device: False)
    with pytest.raises(UserError, match=r"^r\.yaml: trainer\.fused_optimizer: this torch .* has no fused AdamW for cuda"):
        validate_recipe(_recipe(accelerator="gpu", fused_optimizer=True), "r.yaml")
    validate_recipe(_recipe(accelerator="gpu", fused_optimizer=None), "r.yaml")  # unset: the backend's default
    monkeypatch.setattr(kernels, "cpp_compiler", lambda: None)
    with pytest.raises(UserError, match=r"^r\.yaml: trainer\.compile: torch\.compile on the CPU needs a C\+\+ compiler"):
        validate_recipe(_recipe(accelerator="cpu", compile=True), "r.yaml")
    validate_recipe(_recipe(accelerator="cpu", compile=True), "r.yaml", check_hardware=False)  # `validate`: schema only


def test_liger_model_type_read_from_a_model_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    r = _recipe(liger=True)
    r["model"] = {"path": str(tmp_path)}
    with pytest.raises(UserError, match="trainer.liger: liger-kernel has no kernels for gpt2 models"):
        validate_recipe(r, "r.yaml", check_hardware=False)
