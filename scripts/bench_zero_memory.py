"""ZeRO-3 vs DDP: parameter and optimizer-state memory held by each rank, 2 processes on CPU (issue 8), run by
`make bench`; not a test.

Both arms train the same Llama for 2 steps with the HF Trainer (the TRL backend's engine) on 2 gloo processes: DDP
(every rank holds every parameter and the whole AdamW state) and DeepSpeed ZeRO-3 through the same generated config
the TRL backend uses (``trainers.trl_backend.deepspeed_config``). Then each rank counts the bytes it holds: parameters
(ZeRO-3: its partition ``ds_tensor``; DDP: the full tensors) and the optimizer state tensors (``exp_avg``,
``exp_avg_sq``; ZeRO-3's AdamW runs over the rank's flat fp32 partition). Printed: per-rank bytes of each arm and the
ratio ZeRO-3 / DDP (the aim: about 1/2 with 2 ranks). Counts, not timings: the numbers do not depend on load.

Usage: .venv/bin/python scripts/bench_zero_memory.py [--hidden 256] [--layers 4]
(it starts torchrun itself; the two arms run one after the other)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def held_bytes(model, optimizer) -> dict[str, int]:
    params = 0
    for p in model.parameters():
        local = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition of the parameter
        t = local if local is not None else p
        params += t.numel() * t.element_size()
    inner = optimizer
    while hasattr(inner, "optimizer"):  # accelerate's / DeepSpeed's wrappers around the torch optimizer
        inner = inner.optimizer
    state = 0
    for per_param in inner.state.values():
        for v in per_param.values():
            if hasattr(v, "numel") and v.dim() > 0:
                state += v.numel() * v.element_size()
    return {"params": params, "optimizer_state": state}


def worker(args) -> None:
    import torch
    from transformers import Trainer, TrainingArguments

    from llm_limits.trainers.build.data import RowDataset
    from llm_limits.trainers.build.models import build_model
    from llm_limits.trainers.build.tokenizers import build_char_tokenizer
    from llm_limits.trainers.backends.trl import deepspeed_config

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_model("llama", {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                                  "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "max_position_embeddings": 64}, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    ids = torch.randint(4, len(tok), (16, 32), generator=torch.Generator().manual_seed(1))
    rows = RowDataset([{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids])
    with tempfile.TemporaryDirectory() as d:
        targs = TrainingArguments(output_dir=d, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                                  report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                  disable_tqdm=True,
                                  deepspeed=deepspeed_config("deepspeed_stage_3") if args.arm == "zero3" else None)
        trainer = Trainer(model=model, args=targs, train_dataset=rows)
        trainer.train()
        counts = held_bytes(trainer.model_wrapped if args.arm == "zero3" else trainer.model, trainer.optimizer)
    rank = int(os.environ.get("RANK", 0))
    Path(args.out).with_suffix(f".{rank}.json").write_text(json.dumps(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--arm", choices=["ddp", "zero3"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        worker(args)
        return
    from llm_limits.trainers.launch import free_port

    print(f"command: python scripts/bench_zero_memory.py {' '.join(sys.argv[1:])}".rstrip())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))}
    result = {}
    with tempfile.TemporaryDirectory() as d:
        for arm in ("ddp", "zero3"):
            out = Path(d) / arm
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), __file__, "--arm", arm, "--out", str(out), "--hidden", str(args.hidden),
                   "--layers", str(args.layers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{arm} failed:\n{proc.stderr[-3000:]}")
            result[arm] = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in (0, 1)]
    print(f"model: llama {args.layers} layers, hidden {args.hidden}; 2 processes (gloo, CPU), fp32, AdamW")
    for kind in ("params", "optimizer_state"):
        ddp = [r[kind] for r in result["ddp"]]
        z3 = [r[kind] for r in result["zero3"]]
        print(f"{kind:>16}: DDP {ddp[0] / 2**20:.2f} / {ddp[1] / 2**20:.2f} MiB per rank, ZeRO-3 "
              f"{z3[0] / 2**20:.2f} / {z3[1] / 2**20:.2f} MiB per rank; ratio ZeRO-3 / DDP {max(z3) / max(ddp):.3f}")


if __name__ == "__main__":
    main()
