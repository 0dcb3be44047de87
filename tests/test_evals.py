"""The eval contract (evals/base.py) and the positional-loss eval, on tiny models built from a config."""

from __future__ import annotations

import doctest
import json
import math
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from llm_limits import evals
import llm_limits.evals.base
import llm_limits.evals.lm
import llm_limits.evals.positional_loss
from llm_limits.evals import EVALS, EvalResult, LimitSpec, compare, read_limit
from llm_limits.evals.base import passes
from llm_limits.evals.lm import unk_fraction
from llm_limits.evals.positional_loss import (
    PositionalLoss,
    PositionalLossConfig,
    bucket_means,
    positional_limit,
    token_nll,
)
from llm_limits.evals.tasks.synthetic_text import ALPHABET, SyntheticTextConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")


# --- fixtures: a character tokenizer and 2-layer models, built once -----------------------------------------------
def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet``, ``<unk>`` for any other character."""
    vocab = {"<pad>": 0, "<unk>": 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newline too
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def tiny_llama(vocab_size: int, max_positions: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab_size,
                                  max_position_embeddings=max_positions)
    return AutoModelForCausalLM.from_config(config)


def tiny_gpt2(vocab_size: int, n_positions: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=vocab_size,
                                  n_positions=n_positions, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config)




@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def gpt2(tokenizer):
    return tiny_gpt2(len(tokenizer))


class PeekingModel(torch.nn.Module):
    """A test double that "knows" the next token up to position ``good_until`` and is uniform after it: the loss is
    ``log(1 + (V - 1) e^-3)`` at target positions ``< good_until`` and ``ln V`` from there on."""

    def __init__(self, vocab_size: int, good_until: int, max_positions: int = 256):
        super().__init__()
        self.vocab_size, self.good_until = vocab_size, good_until
        self.config = SimpleNamespace(max_position_embeddings=max_positions, model_type="peeking")

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)  # [batch, seq, vocab]
        nxt = input_ids[:, 1 : self.good_until]  # targets at positions 1..good_until-1
        logits[:, : nxt.shape[1]].scatter_(-1, nxt.unsqueeze(-1), 3.0)
        return SimpleNamespace(logits=logits)


# --- evals/base.py ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [evals.base, evals.lm, evals.positional_loss])
def test_doctests(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_read_limit_higher_is_better():
    curve = {4096: 0.80, 1024: 0.98, 8192: 0.9, 2048: 0.91}  # unsorted on purpose
    assert read_limit(curve, threshold=0.85, higher_is_better=True) == 2048  # 8192 recovers but does not count
    assert read_limit(curve, threshold=0.99, higher_is_better=True) == 0.0
    assert read_limit(curve, threshold=0.99, higher_is_better=True, floor=512) == 512
    assert read_limit(curve, threshold=0.5, higher_is_better=True) == 8192
    assert read_limit({}, threshold=0.5, higher_is_better=True) == 0.0


def test_read_limit_lower_is_better_and_nan_fails():
    assert read_limit({16: 2.0, 32: 2.2, 48: 2.3}, threshold=2.2, higher_is_better=False) == 32  # equal passes
    assert read_limit({16: 2.0, 32: math.nan, 48: 2.0}, threshold=2.2, higher_is_better=False) == 16
    assert not passes(math.nan, 1.0, True) and not passes(None, 1.0, False)
    assert passes(1.0, 1.0, True) and passes(1.0, 1.0, False)


def _result(curve, limit, name="positional_loss"):
    spec = LimitSpec(metric="loss", axis="position", axis_values=tuple(float(x) for x in curve),
                     higher_is_better=False, limit="context", limit_unit="tokens")
    return EvalResult(eval=name, spec=spec, curve={float(x): v for x, v in curve.items()}, limit_value=limit,
                      threshold=2.2, scalars={"reference_loss": 2.0, "num_examples": 8}, notes=["a note"])


def test_eval_result_round_trips_through_json():
    result = _result({16: 2.0, 32: 2.1, 48: 2.5, 64.5: 3.0}, 32.0)
    d = json.loads(json.dumps(result.to_dict()))
    assert list(d["curve"]) == ["16", "32", "48", "64.5"]  # whole axis values without ".0"
    back = EvalResult.from_dict(d)
    assert back == result
    assert back.spec.axis_values == (16.0, 32.0, 48.0, 64.5)
    assert all(isinstance(x, float) for x in back.curve)


@pytest.mark.parametrize("name", sorted(EVALS))
def test_every_eval_declares_its_version(name):
    """Each registered eval sets its own ``version`` (not only the base class's), and its results carry it."""
    cls = EVALS[name]
    assert "version" in vars(cls) and isinstance(cls.version, str) and cls.version
    result = cls().result(spec=LimitSpec("loss", "position", (16.0,), False), curve={16.0: 2.0}, limit_value=16.0,
                          threshold=2.2)
    assert result.eval == name and result.version == cls.version


def test_eval_result_version_round_trips():
    result = PositionalLoss().result(spec=LimitSpec("loss", "position", (16.0,), False), curve={16.0: 2.0},
                                     limit_value=16.0, threshold=2.2)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["version"] == PositionalLoss.version
    assert EvalResult.from_dict(d) == result and EvalResult.from_dict(d).version == PositionalLoss.version
    del d["version"]  # a results.json written before evals had versions
    assert EvalResult.from_dict(d).version == ""


def test_compare_before_after():
    before = _result({16: 2.0, 32: 2.5, 48: 3.0}, 16.0)
    after = _result({16: 1.5, 32: 1.6, 48: 1.7}, 48.0)
    delta = compare(before, after)
    assert delta["limit_before"] == 16.0 and delta["limit_after"] == 48.0
    assert delta["limit_delta"] == 32.0 and delta["improved"] is True
    assert delta["limit"] == "context" and delta["metric"] == "loss" and delta["eval"] == "positional_loss"
    assert delta["curve_delta"] == pytest.approx({16.0: -0.5, 32.0: -0.9, 48.0: -1.3})
    assert compare(after, before)["improved"] is False
    with pytest.raises(ValueError, match="different evals"):
        compare(before, _result({16: 1.0}, 16.0, name="other"))


# --- pure functions of the positional eval ------------------------------------------------------------------------
def test_token_nll_matches_the_models_own_loss(llama, tokenizer):
    ids = torch.tensor([tokenizer("the red fox sees a small cat.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = llama(input_ids=ids, labels=ids)
    nll = token_nll(out.logits, ids)
    assert nll.shape == (1, ids.shape[1] - 1)
    assert nll.mean().item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_token_nll_assigns_each_loss_to_its_target_position():
    ids = torch.tensor([[0, 1, 2, 3]])
    logits = torch.zeros(1, 4, 4)
    logits[0, 1, 2] = 100.0  # position 1 predicts token 2 (the target at position 2) perfectly
    nll = token_nll(logits, ids)
    assert nll[0].tolist() == pytest.approx([math.log(4), 0.0, math.log(4)])


def test_bucket_means_on_a_hand_made_tensor():
    # seq_len 16, buckets of 4; column j is target position j + 1
    nll = torch.stack([torch.arange(1.0, 16.0), 2 * torch.arange(1.0, 16.0)])  # [2, 15]
    curve = bucket_means(nll, 4)
    # bucket 0: positions 1..3 -> (1+2+3 + 2+4+6) / 6 = 3; bucket 1: positions 4..7 -> 5.5 * 1.5 = 8.25
    assert curve == pytest.approx({4.0: 3.0, 8.0: 8.25, 12.0: 14.25, 16.0: 20.25})
    assert list(curve) == [4.0, 8.0, 12.0, 16.0]
    with pytest.raises(ValueError, match="not a multiple of bucket_size 5"):
        bucket_means(nll, 5)


def test_limit_is_exact_at_a_jump_at_position_64():
    nll = torch.full((3, 127), 1.0)  # seq_len 128
    nll[:, 63:] = 1.5  # target positions >= 64 are 50% worse
    curve = bucket_means(nll, 16)
    limit, threshold, reference, notes = positional_limit(curve, reference_buckets=2, tolerance=0.1,
                                                           chance_loss=math.log(32), min_gain_nats=0.5)
    assert limit == 64.0 and reference == pytest.approx(1.0) and threshold == pytest.approx(1.1) and notes == []
    # a tolerance above the jump reads the whole window, and says so
    limit, _, _, notes = positional_limit(curve, 2, 0.6, math.log(32), 0.5)
    assert limit == 128.0 and "whole eval length 128" in notes[0]


def test_nothing_learned_rule():
    flat = {16.0: 3.40, 32.0: 3.41, 48.0: 3.40, 64.0: 3.42}
    limit, _, reference, notes = positional_limit(flat, 2, 0.1, chance_loss=math.log(32), min_gain_nats=0.5)
    assert limit == 0.0 and reference == pytest.approx(3.405)
    assert notes == ["reference loss 3.405 is within min_gain_nats=0.5 of chance ln(V)=3.466 (V=32): "
                     "nothing learned, limit 0"]
    # the same curve counts as learned once the margin is small enough
    assert positional_limit(flat, 2, 0.1, math.log(32), 0.05)[0] == 64.0


def test_unk_fraction(tokenizer):
    assert unk_fraction(tokenizer, "the red fox.") == 0.0
    assert unk_fraction(char_tokenizer("abc "), "abcd") == pytest.approx(0.25)


# --- the eval: spec, check, run -------------------------------------------------------------------------------------
def test_registered():
    assert EVALS["positional_loss"] is PositionalLoss and evals.PositionalLoss is PositionalLoss
    assert PositionalLoss.limit == "context" and PositionalLoss.summary


def test_spec():
    spec = PositionalLoss(PositionalLossConfig(seq_len=64, bucket_size=16)).spec()
    assert spec == LimitSpec(metric="loss", axis="position", axis_values=(16.0, 32.0, 48.0, 64.0),
                             higher_is_better=False, threshold=None, limit="context", limit_unit="tokens")
    assert PositionalLoss().spec().axis_values == tuple(float(x) for x in range(16, 129, 16))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seq_len": 100}, "seq_len must be a multiple of bucket_size"),
        ({"seq_len": 32, "reference_buckets": 2}, "reference_buckets must be >= 1 and < the number of buckets"),
        ({"reference_buckets": 0}, "reference_buckets"),
        ({"num_examples": 0}, "num_examples"),
        ({"task": "nope"}, "unknown task 'nope'"),
        ({"task_params": {"seed": 3}}, "task_params.seed is set by the eval"),
    ],
)
def test_invalid_config_is_a_one_line_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        PositionalLoss(PositionalLossConfig(**kwargs)).spec()
    assert "\n" not in str(info.value)


def test_check_seq_len_beyond_position_range(tokenizer):
    with pytest.raises(ValueError, match=r"seq_len 512 exceeds the model's position range 256 \(llama\)"):
        PositionalLoss(PositionalLossConfig(seq_len=512)).check(tiny_llama(len(tokenizer), 256), tokenizer)
    with pytest.raises(ValueError, match=r"seq_len 128 exceeds the model's position range 64 \(gpt2\)"):
        PositionalLoss(PositionalLossConfig(seq_len=128)).check(tiny_gpt2(len(tokenizer), 64), tokenizer)


def test_check_tokenizer_that_cannot_spell_the_task(llama, tokenizer):
    poor = char_tokenizer("abcdefghijklm ")
    with pytest.raises(ValueError, match=r"maps \d+\.\d% of the synthetic_text characters to its unknown token"):
        PositionalLoss(PositionalLossConfig(num_examples=4)).check(llama, poor)
    PositionalLoss(PositionalLossConfig(num_examples=4)).check(llama, tokenizer)  # the full alphabet passes


def test_check_and_run_unknown_task_params(llama, tokenizer):
    with pytest.raises(ValueError, match="unknown task_params for synthetic_text: colour"):
        PositionalLoss(PositionalLossConfig(task_params={"colour": 1})).check(llama, tokenizer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_runs_end_to_end_on_an_untrained_model(arch, request, tokenizer):
    model = request.getfixturevalue(arch)
    model.train()
    ev = PositionalLoss(PositionalLossConfig(seq_len=64, bucket_size=16, num_examples=6, batch_size=4))
    ev.check(model, tokenizer)
    result = ev.run(model, tokenizer, progress=False)
    assert model.training  # mode restored
    assert result.version == EVALS["positional_loss"].version
    assert result.eval == "positional_loss" and result.spec == ev.spec()
    assert list(result.curve) == list(result.spec.axis_values) == [16.0, 32.0, 48.0, 64.0]
    assert all(math.isfinite(v) for v in result.curve.values())
    assert result.scalars["num_examples"] == 6 and result.scalars["tokens"] == 6 * 63
    assert result.scalars["chance_loss"] == pytest.approx(math.log(32))
    # a random model is at chance everywhere: the rule reads limit 0, not "the whole window"
    assert abs(result.scalars["mean_loss"] - math.log(32)) < 0.2
    assert result.limit_value == 0.0
    assert "nothing learned, limit 0" in result.notes[0]
    assert result.threshold == pytest.approx(1.1 * result.scalars["reference_loss"])
    assert EvalResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_run_reads_an_exact_limit_end_to_end(tokenizer):
    model = PeekingModel(len(tokenizer), good_until=64)
    ev = PositionalLoss(PositionalLossConfig(seq_len=128, num_examples=5, batch_size=2))
    result = ev.run(model, tokenizer, progress=False)
    good = math.log(1 + 31 * math.exp(-3.0))
    assert result.curve[64.0] == pytest.approx(good, rel=1e-5)
    assert result.curve[80.0] == pytest.approx(math.log(32), rel=1e-5)
    assert result.limit_value == 64.0 and result.notes == []
    assert result.scalars["reference_loss"] == pytest.approx(good, rel=1e-5)


def test_held_out_data_uses_the_eval_seed_not_the_training_seed(tokenizer):
    ev = PositionalLoss(PositionalLossConfig(seq_len=32, bucket_size=8, num_examples=4, task_params={"doc_chars": 40}))
    held_out = ev._records(tokenizer)
    assert held_out == generate(SyntheticTextConfig(num_docs=4, doc_chars=40, seed=1234))
    assert held_out != generate(SyntheticTextConfig(num_docs=4, doc_chars=40, seed=0))


def test_run_on_a_jsonl_file_skips_short_documents(tmp_path, tokenizer):
    texts = ["too short."] + [r["text"] for r in generate(SyntheticTextConfig(num_docs=3, doc_chars=40, seed=9))]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    ev = PositionalLoss(PositionalLossConfig(seq_len=32, bucket_size=8, num_examples=10, path=str(path)))
    result = ev.run(PeekingModel(len(tokenizer), good_until=32), tokenizer, progress=False)
    assert result.scalars["num_examples"] == 3
    assert result.limit_value == 32.0
    assert "1 document(s) shorter than seq_len=32 tokens were skipped" in result.notes


def test_no_long_enough_document_is_a_one_line_error(tmp_path, llama, tokenizer):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "too short."}\n')
    ev = PositionalLoss(PositionalLossConfig(seq_len=32, bucket_size=8, path=str(path)))
    with pytest.raises(ValueError, match=r"no document of .*corpus.jsonl has seq_len=32 tokens \(all 1 are shorter\)"):
        ev.check(llama, tokenizer)


def test_measures_real_positional_under_training(tokenizer):
    """A llama trained only on 32-token windows degrades past them; one trained on 128-token windows does not."""

    def trained(window: int):
        model = tiny_llama(len(tokenizer), seed=0)
        docs = generate(SyntheticTextConfig(num_docs=256, doc_chars=window, seed=0))
        ids = torch.tensor([tokenizer(d["text"], add_special_tokens=False)["input_ids"] for d in docs])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(150):
            batch = ids[torch.randint(0, len(ids), (16,), generator=gen)]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad()
        return model

    ev = PositionalLoss(PositionalLossConfig(seq_len=128, num_examples=16))
    short = ev.run(trained(32), tokenizer, progress=False)
    full = ev.run(trained(128), tokenizer, progress=False)
    assert 32.0 <= short.limit_value < 128.0
    assert short.curve[128.0] > short.threshold
    assert full.limit_value == 128.0
    assert compare(short, full)["improved"] is True


def test_documents_are_long_enough_for_a_tokenizer_with_several_characters_per_token():
    """Held-out documents are sized from the tokenizer's characters per token, so a coarser tokenizer still gets
    ``seq_len`` tokens from every document."""
    from llm_limits.evals.tasks import synthetic_text as st

    words = sorted({*st.DETERMINERS, "an", *st.ADJECTIVES, *st.NOUNS, *st.TRANSITIVE, *st.INTRANSITIVE, "is",
                    *st.ADVERBS, *st.PREPOSITIONS, *st.CONJUNCTIONS, *" ".join(st.OPENERS).split(), ".", ","})
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    word_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    ev = PositionalLoss(PositionalLossConfig(seq_len=64, num_examples=6))
    result = ev.run(PeekingModel(len(word_tokenizer), good_until=64), word_tokenizer, progress=False)
    assert result.scalars["num_examples"] == 6 and not any("skipped" in n for n in result.notes)
    assert result.limit_value == 64.0
