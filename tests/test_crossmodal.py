"""The crossmodal mitigation: each loss against hand-computed values, gradient directions, the multi-positive
InfoNCE reducing to CLIP's, answer balancing, the schedule, config errors, and extra_loss on a tiny LLaVA."""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import StepContext, hooks_overridden
from llm_limits.mitigations.crossmodal import (
    CrossModal,
    CrossModalConfig,
    alignment,
    balance_answers,
    centroid_gap,
    infonce,
    loss_weight,
    mean_pool,
    siglip,
    uniformity,
)

pytestmark = pytest.mark.usefixtures("one_thread")

I2 = torch.eye(2)
SWAP = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
ALL = torch.ones(2, 2, dtype=torch.bool)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --- pooling ----------------------------------------------------------------------------------------------------------
def test_mean_pool_averages_masked_positions_only():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    out = mean_pool(h, torch.tensor([[1, 1, 0], [0, 0, 1]]))
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [9.0, 10.0]]))
    assert torch.equal(mean_pool(h, torch.zeros(2, 3)), torch.zeros(2, 2))  # nothing pooled: zeros, not NaN


# --- InfoNCE ----------------------------------------------------------------------------------------------------------
def test_infonce_hand_values():
    # s = log 2: logits = 2 * I. Each row's CE = -log(e^2 / (e^2 + e^0)) = log(1 + e^-2), in both directions.
    assert float(infonce(I2, I2, torch.tensor(math.log(2.0)))) == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)
    # captions swapped: the positive sits at logit 0, the negative at 2 -> log(1 + e^2)
    assert float(infonce(I2, SWAP, torch.tensor(math.log(2.0)))) == pytest.approx(math.log1p(math.exp(2)), abs=1e-6)
    # inputs are L2-normalised first: scaling an embedding changes nothing
    assert float(infonce(3 * I2, 0.5 * I2, torch.tensor(math.log(2.0)))) == pytest.approx(math.log1p(math.exp(-2)))


def test_infonce_multi_positive_hand_value():
    # s = 0 (scale 1), logits = I; both rows share the caption group, so both columns are positives of each row:
    # row 0: -(1/2) * [log(e/(e+1)) + log(1/(e+1))] = log(1 + e) - 1/2, the same for every row and both directions.
    assert float(infonce(I2, I2, torch.tensor(0.0), ALL)) == pytest.approx(math.log1p(math.e) - 0.5, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_infonce_single_positive_is_clip(temperature):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    s = torch.tensor(math.log(1 / temperature))
    logits = math.exp(float(s)) * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    labels = torch.arange(6)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert float(infonce(img, txt, s, torch.eye(6, dtype=torch.bool))) == pytest.approx(float(clip), abs=1e-5)
    assert float(infonce(img, txt, s)) == pytest.approx(float(clip), abs=1e-5)  # None = the diagonal


def test_infonce_logit_scale_is_clamped_at_log_100():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    at_cap = infonce(img, txt, torch.tensor(math.log(100.0)))
    assert float(infonce(img, txt, torch.tensor(9.0))) == pytest.approx(float(at_cap))
    s = torch.tensor(9.0, requires_grad=True)
    infonce(img, txt, s).backward()
    assert float(s.grad) == 0.0  # above the cap the scale no longer learns


# --- SigLIP -----------------------------------------------------------------------------------------------------------
def test_siglip_hand_values():
    # t' = 0, b = 1: logits = I + 1 = [[2, 1], [1, 2]].
    # diagonal labels: 2 * softplus(-2) + 2 * softplus(1) (the -log sigmoid(z * logit) terms), over |B| = 2
    want = (2 * softplus(-2) + 2 * softplus(1)) / 2
    assert float(siglip(I2, I2, torch.tensor(0.0), torch.tensor(1.0))) == pytest.approx(want, abs=1e-6)
    # one caption group: all four pairs are positives: 2 * softplus(-2) + 2 * softplus(-1), over 2
    want = (2 * softplus(-2) + 2 * softplus(-1)) / 2
    assert float(siglip(I2, I2, torch.tensor(0.0), torch.tensor(1.0), ALL)) == pytest.approx(want, abs=1e-6)


def test_siglip_at_the_paper_init():
    # t' = log 10, b = -10: positives at 10 - 10 = 0 (log 2 each), negatives at -10 (softplus(-10) each)
    want = (2 * math.log(2) + 2 * softplus(-10)) / 2
    assert float(siglip(I2, I2, torch.tensor(math.log(10)), torch.tensor(-10.0))) == pytest.approx(want, abs=1e-6)


# --- geometry ---------------------------------------------------------------------------------------------------------
def test_alignment_hand_values():
    img, txt = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    # normalised pairs: (1,0)-(0,1) -> squared distance 2; (0,1)-(0,1) -> 0; mean 1
    assert float(alignment(img, txt)) == pytest.approx(1.0)
    assert float(alignment(img, txt, alpha=1.0)) == pytest.approx(math.sqrt(2) / 2)


def test_uniformity_hand_value():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # squared distances of the 3 distinct pairs: 2, 4, 2; t = 2: log((e^-4 + e^-8 + e^-4) / 3)
    want = math.log((2 * math.exp(-4) + math.exp(-8)) / 3)
    assert float(uniformity(x)) == pytest.approx(want, abs=1e-6)
    assert float(uniformity(x, t=1.0)) == pytest.approx(math.log((2 * math.exp(-2) + math.exp(-4)) / 3), abs=1e-6)


def test_centroid_gap_hand_values():
    # normalised centroids (0.5, 0.5) and (-0.5, -0.5): squared distance 1 + 1 = 2
    assert float(centroid_gap(I2, -I2 * 3)) == pytest.approx(2.0)
    assert float(centroid_gap(I2, SWAP)) == pytest.approx(0.0)  # same centroid, though no pair matches


# --- gradient directions ----------------------------------------------------------------------------------------------
def _leaves(seed: int = 0, b: int = 4, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g).requires_grad_(), torch.randn(b, d, generator=g).requires_grad_()


def _sgd_step(loss_fn, img, txt, lr: float = 0.05) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    loss = loss_fn(img, txt)
    loss.backward()
    with torch.no_grad():
        img2, txt2 = img - lr * img.grad, txt - lr * txt.grad
    return float(loss.detach()), float(loss_fn(img2, txt2)), img2, txt2


def _pos_cos(img, txt) -> float:
    return float(F.cosine_similarity(img, txt, dim=-1).mean())


@pytest.mark.parametrize("name", ["infonce", "siglip"])
def test_contrastive_step_decreases_loss_and_raises_positive_cosine(name):
    img, txt = _leaves()
    if name == "infonce":
        fn = lambda a, b: infonce(a, b, torch.tensor(math.log(1 / 0.07)))  # noqa: E731
    else:
        fn = lambda a, b: siglip(a, b, torch.tensor(math.log(10)), torch.tensor(-10.0))  # noqa: E731
    before, after, img2, txt2 = _sgd_step(fn, img, txt)
    assert after < before
    assert _pos_cos(img2, txt2) > _pos_cos(img.detach(), txt.detach())


def test_gap_terms_step_in_the_right_direction():
    img, txt = _leaves(seed=2)
    before, after, _, _ = _sgd_step(lambda a, b: alignment(a, b), img, txt)
    assert after < before
    img, txt = _leaves(seed=3)
    before, after, _, _ = _sgd_step(lambda a, b: uniformity(torch.cat([a, b])), img, txt)
    assert after < before


def test_centroid_gap_gradient_moves_centroids_together():
    img, txt = _leaves(seed=4)
    with torch.no_grad():
        img += 2.0  # two separated clusters
        txt -= 2.0
    c = lambda x: F.normalize(x, dim=-1).mean(0)  # noqa: E731
    before, after, img2, txt2 = _sgd_step(centroid_gap, img, txt, lr=0.5)
    assert after < before
    assert float((c(img2) - c(txt2)).norm()) < float((c(img.detach()) - c(txt.detach())).norm())


# --- answer balancing -------------------------------------------------------------------------------------------------
def _records() -> list[dict]:
    def rec(i, kind, q, a, choices):
        return {"task": "digits", "id": f"r{i}", "image_id": f"img{i}", "image": np.full((2, 2, 3), i, np.uint8),
                "caption": f"caption {i}", "question": q, "answer": a, "choices": choices, "kind": kind,
                "pair_id": -1, "prior_answer": "", "attributes": {}}

    out = []
    for i, a in enumerate(["yes"] * 5 + ["no"] * 2):
        out.append(rec(i, "qa", "is it odd?", a, ["yes", "no"]))
    for i, a in enumerate(["7", "7", "3", "1"], start=10):
        out.append(rec(i, "qa", "which digit is this?", a, ["1", "3", "7"]))
    out.append(rec(20, "caption", "what is in the image?", "caption 20", []))
    out.append(rec(21, "caption", "what is in the image?", "caption 21", []))
    out.append(rec(22, "qa", "is it even?", "no", ["yes", "no"]))  # a group of one answer: nothing to add
    return out


def test_balance_answers_equalises_each_question():
    records = _records()
    frozen = copy.deepcopy(records)
    out = balance_answers(records, seed=0)
    counts = {}
    for r in out:
        if r["choices"]:
            counts.setdefault(r["question"], Counter())[r["answer"]] += 1
    assert counts == {"is it odd?": {"yes": 5, "no": 5}, "which digit is this?": {"7": 2, "3": 2, "1": 2},
                      "is it even?": {"no": 1}}
    assert len(out) == len(records) + 3 + 2
    assert [r["id"] for r in out[: len(records)]] == [r["id"] for r in records]  # every record kept, in order
    assert len({r["id"] for r in out}) == len(out)  # added copies get unique ids
    for r in out[len(records):]:  # a copy is a copy of a record with that answer
        src = next(s for s in records if s["id"] == r["id"].split("~")[0])
        assert r["answer"] == src["answer"] and r["image_id"] == src["image_id"]
    # input untouched (same list, same dicts, same contents)
    assert len(records) == len(frozen)
    for a, b in zip(records, frozen):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) if k == "image" else a[k] == b[k] for k in a)


def test_balance_answers_captions_untouched_and_deterministic():
    records = _records()
    out = balance_answers(records, seed=0)
    assert [r for r in out if not r["choices"]] == [r for r in records if not r["choices"]]
    ids = lambda rs: [r["id"].split("~")[0] for r in rs]  # noqa: E731
    assert ids(balance_answers(records, seed=0)) == ids(out)
    assert any(ids(balance_answers(records, seed=s)) != ids(out) for s in range(1, 10))


def test_transform_records_applies_balancing_only_when_on():
    records = _records()
    assert CrossModal().transform_records(records, seed=0) is records
    on = CrossModal(CrossModalConfig(balance_answers=True)).transform_records(records, seed=0)
    assert [r["id"] for r in on] == [r["id"] for r in balance_answers(records, seed=0)]


# --- schedule ---------------------------------------------------------------------------------------------------------
def test_loss_weight_schedules():
    assert [loss_weight(2.0, "constant", 0.5, p) for p in (0.0, 0.3, 1.0)] == [2.0, 2.0, 2.0]
    assert [loss_weight(2.0, "linear_warmup", 0.5, p) for p in (0.0, 0.25, 0.5, 0.9)] == [0.0, 1.0, 2.0, 2.0]
    assert loss_weight(2.0, "linear_warmup", 0.0, 0.0) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        loss_weight(1.0, "cosine", 0.1, 0.5)


# --- config, registry, loss module ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"contrastive": "clip"}, "contrastive"),
    ({"gap": "wasserstein"}, "gap"),
    ({"schedule": "cosine"}, "schedule"),
    ({"contrastive_weight": -1.0}, "contrastive_weight"),
    ({"gap_weight": float("nan")}, "gap_weight"),
    ({"uniformity_t": 0.0}, "uniformity_t"),
    ({"alignment_alpha": -2.0}, "alignment_alpha"),
    ({"warmup_fraction": 1.5}, "warmup_fraction"),
    ({"layer": 1.0}, "layer"),
    ({"layer": True}, "layer"),
    ({"infonce_init_temperature": 0.001}, "infonce_init_temperature"),
    ({"siglip_init_t_prime": float("inf")}, "siglip_init_t_prime"),
    ({"siglip_init_bias": "low"}, "siglip_init_bias"),
    ({"balance_answers": "yes"}, "balance_answers"),
    ({"contrastive": "none", "gap": "none"}, "contrastive"),
])  # fmt: skip
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        CrossModalConfig(**kwargs)


def test_config_accepts_each_single_part():
    CrossModalConfig(contrastive="none", gap="centroid")
    CrossModalConfig(contrastive="none", balance_answers=True)
    CrossModalConfig(contrastive="siglip", gap="align_uniform", schedule="linear_warmup", layer=0)


def test_registry_and_hooks():
    assert MITIGATIONS["crossmodal"] is CrossModal
    assert CrossModal.limit == "multimodal" and CrossModal.needs_hidden_states
    assert hooks_overridden(CrossModal()) == ["transform_records", "setup", "extra_loss", "loss_module"]


def test_loss_module_initial_values():
    m = CrossModal()
    mod = m.loss_module()
    assert mod is m.loss_module()  # the same module every call
    assert dict(mod.named_parameters()).keys() == {"logit_scale"}
    assert float(mod.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    mod = CrossModal(CrossModalConfig(contrastive="siglip")).loss_module()
    assert dict(mod.named_parameters()).keys() == {"t_prime", "bias"}
    assert float(mod.t_prime.detach()) == pytest.approx(math.log(10)) and float(mod.bias.detach()) == -10.0
    assert all(p.requires_grad for p in mod.parameters())
    assert CrossModal(CrossModalConfig(contrastive="none", gap="centroid")).loss_module() is None
    assert CrossModal(CrossModalConfig(enabled=False)).loss_module() is None


# --- extra_loss on a tiny LLaVA ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm_batch():
    from llm_limits.evals import vlm
    from tests.vlm_fixtures import tiny_vlm

    model, tok = tiny_vlm("clip")
    fmt = vlm.image_format(model, tok)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(4)]
    captions = ["a red circle.", "a blue square.", "a red circle.", "a small green dot."]  # rows 0 and 2 share
    answers = ["red", "blue", "red", "green"]
    rows = [vlm.bos_ids(tok) + vlm.encode(tok, vlm.prompt_text("what colour?", fmt)) + vlm.encode(tok, a)
            + [tok.eos_token_id] for a in answers]
    width = max(len(r) for r in rows)
    ids = torch.full((4, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    cap_ids, cap_mask = vlm.caption_batch(tok, captions)
    groups = {c: g for g, c in enumerate(sorted(set(captions)))}
    batch = {
        "input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100),
        "pixel_values": vlm.pixel_values(images, fmt),
        "image_mask": (ids == fmt.image_token_id).long(),
        "caption_input_ids": cap_ids, "caption_attention_mask": cap_mask,
        "caption_group": torch.tensor([groups[c] for c in captions]),
        "image_group": torch.arange(4),
    }
    return model, tok, fmt, images, captions, batch


def _forward(model, batch):
    keys = ("input_ids", "attention_mask", "labels", "pixel_values")
    return model(**{k: batch[k] for k in keys}, output_hidden_states=True)


@pytest.mark.parametrize("cfg", [
    CrossModalConfig(),
    CrossModalConfig(contrastive="siglip", gap="align_uniform", layer=0),
    CrossModalConfig(contrastive="none", gap="centroid", schedule="linear_warmup"),
])  # fmt: skip
def test_extra_loss_on_tiny_vlm(vlm_batch, cfg):
    model, tok, _, _, _, batch = vlm_batch
    m = CrossModal(cfg)
    assert m.setup(model, tok) is model
    logs: dict[str, float] = {}
    ctx = StepContext(step=5, max_steps=10, log=lambda k, v: logs.__setitem__(k, v))
    model.zero_grad()
    loss = m.extra_loss(_forward(model, batch), batch, ctx)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for part in ("vision_tower", "multi_modal_projector"):
        grads = [p.grad for n, p in model.named_parameters() if part in n]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part
    if m.loss_module() is not None:
        assert all(p.grad is not None and p.grad.abs() > 0 for p in m.loss_module().parameters())
    expected = {"crossmodal/gap", "crossmodal/weight", "crossmodal/loss", "crossmodal/positive_cosine"}
    expected |= {"infonce": {"crossmodal/infonce", "crossmodal/temperature"},
                 "siglip": {"crossmodal/siglip", "crossmodal/t", "crossmodal/bias"}, "none": set()}[cfg.contrastive]
    expected |= {"crossmodal/alignment", "crossmodal/uniformity"} if cfg.gap == "align_uniform" else set()
    assert set(logs) == expected
    assert logs["crossmodal/loss"] == pytest.approx(float(loss.detach()))
    if cfg.contrastive == "infonce":
        assert logs["crossmodal/temperature"] == pytest.approx(0.07)
    model.zero_grad()


@pytest.mark.parametrize("layer", [-1, 0])
def test_embeddings_mirror_evals_vlm(vlm_batch, layer):
    from llm_limits.evals import vlm
    from llm_limits.evals.multimodal import modality_gap

    model, tok, fmt, images, captions, batch = vlm_batch
    m = CrossModal(CrossModalConfig(layer=layer))
    m.setup(model, tok)
    with torch.no_grad():
        img, txt = m.embeddings(_forward(model, batch), batch)
    # image tokens come right after <bos> in a row, so causal attention makes them see exactly what embed_images feeds
    assert torch.allclose(img, vlm.embed_images(model, tok, fmt, images, layer=layer), atol=1e-5)
    assert torch.allclose(txt, vlm.embed_texts(model, tok, captions, layer=layer), atol=1e-5)
    logs: dict[str, float] = {}
    with torch.no_grad():
        m.extra_loss(_forward(model, batch), batch, StepContext(1, 2, log=lambda k, v: logs.__setitem__(k, v)))
    assert logs["crossmodal/gap"] == pytest.approx(modality_gap(img.numpy(), txt.numpy()), abs=1e-5)  # eval's unit


def test_extra_loss_warmup_start_and_errors(vlm_batch):
    model, tok, _, _, _, batch = vlm_batch
    m = CrossModal(CrossModalConfig(schedule="linear_warmup", warmup_fraction=0.5))
    m.setup(model, tok)
    with torch.no_grad():
        out = _forward(model, batch)
        assert float(m.extra_loss(out, batch, StepContext(step=0, max_steps=10))) == 0.0
        no_image = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_mask")}
        with pytest.raises(ValueError, match="crossmodal needs image batches"):
            m.extra_loss(out, no_image, StepContext(step=0, max_steps=10))
        with pytest.raises(ValueError, match="^layer:"):
            bad = CrossModal(CrossModalConfig(layer=99))
            bad.setup(model, tok)
            bad.extra_loss(out, batch, StepContext(step=0, max_steps=10))
    only_data = CrossModal(CrossModalConfig(contrastive="none", balance_answers=True))
    assert only_data.extra_loss(None, {}, StepContext(step=0, max_steps=1)) is None
