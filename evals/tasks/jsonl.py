"""Reading users' JSONL files line by line, with one-line errors naming the file, the line and what was expected.

The task loaders (``synthetic_text.load_jsonl``, ``ruler.load_jsonl``) share this reader and add their own field
checks on each object.
"""

from __future__ import annotations

import codecs

import json
from os import PathLike
from pathlib import Path
from typing import Iterator

from llm_limits.evals.tasks import TaskDataError


def json_objects(path: str | PathLike, expected: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, obj)`` for each non-blank line of ``path``: ``where`` is ``"file:line"`` for the caller's own
    messages, ``obj`` a decoded JSON object. Unreadable files, non-UTF-8 bytes, bad JSON and non-objects raise
    :class:`TaskDataError` (``expected`` says what a line should be); so does a file with no records at all."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise TaskDataError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise TaskDataError(f"{name}: is a directory (expected a JSONL file)") from None
    except OSError as err:
        raise TaskDataError(f"{name}: cannot read ({err.strerror or err})") from None
    # A UTF-8 byte-order mark (Windows editors write one) is an encoding marker, not part of the first record.
    raw = raw.removeprefix(codecs.BOM_UTF8)
    seen = 0
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        where = f"{name}:{lineno}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TaskDataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict):
            raise TaskDataError(f"{where}: got a JSON {json_type(obj)} ({expected})")
        seen += 1
        yield where, obj
    if not seen:
        raise TaskDataError(f"{name}: no records (expected at least one JSON line)")


def json_type(value: object) -> str:
    """JSON's name for the type of a decoded value (``array``, ``number``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"
