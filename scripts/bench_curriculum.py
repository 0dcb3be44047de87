"""Benchmarks of the positional curriculum (issue 3), run by `make bench`; not a test.

1. Sequence-length warmup vs a fixed length: the same tiny Llama, data, optimizer and seed; wall-clock and training
   tokens until the full-length validation loss first reaches a target, printed as ratios (warmup / fixed) from one run.
   The warmup arm truncates batches with the `positional` mitigation's own `transform_batch`.
2. The context eval's batched scoring vs a naive one-example-at-a-time loop over the same grid of records, as a
   throughput ratio.

Usage: .venv/bin/python scripts/bench_curriculum.py [--target-loss 1.2] [--max-steps 4000] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm_limits.evals.context import score_records  # noqa: E402
from llm_limits.evals.tasks.ruler import RulerConfig, generate as ruler_generate  # noqa: E402
from llm_limits.mitigations.base import StepContext  # noqa: E402
from llm_limits.mitigations.positional import Positional, PositionalConfig  # noqa: E402
from llm_limits.mitigations.positional.mitigation import WarmupConfig  # noqa: E402
from llm_limits.trainers.build.data import load_records, tokenize_to_blocks  # noqa: E402
from llm_limits.trainers.build.models import build_model  # noqa: E402
from llm_limits.trainers.recipe.schema import DataSpec  # noqa: E402
from llm_limits.trainers.build.tokenizers import build_char_tokenizer  # noqa: E402

SEQ_LEN = 128
BATCH = 16


def tiny_llama(tok, seed: int):
    torch.manual_seed(seed)
    return build_model("llama", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024},
                       None, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id)


@torch.no_grad()
def val_loss(model, val: torch.Tensor) -> float:
    model.eval()
    loss = sum(float(model(input_ids=b, labels=b).loss) for b in val.split(64))
    model.train()
    return loss / len(val.split(64))


def time_to_target(arm: str, blocks: torch.Tensor, val: torch.Tensor, tok, args) -> dict:
    """Train until the validation loss (full-length blocks) first reaches ``args.target_loss``."""
    model = tiny_llama(tok, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mitigation = None
    if arm == "warmup":
        cfg = PositionalConfig(warmup=WarmupConfig(enabled=True, min_len=16, max_len=SEQ_LEN, schedule="root",
                                                   root_degree=2, warmup_steps=args.warmup_steps, multiple_of=8))
        mitigation = Positional(cfg)
        model = mitigation.setup(model, tok)
    g = torch.Generator().manual_seed(0)
    tokens, t_train, step = 0, 0.0, 0
    while step < args.max_steps:
        order = torch.randperm(len(blocks), generator=g)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            ids = blocks[order[i : i + BATCH]]
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
            t0 = time.perf_counter()
            if mitigation is not None:
                batch = mitigation.transform_batch(batch, StepContext(step=step, max_steps=args.max_steps))
            loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            t_train += time.perf_counter() - t0  # validation time is not counted: both arms pay it alike
            tokens += int(batch["attention_mask"].sum())
            step += 1
            if step % args.eval_every == 0:
                vl = val_loss(model, val)
                if vl <= args.target_loss:
                    return {"arm": arm, "reached": True, "steps": step, "tokens": tokens, "wall_s": t_train, "val": vl}
            if step >= args.max_steps:
                break
    return {"arm": arm, "reached": False, "steps": step, "tokens": tokens, "wall_s": t_train, "val": val_loss(model, val)}


def bench_eval_throughput(tok, args) -> dict:
    """The same grid of needle records scored batched (the eval's way) and one at a time."""
    model = tiny_llama(tok, seed=1).eval()
    records = []
    for n_chars in (64, 128, 256, 512):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            records += ruler_generate(RulerConfig(num_examples=8, context_chars=n_chars - 11, depth=depth, seed=7))
    out = {}
    for label, bs in (("batched", 32), ("one_at_a_time", 1)):
        t0 = time.perf_counter()
        score_records(model, tok, records, batch_size=bs, max_new_tokens=6, device="cpu")
        out[label] = time.perf_counter() - t0
    out["records"] = len(records)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-loss", type=float, default=1.2, help="validation loss both arms must reach")
    p.add_argument("--max-steps", type=int, default=4000, help="give up after this many steps")
    p.add_argument("--warmup-steps", type=int, default=300, help="steps of the warmup arm's 16 -> 128 schedule")
    p.add_argument("--eval-every", type=int, default=25, help="steps between validation checks")
    p.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", 1)),
                   help="torch threads (1 keeps timings stable on a shared 2-core machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    command = "python scripts/bench_curriculum.py " + " ".join(sys.argv[1:])
    print(f"command: {command.strip()}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)")

    tok = build_char_tokenizer()
    records = load_records(DataSpec(task="synthetic_text", params={"num_docs": 1200, "doc_chars": 512}), seed=0)
    all_blocks = tokenize_to_blocks(records, tok, SEQ_LEN)
    val, blocks = all_blocks[:64], all_blocks[64:]
    print(f"\n1. time to validation loss <= {args.target_loss} (tiny llama, {len(blocks)} blocks of {SEQ_LEN}, batch {BATCH})")
    rows = [time_to_target(arm, blocks, val, tok, args) for arm in ("fixed", "warmup")]
    for r in rows:
        status = "reached" if r["reached"] else f"NOT reached (val {r['val']:.3f})"
        print(f"   {r['arm']:<7} {status} at step {r['steps']}: {r['tokens']:,} tokens, {r['wall_s']:.1f} s of training")
    fixed, warm = rows
    if fixed["reached"] and warm["reached"]:
        print(f"   ratio warmup/fixed: tokens {warm['tokens'] / fixed['tokens']:.2f}, wall-clock {warm['wall_s'] / fixed['wall_s']:.2f}")
    else:
        print("   ratio: n/a (an arm did not reach the target; raise --max-steps or the target)")

    ev = bench_eval_throughput(tok, args)
    print(f"\n2. context eval scoring over one grid ({ev['records']} records, 4 lengths x 5 depths x 8)")
    print(f"   batched (32): {ev['batched']:.2f} s   one at a time: {ev['one_at_a_time']:.2f} s   "
          f"throughput ratio: {ev['one_at_a_time'] / ev['batched']:.1f}x")


if __name__ == "__main__":
    main()
