"""Sequence packing (issue 8), run by `make bench`; not a test.

Training tokens per second (real tokens: padding excluded) with and without packing, on a length-skewed set of
documents (log-normal lengths: most short, a long tail), the same tiny Llama, optimizer, batch size and ``seq_len``.
The rows are exactly those `data.packing` builds (``trainers.data.build_datasets``): ``none`` (one padded row per
document), ``blocks`` and ``per_document`` (concatenated, cut into full blocks; the latter with position ids that
restart per document and attention kept inside each document), and for question/answer rows (the same skewed
texts as contexts, a question and a one-token answer) ``none`` against ``per_document`` (whole examples packed by
TRL's best-fit decreasing). The arms alternate over repeats; the ratio printed is the median of packed / unpacked.

Usage: .venv/bin/python scripts/bench_packing.py [--steps 40] [--repeats 3] [--seq-len 256] [--batch 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
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
warnings.filterwarnings("ignore")

from llm_limits.trainers.build.data import build_datasets, real_tokens  # noqa: E402
from llm_limits.trainers.build.models import build_model  # noqa: E402
from llm_limits.trainers.recipe.schema import DataSpec  # noqa: E402
from llm_limits.trainers.build.tokenizers import build_char_tokenizer  # noqa: E402

WORDS = "the model reads a long context and answers from the passage it was given".split()


def skewed_docs(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` documents of log-normal length in characters (median about 40, a tail past 400)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(n, generator=g) * 0.9 + 3.7).clamp(8, 2000).round().long().tolist()
    docs = []
    for i, length in enumerate(lengths):
        text, j = "", i
        while len(text) < length:
            text += WORDS[j % len(WORDS)] + " "
            j += 7
        docs.append({"text": text[:length].strip() or "x"})
    return docs


def skewed_qa(docs: list[dict[str, str]], seq_len: int) -> list[dict[str, str]]:
    """Question/answer records whose contexts are the skewed documents (cut to fit a row)."""
    out = []
    for i, d in enumerate(docs):
        key = f"k{i % 97}"
        out.append({"context": d["text"][: seq_len - 40] + f" {key} is {i % 10}.", "query": f" what is {key}?",
                    "answer": f" {i % 10}"})
    return out


def tokens_per_second(mode: str, args, tok, path: str) -> tuple[float, float]:
    spec = DataSpec(path=path, seq_len=args.seq_len, batch_size=args.batch, packing=mode, val_fraction=0.0)
    train, _ = build_datasets(spec, tok, seed=0)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = build_model("llama", {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4,
                                  "num_attention_heads": 4, "num_key_value_heads": 4,
                                  "max_position_embeddings": args.seq_len},
                        vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keys = ("input_ids", "attention_mask", "labels", "position_ids")
    real, seen, t0, done = 0, 0, None, 0
    while done < args.steps + 2:
        for batch in loader:
            if done == 2:  # two warm-up steps
                t0 = time.perf_counter()
            loss = model(**{k: v for k, v in batch.items() if k in keys}, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if done >= 2:
                real += real_tokens(batch)
                seen += batch["input_ids"].numel()
            done += 1
            if done == args.steps + 2:
                break
    wall = time.perf_counter() - t0
    return real / wall, real / seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_char_tokenizer()
    docs = skewed_docs(4000, seed=0)
    lengths = sorted(len(d["text"]) for d in docs)
    print(f"command: python scripts/bench_packing.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"data: {len(docs)} documents, characters median {lengths[len(lengths) // 2]}, 90th percentile "
          f"{lengths[int(len(lengths) * 0.9)]}, max {lengths[-1]}; rows of {args.seq_len} tokens, batch {args.batch}; "
          f"Llama 4 layers hidden 128; {args.steps} timed steps per arm")
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "docs.jsonl")
        Path(path).write_text("".join(json.dumps(x) + "\n" for x in docs))
        qa_path = str(Path(d) / "qa.jsonl")
        Path(qa_path).write_text("".join(json.dumps(x) + "\n" for x in skewed_qa(docs, args.seq_len)))
        arms = {"blocks": path, "per_document": path, "qa per_document": qa_path}
        ratios: dict[str, list[float]] = {k: [] for k in arms}
        for rep in range(args.repeats):
            base, fill = tokens_per_second("none", args, tok, path)
            qa_base, qa_fill = tokens_per_second("none", args, tok, qa_path)
            line = (f"repeat {rep + 1}: none {base:,.0f} tok/s ({fill:.0%} of row tokens real); qa none "
                    f"{qa_base:,.0f} tok/s ({qa_fill:.0%} real)")
            for arm, data in arms.items():
                tps, fill_p = tokens_per_second(arm.removeprefix("qa "), args, tok, data)
                ref = qa_base if arm.startswith("qa") else base
                ratios[arm].append(tps / ref)
                line += f"; {arm} {tps:,.0f} tok/s ({fill_p:.0%} real), x{tps / ref:.2f}"
            print(line)
    for arm, r in ratios.items():
        print(f"packing {arm} vs none: training tokens per second x{statistics.median(r):.2f} (median of {len(r)})")

if __name__ == "__main__":
    main()
