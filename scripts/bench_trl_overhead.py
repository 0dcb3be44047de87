"""Framework overhead of the TRL backend (issue 8), run by `make bench`; not a test.

The TRL backend's SFT training step (``trainers.trl_backend.sft_trainer``: TRL's ``SFTTrainer`` with the mitigation
hooks, the run callback that logs and checkpoints the mitigations' state, completion-only loss) against a plain
``transformers.Trainer`` on the same model, the same token ids and labels (taken from the SFT trainer's own tokenized
dataset), the same ``TrainingArguments`` (made by ``training_kwargs`` from one recipe), the same shuffled order (same
seed) and the same thread count. Each arm's step time is the median over the timed steps (after warm-up steps),
measured between the starts of consecutive steps (a ``TrainerCallback`` stamps ``on_step_begin``), so data loading,
collation, logging and every hook count. A third arm, TRL's own ``SFTTrainer`` with the same
``SFTConfig`` and no llm-limits hooks, splits the overhead into TRL's and ours. Arms alternate (backend, TRL, plain,
backend...) so drift on a shared machine hits all three; each ratio printed is the median over the repeats of the
per-repeat ratio of median step times.

Every example has the same length, so neither collator pads: the two arms run the same tensors.

Usage: .venv/bin/python scripts/bench_trl_overhead.py [--steps 60] [--warmup 10] [--repeats 3] [--threads 1]
       [--hidden 256] [--layers 4] [--seq-len 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import PrinterCallback  # noqa: E402

from scripts.bench_overhead import add_arguments, make_model  # noqa: E402  (the same model as the Lightning bench)
from llm_limits.trainers.recipe.schema import validate_recipe  # noqa: E402
from llm_limits.trainers.build.tokenizers import build_char_tokenizer  # noqa: E402
from llm_limits.trainers.backends.trl import RunCallback, sft_trainer, training_kwargs  # noqa: E402

warnings.filterwarnings("ignore")
os.environ.setdefault("WANDB_MODE", "disabled")


def recipe(args):
    steps = args.steps + args.warmup
    return validate_recipe({
        "name": "bench-trl-overhead",
        "model": {"model_type": "llama", "tokenizer": {"kind": "char"}},
        "data": {"task": "chains", "seq_len": args.seq_len, "batch_size": args.batch, "val_fraction": 0.0},
        "trainer": {"backend": "trl", "trl": {"algorithm": "sft"}, "max_steps": steps, "lr": 1e-3,
                    "lr_schedule": "constant", "grad_clip": 1.0, "log_every": steps, "accelerator": "cpu"},
        "mitigations": [], "evals": [],
    }, check_hardware=False).recipe


def sft_rows(args, tok):
    """Prompt/completion pairs of random characters whose tokens (prompt + completion + EOS) fill ``seq_len``."""
    from datasets import Dataset

    rng = random.Random(1)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789 "
    n = (args.steps + args.warmup) * args.batch
    half = args.seq_len // 2
    rows = [{"prompt": "".join(rng.choice(letters) for _ in range(half)),
             "completion": "".join(rng.choice(letters) for _ in range(args.seq_len - half - 1))} for _ in range(n)]
    return Dataset.from_list(rows)


class Stamp:
    """Step-start times (and the end of training) of one arm."""

    def __init__(self):
        from transformers import TrainerCallback

        stamps: list[float] = []
        self.stamps = stamps

        class _CB(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                stamps.append(time.perf_counter())

            def on_train_end(self, a, state, control, **kw):
                stamps.append(time.perf_counter())

        self.callback = _CB()

    def steps(self, warmup: int) -> list[float]:
        # the last interval holds the end-of-run checkpoint (both arms save once): not a training step
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])][warmup:-1]


def backend(args, tok, rec, data, run_dir: Path) -> tuple[list[float], object]:
    model = make_model(args, tok)
    kw = training_kwargs(rec.trainer, rec.data, run_dir, rec.seed, progress=False, has_val=False)
    stamp = Stamp()
    holder = {}
    callback = RunCallback(lambda: holder["t"], [], None, [])
    trainer = sft_trainer(model, tok, rec, kw, (data, None), [callback, stamp.callback])
    trainer.remove_callback(PrinterCallback)  # the log lines it prints (progress off) would bury the results
    trainer.mitigations, trainer.pending = [], {}
    holder["t"] = trainer
    trainer.train()
    return stamp.steps(args.warmup), trainer.train_dataset


def trl_only(args, tok, rec, data, run_dir: Path) -> list[float]:
    """TRL's own SFTTrainer with the backend's SFTConfig, without llm-limits' hooks and callback: splits the
    overhead into TRL's and ours."""
    from trl import SFTConfig, SFTTrainer

    model = make_model(args, tok)
    kw = training_kwargs(rec.trainer, rec.data, run_dir, rec.seed, progress=False, has_val=False)
    stamp = Stamp()
    config = SFTConfig(**kw, max_length=rec.data.seq_len, completion_only_loss=True, packing=False,
                       dataset_num_proc=None, remove_unused_columns=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[stamp.callback])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return stamp.steps(args.warmup)


def plain(args, tok, rec, tokenized, run_dir: Path) -> list[float]:
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = make_model(args, tok)
    rows = []
    for ex in tokenized:
        rows.append({"input_ids": ex["input_ids"], "attention_mask": [1] * len(ex["input_ids"]), "labels": ex["labels"]})
    kw = training_kwargs(rec.trainer, rec.data, run_dir, rec.seed, progress=False, has_val=False)
    stamp = Stamp()
    trainer = Trainer(model=model, args=TrainingArguments(**kw), train_dataset=Dataset.from_list(rows).with_format("torch"),
                      data_collator=default_data_collator, callbacks=[stamp.callback])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return stamp.steps(args.warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import datasets

    datasets.disable_progress_bars()
    tok = build_char_tokenizer()
    rec = recipe(args)
    data = sft_rows(args, tok)
    params = sum(p.numel() for p in make_model(args, tok).parameters())
    print(f"command: python scripts/bench_trl_overhead.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"model: llama {args.layers} layers, hidden {args.hidden}, {params:,} parameters; batch {args.batch} x "
          f"{args.seq_len} tokens (SFT, loss on the completion); {args.steps} timed steps after {args.warmup} "
          f"warm-up, {args.repeats} repeats")
    ratios: dict[str, list[float]] = {"backend/plain": [], "backend/trl": [], "trl/plain": []}
    tokenized = None
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            bk, tokenized_now = backend(args, tok, rec, data, Path(d) / "backend")
            tokenized = tokenized if tokenized is not None else tokenized_now
            lengths = {len(ids) for ids in tokenized["input_ids"]}
            if len(lengths) != 1:
                raise SystemExit(f"examples tokenized to lengths {sorted(lengths)[:5]}...: the arms would pad differently")
            if rep == 0:
                masked = sum(x == -100 for x in tokenized[0]["labels"])
                print(f"tokens per example: {sorted(lengths)}; loss on {len(tokenized[0]['labels']) - masked} (the completion)")
            tr = trl_only(args, tok, rec, data, Path(d) / "trl")
            pl = plain(args, tok, rec, tokenized, Path(d) / "plain")
        b, t, p = statistics.median(bk), statistics.median(tr), statistics.median(pl)
        ratios["backend/plain"].append(b / p)
        ratios["backend/trl"].append(b / t)
        ratios["trl/plain"].append(t / p)
        print(f"repeat {rep + 1}: plain HF Trainer {p * 1000:.1f} ms/step, TRL SFTTrainer {t * 1000:.1f} ms/step, "
              f"trl backend {b * 1000:.1f} ms/step")
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"overhead of the TRL backend over a plain HF Trainer: median ratio {med['backend/plain']:.3f} "
          f"({(med['backend/plain'] - 1) * 100:+.1f}%)")
    print(f"  of which TRL's SFTTrainer over the HF Trainer: {med['trl/plain']:.3f}; llm-limits' hooks over TRL's "
          f"SFTTrainer: {med['backend/trl']:.3f}")

if __name__ == "__main__":
    main()
