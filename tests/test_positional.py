"""The positional mitigation: the four pure cores, the hook object, SSMax through transformers, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import StepContext
from llm_limits.mitigations.positional import (
    Positional,
    PositionalConfig,
    WarmupConfig,
    attach_ssmax,
    balance_needles,
    count_keys,
    curriculum_seq_len,
    needle_depth,
    pose_position_ids,
    ssmax_attention,
    ssmax_init,
    truncate_batch,
)
from llm_limits.mitigations.positional.core import SPAN_KEYS
from llm_limits.mitigations.positional.mitigation import SSMAX_ATTENTION, register_ssmax_attention

VOCAB = 64


def tiny_llama(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=512,
    )  # fmt: skip
    kw.update(overrides)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kw))


def needle_batch(rows: int = 4, seq: int = 64, plain_rows: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """``rows`` rows of ``seq`` tokens: structured rows are prompt (4) + haystack with a 4-token needle at a varying
    depth + query/answer (8, labelled); the last ``plain_rows`` rows are plain LM text. Token ids are the slot
    indices plus a per-row offset, so every token is unique and traceable."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(seq).expand(rows, seq) + 1000 * torch.arange(rows)[:, None]
    labels = torch.full((rows, seq), -100)
    spans = {k: torch.full((rows,), -1) for k in SPAN_KEYS}
    for r in range(rows - plain_rows):
        cs, ce = 4, seq - 8
        ns = int(torch.randint(cs, ce - 4 + 1, (1,), generator=g))
        for k, v in zip(SPAN_KEYS, (cs, ce, ns, ns + 4)):
            spans[k][r] = v
        labels[r, ce:] = ids[r, ce:]
    for r in range(rows - plain_rows, rows):
        labels[r] = ids[r]
    mask = torch.ones(rows, seq, dtype=torch.long)
    return {"input_ids": ids.clone(), "attention_mask": mask, "labels": labels, **spans}


def ctx(step: int = 0, max_steps: int = 10, tokens_seen: int = 0, log=None) -> StepContext:
    return StepContext(step=step, max_steps=max_steps, tokens_seen=tokens_seen, **({"log": log} if log else {}))


def _row_parts(batch, r):
    cs, ce, ns, ne = (int(batch[k][r]) for k in SPAN_KEYS)
    ids = batch["input_ids"][r]
    return ids[:cs], ids[ns:ne], ids[ce:], (ns - cs) / ((ce - cs) - (ne - ns))


# --- 1. warmup schedule ---------------------------------------------------------------------------------------------
def test_schedule_linear_root_endpoints_monotone_multiple():
    for schedule in ("linear", "root"):
        lens = [curriculum_seq_len(s, 100, 60, 500, schedule, root_degree=2) for s in range(130)]
        assert lens[0] == 60 and all(v == 500 for v in lens[100:])  # min at 0 (not rounded below), max from T
        assert all(a <= b for a, b in zip(lens, lens[1:]))
        assert all(v % 8 == 0 or v in (60, 500) for v in lens)
    assert curriculum_seq_len(10, 100, 64, 512, "root") > curriculum_seq_len(10, 100, 64, 512, "linear")
    assert curriculum_seq_len(50, 100, 64, 512, multiple_of=64) == 256
    assert curriculum_seq_len(5, 0, 64, 512) == 512  # no warmup
    disc = dict(discrete_lengths=(32, 64, 128), discrete_steps=(5, 10))
    lens = [curriculum_seq_len(s, 0, 1, 100, "discrete", **disc) for s in (0, 4, 5, 6, 10, 11, 99)]
    assert lens == [32, 32, 32, 64, 64, 100, 100]  # DeepSpeed's boundaries (step <= max_step[i]); capped at max_len
    with pytest.raises(ValueError, match="discrete_steps"):
        curriculum_seq_len(0, 10, 1, 100, "discrete", discrete_lengths=(32, 64))
    with pytest.raises(ValueError, match="min_len"):
        curriculum_seq_len(0, 10, 128, 64)


def test_discrete_warmup_follows_deepspeed_fixed_discrete_at_every_step():
    """DeepSpeed's own CurriculumScheduler (``fixed_discrete``) is the reference: the same length at every step,
    boundaries included (it keeps ``difficulty[i]`` while ``global_steps <= max_step[i]``)."""
    from deepspeed.runtime.data_pipeline.curriculum_scheduler import CurriculumScheduler

    lengths, steps = (64, 128, 256, 512), (100, 500, 900)
    ds = CurriculumScheduler({"curriculum_type": "seqlen", "min_difficulty": 64, "max_difficulty": 512,
                              "schedule_type": "fixed_discrete",
                              "schedule_config": {"difficulty": list(lengths), "max_step": list(steps)}})
    ours = [curriculum_seq_len(s, 0, 64, 512, "discrete", discrete_lengths=lengths, discrete_steps=steps)
            for s in range(0, 1002)]
    assert ours == [ds.get_difficulty(s) for s in range(0, 1002)]
    assert ours[100] == 64 and ours[101] == 128  # the case: step 100 with max_step [100, 500] keeps 64


def test_warmup_counts_tokens_and_resolves_max_len_from_batch():
    cfg = PositionalConfig(warmup=WarmupConfig(enabled=True, min_len=16, count_in="tokens", warmup_tokens=1000))
    m = Positional(cfg)
    b = needle_batch(seq=64, plain_rows=4)
    # progress follows tokens_seen, not the step
    assert m.transform_batch(b, ctx(step=9, tokens_seen=0))["input_ids"].shape[1] == 16
    assert m.transform_batch(b, ctx(step=0, tokens_seen=500))["input_ids"].shape[1] == 40
    assert m.transform_batch(b, ctx(step=0, tokens_seen=5000))["input_ids"].shape[1] == 64
    logged = {}
    m.transform_batch(b, ctx(step=5, log=lambda k, v: logged.__setitem__(k, v)))
    assert logged["positional/seq_len"] == 16.0
    with pytest.raises(ValueError, match="warmup_tokens"):
        WarmupConfig(count_in="tokens")
    with pytest.raises(ValueError, match="max_len must be >= warmup.min_len"):
        WarmupConfig(min_len=64, max_len=32)


# --- 2. PoSE --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunks,lengths", [(2, "authors"), (3, "authors"), (3, "random"), (4, "equal")])
def test_pose_ids_valid_and_cover_target(chunks, lengths):
    g = torch.Generator().manual_seed(0)
    window, target = 16, 128
    hits = torch.zeros(target, dtype=torch.long)
    for _ in range(3000):
        ids = pose_position_ids(window, target, chunks, g, lengths)
        assert ids.dtype == torch.long and ids.shape == (window,)
        assert int(ids[0]) == 0 and bool((ids.diff() > 0).all()) and int(ids[-1]) < target
        hits[ids] += 1
    assert bool((hits > 0).all())  # every position in [0, target) is trained at some point


def test_pose_edge_cases():
    assert pose_position_ids(8, 8, 2).tolist() == list(range(8))
    ids = pose_position_ids(8, 100, 8, torch.Generator().manual_seed(1))  # one token per chunk
    assert bool((ids.diff() > 0).all())
    g = torch.Generator().manual_seed(2)
    for _ in range(200):  # the authors' split: the first chunk is at most half the window
        ids = pose_position_ids(15, 100, 2, g)
        jumps = (ids.diff() > 1).nonzero()
        assert len(jumps) == 0 or int(jumps[0]) + 1 <= 8
    with pytest.raises(ValueError, match="target"):
        pose_position_ids(16, 8)


# --- 3. truncation keeps the needle ---------------------------------------------------------------------------------
def test_truncate_keeps_needle_query_answer_and_depth():
    b = needle_batch(rows=6, seq=96, plain_rows=2, seed=3)
    b["position_ids"] = torch.arange(96).expand(6, 96).clone()
    before = {k: v.clone() for k, v in b.items()}
    out = truncate_batch(b, 48)
    assert all(torch.equal(b[k], before[k]) for k in b)  # input untouched
    assert out["input_ids"].shape == (6, 48) and torch.equal(out["position_ids"][0], torch.arange(48))
    for r in range(4):
        p0, n0, q0, d0 = _row_parts(b, r)
        p1, n1, q1, d1 = _row_parts(out, r)
        assert torch.equal(p0, p1) and torch.equal(n0, n1) and torch.equal(q0, q1)  # prompt, needle, query+answer
        assert torch.equal(out["labels"][r, int(out["context_end"][r]) :], b["labels"][r, int(b["context_end"][r]) :])
        hay_after = int(out["context_end"][r] - out["context_start"][r]) - 4
        assert abs(d1 - d0) <= 1 / hay_after + 1e-9  # relative depth preserved up to one token
    for r in (4, 5):  # plain rows: the first 48 tokens, spans stay -1
        assert torch.equal(out["input_ids"][r], b["input_ids"][r, :48]) and int(out["needle_start"][r]) == -1


def test_truncate_sheds_padding_first_and_rejects_short_haystack():
    b = needle_batch(rows=1, seq=64, plain_rows=0)
    b["attention_mask"][0, 56:] = 0  # 8 pad slots at the end (past the answer, as a collator would put them)
    out = truncate_batch(b, 60)
    assert int(out["attention_mask"].sum()) == 56 and int(out["context_end"][0]) == int(b["context_end"][0])
    with pytest.raises(ValueError, match="row 0: cannot truncate a structured row"):
        truncate_batch(needle_batch(rows=1, seq=64, plain_rows=0), 12)


# --- 4. balanced needles -------------------------------------------------------------------------------------------
def test_balance_needles_uniform_depth_and_same_tokens():
    b = needle_batch(rows=4, seq=48, plain_rows=1)
    before = {k: v.clone() for k, v in b.items()}
    g = torch.Generator().manual_seed(0)
    depths = []
    for _ in range(1000):
        out = balance_needles(b, g)
        depths.append(needle_depth(out)[:3])
    assert all(torch.equal(b[k], before[k]) for k in b)
    for r in range(3):  # token multiset kept, needle intact, query/answer and labels in place
        assert sorted(out["input_ids"][r].tolist()) == sorted(b["input_ids"][r].tolist())
        assert torch.equal(_row_parts(out, r)[1], _row_parts(b, r)[1])
        assert torch.equal(out["labels"][r], b["labels"][r])
        assert torch.equal(out["input_ids"][r, 40:], b["input_ids"][r, 40:])
    assert torch.equal(out["input_ids"][3], b["input_ids"][3])  # plain row untouched
    depths = torch.cat(depths)
    counts = torch.histc(depths, bins=5, min=0, max=1)
    assert bool((counts > 0.8 * len(depths) / 5).all()) and abs(float(depths.mean()) - 0.5) < 0.03


# --- 5. SSMax -------------------------------------------------------------------------------------------------------
def test_ssmax_equals_standard_attention_when_scale_is_one():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 8, dtype=torch.float64) for _ in range(3))
    full = torch.ones(2, 1, 10, 10, dtype=torch.bool)  # every query sees all 10 keys: s * log(10) = 1 for all rows
    s = torch.full((4,), ssmax_init(10), dtype=torch.float64, requires_grad=True)
    out = ssmax_attention(q, k, v, full, s, is_causal=False)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    out.pow(2).sum().backward()
    assert s.grad is not None and bool((s.grad != 0).all())


def test_ssmax_causal_counts_keys_not_positions():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    pad = torch.tensor([[0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # two left-pad keys
    mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    assert count_keys(mask, 6, 6).flatten().tolist() == [0, 0, 1, 2, 3, 4]
    s = torch.tensor([0.7], dtype=torch.float64)
    out = ssmax_attention(q, k, v, mask, s)
    n = torch.tensor([1, 1, 1, 2, 3, 4.0], dtype=torch.float64)  # keys per query (pad queries clamp to 1)
    logits = (q @ k.transpose(-1, -2)) / 2 * (0.7 * torch.log(n))[:, None]
    ref = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0) @ v
    assert torch.allclose(out[:, 2:], ref.transpose(1, 2)[:, 2:], atol=1e-12)


def test_ssmax_in_model_masks_padding_trains_s_and_rejects_other_archs():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: transformers builds no mask at all for an unregistered mask interface
    ref = model(input_ids=ids, attention_mask=mask).logits
    register_ssmax_attention()
    model.set_attn_implementation(SSMAX_ATTENTION)  # modules without s: standard attention through our function
    assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits[:, 3:], ref[:, 3:], atol=1e-5)

    m = make({"log_scaling": {"enabled": True, "per_head": True, "init_len": 16}})
    model = m.setup(tiny_llama())
    s = [p for n, p in model.named_parameters() if n.endswith("ssmax_s")]
    assert len(s) == 2 and s[0].shape == (2,) and abs(float(s[0][0].detach()) - 1 / math.log(16)) < 1e-6
    assert model.config._attn_implementation == SSMAX_ATTENTION
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert all(p.grad is not None and bool((p.grad != 0).any()) for p in s)
    assert any(k.endswith("ssmax_s") for k in model.state_dict())  # saved with the weights

    gpt2_config = AutoConfig.for_model("gpt2", n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB)
    gpt2 = AutoModelForCausalLM.from_config(gpt2_config)
    with pytest.raises(ValueError, match="'gpt2'"):
        attach_ssmax(gpt2)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_ssmax_generates_with_cache_and_sliding_window(model_type):
    extra = {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0} if model_type == "qwen2" else {}
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, **extra,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg)
    attach_ssmax(model, per_head=True, init=0.4)
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], 1)
    with torch.no_grad():  # cached decoding counts the same keys as a full forward
        greedy = model(input_ids=gen, attention_mask=full_mask).logits[:, -4:-1].argmax(-1)
    assert torch.equal(greedy, gen[:, -3:])


def test_pose_ids_run_through_llama_with_linear_rope_scaling():
    model = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    m = make({"pose": {"enabled": True}})
    model = m.setup(model)
    assert m.pose_target == 512  # target_len: null = max_position_embeddings
    b = {"input_ids": torch.randint(0, VOCAB, (2, 32))}
    out = m.transform_batch(b, ctx())
    assert int(out["position_ids"].max()) > 31 and "attention_mask" in out
    logits = model(**out).logits
    assert torch.isfinite(logits).all()
    # without the mask PoSE adds, use_cache=False would read the skips as packed sequences and block attention
    assert torch.allclose(model(**out, use_cache=False).logits, logits, atol=1e-5)
    assert not torch.allclose(logits, model(input_ids=b["input_ids"]).logits)  # the skipped ids are really used


# --- 6. the hook object: training, logging, resume ------------------------------------------------------------------
PARTS = {
    "warmup": {"warmup": {"enabled": True, "min_len": 16, "multiple_of": 8}},
    "pose": {"pose": {"enabled": True, "target_len": 256, "num_chunks": 3}},
    "balanced": {"balanced": {"enabled": True}},
    "log_scaling": {"log_scaling": {"enabled": True}},
    "all": {p: {"enabled": True} for p in ("warmup", "pose", "balanced", "log_scaling")},
}


def make(parts: dict) -> Positional:
    from llm_limits.trainers.recipe.schema import strict_model_for, to_dataclass  # the recipe path: nested dicts -> dataclasses

    return Positional(to_dataclass(PositionalConfig, strict_model_for(PositionalConfig).model_validate(parts)))


@pytest.mark.parametrize("part", list(PARTS))
def test_two_step_train_with_each_part(part):
    m = make({**PARTS[part], "histogram_every": 1})
    model = m.setup(tiny_llama())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    logged: dict[str, float] = {}
    for step in range(2):
        b = needle_batch(rows=4, seq=48, plain_rows=1, seed=step)
        b["input_ids"] %= VOCAB
        b["labels"] = torch.where(b["labels"] >= 0, b["input_ids"], -100)
        out = m.transform_batch(b, ctx(step=step, max_steps=4, log=lambda k, v: logged.__setitem__(k, v)))
        loss = model(**{k: v for k, v in out.items() if k not in SPAN_KEYS}).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert len(changed) == len(start)  # everything trains, s included
    expected = {"warmup": "seq_len", "pose": "pose_max_position_id", "balanced": "needle_depth_mean",
                "log_scaling": "ssmax_s_mean", "all": "seq_len"}[part]  # fmt: skip
    assert f"positional/{expected}" in logged and "positional/pos_coverage" in logged


def test_state_dict_round_trip_continues_exactly():
    parts = {p: {"enabled": True} for p in ("warmup", "pose", "balanced")}
    parts["pose"]["target_len"] = 256
    parts["warmup"]["min_len"] = 16
    a = make(parts)
    for step in range(3):
        a.transform_batch(needle_batch(seq=64, seed=step), ctx(step=step, max_steps=6))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make(parts)
    b.load_state_dict(torch.load(buf, weights_only=True))
    nxt = needle_batch(seq=64, seed=3)
    out_a, out_b = a.transform_batch(nxt, ctx(step=3, max_steps=6)), b.transform_batch(nxt, ctx(step=3, max_steps=6))
    assert out_a.keys() == out_b.keys() and all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert out_a["input_ids"].shape[1] == 40  # the curriculum resumed at step 3 of 6
    fresh = make(parts).transform_batch(nxt, ctx(step=3, max_steps=6))
    assert not torch.equal(fresh["position_ids"], out_a["position_ids"])  # without the state the draws differ


def test_registered_and_config_errors_name_the_field():
    assert MITIGATIONS["positional"] is Positional and Positional.limit == "context"
    m = Positional()
    b = needle_batch()
    assert all(torch.equal(m.transform_batch(b, ctx())[k], b[k]) for k in b)  # all parts off: the identity
    with pytest.raises(ValueError, match="pose.target_len"):
        make({"pose": {"target_len": 1}})
    with pytest.raises(ValueError, match="discrete_steps"):
        make({"warmup": {"schedule": "discrete", "discrete_lengths": [16, 32]}})
