#!/usr/bin/env bash
# Start one node of a multi-node llm-limits run. Run it on every node with the same rendezvous address and port and
# that node's rank (0 on the node whose address is the rendezvous):
#
#   scripts/multinode.sh MASTER_ADDR MASTER_PORT NODE_RANK recipes/retrieval/llama-7b-lora-zero2.yaml [overrides...]
#
# The recipe's trainer.num_nodes and trainer.devices (GPUs per node) say how many processes start; `llm-limits train`
# launches torchrun itself on each node (docs/scaling.md). Rank 0 of node 0 names the run directory, which must be on a
# filesystem every node sees.
set -euo pipefail
if [ "$#" -lt 4 ]; then
  echo "usage: $0 MASTER_ADDR MASTER_PORT NODE_RANK RECIPE [overrides...]" >&2
  exit 2
fi
export MASTER_ADDR="$1" MASTER_PORT="$2" NODE_RANK="$3"
shift 3
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec "${LLM_LIMITS:-$HERE/.venv/bin/llm-limits}" train "$@" --no-progress
