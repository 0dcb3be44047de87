"""The longest sequence a Llama trains on one device (issue 21, item 4's GPU half): not a test.

One training step (forward, backward, AdamW) of one row per length, lengths doubling from ``--start`` until the
device runs out of memory, ``--max`` or ``--deadline-s``; then one bisection step between the last length that fit
and the first that did not. The step is what makes long rows fit on one device:

- bf16 weights, activation checkpointing on every decoder layer (transformers' ``gradient_checkpointing_enable``),
  ``sdpa`` attention (the flash kernel on CUDA for causal bf16);
- the loss never holds the whole ``[length, vocab]`` logits: ``--loss chunked`` computes the LM head and the cross
  entropy ``--chunk`` tokens at a time, each chunk under checkpoint (its logits are recomputed in the backward);
  ``--loss liger`` uses Liger's fused linear cross entropy (``liger-kernel``, CUDA only);
- AdamW (fused on CUDA), so the optimizer state is in the peak.

Printed: a markdown table (length, fits, peak memory, step seconds, tokens/s) and the command; ``--out`` writes the
same as JSON. Sizes are scripts/bench_mfu.py's (``1b``: hidden 2048, 22 layers, 32 heads, vocab 32,000).

Usage (GPU, the prepared run):  python scripts/bench_longest_seq.py --size 1b --device cuda --loss liger
                                     [--start 16384] [--max 524288] [--deadline-s 420] [--out longseq.json]
Usage (CPU smoke):              python scripts/bench_longest_seq.py --size tiny --device cpu --start 256 --max 1024
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_mfu import SIZES, VOCAB  # noqa: E402  (one definition of the model sizes)


def build(size: str, device: str, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[size]
    cfg = LlamaConfig(**shape, num_key_value_heads=shape["num_attention_heads"], vocab_size=VOCAB,
                      max_position_embeddings=max_len, attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def chunked_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean next-token cross entropy, the LM head applied ``chunk`` tokens at a time under checkpoint: no more than
    ``[chunk, vocab]`` logits exist at once, in the forward or the backward.

    >>> h, w, y = torch.randn(1, 10, 4), torch.randn(7, 4), torch.randint(0, 7, (1, 10))
    >>> full = F.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1), y[:, 1:].flatten())
    >>> bool(torch.allclose(chunked_loss(h, w, y, 3), full, atol=1e-6))
    True
    """
    h, y = hidden[:, :-1], labels[:, 1:]

    def part(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((hc @ weight.T).float().flatten(0, 1), yc.flatten(), reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[1], chunk):
        total = total + checkpoint(part, h[:, s:s + chunk], y[:, s:s + chunk], use_reentrant=False)
    return total / y.numel()


def step(model, opt, length: int, device: str, loss_kind: str, chunk: int) -> float:
    ids = torch.randint(0, VOCAB, (1, length), device=device)
    hidden = model.model(input_ids=ids).last_hidden_state
    weight = model.lm_head.weight
    if loss_kind == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss()(weight, hidden[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    else:
        loss = chunked_loss(hidden, weight, ids, chunk)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def try_length(model, opt, length: int, args) -> dict:
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        loss = step(model, opt, length, args.device, args.loss, args.chunk)
        _sync(args.device)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return {"length": length, "fits": False}
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    return {"length": length, "fits": True, "loss": loss, "step_s": dt, "tokens_per_s": length / dt, "peak_gib": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=list(SIZES), default="1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--loss", choices=["chunked", "liger"], default="chunked")
    ap.add_argument("--chunk", type=int, default=8192, help="tokens per LM-head chunk (--loss chunked)")
    ap.add_argument("--start", type=int, default=16384)
    ap.add_argument("--max", type=int, default=524288)
    ap.add_argument("--deadline-s", type=float, default=420.0, help="start no new length after this many seconds")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device here (use --device cpu for the smoke run)", file=sys.stderr)
        return 2
    if args.loss == "liger" and args.device != "cuda":
        print("error: --loss liger: Liger's kernels are Triton, CUDA only (use --loss chunked)", file=sys.stderr)
        return 2
    t_start = time.time()
    model = build(args.size, args.device, args.max)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=args.device == "cuda")
    results, length, bad = [], args.start, None
    while length <= args.max and time.time() - t_start < args.deadline_s:
        r = try_length(model, opt, length, args)
        results.append(r)
        print(json.dumps(r), flush=True)
        if not r["fits"]:
            bad = length
            break
        length *= 2
    good = max((r["length"] for r in results if r["fits"]), default=None)
    if good is not None and bad is not None and time.time() - t_start < args.deadline_s:
        mid = (good + bad) // 2 // 1024 * 1024
        if good < mid < bad:
            r = try_length(model, opt, mid, args)
            results.append(r)
            print(json.dumps(r), flush=True)
            if r["fits"]:
                good = mid
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\nLongest row trained in one step: {good} tokens ({args.size} Llama, bf16, checkpointing, "
          f"{args.loss} loss, {name}); stopped by "
          + ("out of memory" if bad else "--max" if length > args.max else "--deadline-s"))
    print("| length | fits | peak GiB | step s | tokens/s |\n|---:|---|---:|---:|---:|")
    for r in sorted(results, key=lambda r: r["length"]):
        if r["fits"]:
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            print(f"| {r['length']:,} | yes | {peak} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} |")
        else:
            print(f"| {r['length']:,} | out of memory | - | - | - |")
    print("command: python scripts/bench_longest_seq.py " + " ".join(sys.argv[1:]))
    if args.out:
        Path(args.out).write_text(json.dumps({"device": name, "args": vars(args), "longest": good,
                                              "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
