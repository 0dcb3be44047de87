"""Checkpoint manifests: an interrupted or damaged checkpoint is detected, reported, and the one before it used."""

from __future__ import annotations

import json
from pathlib import Path

from llm_limits.trainers.backends.checkpoints import (
    MANIFEST, checkpoint_folders, last_good_checkpoint, manifest_path, verify, write_manifest,
)


def _ckpt(root: Path, step: int, manifest: bool = True) -> Path:
    folder = root / f"checkpoint-{step}"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "optimizer.pt").write_bytes(b"x" * 1000)
    if manifest:
        write_manifest(folder, step)
    return folder


def test_manifest_round_trip_and_damage(tmp_path):
    folder = _ckpt(tmp_path, 4)
    assert verify(folder) is None
    (folder / "sub" / "optimizer.pt").write_bytes(b"x" * 999)  # cut short
    assert verify(folder) == "sub/optimizer.pt has 999 bytes, the manifest says 1000"
    (folder / "sub" / "optimizer.pt").write_bytes(b"y" * 1000)  # same size, other bytes
    assert verify(folder) == "sub/optimizer.pt does not match its checksum"
    (folder / "sub" / "optimizer.pt").unlink()
    assert verify(folder) == "sub/optimizer.pt is missing"
    (folder / MANIFEST).write_text("{not json")
    assert verify(folder) == "unreadable manifest"


def test_last_good_checkpoint_skips_interrupted_and_damaged(tmp_path):
    _ckpt(tmp_path, 2)
    damaged = _ckpt(tmp_path, 4)
    (damaged / "model.safetensors").write_bytes(b"\0" * 10)
    _ckpt(tmp_path, 10, manifest=False)  # killed mid-save
    (tmp_path / "not-a-checkpoint").mkdir()
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-10", "checkpoint-4", "checkpoint-2"]
    warnings: list[str] = []
    assert last_good_checkpoint(tmp_path, warn=warnings.append) == tmp_path / "checkpoint-2"
    assert len(warnings) == 2 and "checkpoint-10: skipped, no manifest (the save did not finish)" in warnings[0]
    assert "checkpoint-4: skipped, model.safetensors has 10 bytes" in warnings[1]
    assert last_good_checkpoint(tmp_path / "missing", warn=warnings.append) is None


def test_a_single_file_checkpoint_has_its_manifest_beside_it(tmp_path):
    """Lightning's checkpoints are single files: ``last.ckpt`` -> ``last.ckpt.manifest.json``, same format."""
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(bytes(range(256)) * 40)
    m = write_manifest(ckpt, 7)
    assert m == manifest_path(ckpt) == tmp_path / "last.ckpt.manifest.json"
    assert list(json.loads(m.read_text())["files"]) == ["last.ckpt"] and verify(ckpt) is None
    data = bytearray(ckpt.read_bytes())
    data[100] ^= 1  # one bit flipped
    ckpt.write_bytes(bytes(data))
    assert verify(ckpt) == "last.ckpt does not match its checksum"
    ckpt.write_bytes(bytes(data[:5000]))
    assert verify(ckpt) == "last.ckpt has 5000 bytes, the manifest says 10240"
    assert verify(tmp_path / "step-000001.ckpt") == "no manifest (the save did not finish)"
