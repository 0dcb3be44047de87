"""Greedy decoding of long prompts with and without ``logits_to_keep``, run by `make bench`; not a test.

Every eval decodes through ``evals.lm.greedy_decode``. Its prefill used to ask the model for the logits of every
prompt position, ``[batch, prompt, vocab]`` floats, to read the last row of each; now it passes transformers'
``logits_to_keep=1`` (``evals.lm.keeps_last_logits``). On a real vocabulary that tensor is the size of the model:
4 prompts of 2,048 tokens on SmolLM2's 49,152-token vocabulary are 1.6 GB of float32. This times the context eval's
decoding (4 left-padded prompts, 6 new tokens) on SmolLM2-135M's architecture (30 layers, hidden 576, 9 heads of
which 3 key/value, tied embeddings), randomly initialised so nothing needs pulling: the cost does not depend on the
weights. The arms alternate (A B A B) and the ratio printed is the median of full / last-only wall time, pair by pair;
both arms must decode the same tokens. Then the seconds per prompt of the same prompts decoded as a left-padded batch
(the eval's way), as a batch cut to one length, and one at a time.

Usage: .venv/bin/python scripts/bench_decode.py [--prompt-len 2048] [--batch 4] [--new-tokens 6] [--repeats 3]
       [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from llm_limits.evals import lm  # noqa: E402

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "tie_word_embeddings": True}
"""SmolLM2-135M-Instruct's shape (the GGUF's metadata, trainers/build/pretrained.py converts it)."""


def decode(model, prompts, new_tokens: int, last_only: bool) -> tuple[float, list[list[int]]]:
    """Wall seconds of one ``greedy_decode`` call, with ``logits_to_keep`` on or off, and its tokens."""
    keep = lm.keeps_last_logits
    lm.keeps_last_logits = keep if last_only else (lambda m: False)
    try:
        t0 = time.perf_counter()
        out = lm.greedy_decode(model, prompts, new_tokens, pad_id=0)
        return time.perf_counter() - t0, out
    finally:
        lm.keeps_last_logits = keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    if not lm.keeps_last_logits(model):
        sys.exit("bench_decode: this transformers' LlamaForCausalLM.forward takes no logits_to_keep: nothing to compare")
    g = torch.Generator().manual_seed(0)
    # left padding as the eval batches it: prompts of the given length and up to 1/8 shorter
    prompts = [torch.randint(1, SMOLLM2_135M["vocab_size"], (args.prompt_len - i * args.prompt_len // (8 * args.batch),),
                             generator=g).tolist() for i in range(args.batch)]
    full_gb = args.batch * args.prompt_len * SMOLLM2_135M["vocab_size"] * 4 / 1e9
    print(f"command: python scripts/bench_decode.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"model: SmolLM2-135M's architecture, random weights; {args.batch} prompts of up to {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens; the prefill's full logits are {full_gb:.2f} GB of float32")
    decode(model, [p[:64] for p in prompts], 2, True)  # warm-up
    ratios = []
    for rep in range(args.repeats):
        full, a = decode(model, prompts, args.new_tokens, last_only=False)
        last, b = decode(model, prompts, args.new_tokens, last_only=True)
        if a != b:
            sys.exit(f"bench_decode: repeat {rep + 1} decoded different tokens with logits_to_keep=1")
        ratios.append(full / last)
        print(f"repeat {rep + 1}: every position's logits {full:.2f} s, the last only {last:.2f} s, x{full / last:.2f}")
    print(f"greedy decoding, logits_to_keep=1 vs every position's logits: x{statistics.median(ratios):.2f} faster "
          f"(median of {len(ratios)} pairs)")
    # How the eval batches long prompts: the left-padded batch above, the same batch at one length (no padding mask,
    # so sdpa can take its causal path), and one prompt at a time; seconds per prompt, logits_to_keep on.
    equal = [p[: len(prompts[-1])] for p in prompts]
    per_prompt = {"left-padded batch": [], "batch of equal lengths": [], "one prompt at a time": []}
    for _ in range(args.repeats):
        per_prompt["left-padded batch"].append(decode(model, prompts, args.new_tokens, True)[0] / len(prompts))
        per_prompt["batch of equal lengths"].append(decode(model, equal, args.new_tokens, True)[0] / len(equal))
        per_prompt["one prompt at a time"].append(
            sum(decode(model, [p], args.new_tokens, True)[0] for p in prompts) / len(prompts))
    base = statistics.median(per_prompt["left-padded batch"])
    for name, times in per_prompt.items():
        print(f"{name}: {statistics.median(times):.2f} s per prompt (median of {len(times)}), "
              f"x{base / statistics.median(times):.2f} vs the left-padded batch")


if __name__ == "__main__":
    main()
