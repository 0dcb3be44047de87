"""Synthetic shape scenes as a vision-language task (issue #6), with planted language priors to catch a model that
answers from the wording instead of the image.

A scene is one shape on a dark-grey background, drawn with numpy at ``image_size`` pixels (32 by default), with
four attributes (:data:`VALUES`): ``shape`` (circle, square, triangle), ``colour`` (red, green, blue, yellow:
near-pure RGB, :data:`RGB`), ``size`` (small, large) and ``position`` (left, right half), plus a small random offset
of the shape's centre and optional Gaussian pixel noise (``noise``, std in 0..255 units). The caption states all
four: ``"a small red circle on the left."``.

Questions (short-word answers, multiple choice over the attribute's values; :data:`QUESTIONS`)::

    colour    "what colour is the shape?"   red | green | blue | yellow
    shape     "what shape is it?"           circle | square | triangle
    size      "is the shape large?"         yes | no
    position  "is the shape on the left?"   yes | no
    caption   "what is in the image?"       the caption (choices [])

Record kinds (``kind``), in exact counts (:func:`kind_counts`: ``round(fraction * num_examples)`` each, then
shuffled):

- ``qa``: one of the four questions, the attributes asked equally often. A ``hint_fraction`` of the colour questions
  carry a hint, an object of a colour in the wording (:data:`HINTS`): ``"like a tomato, what colour is the shape?"``,
  whose ``prior_answer`` is the hinted colour ("red"). In ``prior_strength`` of the hinted questions (exact count)
  the hint names the true colour, in the rest another colour: generated training data so plants a language prior
  that a model can learn instead of looking (VQA-CP, Agrawal et al. 2018).
- ``trap`` (``trap_fraction``): a hinted colour question whose hint always contradicts the image. A model that
  follows the prior answers ``prior_answer`` and is wrong (MMStar's "answerable without the image" check turned
  around: here the wording points away from the answer).
- ``pair`` (``pair_fraction``, an even count: two records per pair): MMVP-style pairs (Tong et al. 2024), two images
  identical (offset and noise included) except in ONE attribute, each asked the same unhinted question about that
  attribute, so their answers differ; the two share ``pair_id`` (0, 1, ... in order of appearance) and stand next to
  each other. The four attributes are varied equally often (counts differ by at most one).
- ``caption``: the caption question.

Records (the multimodal record schema; every key always present)::

    {"task": "shapes",
     "id": "shapes-0007-colour",       # record index and what it asks (colour/shape/size/position/caption)
     "image_id": "shapes-0007",        # every record has its own scene
     "image": np.ndarray,              # uint8 [image_size, image_size, 3]
     "caption": "a small red circle on the left.",
     "question": "like a leaf, what colour is the shape?",
     "answer": "red", "choices": ["red", "green", "blue", "yellow"],
     "kind": "qa",                     # qa | trap | pair | caption
     "pair_id": -1,                    # or the id the two records of a pair share
     "prior_answer": "green",          # the hinted colour; "" when the question has no hint
     "attributes": {"shape": "circle", "colour": "red", "size": "small", "position": "left"}}

Everything is drawn from ``random.Random(seed)`` (scenes, kinds, questions, hints) and
``np.random.default_rng`` seeded from it (noise): the same config always gives the same records.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

VERSION = "1"
"""Version of the records this task yields: bump it when they change, so that results over different records are
not compared as equals."""

TASK = "shapes"
"""``task`` of every record."""

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = ("left", "right")

ATTRIBUTES = ("colour", "shape", "size", "position")
"""The attributes of a scene, in the order questions and pairs cycle over them."""

VALUES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
"""Attribute -> its values."""

RGB = {"red": (220, 40, 40), "green": (40, 190, 40), "blue": (40, 70, 230), "yellow": (230, 210, 40)}
"""Colour -> the shape's RGB fill."""

BACKGROUND = (48, 48, 48)
"""The dark-grey background."""

HINTS = {"red": "a tomato", "green": "a leaf", "blue": "the sky", "yellow": "a banana"}
"""Colour -> the object a hinted question names (``"like a tomato, ..."`` suggests red)."""

QUESTIONS = {
    "colour": "what colour is the shape?",
    "shape": "what shape is it?",
    "size": "is the shape large?",
    "position": "is the shape on the left?",
}
"""Attribute -> the (unhinted) question asking about it."""

CAPTION_QUESTION = "what is in the image?"

YES_NO = ["yes", "no"]

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 512

# geometry in units of the image side: centre x by position, half-extent by size, max centre offset per axis
_CENTRE_X = {"left": 0.28, "right": 0.72}
_HALF = {"small": 0.15, "large": 0.24}
_MAX_OFFSET = 0.04
_SQUARE = 0.85  # a square's half-side relative to the half-extent: its area (2.9 r^2) is near a circle's (3.1 r^2)


@dataclass
class ShapesConfig:
    num_examples: int = 1000
    """Records :func:`generate` returns."""
    image_size: int = 32
    """Side of the square images in pixels (16 to 512). From 32 up every shape is told apart by its outline; at 16 a
    small circle may come out as a 4x4 square (the model's processor resizes the images to its own size anyway)."""
    noise: float = 0.0
    """Std of the Gaussian noise added to every pixel, in 0..255 units (0: clean images)."""
    hint_fraction: float = 0.5
    """Fraction of the ``qa`` colour questions worded with a hint (``"like a tomato, ..."``; exact count)."""
    prior_strength: float = 0.9
    """Fraction of the hinted ``qa`` questions whose hint names the true colour (exact count); the language prior a
    model can learn instead of looking. 0.25 (one colour in four) makes the hint carry no information."""
    trap_fraction: float = 0.0
    """Fraction of the records that are traps: hinted colour questions whose hint contradicts the image. 0 for
    training; eval sets use more."""
    pair_fraction: float = 0.0
    """Fraction of the records emitted as MMVP-style pairs (two images differing in one attribute, the same question,
    different answers); the count is rounded down to an even number."""
    caption_fraction: float = 0.2
    """Fraction of the records that ask for the caption."""
    seed: int = 0
    """Seed of everything drawn; the same config always gives the same records."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` naming the field when this config cannot generate.

        >>> ShapesConfig(trap_fraction=0.6, pair_fraction=0.6)
        Traceback (most recent call last):
        ...
        ValueError: shapes: trap_fraction + pair_fraction + caption_fraction must be <= 1 (got 0.6 + 0.6 + 0.2 = 1.4)
        """
        if not _is_int(self.num_examples) or self.num_examples < 1:
            raise ValueError(f"shapes: num_examples must be an integer >= 1 (got {self.num_examples!r})")
        if not _is_int(self.image_size) or not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"shapes: image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] "
                             f"(got {self.image_size!r})")
        if not (_is_number(self.noise) and math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"shapes: noise must be a number >= 0 (got {self.noise!r})")
        for name in ("hint_fraction", "prior_strength", "trap_fraction", "pair_fraction", "caption_fraction"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value <= 1):
                raise ValueError(f"shapes: {name} must be a number in [0, 1] (got {value!r})")
        total = self.trap_fraction + self.pair_fraction + self.caption_fraction
        if total > 1 + 1e-9:
            raise ValueError(f"shapes: trap_fraction + pair_fraction + caption_fraction must be <= 1 (got "
                             f"{self.trap_fraction:g} + {self.pair_fraction:g} + {self.caption_fraction:g} = "
                             f"{total:g})")
        if not _is_int(self.seed):
            raise ValueError(f"shapes: seed must be an integer (got {self.seed!r})")


# --- scenes (pure) --------------------------------------------------------------------------------------------------
def caption_text(attributes: dict) -> str:
    """The caption of a scene.

    >>> caption_text({"shape": "circle", "colour": "red", "size": "small", "position": "left"})
    'a small red circle on the left.'
    """
    a = attributes
    return f"a {a['size']} {a['colour']} {a['shape']} on the {a['position']}."


def shape_mask(attributes: dict, image_size: int, offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``[image_size, image_size]`` bool: the pixels (by their centres) the scene's shape covers. ``offset``
    ``(dx, dy)`` moves the centre, in units of the image side (generated scenes use ``|dx|, |dy| <= 0.04``).

    >>> m = shape_mask({"shape": "square", "colour": "red", "size": "large", "position": "left"}, 32)
    >>> int(m.sum()), bool(m[:, :16].sum() > m[:, 16:].sum())
    (182, True)
    """
    s = image_size
    coords = (np.arange(s) + 0.5) / s
    u, v = coords[None, :], coords[:, None]  # u: x (column), v: y (row)
    cx = _CENTRE_X[attributes["position"]] + offset[0]
    cy = 0.5 + offset[1]
    r = _HALF[attributes["size"]]
    shape = attributes["shape"]
    if shape == "circle":
        return (u - cx) ** 2 + (v - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(u - cx) <= _SQUARE * r) & (np.abs(v - cy) <= _SQUARE * r)
    if shape == "triangle":  # apex up, base 2r wide at the bottom, height 2r
        t = (v - (cy - r)) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(u - cx) <= t * r)
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def render(attributes: dict, image_size: int, offset: tuple[float, float] = (0.0, 0.0),
           noise: np.ndarray | None = None) -> np.ndarray:
    """``[image_size, image_size, 3]`` uint8: the scene's shape in its colour on :data:`BACKGROUND`; ``noise``
    (float ``[image_size, image_size, 3]``) is added before clipping to 0..255."""
    img = np.empty((image_size, image_size, 3), dtype=np.float32)
    img[:] = BACKGROUND
    img[shape_mask(attributes, image_size, offset)] = RGB[attributes["colour"]]
    if noise is not None:
        img += noise
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def answer_for(attribute: str, attributes: dict) -> str:
    """The answer to :data:`QUESTIONS` ``[attribute]`` about a scene.

    >>> scene = {"shape": "circle", "colour": "red", "size": "small", "position": "left"}
    >>> [answer_for(a, scene) for a in ATTRIBUTES]
    ['red', 'circle', 'no', 'yes']
    """
    if attribute == "size":
        return "yes" if attributes["size"] == "large" else "no"
    if attribute == "position":
        return "yes" if attributes["position"] == "left" else "no"
    return attributes[attribute]


def choices_for(attribute: str) -> list[str]:
    """The options of the question about ``attribute``: its values, or yes/no for the yes/no questions."""
    return list(YES_NO) if attribute in ("size", "position") else list(VALUES[attribute])


def hinted_question(hint: str) -> str:
    """The colour question worded with the object of colour ``hint``.

    >>> hinted_question("blue")
    'like the sky, what colour is the shape?'
    """
    return f"like {HINTS[hint]}, {QUESTIONS['colour']}"


# --- generator ------------------------------------------------------------------------------------------------------
def kind_counts(config: ShapesConfig) -> dict[str, int]:
    """How many records of each kind :func:`generate` makes: ``trap``, ``pair`` (records, even), ``caption`` and
    ``qa`` (the rest) sum to ``num_examples``; ``colour_qa`` of the ``qa`` records ask the colour (the four
    attributes take turns, colour first), ``hinted`` of those carry a hint and ``hint_matches`` of the hinted name the
    true colour. Each is ``round(fraction * count)``; trap, pair and caption are capped in that order so they never
    exceed ``num_examples`` together.

    >>> kind_counts(ShapesConfig(num_examples=100, trap_fraction=0.1, pair_fraction=0.25, caption_fraction=0.2))
    {'trap': 10, 'pair': 24, 'caption': 20, 'qa': 46, 'colour_qa': 12, 'hinted': 6, 'hint_matches': 5}
    """
    c, n = config, config.num_examples
    trap = min(round(c.trap_fraction * n), n)
    pair = min(round(c.pair_fraction * n), n - trap)
    pair -= pair % 2
    caption = min(round(c.caption_fraction * n), n - trap - pair)
    qa = n - trap - pair - caption
    colour_qa = (qa + len(ATTRIBUTES) - 1) // len(ATTRIBUTES)
    hinted = round(c.hint_fraction * colour_qa)
    return {"trap": trap, "pair": pair, "caption": caption, "qa": qa, "colour_qa": colour_qa, "hinted": hinted,
            "hint_matches": round(c.prior_strength * hinted)}


def generate(config: ShapesConfig) -> list[dict]:
    """``config.num_examples`` records (see the module docstring), the kinds in exact counts (:func:`kind_counts`)
    shuffled. Deterministic in ``config``."""
    config.validate()
    c = config
    counts = kind_counts(c)
    master = random.Random(c.seed)
    kind_rng, scene_rng, q_rng = (random.Random(master.getrandbits(64)) for _ in range(3))
    noise_rng = np.random.default_rng(master.getrandbits(64))

    # a pair is one unit of two records, so its two records stay next to each other after the shuffle
    units = ["trap"] * counts["trap"] + ["pair"] * (counts["pair"] // 2) + ["caption"] * counts["caption"]
    units += ["qa"] * counts["qa"]
    kind_rng.shuffle(units)
    qa_asks = [ATTRIBUTES[i % len(ATTRIBUTES)] for i in range(counts["qa"])]
    kind_rng.shuffle(qa_asks)
    hints = ["match"] * counts["hint_matches"] + ["other"] * (counts["hinted"] - counts["hint_matches"])
    hints += ["none"] * (counts["colour_qa"] - counts["hinted"])
    kind_rng.shuffle(hints)
    pair_varies = [ATTRIBUTES[i % len(ATTRIBUTES)] for i in range(counts["pair"] // 2)]
    kind_rng.shuffle(pair_varies)
    qa_asks_it, hints_it, pair_varies_it = iter(qa_asks), iter(hints), iter(pair_varies)

    records: list[dict] = []
    pair_id = 0
    for unit in units:
        # every unit draws a scene, an offset and (with noise) a noise field, so the scenes do not depend on the kinds
        scene = {a: scene_rng.choice(VALUES[a]) for a in ("shape", "colour", "size", "position")}
        offset = (scene_rng.uniform(-_MAX_OFFSET, _MAX_OFFSET), scene_rng.uniform(-_MAX_OFFSET, _MAX_OFFSET))
        noise = noise_rng.normal(0.0, c.noise, (c.image_size, c.image_size, 3)) if c.noise > 0 else None
        image = render(scene, c.image_size, offset, noise)
        if unit == "caption":
            records.append(_record(len(records), image, scene, "caption", CAPTION_QUESTION, caption_text(scene), []))
        elif unit == "trap":
            hint = q_rng.choice([v for v in COLOURS if v != scene["colour"]])
            records.append(_record(len(records), image, scene, "colour", hinted_question(hint), scene["colour"],
                                   choices_for("colour"), kind="trap", prior_answer=hint))
        elif unit == "qa":
            ask = next(qa_asks_it)
            question, prior = QUESTIONS[ask], ""
            if ask == "colour":
                how = next(hints_it)
                if how != "none":
                    prior = scene["colour"] if how == "match" else \
                        q_rng.choice([v for v in COLOURS if v != scene["colour"]])
                    question = hinted_question(prior)
            records.append(_record(len(records), image, scene, ask, question, answer_for(ask, scene),
                                   choices_for(ask), prior_answer=prior))
        else:  # pair: the same offset and noise, one attribute changed
            varies = next(pair_varies_it)
            other = {**scene, varies: q_rng.choice([v for v in VALUES[varies] if v != scene[varies]])}
            for s, img in ((scene, image), (other, render(other, c.image_size, offset, noise))):
                records.append(_record(len(records), img, s, varies, QUESTIONS[varies], answer_for(varies, s),
                                       choices_for(varies), kind="pair", pair_id=pair_id))
            pair_id += 1
    return records


def _record(index: int, image: np.ndarray, scene: dict, asks: str, question: str, answer: str, choices: list[str],
            *, kind: str | None = None, pair_id: int = -1, prior_answer: str = "") -> dict:
    image_id = f"{TASK}-{index:04d}"
    return {
        "task": TASK,
        "id": f"{image_id}-{asks}",
        "image_id": image_id,
        "image": image,
        "caption": caption_text(scene),
        "question": question,
        "answer": answer,
        "choices": choices,
        "kind": kind or ("caption" if asks == "caption" else "qa"),
        "pair_id": pair_id,
        "prior_answer": prior_answer,
        "attributes": dict(scene),
    }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
