"""The multimodal eval (evals/multimodal.py): the modality gap, separability and caption-equality recall on hand-made
embeddings, MMStar gain/leakage and MMVP pair accuracy on hand-made answers, the summary on a scripted measurement
(exact values), which images each stage feeds the model, config validation, check() on non-VLMs and misfits, and the
real run on the tiny CLIP and SigLIP LLaVA models over shapes, digits and the image_folder fixture."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from llm_limits import evals
import llm_limits.evals.multimodal as mm
from llm_limits.evals import EVALS, EvalResult
from llm_limits.evals import vlm
from llm_limits.evals.multimodal import (
    EvalSet,
    Measurements,
    Multimodal,
    MultimodalConfig,
    build_eval_set,
    chance_accuracy,
    cosine_matrix,
    modality_gap,
    multimodal_gain,
    multimodal_leakage,
    pair_accuracy,
    pair_cosine,
    recall_at_k,
    recall_chance,
    separability,
    summarize,
    task_config,
)
from tests.vlm_fixtures import tiny_tokenizer, tiny_vlm
from llm_limits.trainers.recipe.schema import strict_model_for, to_dataclass
from llm_limits.trainers.build.tokenizers import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"num_examples": 12, "num_retrieval": 12, "trap_examples": 6, "pair_examples": 3, "batch_size": 64}
"""The real runs: 12 multiple-choice records at 5 signal levels and blind, 12 images, 6 traps, 3 pairs."""

FIXTURE = "tests/fixtures/image_folder/data.jsonl"


@pytest.fixture(scope="module")
def clip():
    return tiny_vlm("clip")


@pytest.fixture(scope="module")
def siglip():
    return tiny_vlm("siglip")


def test_doctests():
    assert doctest.testmod(mm).failed == 0


def test_registered():
    assert EVALS["multimodal"] is Multimodal and evals.Multimodal is Multimodal
    assert Multimodal.limit == "multimodal" and Multimodal.Config is MultimodalConfig


# --- alignment: hand-made embeddings ----------------------------------------------------------------------------------
def cones(n: int = 8, a: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Two opposite cones in 3-D: images ``(a, b cos t, b sin t)``, texts ``(-a, b cos t, b sin t)`` with
    ``b = sqrt(1 - a^2)``, at ``n`` evenly spaced ``t``; centres ``(a, 0, 0)`` and ``(-a, 0, 0)``."""
    b = math.sqrt(1 - a * a)
    t = 2 * math.pi * np.arange(n) / n
    ring = np.stack([b * np.cos(t), b * np.sin(t)], axis=1)
    return np.column_stack([np.full(n, a), ring]), np.column_stack([np.full(n, -a), ring])


def test_opposite_cones():
    img, txt = cones()
    scale = np.arange(1, 9)[:, None]  # lengths differ: everything is normalised first
    assert modality_gap(img * scale, txt * 3.0) == pytest.approx(1.2)  # || (0.6,0,0) - (-0.6,0,0) ||
    assert pair_cosine(img * scale, txt) == pytest.approx(-0.36 + 0.64)  # -a^2 + b^2
    assert separability(img * scale, txt) == 1.0
    assert modality_gap(img, -img) == pytest.approx(2 * 0.6)  # antipodal clouds: twice the centre's length


def test_identical_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6))
    assert modality_gap(x, x * 2.0) == pytest.approx(0.0, abs=1e-12)
    assert pair_cosine(x, x) == pytest.approx(1.0)
    # each image with its identical caption in one fold: the probe gives both the same label, one of two right
    assert separability(x, x) == 0.5


def test_separability_edge_cases():
    assert math.isnan(separability([[1.0, 0.0]], [[0.0, 1.0]]))  # one embedding per modality: no folds
    img, txt = cones(3)
    assert separability(img, txt) == 1.0  # 3 per modality: 3 folds
    img, txt = cones(8)
    assert separability(img, txt[:5]) == 1.0  # unmatched sizes: no pair groups


def test_recall_with_repeated_captions():
    caps = ["a", "a", "b", "c"]
    sim = np.array([[0.1, 0.9, 0.0, 0.0],    # query a: best item 1 (a) -> hit at 1
                    [0.0, 0.2, 0.1, 0.8],    # query a: c, a -> hit at 2
                    [0.9, 0.0, 0.5, 0.0],    # query b: a, b -> hit at 2
                    [0.0, 0.0, 0.0, 1.0]])   # query c: c -> hit at 1
    assert recall_at_k(sim, caps, caps, 1) == 0.5
    assert recall_at_k(sim, caps, caps, 2) == 1.0
    # the transpose: item-side queries over the rows (t2i when sim is [images, texts])
    # column 0 (a): rows 2, 0 -> b, a; column 1 (a): row 0 -> a; column 2 (b): row 2 -> b; column 3 (c): row 3 -> c
    assert recall_at_k(sim.T, caps, caps, 1) == 0.75
    # ties rank by index: every score equal, so each query's top item is item 0 (caption a)
    assert recall_at_k(np.zeros((4, 4)), caps, caps, 1) == 0.5
    assert recall_at_k(np.zeros((4, 4)), caps, caps, 4) == 1.0
    with pytest.raises(ValueError, match="sim is"):
        recall_at_k(sim[:3], caps, caps, 1)


def test_recall_from_embeddings():
    # 4 images, their captions' embeddings: two "seven" captions are the same text, so the same vector
    img = np.array([[1.0, 0.1, 0.0], [0.9, 0.0, 0.2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    txt = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.1, 1.0]])
    caps = ["a handwritten seven.", "a handwritten seven.", "a handwritten one.", "a handwritten two."]
    sim = cosine_matrix(img, txt)
    assert sim.shape == (4, 4)
    assert recall_at_k(sim, caps, caps, 1) == 1.0  # image 1's best text is text 0: the same caption text, a hit
    assert recall_at_k(sim.T, caps, caps, 1) == 1.0


def test_recall_chance():
    caps = ["a", "a", "b", "c"]
    assert recall_chance(caps, 1) == pytest.approx((2 + 2 + 1 + 1) / 16)
    # k=2: a-queries miss only when both draws avoid the two a's: 1 - C(2,2)/C(4,2) = 5/6; b and c: 1 - C(3,2)/C(4,2)
    assert recall_chance(caps, 2) == pytest.approx((2 * 5 / 6 + 2 * 0.5) / 4)
    assert recall_chance(caps, 10) == 1.0
    assert recall_chance(["x"] * 5, 1) == 1.0
    assert recall_chance([str(d) for d in range(10)] * 3, 1) == pytest.approx(0.1)
    assert math.isnan(recall_chance([], 1))


# --- answers: hand-made outcomes --------------------------------------------------------------------------------------
def test_mmstar_and_pairs():
    assert multimodal_gain(0.8, 0.55) == pytest.approx(0.25)
    assert multimodal_gain(0.4, 0.5) == pytest.approx(-0.1)
    assert multimodal_leakage(0.55, 0.25) == pytest.approx(0.30)
    assert multimodal_leakage(0.2, 0.25) == 0.0
    assert pair_accuracy([0, 0, 1, 1], [True, True, True, False]) == 0.5
    assert pair_accuracy([-1, 3, 3, -1], [False, True, True, False]) == 1.0  # -1: not a pair, ignored
    assert math.isnan(pair_accuracy([-1], [True]))
    assert chance_accuracy([["0"] * 10, ["yes", "no"]]) == pytest.approx(0.3)
    assert mm.pick(["a", "b", "c"], [-2.0, -1.0, -1.0]) == "b"
    with pytest.raises(ValueError, match="scores"):
        mm.pick(["a"], [0.0, 1.0])


def record(answer: str, choices: list[str], *, kind: str = "qa", prior: str = "", pair_id: int = -1,
           caption: str = "", image_id: str = "") -> dict:
    return {"task": "shapes", "id": image_id, "image_id": image_id, "image": np.zeros((4, 4, 3), np.uint8),
            "caption": caption, "question": "q?", "answer": answer, "choices": choices, "kind": kind,
            "pair_id": pair_id, "prior_answer": prior, "attributes": {}}


def scripted() -> tuple[EvalSet, Measurements]:
    yn, rgb = ["yes", "no"], ["red", "green", "blue", "yellow"]
    qa = [record("yes", yn), record("no", yn), record("red", rgb), record("blue", rgb)]
    items = [record("", [], kind="caption", caption=c, image_id=str(i)) for i, c in enumerate("aabc")]
    traps = [record("red", rgb, kind="trap", prior="green"), record("blue", rgb, kind="trap", prior="red")]
    pairs = [record("yes", yn, kind="pair", pair_id=0), record("no", yn, kind="pair", pair_id=0),
             record("red", rgb, kind="pair", pair_id=1), record("blue", rgb, kind="pair", pair_id=1)]
    img, txt = cones(4)
    m = Measurements(
        image_embeddings=img, text_embeddings=txt,
        answers={0.0: ["yes", "yes", "green", "red"], 0.5: ["yes", "no", "green", "red"],
                 1.0: ["yes", "no", "red", "red"]},
        answers_no_image=["yes", "yes", "red", "red"],
        trap_answers=["red", "red"], trap_answers_no_image=["green", "red"],
        pair_answers=["yes", "no", "red", "red"])
    return EvalSet(qa=qa, items=items, traps=traps, pairs=pairs, notes=["from the data"]), m


def test_summarize_exact():
    data, m = scripted()
    c = MultimodalConfig(task="digits", signal_levels=(0.0, 0.5, 1.0), text_only_accuracy=0.25)
    curve, limit, threshold, s, series, notes = summarize(c, data, m)
    assert curve == {0.0: 0.25, 0.5: 0.5, 1.0: 0.75}
    assert s["acc_sighted"] == 0.75 and s["acc_noise"] == 0.25 and s["acc_no_image"] == 0.5
    assert limit == s["multimodal_gain"] == pytest.approx(0.25)
    assert s["multimodal_leakage"] == pytest.approx(0.25)  # 0.5 blind - S_t 0.25
    assert s["gain_vs_noise"] == pytest.approx(0.5)
    assert threshold == s["chance_accuracy"] == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    assert s["text_only_accuracy"] == 0.25
    assert s["trap_accuracy"] == 0.5 and s["trap_prior_rate"] == 0.5  # right on the first, the prior on the second
    assert s["trap_accuracy_no_image"] == 0.0 and s["trap_prior_rate_no_image"] == 1.0
    assert s["pair_accuracy"] == 0.5 and s["pair_record_accuracy"] == 0.75 and s["num_pairs"] == 2
    assert s["gap"] == pytest.approx(1.2) and s["separability"] == 1.0
    assert s["gap_pair_cosine"] == pytest.approx(0.28)
    # cones: image i's nearest text is text i (cosine 0.28 vs -0.36 - 0.64 cos dt); captions a a b c
    assert s["i2t_recall@1"] == 1.0 and s["t2i_recall@1"] == 1.0
    assert s["recall_chance@1"] == pytest.approx(0.375) and s["num_captions"] == 3
    assert series["recall_i2t"].points == {1.0: 1.0, 5.0: 1.0} and series["recall_t2i"].axis == "k"
    assert notes[0] == "from the data"
    assert any("recall hit is any retrieved item" in n for n in notes)
    assert not any("uses chance" in n for n in notes)


def test_summarize_notes_without_text_only_accuracy():
    data, m = scripted()
    m.answers_no_image = ["yes", "no", "red", "red"]  # blind as good as sighted
    c = MultimodalConfig(task="digits", signal_levels=(0.0, 0.5, 1.0))
    _, limit, _, s, _, notes = summarize(c, data, m)
    assert limit == 0.0 and s["text_only_accuracy"] == s["chance_accuracy"]
    assert s["multimodal_leakage"] == pytest.approx(0.75 - 0.375)
    assert any("uses chance (0.38) as the text-only score" in n for n in notes)
    assert any("do not use the image" in n for n in notes)
    data.traps, data.pairs, data.items = [], [], data.items[:1]
    _, _, _, s, series, notes = summarize(c, data, m)
    assert not any(k.startswith(("trap_", "pair_", "gap", "i2t", "t2i")) for k in s) and not series
    assert any("fewer than 2 captioned images" in n for n in notes)


# --- the records ------------------------------------------------------------------------------------------------------
def test_digits_reads_the_test_split():
    c = MultimodalConfig(task="digits", num_examples=30, num_retrieval=20)
    assert task_config(c, "main", 5).split == "test" and task_config(c, "main", 5).seed == c.seed
    data = build_eval_set(c)
    assert len(data.qa) == 30 and len(data.items) == 20 and not data.traps and not data.pairs
    assert all(int(r["image_id"].split("-")[1]) % 5 == 0 for r in data.qa + data.items)  # the held-out images
    assert all(r["kind"] == "qa" and r["choices"] for r in data.qa)
    assert len({r["image_id"] for r in data.items}) == 20
    assert any("digits has no traps or MMVP pairs" in n for n in data.notes)
    train = MultimodalConfig(task="digits", params={"split": "train", "questions": ["digit"]})
    assert task_config(train, "main", 5).split == "train"


def test_shapes_sets():
    c = MultimodalConfig(task="shapes", num_examples=10, num_retrieval=15, trap_examples=7, pair_examples=4,
                         params={"image_size": 16})
    data = build_eval_set(c)
    assert len(data.qa) == 10 and len(data.items) == 15 and len(data.traps) == 7 and len(data.pairs) == 8
    assert all(r["kind"] == "trap" and r["prior_answer"] not in ("", r["answer"]) for r in data.traps)
    assert [r["pair_id"] for r in data.pairs] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(r["image"].shape == (16, 16, 3) for r in data.qa)
    assert not data.notes
    # separate generations with distinct seeds: the trap scenes are not the main set's
    assert not np.array_equal(data.traps[0]["image"], data.qa[0]["image"])
    again = build_eval_set(c)
    assert [r["id"] for r in again.qa] == [r["id"] for r in data.qa]
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(again.traps, data.traps))


def test_image_folder_set():
    data = build_eval_set(MultimodalConfig(task="image_folder", path=FIXTURE, num_examples=50, num_retrieval=50))
    assert data.qa and all(r["kind"] == "qa" and r["choices"] for r in data.qa)
    assert len(data.items) == len({r["image_id"] for r in data.items})
    assert len(data.pairs) % 2 == 0
    assert any("distinct captioned images were available" in n for n in data.notes)


# --- config -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"task": "cifar"}, "task must be one of"),
    ({"params": {"bogus": 1}}, r"params.bogus: not a field of task shapes \(known: caption_fraction, hint_fraction, "
                               r"image_size, noise, pair_fraction, prior_strength, trap_fraction\)"),
    ({"task": "digits", "params": {"image_size": 8}}, "params.image_size: not a field of task digits"),
    ({"params": {"num_examples": 5}}, "params.num_examples is set by the eval"),
    ({"params": {"seed": 5}}, "params.seed is set by the eval"),
    ({"task": "digits", "params": {"split": "val"}}, "multimodal: params: split must be one of train, test"),
    ({"params": {"image_size": 3}}, "multimodal: params: image_size must be"),
    ({"params": [1]}, "params must be a mapping"),
    ({"task": "image_folder"}, "path is required for task image_folder"),
    ({"task": "image_folder", "path": FIXTURE, "params": {"rot": "."}}, r"params.rot: .*known: root"),
    ({"path": FIXTURE}, "path is only read by task image_folder"),
    ({"signal_levels": (0.0, 0.5)}, "must include 0 .* and 1"),
    ({"signal_levels": (0.5, 1.0)}, "must include 0"),
    ({"signal_levels": (0.0, 0.6, 0.4, 1.0)}, "strictly ascending"),
    ({"signal_levels": (0.0, 1.5)}, "within \\[0, 1\\]"),
    ({"signal_levels": ()}, "signal_levels must be numbers"),
    ({"num_examples": 0}, "num_examples must be an integer >= 1"),
    ({"num_retrieval": 1}, "num_retrieval must be an integer >= 2"),
    ({"trap_examples": -1}, "trap_examples must be an integer >= 0"),
    ({"pair_examples": 1.5}, "pair_examples must be an integer >= 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ({"layer": "last"}, "layer must be an integer"),
    ({"text_only_accuracy": 1.5}, "text_only_accuracy must be within"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        MultimodalConfig(**kwargs)
    assert str(err.value).startswith("multimodal") and "\n" not in str(err.value)


def test_config_defaults_and_spec():
    c = MultimodalConfig()
    assert (c.task, c.num_examples, c.num_retrieval, c.trap_examples, c.pair_examples) == ("shapes", 200, 100, 100, 50)
    spec = Multimodal(c).spec()
    assert spec.metric == "accuracy" and spec.axis == "image_signal" and spec.higher_is_better
    assert spec.axis_values == (0.0, 0.25, 0.5, 0.75, 1.0) and spec.threshold is None
    assert spec.limit == "multimodal" and spec.limit_unit == "accuracy points"
    assert MultimodalConfig(signal_levels=(0, 1)).signal_levels == (0, 1)


def test_recipe_entry():
    """A recipe's ``evals:`` entry (YAML lists, ints for floats) becomes the config through the strict schema."""
    schema = strict_model_for(MultimodalConfig)
    entry = {"task": "digits", "params": {"questions": ["digit"]}, "signal_levels": [0, 0.5, 1],
             "text_only_accuracy": 0.3, "num_examples": 20}
    c = to_dataclass(MultimodalConfig, schema.model_validate(entry))
    assert c.signal_levels == (0.0, 0.5, 1.0) and c.params == {"questions": ["digit"]} and c.path is None
    assert Multimodal(c).spec().axis_values == (0.0, 0.5, 1.0)


# --- check ----------------------------------------------------------------------------------------------------------
def test_check_rejects_a_plain_llama():
    tok = tiny_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="multimodal: model type 'llama' is not a vision-language model") as err:
        Multimodal(MultimodalConfig(task="digits", **SMALL)).check(llama, tok)
    assert "\n" not in str(err.value)


def test_check_misfits():
    model, tok = tiny_vlm("clip")
    Multimodal(MultimodalConfig(task="digits", layer=-3, **SMALL)).check(model, tok)  # 2 layers: -3 is the input
    with pytest.raises(ValueError, match=r"layer must be within \[-3, 2\]"):
        Multimodal(MultimodalConfig(task="digits", layer=3, **SMALL)).check(model, tok)
    with pytest.raises(ValueError, match="tokenizer has no token for the model's image_token_id"):
        Multimodal(MultimodalConfig(task="digits", **SMALL)).check(model, build_char_tokenizer())
    model.config.text_config.max_position_embeddings = 16
    with pytest.raises(ValueError, match="needs .* positions .* position range is 16"):
        Multimodal(MultimodalConfig(task="digits", **SMALL)).check(model, tok)


def test_check_spelling():
    model, tok = tiny_vlm("clip")
    narrow = build_char_tokenizer(alphabet="abcdefghijklmnopqrstuvwxyz ?\n:")  # no digits
    narrow.add_special_tokens({"additional_special_tokens": [vlm.IMAGE_TOKEN]})
    model.config.image_token_id = narrow.convert_tokens_to_ids(vlm.IMAGE_TOKEN)
    with pytest.raises(ValueError, match="tokenizer cannot spell the digits records"):
        Multimodal(MultimodalConfig(task="digits", **SMALL)).check(model, narrow)


def test_check_no_multiple_choice(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"image": "x.png", "caption": "a dot."}\n')
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "x.png")
    model, tok = tiny_vlm("clip")
    with pytest.raises(ValueError, match="no multiple-choice records"):
        Multimodal(MultimodalConfig(task="image_folder", path=str(tmp_path / "data.jsonl"))).check(model, tok)


# --- what each stage feeds the model ----------------------------------------------------------------------------------
def test_measure_feeds_clean_noise_and_blind(clip, monkeypatch):
    model, tok = clip
    c = MultimodalConfig(task="shapes", signal_levels=(0.0, 0.5, 1.0), **SMALL)
    e = Multimodal(c)
    data = e.data()
    calls = []

    def fake(model, tokenizer, fmt, questions, images, choices, *, batch_size=32):
        calls.append((list(questions), None if images is None else [np.array(i) for i in images]))
        return [[0.0] * len(o) for o in choices]

    monkeypatch.setattr(vlm, "choice_logprobs", fake)
    m = e.measure(model, tok, data)
    fmt = vlm.image_format(model, tok)
    noise = vlm.noise_images(len(data.qa), fmt.image_size, seed=c.seed + mm.SEED_OFFSETS["noise"])
    qa_calls = calls[:4]
    assert all(q == [r["question"] for r in data.qa] for q, _ in qa_calls)
    assert all(np.array_equal(a, b) for a, b in zip(qa_calls[0][1], noise))  # s = 0: pure noise
    half = vlm.blend([r["image"] for r in data.qa], noise, 0.5)
    assert all(np.array_equal(a, b) for a, b in zip(qa_calls[1][1], half))
    assert all(np.array_equal(a, r["image"]) for a, r in zip(qa_calls[2][1], data.qa))  # s = 1: the clean image
    assert qa_calls[3][1] is None  # blind
    assert calls[4][1] is not None and calls[5][1] is None  # traps sighted, then blind
    assert len(calls) == 7 and len(calls[6][0]) == 6  # pairs, sighted
    assert m.answers[0.0] == [r["choices"][0] for r in data.qa]  # all tied: the first choice
    assert m.image_embeddings.shape == (12, 32) and m.text_embeddings.shape == (12, 32)


# --- real runs --------------------------------------------------------------------------------------------------------
IN_UNIT = ("acc_", "trap_", "pair_", "recall", "i2t", "t2i", "separability", "chance", "text_only", "accuracy@",
           "multimodal_leakage")


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_run_shapes(vision, clip, siglip):
    model, tok = clip if vision == "clip" else siglip
    model.train()
    e = Multimodal(MultimodalConfig(task="shapes", **SMALL))
    e.check(model, tok)
    result = e.run(model, tok, progress=True)
    assert model.training  # eval mode only during the run
    s = result.scalars
    expected = {"gap", "gap_pair_cosine", "separability", "i2t_recall@1", "i2t_recall@5", "t2i_recall@1",
                "t2i_recall@5", "recall_chance@1", "recall_chance@5", "acc_sighted", "acc_no_image", "acc_noise",
                "multimodal_gain", "multimodal_leakage", "gain_vs_noise", "trap_accuracy", "trap_prior_rate",
                "trap_accuracy_no_image", "trap_prior_rate_no_image", "pair_accuracy", "pair_record_accuracy",
                "chance_accuracy", "text_only_accuracy", "num_examples", "num_retrieval", "num_traps", "num_pairs"}
    assert expected <= set(s)
    assert all(isinstance(v, float) and math.isfinite(v) for v in s.values())
    assert all(0.0 <= v <= 1.0 for k, v in s.items() if k.startswith(IN_UNIT)), s
    assert 0.0 <= s["gap"] <= 2.0 and -1.0 <= s["gap_pair_cosine"] <= 1.0
    assert -1.0 <= s["multimodal_gain"] <= 1.0 and -1.0 <= s["gain_vs_noise"] <= 1.0
    assert (s["num_examples"], s["num_retrieval"], s["num_traps"], s["num_pairs"]) == (12, 12, 6, 3)
    assert list(result.curve) == [0.0, 0.25, 0.5, 0.75, 1.0] == list(result.spec.axis_values)
    assert result.limit_value == s["multimodal_gain"] and result.threshold == s["chance_accuracy"]
    assert result.curve[1.0] == s["acc_sighted"] and result.curve[0.0] == s["acc_noise"]
    assert set(result.series) == {"recall_i2t", "recall_t2i"}
    assert result.version == EVALS["multimodal"].version
    assert result.eval == "multimodal" and result.notes
    assert EvalResult.from_dict(result.to_dict()).to_dict() == result.to_dict()
    again = Multimodal(MultimodalConfig(task="shapes", **SMALL)).run(model, tok, progress=False)
    assert again.to_dict() == result.to_dict()


def test_run_digits_and_image_folder(siglip):
    model, tok = siglip
    result = Multimodal(MultimodalConfig(task="digits", **SMALL)).run(model, tok, progress=False)
    assert not any(k.startswith(("trap_", "pair_")) for k in result.scalars)
    assert any("digits has no traps or MMVP pairs" in n for n in result.notes)
    assert result.scalars["num_captions"] <= 10 and result.scalars["recall_chance@1"] > 1 / 12
    e = Multimodal(MultimodalConfig(task="image_folder", path=FIXTURE, **SMALL))
    e.check(model, tok)
    result = e.run(model, tok, progress=False)
    assert result.scalars["num_examples"] >= 1 and result.limit_value == result.scalars["multimodal_gain"]
    assert any("were available" in n or "was available" in n for n in result.notes)
