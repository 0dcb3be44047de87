"""Long-context memory per rank: Ulysses sequence parallelism (SP=2, 2 processes) against one process (SP=1), on
the CPU, for growing sequence lengths (issue 21), run by `make bench`; not a test.

Both arms run the same small Llama (seed 0, fp32, sdpa) on the same rows: one forward and backward per length, the
loss summed over the tokens. SP=1 is one plain process; SP=2 is 2 gloo processes under torchrun, each holding half of
every row, attention through the TRL backend's sequence-parallel path (``trainers/backends/trl/sequence_parallel.py``:
``shard_batch`` and DeepSpeed's ``UlyssesSPAttentionHF``). Per rank and length it measures:

- **activations**: the bytes of every tensor autograd saves for the backward during the forward (unique storages,
  counted through ``torch.autograd.graph.saved_tensors_hooks``; the weights it saves are left out): what a longer sequence costs in memory, exactly,
  whatever the machine's load; the parameters, gradients and optimizer state are the same in both arms;
- **peak RSS over baseline**: the process's peak resident memory (``ru_maxrss``) after the length's step, minus the
  peak after building the model; lengths run in increasing order, so each value is that length's peak (allocator
  caching and the gathered heads included); a noisier, whole-process view.

Printed: a markdown table (per-rank values, ratio SP=2 / SP=1) and the command. The aim: per-rank activations at
SP=2 within 0.6x of SP=1 at the longest length.

Usage: .venv/bin/python scripts/bench_sp_memory.py [--lengths 512 1024 2048 4096] [--hidden 128] [--layers 2]
(it starts torchrun itself for the SP=2 arm)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    from llm_limits.trainers.build.models import build_model
    from llm_limits.trainers.backends.trl.sequence_parallel import setup, shard_batch

    torch.manual_seed(0)
    model = build_model("llama", {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                                  "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                                  "num_key_value_heads": args.heads, "max_position_embeddings": max(args.lengths)},
                        vocab_size=args.vocab, attn_implementation="sdpa")
    model.train()
    sp = setup(model, world, micro_batch_size=1) if world > 1 else None
    weights = {q.untyped_storage().data_ptr() for q in model.parameters()}  # saved weights are not activations
    baseline = _peak_rss_bytes()
    rows = []
    for length in args.lengths:
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(0, args.vocab, (1, length), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone()}
        part = shard_batch(batch, sp.rank, sp.size) if sp else shard_batch(batch, 0, 1)
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() in weights:
                return t
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
            return t

        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=part["input_ids"], position_ids=part["position_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), part["shift_labels"].flatten(),
                                                     ignore_index=-100, reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)
        rows.append({"length": length, "activations": sum(seen.values()), "rss": _peak_rss_bytes() - baseline,
                     "seconds": time.perf_counter() - t0, "loss": float(loss)})
        del logits, loss
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, rows)
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(gathered))
        dist.destroy_process_group()
    else:
        Path(args.out).write_text(json.dumps([rows]))


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    common = ["--lengths", *map(str, args.lengths), "--hidden", str(args.hidden), "--layers", str(args.layers),
              "--heads", str(args.heads), "--vocab", str(args.vocab), "--worker"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        one, two = Path(tmp) / "sp1.json", Path(tmp) / "sp2.json"
        subprocess.run([sys.executable, __file__, *common, "--out", str(one)], check=True, env=env)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), __file__, *common, "--out", str(two)], check=True, env=env)
        ref = json.loads(one.read_text())[0]
        ranks = json.loads(two.read_text())
    import torch

    print(f"# {datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} | "
          f"Llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}, fp32, sdpa, "
          "1 thread per process")
    print("| length | activations SP=1 | activations SP=2, per rank (rank 0 / rank 1) | ratio | peak RSS over "
          "baseline SP=1 | SP=2 per rank (max) | ratio | loss SP=1 / SP=2 (sum of ranks) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(ref):
        per = [rank[i] for rank in ranks]
        act = max(x["activations"] for x in per)
        rss = max(x["rss"] for x in per)
        loss2 = sum(x["loss"] for x in per)
        print(f"| {r['length']:,} | {_mib(r['activations'])} | {' / '.join(_mib(x['activations']) for x in per)} | "
              f"**{act / r['activations']:.3f}** | {_mib(r['rss'])} | {_mib(rss)} | "
              f"{rss / max(r['rss'], 1):.2f} | {r['loss']:.3f} / {loss2:.3f} |")
    print(f"command: python scripts/bench_sp_memory.py --lengths {' '.join(map(str, args.lengths))} "
          f"--hidden {args.hidden} --layers {args.layers} --heads {args.heads}")


if __name__ == "__main__":
    main()
