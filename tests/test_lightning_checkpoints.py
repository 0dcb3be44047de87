"""Lightning checkpoints: one for every ``checkpoint_every`` step (an epoch's last batch included), each with a
manifest; ``--resume`` skips damaged ones (one line each) and still ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm_limits.trainers.backends.checkpoints import manifest_path, verify, write_manifest
from llm_limits.trainers.backends.lightning import ManifestCheckpoint, checkpoint_files, last_good_checkpoint
from llm_limits.trainers.recipe.schema import validate_recipe
from llm_limits.trainers.build.assemble import build
from llm_limits.trainers.run import train

from tests.test_crash_resume import lightning_recipe, same
from tests.test_trl_backend import write

pytestmark = pytest.mark.usefixtures("one_thread")

EPOCH = 19
"""Train batches per epoch of the tiny recipe (checked in the first test): steps 19 and 38 end epochs."""


def _run(tmp_path: Path, **trainer) -> Path:
    r = lightning_recipe(tmp_path)
    r["trainer"].update(trainer)
    return train(str(write(tmp_path, r)), progress=False, echo=lambda s: None)


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:11]) for p in (run_dir / "checkpoints").glob("step-*.ckpt"))


def test_every_checkpoint_step_is_written_with_its_manifest_epoch_ends_included(tmp_path, monkeypatch):
    """checkpoint_every: 1 over two epoch ends. Steps 19 and 38 were missing: ModelCheckpoint deferred the save on an
    epoch's last batch to a validation that did not come. Each file is written once."""
    _, train_loader, _ = build(validate_recipe(lightning_recipe(tmp_path), "tiny"))
    assert len(train_loader) == EPOCH
    saves: list[str] = []
    save = ManifestCheckpoint._save_checkpoint

    def counted(self, trainer, filepath):
        saves.append(Path(filepath).name)
        save(self, trainer, filepath)

    monkeypatch.setattr(ManifestCheckpoint, "_save_checkpoint", counted)
    run_dir = _run(tmp_path, max_steps=40, checkpoint_every=1, keep_last=100)
    assert _steps(run_dir) == list(range(1, 41))
    assert sorted(saves) == sorted(["last.ckpt"] * 40 + [f"step-{i:06d}.ckpt" for i in range(1, 41)])
    files = checkpoint_files(run_dir / "checkpoints")
    assert [p.name for p in files[:2]] == ["last.ckpt", "step-000040.ckpt"] and len(files) == 41
    for p in files:
        assert verify(p) is None, p
    assert json.loads(manifest_path(files[0]).read_text())["step"] == 40
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if "-v" in p.name]  # each step once


def test_keep_last_prunes_the_manifest_with_its_checkpoint(tmp_path):
    run_dir = _run(tmp_path, max_steps=8, checkpoint_every=2, keep_last=2)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "last.ckpt", "last.ckpt.manifest.json",
        "step-000006.ckpt", "step-000006.ckpt.manifest.json", "step-000008.ckpt", "step-000008.ckpt.manifest.json",
    ]


def test_resume_skips_damaged_checkpoints_and_ends_with_the_uninterrupted_weights(tmp_path):
    """A run stopped after step 20: last.ckpt has a flipped byte and step-000020.ckpt was cut short, so --resume
    says so (one line each) and continues from step 19, an epoch's last batch; it ends bitwise equal."""
    reference = _run(tmp_path, max_steps=24, checkpoint_every=1, keep_last=100)
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed, symlinks=True)
    shutil.rmtree(crashed / "model")
    ckpts = crashed / "checkpoints"
    for step in range(21, 25):
        (ckpts / f"step-{step:06d}.ckpt").unlink()
        manifest_path(ckpts / f"step-{step:06d}.ckpt").unlink()
    shutil.copy(ckpts / "step-000020.ckpt", ckpts / "last.ckpt")
    write_manifest(ckpts / "last.ckpt", 20)
    data = bytearray((ckpts / "last.ckpt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (ckpts / "last.ckpt").write_bytes(bytes(data))
    with open(ckpts / "step-000020.ckpt", "r+b") as f:
        f.truncate(1000)

    lines: list[str] = []
    resumed = train("unused", resume=str(crashed), progress=False, echo=lines.append)
    skipped = [s for s in lines if "skipped" in s]
    assert len(skipped) == 2 and all("\n" not in s for s in skipped)
    assert "last.ckpt: skipped, last.ckpt does not match its checksum; trying the one before" in skipped[0]
    assert "step-000020.ckpt: skipped, step-000020.ckpt has 1000 bytes, the manifest says" in skipped[1]
    assert f"--resume: continuing from {ckpts / 'step-000019.ckpt'}" in lines
    assert same(reference, resumed)
    assert json.loads((resumed / "results.json").read_text())["train"]["steps"] == 24
    assert all(verify(p) is None for p in checkpoint_files(ckpts))  # steps 20 and last were written again


def test_resume_with_no_good_checkpoint_trains_from_the_start(tmp_path):
    reference = _run(tmp_path, max_steps=4, checkpoint_every=2, keep_last=5)
    crashed = tmp_path / "crashed"
    shutil.copytree(reference, crashed, symlinks=True)
    shutil.rmtree(crashed / "model")
    for p in checkpoint_files(crashed / "checkpoints"):
        with open(p, "r+b") as f:
            f.truncate(10)
    lines: list[str] = []
    resumed = train("unused", resume=str(crashed), progress=False, echo=lines.append)
    assert sum("skipped" in s for s in lines) == 3  # last, step 4, step 2
    assert f"--resume: no complete checkpoint in {crashed / 'checkpoints'}; training from the start" in lines
    assert same(reference, resumed)


def test_resume_order_and_checkpoints_from_before_manifests(tmp_path):
    for name in ("step-000002.ckpt", "step-000010.ckpt", "last.ckpt", "step-000004.ckpt", "notes.txt"):
        (tmp_path / name).write_bytes(b"x" * 100)
    assert [p.name for p in checkpoint_files(tmp_path)] == [
        "last.ckpt", "step-000010.ckpt", "step-000004.ckpt", "step-000002.ckpt"]
    # a run from before manifests: none has one, so the newest is taken unverified, with one line
    lines: list[str] = []
    assert last_good_checkpoint(tmp_path, warn=lines.append) == tmp_path / "last.ckpt"
    assert lines == [f"checkpoint {tmp_path / 'last.ckpt'}: no manifest (written before checkpoints had one); "
                     "using it unverified"]
    # once any has a manifest, one without is a save that did not finish (killed before its manifest): skipped
    write_manifest(tmp_path / "step-000004.ckpt", 4)
    lines.clear()
    assert last_good_checkpoint(tmp_path, warn=lines.append) == tmp_path / "step-000004.ckpt"
    assert len(lines) == 2
    assert lines[0].endswith("last.ckpt: skipped, no manifest (the save did not finish); trying the one before")
