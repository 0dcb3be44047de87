"""Framework overhead (issue 8), run by `make bench`; not a test.

The Lightning backend's training step (``CausalLMModule`` in a ``Trainer`` built by ``build_trainer``: no mitigation,
no checkpoint until the end, no progress bar, no logger) against a bare PyTorch loop (forward, backward, gradient
clip, AdamW step, zero_grad) on the same model, the same batches in the same order, the same optimizer settings and
the same thread count. Each arm's step time is the median over the timed steps (after warm-up steps), measured
between the starts of consecutive steps, so data loading, logging and every hook count against the framework.
Arms alternate (bare, lightning, bare, lightning...) so drift on a shared machine hits both; the ratio printed is
median(lightning) / median(bare) over the repeats.

Usage: .venv/bin/python scripts/bench_overhead.py [--steps 60] [--warmup 10] [--repeats 3] [--threads 1]
       [--hidden 256] [--layers 4] [--seq-len 256] [--batch 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_limits.trainers.build.data import RowDataset  # noqa: E402
from llm_limits.trainers.backends.lightning import CausalLMModule, build_trainer  # noqa: E402
from llm_limits.trainers.backends.hooks import HookDriver
from llm_limits.trainers.build.models import build_model  # noqa: E402
from llm_limits.trainers.recipe.schema import TrainerSpec  # noqa: E402
from llm_limits.trainers.build.tokenizers import build_char_tokenizer  # noqa: E402

warnings.filterwarnings("ignore")
import logging  # noqa: E402

for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(name).setLevel(logging.ERROR)  # "GPU available: False" and tips, once per Trainer


def make_model(args, tok):
    torch.manual_seed(0)
    return build_model("llama", {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                                 "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 4,
                                 "max_position_embeddings": args.seq_len}, vocab_size=len(tok),
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def make_rows(args, vocab: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = (args.steps + args.warmup) * args.batch
    ids = torch.randint(4, vocab, (n, args.seq_len), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def _stamp(args) -> float:
    if args.device == "cuda":
        torch.cuda.synchronize()  # a step's time on the GPU includes the kernels it queued
    return time.perf_counter()


def bare(args, tok, rows) -> list[float]:
    model = make_model(args, tok).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(RowDataset(rows), batch_size=args.batch, shuffle=False)
    stamps = []
    model.train()
    for batch in loader:
        stamps.append(_stamp(args))
        batch = {k: v.to(args.device, non_blocking=True) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    stamps.append(_stamp(args))
    return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:]


def lightning(args, tok, rows) -> list[float]:
    import lightning as L

    model = make_model(args, tok)
    steps = args.steps + args.warmup
    spec = TrainerSpec(max_steps=steps, lr=1e-3, lr_schedule="constant", grad_clip=1.0, log_every=steps,
                       accelerator="gpu" if args.device == "cuda" else "cpu")
    module = CausalLMModule(model, HookDriver([]), spec)
    loader = torch.utils.data.DataLoader(RowDataset(rows), batch_size=args.batch, shuffle=False)
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            stamps.append(_stamp(args))

        def on_train_end(self, trainer, pl_module):
            stamps.append(_stamp(args))

    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(spec, Path(d), logger=None, has_val=False, progress=False)
        trainer.callbacks.append(Stamp())
        trainer.fit(module, train_dataloaders=loader)
    # The last interval holds the end-of-run checkpoint: not a training step.
    return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:-1]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of both framework-overhead benchmarks (this one and bench_trl_overhead.py)."""
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where both arms train (cuda: the host "
                    "overhead that makes a tiny model launch-bound on a GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    rows = make_rows(args, len(tok))
    params = sum(p.numel() for p in make_model(args, tok).parameters())
    print(f"command: python scripts/bench_overhead.py {' '.join(sys.argv[1:])}".rstrip())
    gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"model: llama {args.layers} layers, hidden {args.hidden}, {params:,} parameters; batch {args.batch} x "
          f"{args.seq_len} tokens; {args.steps} timed steps after {args.warmup} warm-up, {args.repeats} repeats")
    ratios = []
    for rep in range(args.repeats):
        b = statistics.median(bare(args, tok, rows))
        lt = statistics.median(lightning(args, tok, rows))
        ratios.append(lt / b)
        print(f"repeat {rep + 1}: bare {b * 1000:.1f} ms/step, lightning backend {lt * 1000:.1f} ms/step, "
              f"ratio {lt / b:.3f}")
    print(f"overhead of the Lightning backend over a bare loop: median ratio {statistics.median(ratios):.3f} "
          f"({(statistics.median(ratios) - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
