"""The kill soak (issue 22), not a test and not in CI: SIGKILL a tiny run at N random moments, resume it each time with
``llm-limits train --resume``, and compare its final weights with the uninterrupted run's, bitwise.

Configurations (the same tiny recipes as the suite's crash tests, whose helpers this script imports):

- ``lightning``: the Lightning backend, one process (``tests/test_crash_resume.py``'s recipe);
- ``trl``: the TRL backend's SFT, one process (``tests/test_trl_backend.py``'s recipe);
- ``trl-zero2``: the same under DeepSpeed ZeRO-2 with 2 processes on CPU (gloo; the CLI relaunches itself under
  torchrun), killed as a whole process tree (launcher, torchrun and both workers), as a lost node would be.

A kill moment is drawn as a training step ``t`` (uniform over the first 90% of the run, so the delay does not carry it
past the end) and a delay ``d`` (uniform, 0 to ``--max-delay`` seconds): the soak waits until the attempt has written
a checkpoint of step ``t`` or later that is newer than the one it resumed from, then ``d`` more seconds, then sends
SIGKILL. So every kill interrupts training that has made progress since its resume, mid-step or mid-save (kills
during the start-up, when no file of the run is being written, were 13 of 20 in the first version, which waited for
step ``t`` only: sorted targets close together were already behind the resumed run). Every attempt after the first is
``llm-limits train --resume RUN_DIR``; when an attempt ends by itself (the run finished before its kill) the soak stops
killing that configuration and says how many kills it sent.

Usage: .venv/bin/python scripts/crash_soak.py [--kills 20] [--configs lightning,trl,trl-zero2] [--seed 0]
       [--max-steps 3000] [--checkpoint-every 20] [--max-delay 0.5] [--keep DIR]
Exit code 0 when every configuration ended bitwise equal to its uninterrupted run with every kill landing before the
run had written its results, 1 otherwise. A kill after the results (during the shutdown) interrupts nothing: the run
was too short for its kill moments (on a quiet machine the tiny one-process runs train about 130 steps a second, so
the defaults are 3,000 steps and a delay of at most half a second; 60 steps and 3 s, the first defaults, let every kill
land late).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tqdm import tqdm  # noqa: E402

from tests.test_crash_resume import _checkpoint_of, lightning_recipe, same  # noqa: E402
from tests.test_trl_backend import trl_recipe, write  # noqa: E402

CLI = [sys.executable, "-m", "llm_limits.trainers.cli"]


@dataclass
class Config:
    name: str
    backend: str
    recipe: Callable[[Path], dict[str, Any]]
    timeout_s: float = 900.0


def _trl(tmp: Path) -> dict[str, Any]:
    r = trl_recipe(tmp, "sft")
    r["evals"] = []
    return r


def _trl_zero2(tmp: Path) -> dict[str, Any]:
    r = _trl(tmp)
    r["trainer"].update(strategy="deepspeed_stage_2", devices=2)
    return r


CONFIGS = {
    "lightning": Config("lightning", "lightning", lightning_recipe),
    "trl": Config("trl", "trl", _trl),
    "trl-zero2": Config("trl-zero2", "trl", _trl_zero2, timeout_s=1800.0),
}


@dataclass
class Result:
    config: str
    kills: int = 0
    kills_asked: int = 0
    late_kills: int = 0
    """Kills that came after the run had written its final results (during its shutdown): not an interruption."""
    resumed: int = 0
    """Attempts after the first whose log says ``--resume: continuing from`` a checkpoint (the rest started over: a
    soak where every resume trained from the start would still end bitwise equal, so this is counted)."""
    attempts: int = 0
    steps: int | None = None
    bitwise: bool | None = None
    reference_s: float = 0.0
    soak_s: float = 0.0
    note: str = ""
    moments: list[str] = field(default_factory=list)


def environment() -> dict[str, str]:
    """What the suite's crash test gives its children: offline wandb, no hub, one thread, and no inherited wandb
    service (a killed child would leave its run open in it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE", "LLM_LIMITS_RUN_DIR")}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    return env


def launch(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """``llm-limits ARGS`` in its own process group (torchrun and its workers included), output to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([*CLI, *args, "--no-progress"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL the launched process and every process below it, as a lost machine would stop them; returns how many.
    Not the process group alone: torchrun starts each worker in a session of its own, so a group kill left the
    workers training on (and finishing the run) after their launcher had died."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()
    return len(procs)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()) if root.exists() else []


def newest_checkpoint(run_dir: Path, backend: str, max_steps: int) -> int:
    """The highest step with a checkpoint in ``run_dir`` (complete or being written), 0 when none."""
    return max((s for s in range(1, max_steps + 1) if _checkpoint_of(run_dir, backend, s).exists()), default=0)


def finished(run_dir: Path) -> bool:
    """The run wrote its trained model and its final results (``train`` in results.json, written after the save)."""
    try:
        return (run_dir / "model").is_dir() and "train" in json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False


def soak(cfg: Config, *, kills: int, seed: int, max_steps: int, checkpoint_every: int, max_delay: float,
         work: Path, bar: tqdm) -> Result:
    res = Result(cfg.name, kills_asked=kills)
    env = environment()
    r = cfg.recipe(work)
    r["trainer"].update(max_steps=max_steps, checkpoint_every=checkpoint_every, keep_last=2, log_every=1)
    r["name"] = f"soak-{cfg.name}"
    r["output_dir"] = str(work / "reference")
    ref_path = write(work, r, "reference.yaml")
    t0 = time.time()
    proc = launch(["train", str(ref_path)], work / "reference.log", env)
    if proc.wait(timeout=cfg.timeout_s) != 0:
        res.note = f"the uninterrupted run failed: {(work / 'reference.log').read_text()[-800:]}"
        return res
    res.reference_s = time.time() - t0
    (reference,) = run_dirs(work / "reference" / r["name"])

    r["output_dir"] = str(work / "soak")
    path = write(work, r, "soak.yaml")
    root = work / "soak" / r["name"]
    rng = random.Random(seed)
    targets = sorted(rng.randint(1, max(1, int(0.9 * max_steps))) for _ in range(kills))
    run_dir: Path | None = None
    start = 0  # the newest checkpoint when the previous attempt was killed: where the next one resumes
    t0 = time.time()
    for i, target in enumerate(targets):
        delay = rng.uniform(0.0, max_delay)
        wait_for = max(target, start + 1)  # a checkpoint this attempt wrote itself, at or past the target
        args = ["train", "--resume", str(run_dir)] if run_dir else ["train", str(path)]
        proc = launch(args, work / f"attempt{i}.log", env)
        res.attempts += 1
        deadline = time.time() + cfg.timeout_s
        while proc.poll() is None and time.time() < deadline:
            if run_dir is None and (dirs := run_dirs(root)):
                run_dir = dirs[0]
            if run_dir is not None and newest_checkpoint(run_dir, cfg.backend, max_steps) >= wait_for:
                break
            time.sleep(0.05)
        time.sleep(delay)
        if proc.poll() is not None:  # it finished (or failed) before its kill
            if proc.returncode != 0:
                res.note = f"attempt {i} exited {proc.returncode}: {(work / f'attempt{i}.log').read_text()[-800:]}"
                return res
            res.note = f"the run finished before kill {i + 1}"
            break
        step = newest_checkpoint(run_dir, cfg.backend, max_steps) if run_dir else 0
        done_before = run_dir is not None and finished(run_dir)
        killed = kill_tree(proc)
        res.kills += 1
        res.late_kills += int(done_before)
        res.moments.append(f"kill {i + 1}: attempt {i} (from step {start}) killed {delay:.2f} s after a "
                           f"checkpoint >= {wait_for} existed ({killed} processes), newest checkpoint then {step}"
                           + (" (the run had already written its results)" if done_before else ""))
        start = step
        bar.update(1)
        bar.set_postfix_str(f"{cfg.name}: kill {res.kills}/{kills}")
    if run_dir is None:
        res.note = "no run directory was ever created"
        return res
    if not finished(run_dir):  # a kill after model/ was saved but before the report still leaves the run unfinished
        proc = launch(["train", "--resume", str(run_dir)], work / "final.log", env)
        res.attempts += 1
        if proc.wait(timeout=cfg.timeout_s) != 0:
            res.note = f"the final resume failed: {(work / 'final.log').read_text()[-800:]}"
            return res
    res.soak_s = time.time() - t0
    if not finished(run_dir):
        res.note = "the run has no final results after its last resume"
        return res
    res.steps = int(json.loads((run_dir / "results.json").read_text())["train"]["steps"])
    res.bitwise = same(reference, run_dir)
    resumes = [p for p in [*work.glob("attempt*.log"), work / "final.log"] if p.name != "attempt0.log" and p.exists()]
    res.resumed = sum("--resume: continuing from" in p.read_text() for p in resumes)
    (work / "moments.txt").write_text("\n".join(res.moments) + "\n")
    return res


def table(results: list[Result]) -> str:
    head = ("configuration", "kills", "of them after the results", "attempts", "resumed from a checkpoint", "final step", "bitwise equal", "reference s", "soak s", "note")
    rows = [head] + [(r.config, f"{r.kills}/{r.kills_asked}", str(r.late_kills), str(r.attempts), str(r.resumed), str(r.steps), str(r.bitwise),
                      f"{r.reference_s:.0f}", f"{r.soak_s:.0f}", r.note.splitlines()[0][:80] if r.note else "")
                     for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per configuration (default 20)")
    ap.add_argument("--configs", default="lightning,trl,trl-zero2", help="comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--max-delay", type=float, default=0.5, help="largest delay after the target checkpoint, seconds")
    ap.add_argument("--keep", default=None, help="keep the runs and logs in this folder (default: a temporary one)")
    a = ap.parse_args()
    names = [n.strip() for n in a.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: --configs: unknown configuration {unknown[0]!r} (expected {', '.join(CONFIGS)})", file=sys.stderr)
        return 2
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="crash-soak-"))
    results = []
    with tqdm(total=a.kills * len(names), desc="kills", unit="kill") as bar:
        for name in names:
            work = base / name
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            res = soak(CONFIGS[name], kills=a.kills, seed=a.seed, max_steps=a.max_steps,
                       checkpoint_every=a.checkpoint_every, max_delay=a.max_delay, work=work, bar=bar)
            results.append(res)
            tqdm.write(f"{name}: {res.kills} kills, {res.attempts} attempts, bitwise equal: {res.bitwise} "
                       f"({res.soak_s:.0f} s; the uninterrupted run {res.reference_s:.0f} s) {res.note}")
    print(table(results))
    print(f"command: {' '.join([Path(sys.executable).name, 'scripts/crash_soak.py', *sys.argv[1:]])}")
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    late = sum(r.late_kills for r in results)
    if late:
        print(f"{late} kills came after the results (during the shutdown) and interrupted nothing: raise --max-steps "
              f"or lower --max-delay")
    fresh = sum(r.attempts - 1 - r.resumed for r in results)
    if fresh:
        print(f"{fresh} resumed attempts found no checkpoint to continue from and trained from the start")
    return 0 if all(r.bitwise for r in results) and not late and not fresh else 1


if __name__ == "__main__":
    sys.exit(main())
