"""The multimodal tasks (issue #6): ``digits`` (sklearn's 8x8 digits), ``shapes`` (synthetic scenes with planted
language priors, traps and MMVP-style pairs) and the ``image_folder`` loader (users' images, confined to their root).
Every record is checked against the shared record schema."""

from __future__ import annotations

import json
import re
import shutil
import string
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from llm_limits.evals.tasks import TASKS, TaskDataError, digits, shapes
from llm_limits.evals.tasks.digits import DigitsConfig
from llm_limits.evals.tasks.image_folder import load
from llm_limits.evals.tasks.shapes import ShapesConfig

FIXTURE = Path(__file__).parent / "fixtures" / "image_folder"
FIELDS = {"task", "id", "image_id", "image", "caption", "question", "answer", "choices", "kind", "pair_id",
          "prior_answer", "attributes"}
KINDS = {"caption", "qa", "trap", "pair"}
PRINTABLE = set(string.printable) - set("\r\x0b\x0c\t\n")
MIXED = ShapesConfig(num_examples=1200, trap_fraction=0.1, pair_fraction=0.2, caption_fraction=0.15, seed=3)


def check_records(records: list[dict], task: str, *, ascii_text: bool = True) -> None:
    """Every record has every key of the contract, with its type; ids are unique; kinds are consistent."""
    assert records
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert set(r) == FIELDS
        assert r["task"] == task
        for name in ("id", "image_id", "caption", "question", "answer", "prior_answer"):
            assert isinstance(r[name], str), name
            if ascii_text:
                assert set(r[name]) <= PRINTABLE, (name, r[name])
        for name in ("id", "image_id", "caption", "question", "answer"):
            assert r[name], name
        img = r["image"]
        assert isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert isinstance(r["choices"], list) and all(isinstance(c, str) for c in r["choices"])
        assert r["kind"] in KINDS
        assert isinstance(r["pair_id"], int) and not isinstance(r["pair_id"], bool)
        assert (r["pair_id"] >= 0) == (r["kind"] == "pair")
        assert isinstance(r["attributes"], dict)
        if r["kind"] == "caption":
            assert (r["question"], r["answer"], r["choices"]) == ("what is in the image?", r["caption"], [])
        elif r["choices"]:
            assert r["answer"] in r["choices"]
        if r["kind"] == "trap":
            assert r["prior_answer"] and r["prior_answer"] != r["answer"]


def summary(records: list[dict]) -> list[tuple]:
    """Records as comparable tuples (images as bytes)."""
    return [tuple(r[k] if k != "image" else r[k].tobytes() for k in sorted(FIELDS - {"attributes", "choices"}))
            + (tuple(r["choices"]), tuple(sorted(r["attributes"].items()))) for r in records]


def test_registered_as_tasks():
    assert TASKS["digits"] == (DigitsConfig, digits.generate)
    assert TASKS["shapes"] == (ShapesConfig, shapes.generate)


# --- digits ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sk_digits():
    return load_digits()


@pytest.fixture(scope="module")
def digits_test() -> list[dict]:
    return digits.generate(DigitsConfig(split="test"))


def test_digits_partition_is_fixed_disjoint_and_covers_every_image(sk_digits):
    train, test = digits.split_indices("train"), digits.split_indices("test")
    assert not set(train) & set(test)
    assert sorted(train + test) == list(range(len(sk_digits.target)))
    assert test == [i for i in range(len(sk_digits.target)) if i % 5 == 0]
    # the seed never moves an image across the split
    for split, indices in (("train", train), ("test", test)):
        for seed in (0, 7):
            ids = {r["image_id"] for r in digits.generate(DigitsConfig(split=split, seed=seed))}
            assert ids == {f"digits-{i:04d}" for i in indices}
    drawn = digits.generate(DigitsConfig(split="train", num_examples=500, seed=1))
    assert {int(r["image_id"].split("-")[1]) for r in drawn} <= set(train)


def test_digits_records_and_answers_match_load_digits(digits_test, sk_digits):
    check_records(digits_test, "digits")
    assert len(digits_test) == 360 * 3
    assert Counter(r["kind"] for r in digits_test) == {"qa": 720, "caption": 360}
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for r in digits_test:
        i = int(r["image_id"].split("-")[1])
        d = int(sk_digits.target[i])
        assert r["attributes"] == {"digit": d}
        assert r["caption"] == f"a handwritten {words[d]}."
        assert (r["pair_id"], r["prior_answer"]) == (-1, "")
        assert r["image"].shape == (8, 8, 3)
        expected = np.round(sk_digits.images[i] * 255 / 16).astype(np.uint8)
        assert all(np.array_equal(r["image"][:, :, c], expected) for c in range(3))
        if r["question"] == "which digit is this?":
            assert (r["answer"], r["choices"], r["kind"]) == (str(d), [str(k) for k in range(10)], "qa")
        elif r["question"] == "is the digit even?":
            assert (r["answer"], r["choices"]) == ("yes" if d % 2 == 0 else "no", ["yes", "no"])
        else:
            assert r["kind"] == "caption"
    assert int(digits_test[0]["image"].max()) <= 255 and any(int(r["image"].max()) == 255 for r in digits_test)


def test_digits_deterministic_in_seed_and_sized_by_num_examples(digits_test):
    assert summary(digits.generate(DigitsConfig(split="test"))) == summary(digits_test)
    other = digits.generate(DigitsConfig(split="test", seed=1))
    assert [r["id"] for r in other] != [r["id"] for r in digits_test]
    assert sorted(r["id"] for r in other) == sorted(r["id"] for r in digits_test)
    a = digits.generate(DigitsConfig(split="test", num_examples=50, seed=2))
    assert summary(a) == summary(digits.generate(DigitsConfig(split="test", num_examples=50, seed=2)))
    assert len(a) == 50 and len({r["id"] for r in a}) == 50
    # more records than the pool: whole passes, repeats get their own id
    many = digits.generate(DigitsConfig(split="test", num_examples=400, questions=("digit",)))
    check_records(many, "digits")
    assert len(many) == 400 and len({r["image_id"] for r in many}) == 360
    assert Counter(r["image_id"] for r in many).most_common(1)[0][1] == 2


def test_digits_question_subset():
    recs = digits.generate(DigitsConfig(split="test", questions=["parity"], num_examples=30))
    assert {r["question"] for r in recs} == {"is the digit even?"}
    assert all(r["id"].endswith("-parity") for r in recs)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "val"}, "digits: split must be one of train, test"),
    ({"num_examples": -1}, "digits: num_examples must be an integer >= 0"),
    ({"questions": ("digit", "colour")}, "digits: questions: unknown kind 'colour'"),
    ({"questions": ()}, "digits: questions: expected a non-empty list"),
    ({"questions": "digit"}, "digits: questions: expected a non-empty list"),
    ({"seed": 1.5}, "digits: seed must be an integer"),
])
def test_digits_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DigitsConfig(**kwargs)


# --- shapes ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed() -> list[dict]:
    return shapes.generate(MIXED)


def shape_pixels(image: np.ndarray) -> np.ndarray:
    """Bool mask of the pixels that are not background (clean images)."""
    return np.abs(image.astype(int) - np.array(shapes.BACKGROUND)).sum(-1) > 60


def test_shapes_deterministic_in_seed(mixed):
    check_records(mixed, "shapes")
    assert summary(shapes.generate(MIXED)) == summary(mixed)
    other = shapes.generate(ShapesConfig(**{**MIXED.__dict__, "seed": 4}))
    assert summary(other) != summary(mixed)


def test_shapes_rendering_matches_the_attributes():
    recs = shapes.generate(ShapesConfig(num_examples=300, seed=5))
    areas: dict[str, list[int]] = {"small": [], "large": []}
    for r in recs:
        a, img = r["attributes"], r["image"]
        assert img.shape == (32, 32, 3)
        assert r["caption"] == f"a {a['size']} {a['colour']} {a['shape']} on the {a['position']}."
        mask = shape_pixels(img)
        # colour: the mean colour of the shape's pixels is nearest its RGB value
        mean = img[mask].mean(0)
        assert min(shapes.RGB, key=lambda c: np.abs(mean - shapes.RGB[c]).sum()) == a["colour"]
        assert np.abs(mean - shapes.RGB[a["colour"]]).max() < 1
        # position: centroid on the named half
        cx = np.nonzero(mask)[1].mean() + 0.5
        assert (cx < 16) == (a["position"] == "left")
        # shape: how much of its bounding box it fills (square ~1, circle ~pi/4, triangle ~1/2)
        rows, cols = np.nonzero(mask)
        fill = mask.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
        assert {"square": fill > 0.95, "circle": 0.65 < fill < 0.9, "triangle": fill < 0.65}[a["shape"]], \
            (a, fill)
        areas[a["size"]].append(int(mask.sum()))
    assert max(areas["small"]) < min(areas["large"])


def test_shapes_questions_answers_and_exact_kind_counts(mixed):
    counts = shapes.kind_counts(MIXED)
    assert counts == {"trap": 120, "pair": 240, "caption": 180, "qa": 660, "colour_qa": 165, "hinted": 82,
                      "hint_matches": 74}
    assert Counter(r["kind"] for r in mixed) == {k: counts[k] for k in ("trap", "pair", "caption", "qa")}
    qa = [r for r in mixed if r["kind"] == "qa"]
    asked = Counter(r["id"].rsplit("-", 1)[1] for r in qa)
    assert asked == {"colour": 165, "shape": 165, "size": 165, "position": 165}
    for r in qa:
        ask = r["id"].rsplit("-", 1)[1]
        assert r["answer"] == shapes.answer_for(ask, r["attributes"])
        assert r["choices"] == shapes.choices_for(ask)
        if ask != "colour":
            assert (r["question"], r["prior_answer"]) == (shapes.QUESTIONS[ask], "")
    # the record order is shuffled, not grouped by kind
    first = [r["kind"] for r in mixed[:100]]
    assert len(set(first)) == 4


@pytest.mark.parametrize("prior_strength", [0.9, 0.25])
def test_shapes_hints_plant_a_prior_of_the_stated_strength(prior_strength):
    recs = shapes.generate(ShapesConfig(num_examples=2000, prior_strength=prior_strength, hint_fraction=0.5,
                                        caption_fraction=0.0, image_size=16, seed=1))
    colour = [r for r in recs if r["kind"] == "qa" and r["id"].endswith("-colour")]
    hinted = [r for r in colour if r["prior_answer"]]
    assert len(hinted) == round(0.5 * len(colour))
    for r in hinted:
        assert r["question"] == f"like {shapes.HINTS[r['prior_answer']]}, what colour is the shape?"
        assert r["prior_answer"] in shapes.COLOURS
    assert all(r["question"] == "what colour is the shape?" for r in colour if not r["prior_answer"])
    match = sum(r["prior_answer"] == r["answer"] for r in hinted) / len(hinted)
    assert abs(match - prior_strength) < 0.01
    # the prior a text-only model could learn: the hint predicts the answer only as often as prior_strength says
    assert all(r["answer"] == r["attributes"]["colour"] for r in colour)


def test_shapes_traps_always_contradict_the_image(mixed):
    traps = [r for r in mixed if r["kind"] == "trap"]
    assert len(traps) == 120
    for r in traps:
        assert r["answer"] == r["attributes"]["colour"] != r["prior_answer"]
        assert r["question"] == shapes.hinted_question(r["prior_answer"])
        assert r["choices"] == list(shapes.COLOURS)
        mean = r["image"][shape_pixels(r["image"])].mean(0)
        assert np.abs(mean - shapes.RGB[r["answer"]]).max() < 1


def test_shapes_pairs_differ_in_exactly_one_attribute():
    config = ShapesConfig(num_examples=400, pair_fraction=0.5, caption_fraction=0.1, noise=12.0, seed=2)
    recs = shapes.generate(config)
    clean = shapes.generate(ShapesConfig(**{**config.__dict__, "noise": 0.0}))  # the same scenes, noise-free
    check_records(recs, "shapes")
    by_pair: dict[int, list[int]] = {}
    for i, r in enumerate(recs):
        if r["kind"] == "pair":
            by_pair.setdefault(r["pair_id"], []).append(i)
    assert sorted(by_pair) == list(range(100))
    varied = Counter()
    for i, j in by_pair.values():
        a, b = recs[i], recs[j]
        assert j == i + 1  # the two records of a pair stand together
        diff = [k for k in a["attributes"] if a["attributes"][k] != b["attributes"][k]]
        assert len(diff) == 1
        varied[diff[0]] += 1
        assert a["question"] == b["question"] == shapes.QUESTIONS[diff[0]]
        assert a["answer"] != b["answer"]
        assert a["image_id"] != b["image_id"] and not np.array_equal(a["image"], b["image"])
        assert a["prior_answer"] == b["prior_answer"] == ""
        # identical elsewhere: the same offset and the same noise, so pixels off both shapes agree
        same = ~(shape_pixels(clean[i]["image"]) | shape_pixels(clean[j]["image"]))
        assert same.sum() > 32 * 32 / 2
        assert np.array_equal(a["image"][same], b["image"][same])
    assert varied == {"colour": 25, "shape": 25, "size": 25, "position": 25}


def test_shapes_noise_keeps_the_scenes():
    clean = shapes.generate(ShapesConfig(num_examples=50, seed=9))
    noisy = shapes.generate(ShapesConfig(num_examples=50, seed=9, noise=20.0))
    assert [r["attributes"] for r in clean] == [r["attributes"] for r in noisy]
    assert [r["question"] for r in clean] == [r["question"] for r in noisy]
    diff = np.concatenate([(a["image"].astype(float) - b["image"]).ravel() for a, b in zip(clean, noisy)])
    assert 12 < np.abs(diff).mean() < 20  # E|N(0, 20)| = 16 (a little less where clipping bites)
    small = shapes.generate(ShapesConfig(num_examples=5, image_size=16))
    assert all(r["image"].shape == (16, 16, 3) for r in small)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_examples": 0}, "shapes: num_examples must be an integer >= 1"),
    ({"image_size": 8}, "shapes: image_size must be an integer in [16, 512]"),
    ({"noise": -1.0}, "shapes: noise must be a number >= 0"),
    ({"prior_strength": 1.5}, "shapes: prior_strength must be a number in [0, 1]"),
    ({"hint_fraction": "half"}, "shapes: hint_fraction must be a number in [0, 1]"),
    ({"trap_fraction": 0.5, "pair_fraction": 0.5}, "shapes: trap_fraction + pair_fraction + caption_fraction"),
])
def test_shapes_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ShapesConfig(**kwargs)


# --- image folder ---------------------------------------------------------------------------------------------------
def test_image_folder_fixture_loads():
    recs = load(FIXTURE / "data.jsonl")
    check_records(recs, "image_folder")
    assert len(recs) == 7
    assert [r["kind"] for r in recs] == ["caption", "qa", "pair", "pair", "qa", "trap", "qa"]
    assert [r["id"] for r in recs][:2] == ["image_folder-0001", "image_folder-0002"]
    assert recs[0]["image_id"] == recs[1]["image_id"] == "images/red_circle.png"
    assert recs[6]["image_id"] == "images/yellow_triangle.png"  # "./images/..." normalised
    assert all(r["image"].shape == (16, 16, 3) for r in recs)
    red = recs[0]["image"]
    assert np.abs(red[shape_pixels(red)].mean(0) - shapes.RGB["red"]).max() < 1
    assert recs[2]["pair_id"] == recs[3]["pair_id"] == 0 and recs[2]["answer"] != recs[3]["answer"]
    assert recs[5]["prior_answer"] == "blue" and recs[4]["attributes"]["shape"] == "square"
    assert recs[6]["choices"] == []
    # an explicit root gives the same records
    assert summary(load(FIXTURE / "data.jsonl", root=FIXTURE)) == summary(recs)


@pytest.fixture
def dataset(tmp_path: Path):
    """A copy of the fixture's images under ``tmp_path/ds``, an image outside it, and a writer of ``data.jsonl``
    whose first line is good (so a bad line is line 2)."""
    root = tmp_path / "ds"
    shutil.copytree(FIXTURE / "images", root / "images")
    shutil.copy(FIXTURE / "images" / "red_circle.png", tmp_path / "outside.png")
    good = {"image": "images/red_circle.png", "caption": "a large red circle on the left."}

    def write(line: object) -> Path:
        path = root / "data.jsonl"
        bad = line if isinstance(line, str) else json.dumps(line)
        path.write_text(json.dumps(good) + "\n" + bad + "\n")
        return path

    return root, write


Q = {"caption": "a red circle.", "question": "what colour is the shape?", "answer": "red"}


@pytest.mark.parametrize("line, field, what", [
    ({**Q, "image": "../outside.png"}, "image", "'../outside.png' is outside the dataset root"),
    ({**Q, "image": "images/../../outside.png"}, "image", "is outside the dataset root"),
    ({**Q, "image": "images/missing.png"}, "image", "'images/missing.png' not found under the dataset root"),
    ({**Q, "image": "images"}, "image", "is not a file"),
    ({**Q, "image": "images/not_a_png.png"}, "image", "is not a readable image"),
    ({**Q, "image": 3}, "image", "expected a string"),
    ({"caption": "x.", "question": "q?", "answer": "a"}, "image", "missing"),
    ({"image": "images/red_circle.png", "question": "q?", "answer": "a"}, "caption", "missing"),
    ({**Q, "image": "images/red_circle.png", "answer": None}, "answer", "missing"),
    ({**Q, "image": "images/red_circle.png", "choices": ["green", "blue"]}, "choices", "must contain the answer"),
    ({**Q, "image": "images/red_circle.png", "choices": "red"}, "choices", "expected a non-empty list"),
    ({**Q, "image": "images/red_circle.png", "kind": "quiz"}, "kind", "expected one of qa, trap, pair, caption"),
    ({**Q, "image": "images/red_circle.png", "kind": "trap"}, "prior_answer", "a trap needs"),
    ({**Q, "image": "images/red_circle.png", "pair_id": "a"}, "pair_id", "expected an integer >= 0"),
    ({**Q, "image": "images/red_circle.png", "kind": "pair"}, "pair_id", "a pair record needs one"),
    ({**Q, "image": "images/red_circle.png", "pair_id": 4}, "pair_id", "4 is shared by 1 record (expected exactly 2"),
    ({"image": "images/red_circle.png", "caption": "c.", "answer": "red"}, "answer", "given without a \"question\""),
])
def test_image_folder_bad_lines_name_file_line_and_field(dataset, line, field, what):
    root, write = dataset
    (root / "images" / "not_a_png.png").write_text("hello")
    path = write(line)
    with pytest.raises(TaskDataError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:2: {field}:"), message
    assert what in message, message


def test_image_folder_refuses_absolute_paths_and_symlinks_out(dataset, tmp_path):
    root, write = dataset
    outside = tmp_path / "outside.png"
    path = write({**Q, "image": str(outside)})
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:2: image: {str(outside)!r} is an absolute path")):
        load(path)
    (root / "images" / "link.png").symlink_to(outside)
    path = write({**Q, "image": "images/link.png"})
    expected = f"{path}:2: image: 'images/link.png' is outside the dataset root {root.resolve()}"
    with pytest.raises(TaskDataError, match=re.escape(expected)):
        load(path)
    (root / "images" / "dir_link").symlink_to(tmp_path, target_is_directory=True)
    path = write({**Q, "image": "images/dir_link/outside.png"})
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:2: image: 'images/dir_link/outside.png' is outside")):
        load(path)
    # a symlink that stays inside the root is fine
    (root / "images" / "inner.png").symlink_to(root / "images" / "blue_circle.png")
    recs = load(write({**Q, "image": "images/inner.png", "answer": "blue"}))
    assert recs[1]["image_id"] == "images/inner.png" and recs[1]["image"].shape == (16, 16, 3)


def test_image_folder_bad_json_and_root(dataset, tmp_path):
    root, write = dataset
    path = write('{"image": "images/red_circle.png", "caption": ')
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:2: not valid JSON")):
        load(path)
    path = tmp_path / "elsewhere.jsonl"
    path.write_text(json.dumps({**Q, "image": "red_circle.png"}) + "\n")
    # with root=ds/images the relative path resolves; the default root (the JSONL's folder) does not hold it
    assert load(path, root=root / "images")[0]["image_id"] == "red_circle.png"
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:1: image: 'red_circle.png' not found")):
        load(path)
    with pytest.raises(TaskDataError, match=re.escape(f"{path}: the dataset root {root / 'nope'} is not a folder")):
        load(path, root=root / "nope")
    with pytest.raises(TaskDataError, match="file not found"):
        load(root / "nope.jsonl")
