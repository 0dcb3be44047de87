"""The run directory: its layout, a fresh one per run, the one that every rank of a launch shares, and ``latest``.

``<output_dir>/<name>/<YYYYmmdd-HHMMSS>/`` holds ``recipe.yaml`` (the resolved recipe), ``results.json``, ``report.md``,
``plots/``, ``checkpoints/``, ``model/`` (and ``adapter/`` for LoRA, :mod:`llm_limits.trainers.backends.base`) and the
offline wandb run; ``<output_dir>/<name>/latest`` points at the newest finished one.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.results.record import REPORT_FILE, RESULTS_FILE  # noqa: F401  (part of the layout)
from llm_limits.trainers.results.report import write_atomic


RUN_DIR_ENV = "LLM_LIMITS_RUN_DIR"
"""Set by rank 0 before training so processes a launcher starts later write into the same run directory."""


RECIPE_FILE = "recipe.yaml"
"""The resolved recipe (defaults filled in, overrides applied); ``--resume`` reads it."""


def new_run_dir(output_dir: str, name: str) -> Path:
    """``<output_dir>/<name>/<YYYYmmdd-HHMMSS>``, suffixed if that exists (never reuses a directory)."""
    base = Path(output_dir) / name / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


_STARTED = __import__("time").time()
"""When this process imported the run module (the ranks of one launch start within seconds of each other)."""


LAUNCH_WAIT_S = 600.0
"""How long a rank started by torchrun waits for rank 0 to name the run directory (rank 0 builds first)."""


def launch_file(root: Path) -> Path | None:
    """Where rank 0 of a torchrun / deepspeed-launcher job writes the run directory for the other ranks (keyed by
    the job's rendezvous address, so two jobs of one recipe do not mix); ``None`` outside a multi-process launch."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    key = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}".replace("/", "_")
    return root / f".launch-{key}"


def announce_run_dir(root: Path, run_dir: Path) -> None:
    """Rank 0: tell the ranks the launcher started beside it which run directory to share (checkpoint shards of a
    ZeRO run must land in one folder)."""
    f = launch_file(root)
    if f is not None:
        write_atomic(f, str(run_dir.resolve()))


def await_run_dir(root: Path) -> Path:
    """Ranks > 0: the run directory rank 0 announced for this launch (written after this process started)."""
    import time

    f = launch_file(root)
    if f is None:
        return new_run_dir(str(root.parent), root.name)
    started = _STARTED - 30.0  # ranks start together; an older file is a previous launch's
    deadline = time.time() + LAUNCH_WAIT_S
    while time.time() < deadline:
        if f.is_file() and f.stat().st_mtime >= started:
            return Path(f.read_text().strip())
        time.sleep(0.2)
    raise UserError(f"{f}: rank 0 did not name a run directory within {LAUNCH_WAIT_S:.0f} s (did it fail? see its log)")


LATEST = "latest"
"""``<output_dir>/<name>/latest`` points at the newest finished run, so a recipe can start from another's model:
``model.path: runs/reasoning-tiny-sft/latest/model``."""


def point_latest(run_dir: Path) -> None:
    """Point ``<run_dir's parent>/latest`` at ``run_dir`` (a relative symlink, swapped in atomically)."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without symlinks: the timestamped directory is still there
        return
