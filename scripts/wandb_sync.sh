#!/usr/bin/env bash
# Upload every offline wandb run under a runs/ folder (default: ./runs) once you have a key.
#   WANDB_API_KEY=... scripts/wandb_sync.sh [RUNS_DIR]
set -euo pipefail
root=${1:-runs}
here=$(cd "$(dirname "$0")/.." && pwd)
wandb=${WANDB_BIN:-$here/.venv/bin/wandb}
[ -x "$wandb" ] || { echo "error: $wandb not found (run 'make install' first)" >&2; exit 2; }
[ -d "$root" ] || { echo "error: $root: no such folder (expected a runs/ directory)" >&2; exit 2; }
mapfile -t dirs < <(find "$root" -type d -name 'offline-run-*' | sort)
[ ${#dirs[@]} -gt 0 ] || { echo "no offline wandb runs under $root"; exit 0; }
echo "syncing ${#dirs[@]} offline run(s) from $root"
"$wandb" sync "${dirs[@]}"
