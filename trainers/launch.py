"""``llm-limits train`` starts its own processes: a TRL-backend recipe that asks for more than one device is re-run
under ``torchrun`` (``python -m torch.distributed.run``) with the same arguments; a multi-node run needs the
rendezvous every node agrees on. The Lightning backend starts its DDP ranks itself (Lightning's launcher), so only the
rendezvous and device checks apply to it.

Single node: ``torchrun --nproc_per_node <devices> --master_port <free port> -m llm_limits.trainers.cli train ...``.
Several nodes (``trainer.num_nodes > 1``): every node runs ``llm-limits train`` with ``MASTER_ADDR``, ``MASTER_PORT``
and ``NODE_RANK`` set (``scripts/multinode.sh`` and ``scripts/slurm.sbatch`` set them), and each becomes
``torchrun --nnodes <num_nodes> --node_rank <NODE_RANK> --master_addr <MASTER_ADDR> --master_port <MASTER_PORT>
--nproc_per_node <devices> ...``. Under a launcher already (``WORLD_SIZE`` set) nothing is re-launched.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from llm_limits.trainers.recipe.errors import UserError

RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")
"""What every node of a multi-node run must have in its environment."""


def under_launcher() -> bool:
    """Whether this process was started by a launcher (torchrun, the deepspeed launcher, SLURM's srun with our script)."""
    return "WORLD_SIZE" in os.environ


def check_rendezvous(trainer: Any, source: str) -> None:
    """A multi-node run without its rendezvous is a one-line error before any process starts."""
    if trainer.num_nodes <= 1 or under_launcher():
        return
    missing = [v for v in RENDEZVOUS_VARS if not os.environ.get(v)]
    if missing:
        raise UserError(
            f"{source}: trainer.num_nodes: {trainer.num_nodes} nodes need a rendezvous address, but {', '.join(missing)} "
            "is not set (start every node with scripts/multinode.sh, or scripts/slurm.sbatch under SLURM)"
        )


def command(trainer: Any, cli_args: list[str]) -> list[str] | None:
    """The ``torchrun`` command that re-runs ``llm-limits <cli_args>`` in ``devices x num_nodes`` processes, or
    ``None`` when this process should train itself (one device, the Lightning backend, or already under a launcher)."""
    if under_launcher() or trainer.backend != "trl" or trainer.devices * trainer.num_nodes <= 1:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(trainer.devices)]
    if trainer.num_nodes > 1:
        cmd += ["--nnodes", str(trainer.num_nodes), "--node_rank", os.environ["NODE_RANK"],
                "--master_addr", os.environ["MASTER_ADDR"], "--master_port", os.environ["MASTER_PORT"]]
    else:
        cmd += ["--master_port", str(free_port())]
    return cmd + ["-m", "llm_limits.trainers.cli", *cli_args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
