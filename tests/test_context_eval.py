"""The context eval (evals/context.py): RULER-style retrieval by length x depth, its pure helpers, left-padded
batching, the attention-mass measurement and the full run, on tiny models built from a config."""

from __future__ import annotations

import doctest
import functools
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llm_limits import evals
import llm_limits.evals.context
from llm_limits.evals import EVALS, EvalResult, LimitSpec, read_limit
from llm_limits.evals.context import (
    Context,
    ContextConfig,
    cut_prediction,
    depth_averaged,
    effective_length,
    is_correct,
    needle_attention,
    needle_attention_mass,
    predict_records,
    score_records,
)
from llm_limits.evals.lm import greedy_decode
from llm_limits.evals.tasks.ruler import RulerConfig, generate, prompt_text
from llm_limits.trainers.build.tokenizers import build_char_tokenizer

SMALL = {"lengths": [32, 64, 128], "depths": [0.0, 0.5, 1.0], "examples_per_cell": 2, "batch_size": 8}
"""A 3 x 3 grid of 2 prompts per cell: 18 prompts, well under a second on a tiny model."""

pytestmark = pytest.mark.usefixtures("one_thread")


# --- fixtures: the project's char tokenizer and 2-layer models ------------------------------------------------------
def tiny(arch: str, vocab_size: int, positions: int = 1024, init: float = 0.02, seed: int = 0):
    """A 2-layer llama or gpt2; ``init`` is the weights' std (0.5 makes logits decisive, so argmax never ties)."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab_size,
                                      max_position_embeddings=positions, initializer_range=init)
    else:
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=vocab_size,
                                      n_positions=positions, bos_token_id=2, eos_token_id=3, initializer_range=init)
    return AutoModelForCausalLM.from_config(config)




@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny("llama", len(tokenizer))


class CopyOracle(torch.nn.Module):
    """A test double with perfect retrieval, the ideal induction head: it reads the query's key (``\\n#key:``) and
    copies every value stored under it in the context (``#key:value.``), joined by ``,``, then ``.``. It answers
    ``xxxx`` instead when the context is longer than ``fail_above`` characters and the needle's depth is within 0.1
    of one of ``fail_depths`` (all depths when empty). It returns no KV cache, so the decoder feeds it the whole
    sequence every step, and no attention weights."""

    def __init__(self, tokenizer, fail_above: int | None = None, fail_depths: tuple[float, ...] = ()):
        super().__init__()
        self.tok, self.fail_above, self.fail_depths = tokenizer, fail_above, fail_depths
        self.config = SimpleNamespace(max_position_embeddings=4096, model_type="oracle")

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, len(self.tok))  # [batch, seq, vocab]
        for b in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[b][attention_mask[b].bool()].tolist())
            q = text.rindex("\n#")
            key_end = text.index(":", q)
            key, context, generated = text[q + 2 : key_end], text[:q], text[key_end + 1 :]
            values = re.findall(rf"#{key}:(\d+)\.", context)
            target = ",".join(values) + ".\n"
            # depth as the generator places it: the needle's start over the room left for it
            depth = context.index(f"#{key}:") / (len(context) - len(f"#{key}:{values[0]}."))
            if (self.fail_above is not None and len(context) > self.fail_above
                    and (not self.fail_depths or any(abs(depth - d) < 0.1 for d in self.fail_depths))):
                target = "xxxx"
            nxt = target[len(generated)] if len(generated) < len(target) else "\n"
            logits[b, -1, self.tok.convert_tokens_to_ids(nxt)] = 1.0
        return SimpleNamespace(logits=logits)


def records_of_mixed_lengths(task: str = "niah_single") -> list[dict]:
    """Ruler records whose prompts have three different token lengths, so a batch of them is left padded."""
    return [r for chars, seed in ((40, 1), (57, 2), (33, 3)) for r in
            generate(RulerConfig(task=task, num_examples=3, context_chars=chars, seed=seed))]


# --- pure functions --------------------------------------------------------------------------------------------------
def test_doctests():
    result = doctest.testmod(evals.context)
    assert result.attempted > 0 and result.failed == 0


def test_effective_length_on_hand_made_grids():
    # depth-averaged: 64 -> 1.0, 128 -> 0.9, 256 -> 0.6 (lost in the middle), 512 -> 0.9 (recovers, but too late)
    cells = {(64, 0.0): 1.0, (64, 0.5): 1.0, (64, 1.0): 1.0,
             (128, 0.0): 1.0, (128, 0.5): 0.7, (128, 1.0): 1.0,
             (256, 0.0): 0.9, (256, 0.5): 0.0, (256, 1.0): 0.9,
             (512, 0.0): 0.9, (512, 0.5): 0.9, (512, 1.0): 0.9}
    curve = depth_averaged(cells)
    assert list(curve) == [64.0, 128.0, 256.0, 512.0]
    assert curve == pytest.approx({64.0: 1.0, 128.0: 0.9, 256.0: 0.6, 512.0: 0.9})
    assert effective_length(curve, 0.85) == 128.0 == read_limit(curve, 0.85, higher_is_better=True)
    assert effective_length(curve, 0.9) == 128.0  # equal to the threshold passes
    assert effective_length(curve, 0.95) == 64.0
    assert effective_length(curve, 0.5) == 512.0
    assert effective_length({64.0: 0.8, 128.0: 1.0}, 0.85) == 0.0  # the shortest fails: 0, whatever follows


@pytest.mark.parametrize(
    "continuation,answer,correct",
    [
        ("4821.\n#", "4821", True),  # the needle's own "." ends the value
        (" 4821\n", "4821", True),  # leading white space is dropped
        ("4821 the", "4821", True),  # a space cannot belong to a single value
        ("48213", "4821", False),  # an extra digit belongs to the value, so it is wrong
        ("482", "4821", False),
        ("1234,5678.", "1234,5678", True),  # "," is the multi-value separator, kept
        ("1234,5678,9", "1234,5678", False),  # an extra value is wrong
        ("1234.5678", "1234,5678", False),
        ("abc,def.\n", "abc,def", True),  # variable tracking
    ],
)
def test_answer_cutting_rule(continuation, answer, correct):
    assert is_correct(continuation, answer) is correct
    if correct:
        assert cut_prediction(continuation, answer) == answer


def test_needle_attention_mass_on_a_constructed_pattern():
    # batch 2, 2 heads, 4 keys; row 1 is left padded by one (its key 0 is a pad with no attention)
    last_l0 = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]],
                            [[0.0, 0.5, 0.5, 0.0], [0.0, 0.1, 0.1, 0.8]]])  # [batch, heads, k]
    last_l1 = torch.tensor([[[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]],
                            [[0.0, 0.2, 0.2, 0.6], [0.0, 0.3, 0.3, 0.4]]])
    # only the last query row counts: earlier rows get junk that must be ignored
    attentions = [torch.cat([torch.full((2, 2, 2, 4), 9.0), a.unsqueeze(2)], dim=2) for a in (last_l0, last_l1)]
    needle = torch.tensor([[False, False, True, True], [False, True, False, False]])
    mass = needle_attention_mass(attentions, needle)
    # row 0: layer0 (0.7 + 0.5) / 2, layer1 (1 + 1) / 2 -> (0.6 + 1.0) / 2; row 1: (0.3 + 0.25) / 2
    assert mass.tolist() == pytest.approx([0.8, 0.275])


# --- batching: left padding gives what one-at-a-time gives ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_predictions_equal_unbatched(arch, tokenizer):
    """llama's RoPE is shift-invariant, gpt2's learned positions are not: on gpt2 this fails without position ids
    that skip the pads."""
    model = tiny(arch, len(tokenizer), positions=256, init=0.5)
    records = records_of_mixed_lengths()
    lengths = {len(tokenizer(prompt_text(r))["input_ids"]) for r in records}
    assert len(lengths) == 3  # one batch of 9 holds three lengths: two of them left padded
    one = predict_records(model, tokenizer, records, batch_size=1, max_new_tokens=6)
    batched = predict_records(model, tokenizer, records, batch_size=9, max_new_tokens=6)
    assert batched == one
    assert len(set(one)) > 3  # not a degenerate model that says the same thing to every prompt
    assert score_records(model, tokenizer, records, 9, 6) == score_records(model, tokenizer, records, 1, 6)


def test_greedy_decode_matches_transformers_generate(tokenizer):
    model = tiny("llama", len(tokenizer), init=0.5).eval()
    prompt = tokenizer(prompt_text(records_of_mixed_lengths()[0]))["input_ids"]
    ours = greedy_decode(model, [prompt], max_new_tokens=5, pad_id=0)[0]
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=5, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref[: len(ours)] and len(ours) >= 1


def test_decode_asks_for_the_last_logits_only(tokenizer, monkeypatch):
    """A transformers causal LM, bare, under LoRA or inside a Sampler, is asked for its last position's logits only;
    the left-padded batch decodes to the same tokens as with every position's logits."""
    from peft import LoraConfig, get_peft_model

    from llm_limits.evals import lm

    model = tiny("llama", len(tokenizer), init=0.5).eval()
    lora = get_peft_model(tiny("llama", len(tokenizer), init=0.5), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    sampler = lm.Sampler(model, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert lm.keeps_last_logits(model) and lm.keeps_last_logits(lora) and lm.keeps_last_logits(sampler)
    assert not lm.keeps_last_logits(torch.nn.Linear(2, 2))  # forward(input): nothing to ask
    seen = []
    forward = type(model).forward

    @functools.wraps(forward)  # keeps forward's signature, which is what keeps_last_logits reads
    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        seen.append((kwargs.get("logits_to_keep"), tuple(out.logits.shape)))
        return out

    prompts = [tokenizer(prompt_text(r))["input_ids"] for r in records_of_mixed_lengths()[:3]]
    monkeypatch.setattr(type(model), "forward", spy)
    kept = greedy_decode(model, prompts, max_new_tokens=4, pad_id=0)
    assert seen and all(keep == 1 and shape[1] == 1 for keep, shape in seen)  # the prefill too: [batch, 1, vocab]
    monkeypatch.setattr(lm, "keeps_last_logits", lambda m: False)
    seen.clear()
    full = greedy_decode(model, prompts, max_new_tokens=4, pad_id=0)
    assert seen[0][0] is None and seen[0][1][1] == max(len(p) for p in prompts)
    assert kept == full and any(kept)


# --- attention mass ----------------------------------------------------------------------------------------------------
def test_needle_attention_on_a_uniform_attention_llama(tokenizer):
    """With zero query weights every score is 0, so the last token attends uniformly to the whole prompt: the needle's
    share is exactly (needle tokens) / (prompt tokens), which checks the offset mapping, the padding and the eager
    switch (and that the model goes back to sdpa afterwards)."""
    model = tiny("llama", len(tokenizer))
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
    records = records_of_mixed_lengths()
    masses, distractors = needle_attention(model, tokenizer, records, batch_size=9)
    for r, mass, n_other in zip(records, masses, distractors):
        (s, e), = r["needle_spans"]
        n_prompt = len(prompt_text(r))  # one token per character
        assert mass == pytest.approx((e - s) / n_prompt, rel=1e-4)
        assert n_other == len(r["context"]) - (e - s)
    assert model.config._attn_implementation == "sdpa"


def test_attention_mass_is_skipped_for_a_model_without_attentions(tokenizer):
    assert needle_attention(CopyOracle(tokenizer), tokenizer, records_of_mixed_lengths(), 4) is None


# --- the eval ----------------------------------------------------------------------------------------------------------
def test_registered():
    assert EVALS["context"] is Context and evals.Context is Context
    assert Context.limit == "context" and Context.name == "context" and Context.summary


def test_spec():
    assert Context().spec() == LimitSpec(metric="niah_acc", axis="context_len", axis_values=(64.0, 128.0, 256.0, 512.0),
                                         higher_is_better=True, threshold=0.85, limit="context", limit_unit="tokens")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lengths": []}, "lengths must not be empty"),
        ({"lengths": [128, 64]}, r"lengths must be strictly ascending \(got \[128, 64\]\)"),
        ({"lengths": [0, 64]}, "lengths must be positive integers"),
        ({"depths": [0.0, 1.5]}, r"depths must be a non-empty list of fractions within \[0, 1\]"),
        ({"threshold": 0.0}, r"threshold must be within \(0, 1\]"),
        ({"threshold": 1.2}, r"threshold must be within \(0, 1\]"),
        ({"examples_per_cell": 0}, "examples_per_cell"),
        ({"middle_length": 100}, r"middle_length 100 must be one of lengths"),
        ({"task": "needle"}, "unknown task 'needle' \\(known: niah_single, niah_multikey"),
        ({"task_params": {"seed": 1}}, "task_params.seed is set by the eval"),
        ({"task_params": {"colour": 1}}, "unknown task_params for ruler: colour"),
        ({"task": "niah_multikey"}, "niah_multikey needs num_distractors >= 1"),
    ],
)
def test_invalid_config_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        Context(ContextConfig(**kwargs)).spec()
    assert "\n" not in str(info.value)


def test_check(tokenizer, llama):
    Context(ContextConfig(**SMALL)).check(llama, tokenizer)
    # gpt2's learned positions end hard at n_positions: prompt + answer must fit
    with pytest.raises(ValueError, match=r"lengths up to 128 tokens need \d+ positions .* position range is 128 "
                                         r"\(gpt2\)") as info:
        Context(ContextConfig(**SMALL)).check(tiny("gpt2", len(tokenizer), positions=128), tokenizer)
    assert "\n" not in str(info.value)
    # RoPE extrapolates: a llama declaring 64 positions passes (run() adds a note instead)
    Context(ContextConfig(**SMALL)).check(tiny("llama", len(tokenizer), positions=64), tokenizer)
    letters_only = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
    with pytest.raises(ValueError, match=r"maps \d+\.\d% of the ruler/niah_single characters to its unknown token"):
        Context(ContextConfig(**SMALL)).check(llama, letters_only)
    with pytest.raises(ValueError, match="context: ruler: context_chars=4 is too short for the needles"):
        Context(ContextConfig(lengths=[4, 64])).check(llama, tokenizer)


def test_held_out_data_uses_the_eval_seed(tokenizer):
    cells, cpt = Context(ContextConfig(**SMALL))._cells(tokenizer)
    assert cpt == 1.0 and list(cells)[:3] == [(32.0, 0.0), (32.0, 0.5), (32.0, 1.0)] and len(cells) == 9
    assert cells[(64.0, 0.5)] == generate(RulerConfig(num_examples=2, context_chars=64, depth=0.5, seed=1234))
    assert cells[(64.0, 0.5)] != generate(RulerConfig(num_examples=2, context_chars=64, depth=0.5, seed=0))


def test_oracle_retrieves_everywhere(tokenizer):
    result = Context(ContextConfig(**SMALL, position_loss=False)).run(CopyOracle(tokenizer), tokenizer, progress=False)
    assert result.curve == {32.0: 1.0, 64.0: 1.0, 128.0: 1.0}
    assert result.limit_value == 128.0 and "longest length measured, 128" in result.notes[0]
    assert result.series["lost_in_the_middle"].points == {0.0: 1.0, 0.5: 1.0, 1.0: 1.0}
    assert "attention_mass" not in result.series and any("attention_mass skipped" in n for n in result.notes)
    assert result.scalars["num_examples"] == 18 and result.scalars["max_new_tokens"] == 6  # 4 digits + 2


def test_oracle_that_fails_beyond_a_length(tokenizer):
    result = Context(ContextConfig(**SMALL, position_loss=False, attention_mass=False)).run(
        CopyOracle(tokenizer, fail_above=64), tokenizer, progress=False)
    assert result.curve == {32.0: 1.0, 64.0: 1.0, 128.0: 0.0} and result.limit_value == 64.0


def test_oracle_lost_in_the_middle(tokenizer):
    """Failing only at mid depth beyond 32 characters: 2/3 depth-averaged accuracy fails 0.85 from 64 on."""
    model = CopyOracle(tokenizer, fail_above=32, fail_depths=(0.5,))
    result = Context(ContextConfig(**SMALL, position_loss=False, attention_mass=False, middle_length=64)).run(
        model, tokenizer, progress=False)
    assert result.curve == pytest.approx({32.0: 1.0, 64.0: 2 / 3, 128.0: 2 / 3})
    assert result.limit_value == 32.0
    assert result.series["lost_in_the_middle"].points == {0.0: 1.0, 0.5: 0.0, 1.0: 1.0}
    assert result.grids["accuracy"].values == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


def test_multivalue_task_on_the_oracle(tokenizer):
    config = ContextConfig(**SMALL, task="niah_multivalue", position_loss=False, attention_mass=False)
    result = Context(config).run(CopyOracle(tokenizer), tokenizer, progress=False)
    assert result.limit_value == 128.0 and result.scalars["max_new_tokens"] == 11  # "1234,5678" + 2


def test_run_on_a_tiny_llama(tokenizer):
    model = tiny("llama", len(tokenizer), positions=48)  # RoPE: 64 > 48 runs, with a note
    model.train()
    ev = Context(ContextConfig(**{**SMALL, "lengths": [32, 64]}))
    ev.check(model, tokenizer)
    result = ev.run(model, tokenizer, progress=False)
    assert model.training and model.config._attn_implementation == "sdpa"  # both restored
    assert result.version == EVALS["context"].version
    assert result.eval == "context" and result.spec == ev.spec() and result.threshold == 0.85
    assert list(result.curve) == [32.0, 64.0] and all(0.0 <= v <= 1.0 for v in result.curve.values())
    grid = result.grids["accuracy"]
    assert (grid.x, grid.y) == ([32.0, 64.0], [0.0, 0.5, 1.0])
    assert len(grid.values) == 3 and all(len(row) == 2 for row in grid.values)
    assert all(0.0 <= v <= 1.0 for row in grid.values for v in row)
    assert result.grids["context_tokens"].values == [[32.0, 64.0]] * 3  # a char tokenizer: exact lengths
    assert set(result.series) == {"lost_in_the_middle", "attention_mass", "position_loss"}
    attention = result.series["attention_mass"]
    assert attention.axis == "distractor_tokens" and len(attention.points) == 2
    assert all(0.0 < v < 1.0 for v in attention.points.values())
    assert list(result.series["position_loss"].points) == [16.0, 32.0, 48.0]  # clipped to the 48 positions
    assert result.series["position_loss"].higher_is_better is False
    assert result.scalars["num_examples"] == 12 and result.scalars["context_tokens@64"] == 64.0
    assert any("max_position_embeddings=48" in n for n in result.notes)
    assert result.limit_value == 0.0  # a random model retrieves nothing
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_run_on_a_jsonl_file(tmp_path, tokenizer):
    records = [r for chars in (40, 80) for depth in (0.0, 1.0)
               for r in generate(RulerConfig(num_examples=2, context_chars=chars, depth=depth, seed=5))]
    records.append({**records[0], "depth": -1.0, "needle_spans": []})  # unknown depth: a row of its own
    path = tmp_path / "ruler.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ev = Context(ContextConfig(path=str(path), depths=[0.0, 0.5, 1.0], position_loss=False, attention_mass=False))
    assert ev.spec().axis_values == ()
    result = ev.run(CopyOracle(tokenizer, fail_above=60), tokenizer, progress=False)
    assert result.spec.axis_values == (40.0, 80.0) and result.scalars["num_examples"] == 9
    assert result.grids["accuracy"].y == [-1.0, 0.0, 1.0]
    assert result.curve == {40.0: 1.0, 80.0: 0.0} and result.limit_value == 40.0
    assert result.series["lost_in_the_middle"].points == {0.0: 0.0, 1.0: 0.0}  # at the longest length, known depths
    assert math.isnan(result.grids["accuracy"].values[0][1])  # no unknown-depth record at 80
