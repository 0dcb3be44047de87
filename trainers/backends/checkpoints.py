"""Checkpoint manifests: a checkpoint counts only once its manifest says every file is there, whole.

A checkpoint folder is written file by file (the HF Trainer's ``checkpoint-N/``), so a run killed mid-save leaves a
folder that looks like a checkpoint and is not one. After the save completes, :func:`write_manifest` records each
file's size and SHA-256 in ``manifest.json`` (written to a temporary name, then renamed). On resume,
:func:`last_good_checkpoint` walks the folders newest first and takes the first whose manifest verifies; every folder
it skips is reported with the reason (no manifest: the save was interrupted; a size or checksum mismatch: the files
changed or were cut short).

A single-file checkpoint (Lightning's ``last.ckpt``, ``step-N.ckpt``) gets the same manifest beside it,
``<name>.manifest.json``, listing that one file: the file itself is written atomically, but a copy cut short or bit
rot later is only found when loading fails without one.

Hashing cost: files up to ``FULL_HASH_BYTES`` are hashed whole; bigger ones (multi-GB weight and optimizer shards) by
their size plus the SHA-256 of their first and last MiB, which catches truncation and most damage without reading
the whole file at every save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

MANIFEST = "manifest.json"
FULL_HASH_BYTES = 256 * 2**20
EDGE_BYTES = 2**20
_STEP = re.compile(r"^checkpoint-(\d+)$")


def file_digest(path: Path) -> str:
    """SHA-256 of the whole file, or ``edges:`` + the SHA-256 of its first and last MiB for files over
    ``FULL_HASH_BYTES``."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(f.read(EDGE_BYTES))
        f.seek(size - EDGE_BYTES)
        h.update(f.read(EDGE_BYTES))
    return "edges:" + h.hexdigest()


def manifest_path(checkpoint: Path) -> Path:
    """Where ``checkpoint``'s manifest lives: inside a folder (``manifest.json``), beside a single file
    (``last.ckpt`` -> ``last.ckpt.manifest.json``)."""
    if checkpoint.is_dir():
        return checkpoint / MANIFEST
    return checkpoint.with_name(f"{checkpoint.name}.{MANIFEST}")


def write_manifest(checkpoint: Path, step: int) -> Path:
    """Record every file of ``checkpoint`` (a folder: every file under it but the manifest; a file: itself) with its
    size and digest; atomic. Call it once the checkpoint is complete."""
    if checkpoint.is_dir():
        base, paths = checkpoint, sorted(checkpoint.rglob("*"))
    else:
        base, paths = checkpoint.parent, [checkpoint]
    files = {}
    for p in paths:
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}"):
            files[str(p.relative_to(base))] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
    target = manifest_path(checkpoint)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    os.replace(tmp, target)
    return target


def verify(checkpoint: Path) -> str | None:
    """``None`` when ``checkpoint``'s manifest matches its files, else the reason it does not (one line)."""
    m = manifest_path(checkpoint)
    if not m.is_file():
        return "no manifest (the save did not finish)"
    base = checkpoint if checkpoint.is_dir() else checkpoint.parent
    try:
        files = json.loads(m.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for rel, meta in files.items():
        p = base / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if file_digest(p) != meta["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def checkpoint_folders(root: Path) -> list[Path]:
    """``checkpoint-N`` folders under ``root``, newest (largest N) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def last_good_checkpoint(
    root: Path, warn: Callable[[str], None] = print, *, candidates: Callable[[Path], list[Path]] = checkpoint_folders,
    legacy_ok: bool = False,
) -> Path | None:
    """The newest checkpoint under ``root`` whose manifest verifies; each one skipped is reported through ``warn``
    with its reason. ``None`` when there is none.

    ``candidates(root)`` lists the checkpoints, newest first (default: HF ``checkpoint-N`` folders). With
    ``legacy_ok``, a run none of whose checkpoints has a manifest (written before manifests existed) resumes from
    its newest checkpoint unverified, with a warning; once any checkpoint has a manifest, one without is skipped."""
    found = candidates(root)
    if legacy_ok and found and not any(manifest_path(c).is_file() for c in found):
        warn(f"checkpoint {found[0]}: no manifest (written before checkpoints had one); using it unverified")
        return found[0]
    for checkpoint in found:
        reason = verify(checkpoint)
        if reason is None:
            return checkpoint
        warn(f"checkpoint {checkpoint}: skipped, {reason}; trying the one before")
    return None


def resume_point(
    root: Path, *, rank0: bool, echo: Callable[[str], None] = print,
    candidates: Callable[[Path], list[Path]] = checkpoint_folders, legacy_ok: bool = False,
) -> str | None:
    """``--resume``: the checkpoint both backends continue from (:func:`last_good_checkpoint`), said in one line on
    rank 0; ``None`` (training from the start, also said) when there is none."""
    good = last_good_checkpoint(root, warn=echo if rank0 else (lambda _: None), candidates=candidates, legacy_ok=legacy_ok)
    if rank0:
        echo(f"--resume: continuing from {good}" if good is not None
             else f"--resume: no complete checkpoint in {root}; training from the start")
    return str(good) if good is not None else None
