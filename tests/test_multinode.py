"""The multi-node launch scripts, run for real on one machine: two "nodes" (two launches of the script, each starting
torchrun with one process) meet at a rendezvous on 127.0.0.1 and train one ZeRO-2 run of the TRL backend together.

``scripts/multinode.sh`` runs as a user runs it on each node. ``scripts/slurm.sbatch`` runs under stand-ins for SLURM's
``scontrol`` and ``srun`` (this machine has no SLURM): ``srun`` starts the script's command once per node with
``SLURM_NODEID`` set, as SLURM does with ``--ntasks-per-node=1``. What this does not test: two real hosts, a network
between them, a shared filesystem other than this disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_trl_backend import trl_recipe, write
from llm_limits.trainers.launch import free_port

pytestmark = pytest.mark.slow

LLM_LIMITS = str(Path(sys.executable).parent / "llm-limits")


def two_node_recipe(tmp_path: Path) -> Path:
    r = trl_recipe(tmp_path, "sft")
    r["trainer"].update(strategy="deepspeed_stage_2", devices=1, num_nodes=2, max_steps=3)
    r["evals"] = []
    return write(tmp_path, r)


def env(tmp_path: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "NODE_RANK", "LLM_LIMITS_RUN_DIR")}
    return {**e, "LLM_LIMITS": LLM_LIMITS, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def check_run(tmp_path: Path, logs: list[str]) -> None:
    runs = [p for p in (tmp_path / "runs" / "trl-sft").iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(runs) == 1, f"both nodes must write one run directory, found {runs}\n" + "\n".join(logs)
    train = json.loads((runs[0] / "results.json").read_text())["train"]
    assert train["world_size"] == 2 and train["zero_stage"] == 2 and train["steps"] == 3
    # each node's rank saved its ZeRO-2 optimizer shard into the shared run directory
    shards = sorted(p.name for p in (runs[0] / "checkpoints").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards


def test_multinode_script_two_nodes_on_one_machine(tmp_path):
    recipe, port = two_node_recipe(tmp_path), str(free_port())
    nodes = [subprocess.Popen(["bash", str(REPO / "scripts" / "multinode.sh"), "127.0.0.1", port, str(rank),
                               str(recipe)], cwd=REPO, env=env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [n.communicate(timeout=900)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    # each node launched torchrun as one of two nodes at the rendezvous (the console may wrap the line)
    assert all(f"--nnodes 2 --node_rank {rank} --master_addr 127.0.0.1 --master_port {port}" in " ".join(log.split())
               for rank, log in enumerate(logs)), logs[0][:2000]
    check_run(tmp_path, logs)


def test_slurm_script_under_a_stand_in_srun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n# scontrol show hostnames LIST: the first node\necho 127.0.0.1\n')
    # srun [options] bash -c CMD: one task per node (2 nodes), SLURM_NODEID set, fail if any task fails
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'SLURM_NODEID=0 "$@" & a=$!\nSLURM_NODEID=1 "$@" & b=$!\n'
        'wait $a; ra=$?; wait $b; rb=$?\nexit $(( ra || rb ))\n'
    )
    for f in ("scontrol", "srun"):
        (bin_dir / f).chmod(0o755)
    recipe = two_node_recipe(tmp_path)
    e = {**env(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]",
         "SLURM_SUBMIT_DIR": str(REPO), "MASTER_PORT": str(free_port())}
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sbatch"), str(recipe), "trainer.max_steps=3"],
                         cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    check_run(tmp_path, [out.stdout, out.stderr])
