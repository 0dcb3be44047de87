"""Pin what the code computes: run a fixed set of short recipes and print the SHA-256 of each run's trained weights
and of its results.json curves.

    python scripts/pin_runs.py --out pins.json            # record (about 6 minutes on 2 cores)
    python scripts/pin_runs.py --check pins.json          # rerun and compare; exit 1 on any difference

A refactoring that must not change what the code computes is checked by recording the pins before it and checking
them after it, on the same machine (float results differ between CPUs in the last digits, so pins are per machine).
Only the CLI is used, so the same script runs against the code before and after a redesign.

The weights hash covers every tensor's name, dtype, shape and bytes in name order (not the safetensors file, whose
metadata may change); the curves hash covers every eval's ``curve``, ``series`` and ``grids`` before and after.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# name -> (recipe, overrides). Order matters: the GRPO arm starts from the SFT run's model.
RUNS: dict[str, tuple[str, list[str]]] = {
    "tiny-lm": ("recipes/baseline/tiny-lm.yaml", []),
    "tiny-pose-300": ("recipes/context/tiny-pose.yaml", ["trainer.max_tokens=614400", "trainer.log_every=50"]),
    "tiny-sft-20": ("recipes/reasoning/tiny-sft.yaml", ["trainer.max_steps=20", "trainer.warmup_steps=2"]),
    "grpo-step-2": ("recipes/reasoning/tiny-grpo-step.yaml", ["trainer.max_steps=2", "trainer.warmup_steps=0"]),
    "multimodal-infonce-20": ("recipes/multimodal/tiny-infonce.yaml", ["trainer.max_steps=20", "trainer.warmup_steps=2"]),
}


def weights_sha(model_dir: Path) -> str:
    from safetensors.torch import load_file

    tensors: dict = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def curves_sha(results_file: Path) -> str:
    results = json.loads(results_file.read_text())
    keep = {}
    for key, entry in sorted(results["evals"].items()):
        for phase in ("before", "after"):
            e = entry.get(phase) or {}
            keep[f"{key}/{phase}"] = {k: e.get(k) for k in ("curve", "series", "grids", "limit_value")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def run_all(work: Path) -> dict[str, dict[str, str]]:
    # `python -m` of this tree's CLI: llm_limits.trainers.cli once the package namespace exists, trainers.cli before it
    # (the old layout is run from PYTHONPATH, whatever checkout the venv has installed).
    module = "llm_limits.trainers.cli" if "llm_limits" in (ROOT / "pyproject.toml").read_text() else "trainers.cli"
    # PYTHONPATH: the tree this script sits in is the code that runs, even where another checkout is installed.
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out: dict[str, dict[str, str]] = {}
    for name, (recipe, overrides) in RUNS.items():
        cmd = [sys.executable, "-m", module, "train", str(ROOT / recipe), "output_dir=" + str(work / "runs"),
               "tracking.wandb.mode=disabled", *overrides]
        if name == "grpo-step-2":
            cmd.append(f"model.path={work / 'runs' / 'reasoning-tiny-sft' / 'latest' / 'model'}")
        print(f"[pin] {name}: {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"[pin] {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        run_dir = (work / "runs" / yaml.safe_load((ROOT / recipe).read_text())["name"] / "latest").resolve()
        out[name] = {"weights": weights_sha(run_dir / "model"), "curves": curves_sha(run_dir / "results.json")}
        print(f"[pin] {name}: weights {out[name]['weights'][:16]}  curves {out[name]['curves'][:16]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", type=Path, help="write the pins here")
    g.add_argument("--check", type=Path, help="compare against pins written earlier with --out")
    ap.add_argument("--keep", type=Path, help="run here and keep the run directories (default: a temporary folder)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="pins-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        pins = run_all(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(pins, indent=2) + "\n")
        print(f"[pin] wrote {args.out}")
        return
    want = json.loads(args.check.read_text())
    bad = [f"{n}.{k}" for n in want for k in want[n] if pins.get(n, {}).get(k) != want[n][k]]
    for n in want:
        for k in want[n]:
            mark = "same" if pins.get(n, {}).get(k) == want[n][k] else "DIFFERENT"
            print(f"{n:24s} {k:8s} {want[n][k][:16]}  {mark}")
    if bad:
        sys.exit(f"[pin] {len(bad)} differ: {', '.join(bad)}")
    print("[pin] all bitwise the same")


if __name__ == "__main__":
    main()
