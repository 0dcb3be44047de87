"""A user's own images as a vision-language task (issue #6): a folder of image files and a JSONL file that describes
them, one record per line.

Layout (the dataset root is the JSONL file's folder unless :func:`load` is given ``root``)::

    my_data/
      data.jsonl
      images/cat.png
      images/dog.jpg

Schema of a line (other fields are ignored)::

    {"image": "images/cat.png",   # required: a path relative to the root (any format Pillow reads)
     "caption": "a cat on a mat.",  # required: the image's caption
     "question": "what animal is it?",  # optional; without it the line is a caption record
     "answer": "cat",             # required with a question (and only with one)
     "choices": ["cat", "dog"],   # optional: the multiple-choice options, the answer among them
     "kind": "qa",                # optional: qa | trap | pair | caption (default: caption without a question,
                                  #   pair with a pair_id, else qa)
     "pair_id": 3,                # optional, int >= 0: pair records only, exactly two records share one
     "prior_answer": "dog",       # optional: the answer the question's wording suggests (required by a trap,
                                  #   and different from its answer)
     "attributes": {"animal": "cat"}}  # optional JSON object, kept as the record's ground truth

A line without a question becomes a caption record: question ``"what is in the image?"``, answer the caption,
choices ``[]``. Text is kept as written except that runs of white space (newlines included) become one space; the
text of user data may hold characters a character tokenizer lacks.

Records follow the multimodal record schema: ``task`` ``"image_folder"``, ``id`` ``"image_folder-0003"`` (the line
number), ``image_id`` the image path as written (normalised: ``./images/a.png`` is ``images/a.png``), ``image`` the
file read with Pillow and converted to RGB (uint8 ``[H, W, 3]``, records about one file share one array).

Path confinement: an image path must stay inside the root after following symlinks (``Path.resolve``): absolute
paths, ``..`` that climbs out and symlinks that point out are refused, so a data file cannot make the loader read
files elsewhere. Every problem (bad JSON, a missing or ill-typed field, a path outside the root, a missing or
unreadable image) raises :class:`~evals.tasks.TaskDataError` with one line naming the file, the line and the field::

    data.jsonl:3: image: '../x.png' is outside the dataset root /abs/my_data

``tests/fixtures/image_folder/`` is a four-image example.
"""

from __future__ import annotations

import os
from os import PathLike
from pathlib import Path

import numpy as np

from llm_limits.evals.tasks import TaskDataError
from llm_limits.evals.tasks.jsonl import json_objects, json_type

VERSION = "1"
"""Version of the records this task yields: bump it when they change, so that results over different records are
not compared as equals."""

TASK = "image_folder"
"""``task`` of every record."""

KINDS = ("qa", "trap", "pair", "caption")
CAPTION_QUESTION = "what is in the image?"

EXPECTED = ('expected {"image": "relative/path.png", "caption": str, "question": str (optional), '
            '"answer": str (with a question), "choices": [str, ...] (optional), "kind": qa|trap|pair|caption '
            '(optional), "pair_id": int (optional), "prior_answer": str (optional)}')


def load(jsonl_path: str | PathLike, root: str | PathLike | None = None) -> list[dict]:
    """Records (see the module docstring) from ``jsonl_path``, images read from under ``root`` (default: the JSONL
    file's folder). Raises :class:`~evals.tasks.TaskDataError` (one line, ``file:line: field: ...``) on any problem."""
    base = Path(jsonl_path).parent if root is None else Path(root)
    if not base.is_dir():
        raise TaskDataError(f"{jsonl_path}: the dataset root {base} is not a folder")
    base = base.resolve()
    images: dict[Path, np.ndarray] = {}
    records: list[dict] = []
    pair_lines: dict[int, list[str]] = {}
    for where, obj in json_objects(jsonl_path, EXPECTED):
        record = _record(where, obj, base, images)
        if record["pair_id"] >= 0:
            pair_lines.setdefault(record["pair_id"], []).append(where)
        records.append(record)
    for pid, lines in pair_lines.items():
        if len(lines) != 2:
            raise TaskDataError(f"{lines[0]}: pair_id: {pid} is shared by {len(lines)} record"
                                f"{'s' if len(lines) != 1 else ''} (expected exactly 2, the two images of a pair)")
    return records


def _record(where: str, obj: dict, root: Path, images: dict[Path, np.ndarray]) -> dict:
    rel = _text(where, obj, "image", required=True, clean=False)
    path = _confined(where, rel, root)
    caption = _text(where, obj, "caption", required=True)
    question = _text(where, obj, "question", required=False)
    answer = _text(where, obj, "answer", required=question is not None)
    prior = _text(where, obj, "prior_answer", required=False) or ""
    choices = _choices(where, obj)
    pair_id = _pair_id(where, obj)
    kind = obj.get("kind")
    if kind is not None and kind not in KINDS:
        raise TaskDataError(f"{where}: kind: expected one of {', '.join(KINDS)} (got {_show(kind)})")
    if question is None:
        for name, value in (("answer", answer), ("choices", choices), ("pair_id", pair_id)):
            if value is not None:
                raise TaskDataError(f'{where}: {name}: given without a "question" (a line without a question is a '
                                    f"caption record)")
        if kind not in (None, "caption"):
            raise TaskDataError(f'{where}: kind: {kind!r} needs a "question" (a line without one is a caption '
                                f"record)")
        kind, question, answer = "caption", CAPTION_QUESTION, caption
    else:
        kind = kind or ("pair" if pair_id is not None else "qa")
        if kind == "caption":
            raise TaskDataError(f'{where}: kind: a caption record has no "question" (drop it, or use kind qa)')
        if (kind == "pair") != (pair_id is not None):
            raise TaskDataError(f"{where}: pair_id: " + ("a pair record needs one (an int >= 0 shared with its "
                                                         "other record)" if kind == "pair" else
                                                         f"only pair records have one (kind is {kind!r})"))
        if kind == "trap" and (not prior or prior.lower() == answer.lower()):
            raise TaskDataError(f"{where}: prior_answer: a trap needs the answer its wording suggests, different "
                                f"from the answer (got {prior!r})")
    if choices is not None and answer not in choices:
        raise TaskDataError(f"{where}: choices: must contain the answer {answer!r} (got {choices})")
    attributes = obj.get("attributes", {})
    if not isinstance(attributes, dict):
        raise TaskDataError(f"{where}: attributes: expected a JSON object (got a JSON {json_type(attributes)})")
    if path not in images:
        images[path] = _read_image(where, rel, path)
    return {
        "task": TASK,
        "id": f"{TASK}-{int(where.rsplit(':', 1)[1]):04d}",
        "image_id": os.path.normpath(rel).replace(os.sep, "/"),
        "image": images[path],
        "caption": caption,
        "question": question,
        "answer": answer,
        "choices": choices or [],
        "kind": kind,
        "pair_id": -1 if pair_id is None else pair_id,
        "prior_answer": prior,
        "attributes": attributes,
    }


def _confined(where: str, rel: str, root: Path) -> Path:
    """The resolved path of ``rel``, which must lie inside ``root`` (already resolved) after following symlinks."""
    if Path(rel).is_absolute() or Path(rel).drive:
        raise TaskDataError(f"{where}: image: {rel!r} is an absolute path (expected a path relative to the dataset "
                            f"root {root})")
    try:
        path = (root / rel).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a NUL byte
        raise TaskDataError(f"{where}: image: {rel!r} cannot be resolved ({err})") from None
    if not path.is_relative_to(root):
        raise TaskDataError(f"{where}: image: {rel!r} is outside the dataset root {root}")
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise TaskDataError(f"{where}: image: {rel!r} {what} under the dataset root {root}")
    return path


def _read_image(where: str, rel: str, path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise TaskDataError(f"{where}: image: {rel!r} is not a readable image ({reason})") from None


def _text(where: str, obj: dict, name: str, *, required: bool, clean: bool = True) -> str | None:
    """The string field ``name`` (``None`` when absent and not ``required``); white space runs become one space
    unless ``clean`` is false (a path is kept as written)."""
    if name not in obj or obj[name] is None:
        if required:
            why = " (required with a question)" if name == "answer" else ""
            raise TaskDataError(f"{where}: {name}: missing, expected a non-empty string{why}")
        return None
    value = obj[name]
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: {name}: expected a string (got a JSON {json_type(value)})")
    if clean:
        value = " ".join(value.split())
    if not value.strip():
        raise TaskDataError(f"{where}: {name}: expected a non-empty string (got {obj[name]!r})")
    return value


def _choices(where: str, obj: dict) -> list[str] | None:
    if "choices" not in obj or obj["choices"] is None:
        return None
    value = obj["choices"]
    if not isinstance(value, list) or not value:
        got = "an empty array" if isinstance(value, list) else f"a JSON {json_type(value)}"
        raise TaskDataError(f"{where}: choices: expected a non-empty list of strings (got {got})")
    out = []
    for i, c in enumerate(value):
        if not isinstance(c, str) or not c.strip():
            got = "an empty string" if isinstance(c, str) else f"a JSON {json_type(c)}"
            raise TaskDataError(f"{where}: choices[{i}]: expected a non-empty string (got {got})")
        out.append(" ".join(c.split()))
    if len(set(out)) != len(out):
        raise TaskDataError(f"{where}: choices: each option at most once (got {out})")
    return out


def _pair_id(where: str, obj: dict) -> int | None:
    if "pair_id" not in obj or obj["pair_id"] is None:
        return None
    value = obj["pair_id"]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TaskDataError(f"{where}: pair_id: expected an integer >= 0 (got {_show(value)})")
    return value


def _show(value: object) -> str:
    return repr(value) if isinstance(value, (str, int, float)) else f"a JSON {json_type(value)}"
