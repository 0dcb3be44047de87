"""Handwritten digits as a vision-language task (issue #6): scikit-learn's bundled 8x8 digits (``load_digits``, 1797
images of 0-9, offline), asked about in words. The smallest real images there are: a tiny VLM can learn them in
minutes, and whether its answers use the image or the wording (the ``multimodal`` eval) is easy to read off.

Three question kinds per image (:data:`QUESTION_KINDS`; :class:`DigitsConfig` ``questions`` picks a subset)::

    kind     question                  answer                  choices
    digit    "which digit is this?"    "7"                     "0".."9"
    parity   "is the digit even?"      "no"                    "yes", "no"
    caption  "what is in the image?"   "a handwritten seven."  []          (record kind "caption", the rest "qa")

Records (the multimodal record schema; every key always present)::

    {"task": "digits",
     "id": "digits-0042-parity",       # image index (in load_digits order) and question kind; unique in a set
     "image_id": "digits-0042",        # the records about one image share it
     "image": np.ndarray,              # uint8 [8, 8, 3]: load_digits' 0..16 scaled by round(v * 255 / 16), grey
                                       # replicated over RGB; kept 8x8 (the model's processor resizes it)
     "caption": "a handwritten seven.",
     "question": "is the digit even?", "answer": "no", "choices": ["yes", "no"],
     "kind": "qa",                     # "caption" for the caption question
     "pair_id": -1, "prior_answer": "",
     "attributes": {"digit": 7}}

The split is a fixed partition of the images, independent of ``seed``: image ``i`` is in ``"test"`` when
``i % 5 == 0`` (360 images) and in ``"train"`` otherwise (1437), so an eval set never shows an image the model was
trained on. ``num_examples=0`` gives every image of the split once per question kind; ``num_examples=n`` draws ``n``
records from that pool without replacement (when ``n`` exceeds the pool, whole shuffled passes of it and then a
draw for the rest; a repeated record's id gets ``-r1``, ``-r2``... appended). Either way the records are shuffled
with ``random.Random(seed)``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

import numpy as np

VERSION = "1"
"""Version of the records this task yields: bump it when they change, so that results over different records are
not compared as equals."""

TASK = "digits"
"""``task`` of every record."""

QUESTION_KINDS = ("digit", "parity", "caption")
"""The question kinds :class:`DigitsConfig` ``questions`` may name, in the order records of one image are listed."""

SPLITS = ("train", "test")

TEST_EVERY = 5
"""Image ``i`` of ``load_digits`` is a test image when ``i % TEST_EVERY == 0``."""

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

QUESTIONS = {
    "digit": "which digit is this?",
    "parity": "is the digit even?",
    "caption": "what is in the image?",
}
"""Question kind -> its question text."""

DIGIT_CHOICES = [str(d) for d in range(10)]
YES_NO = ["yes", "no"]


@dataclass
class DigitsConfig:
    split: str = "train"
    """``"train"`` or ``"test"``: a fixed partition of the 1797 images (``i % 5 == 0`` is test), never moved by
    ``seed``."""
    num_examples: int = 0
    """Records to return: 0 = every image of the split once per question kind; ``n > 0`` = ``n`` records drawn
    (seeded) from that pool."""
    questions: tuple[str, ...] = field(default_factory=lambda: QUESTION_KINDS)
    """Question kinds asked about each image: a non-empty subset of ``digit``, ``parity``, ``caption``."""
    seed: int = 0
    """Seed of the draw and the shuffle; the same config always gives the same records."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field when this config cannot generate.

        >>> DigitsConfig(split="val")
        Traceback (most recent call last):
        ...
        ValueError: digits: split must be one of train, test (got 'val')
        """
        if self.split not in SPLITS:
            raise ValueError(f"digits: split must be one of {', '.join(SPLITS)} (got {self.split!r})")
        if not _is_int(self.num_examples) or self.num_examples < 0:
            raise ValueError(f"digits: num_examples must be an integer >= 0, 0 = every image of the split "
                             f"(got {self.num_examples!r})")
        if not _is_int(self.seed):
            raise ValueError(f"digits: seed must be an integer (got {self.seed!r})")
        if isinstance(self.questions, str) or not isinstance(self.questions, (list, tuple)) or not self.questions:
            raise ValueError(f"digits: questions: expected a non-empty list of {', '.join(QUESTION_KINDS)} "
                             f"(got {self.questions!r})")
        for q in self.questions:
            if q not in QUESTION_KINDS:
                raise ValueError(f"digits: questions: unknown kind {q!r} (known: {', '.join(QUESTION_KINDS)})")
        if len(set(self.questions)) != len(self.questions):
            raise ValueError(f"digits: questions: each kind at most once (got {list(self.questions)})")


# --- data -----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [1797, 8, 8, 3], targets int [1797])`` from scikit-learn's bundled copy (no download)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    grey = np.round(data.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=3)
    images.flags.writeable = False  # the cache is shared by every caller
    return images, data.target.astype(np.int64)


def split_indices(split: str) -> list[int]:
    """Indices (``load_digits`` order) of the images in ``split``; the same on every call and machine.

    >>> len(split_indices("train")), len(split_indices("test")), split_indices("test")[:3]
    (1437, 360, [0, 5, 10])
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} (got {split!r})")
    n = len(_digits()[1])
    test = split == "test"
    return [i for i in range(n) if (i % TEST_EVERY == 0) == test]


def caption_text(digit: int) -> str:
    """The caption of an image of ``digit``, the digit spelled out.

    >>> caption_text(7)
    'a handwritten seven.'
    """
    return f"a handwritten {DIGIT_WORDS[digit]}."


def make_record(index: int, kind: str, copy: int = 0) -> dict:
    """The record asking question ``kind`` about image ``index`` of ``load_digits`` (``copy > 0``: a repeat, its id
    suffixed ``-r{copy}``).

    >>> r = make_record(0, "parity")
    >>> r["id"], r["question"], r["answer"], r["choices"], r["attributes"], r["image"].shape
    ('digits-0000-parity', 'is the digit even?', 'yes', ['yes', 'no'], {'digit': 0}, (8, 8, 3))
    """
    images, targets = _digits()
    digit = int(targets[index])
    caption = caption_text(digit)
    if kind == "digit":
        answer, choices = str(digit), list(DIGIT_CHOICES)
    elif kind == "parity":
        answer, choices = ("yes" if digit % 2 == 0 else "no"), list(YES_NO)
    elif kind == "caption":
        answer, choices = caption, []
    else:
        raise ValueError(f"unknown question kind {kind!r} (known: {', '.join(QUESTION_KINDS)})")
    image_id = f"{TASK}-{index:04d}"
    return {
        "task": TASK,
        "id": f"{image_id}-{kind}" + (f"-r{copy}" if copy else ""),
        "image_id": image_id,
        "image": images[index].copy(),  # the cache stays untouched whatever a caller does to its record
        "caption": caption,
        "question": QUESTIONS[kind],
        "answer": answer,
        "choices": choices,
        "kind": "caption" if kind == "caption" else "qa",
        "pair_id": -1,
        "prior_answer": "",
        "attributes": {"digit": digit},
    }


def generate(config: DigitsConfig) -> list[dict]:
    """The records of ``config`` (see the module docstring), shuffled. Deterministic: draws only from
    ``random.Random(config.seed)``; the split never depends on the seed."""
    config.validate()
    kinds = [k for k in QUESTION_KINDS if k in config.questions]
    pool = [(i, k) for i in split_indices(config.split) for k in kinds]
    rng = random.Random(config.seed)
    n = config.num_examples or len(pool)
    chosen: list[tuple[int, str, int]] = []
    for copy in range(n // len(pool)):  # whole passes first, so every record appears as evenly as n allows
        chosen += [(i, k, copy) for i, k in pool]
    chosen += [(i, k, n // len(pool)) for i, k in rng.sample(pool, n % len(pool))]
    rng.shuffle(chosen)
    return [make_record(i, k, copy) for i, k, copy in chosen]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
