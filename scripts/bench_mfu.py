"""Model FLOPs utilisation on a GPU (issue 8): a 125M-1B Llama in bf16 through the Lightning backend with its DeepSpeed
strategy and through the TRL backend (DeepSpeed via the HF integration); not a test, and not in `make bench` (it
needs a CUDA GPU; this project's CI machine has none).

Each arm builds the model from a config (random weights, vocabulary 32,000), trains ``--steps`` timed steps after
``--warmup`` on random token ids (every row full: no padding, so every token is a trained token) with the backend's
own trainer: ``trainers.lightning_backend.build_trainer`` + ``CausalLMModule`` and ``trainers.trl_backend.sft_trainer``
(the ids handed over already tokenized, so TRL does not touch them), each arm in its own process. Step time is the median interval between the
starts of consecutive steps (``torch.cuda.synchronize`` at each stamp).

Model FLOPs per token (PaLM, arXiv 2204.02311, appendix B): ``6 N + 12 L H S``, N the parameters that take part in
matrix multiplies (all but the input embedding), L layers, H the hidden size, S the sequence length: forward and
backward, attention counted in full (causal kernels skip half; the convention does not). Activation recomputation is
not counted (it is hardware FLOPs, not model FLOPs). MFU = tokens/s x FLOPs per token / peak, the peak being the
GPU's dense bf16 tensor throughput (H100 and H200 SXM: 989 TFLOP/s; others: pass ``--peak-tflops``).

Usage (GPU):  .venv/bin/python scripts/bench_mfu.py [--size 125m|350m|1b] [--backend both|lightning|trl]
              [--strategy deepspeed_stage_2] [--seq-len 2048] [--batch 8] [--steps 30] [--warmup 5]
Smoke (CPU, checks the script runs; the MFU it prints means nothing): .venv/bin/python scripts/bench_mfu.py --smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
os.environ.setdefault("WANDB_MODE", "disabled")

SIZES = {
    # Llama shapes; parameter counts at vocabulary 32,000, untied head
    "125m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
    "350m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts), matched against ``torch.cuda.get_device_name``."""
VOCAB = 32000


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[args.size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, max_position_embeddings=args.seq_len, num_key_value_heads=shape["num_attention_heads"],
                         attn_implementation=args.attn, use_cache=False, **shape)
    return LlamaForCausalLM(config)


def flops_per_token(model, seq_len: int) -> float:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    return 6.0 * n + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def rows(args) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, ((args.steps + args.warmup + 2) * args.batch, args.seq_len), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lightning_arm(args, data) -> tuple[list[float], float]:
    import lightning as L

    from llm_limits.trainers.build.data import RowDataset
    from llm_limits.trainers.backends.lightning import CausalLMModule, build_trainer
    from llm_limits.trainers.backends.hooks import HookDriver
    from llm_limits.trainers.recipe.schema import TrainerSpec

    model = make_model(args)
    steps = args.steps + args.warmup
    spec = TrainerSpec(max_steps=steps, lr=1e-4, lr_schedule="constant", grad_clip=1.0, log_every=steps,
                       precision=args.precision, strategy=args.lightning_strategy, accelerator=args.accelerator,
                       devices=1)
    module = CausalLMModule(model, HookDriver([]), spec)
    loader = torch.utils.data.DataLoader(RowDataset(data), batch_size=args.batch, shuffle=False)
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(spec, Path(d), logger=None, has_val=False, progress=False)
        trainer.callbacks.append(Stamp())
        trainer.fit(module, train_dataloaders=loader)
    return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:], flops_per_token(model, args.seq_len)


def trl_arm(args, data) -> tuple[list[float], float]:
    from datasets import Dataset
    from transformers import TrainerCallback

    from llm_limits.trainers.recipe.schema import validate_recipe
    from llm_limits.trainers.build.tokenizers import build_char_tokenizer
    from llm_limits.trainers.backends.trl import ensure_distributed_env, sft_trainer, training_kwargs

    steps = args.steps + args.warmup
    rec = validate_recipe({
        "name": "bench-mfu", "model": {"model_type": "llama"},
        "data": {"task": "chains", "seq_len": args.seq_len, "batch_size": args.batch, "val_fraction": 0.0},
        "trainer": {"backend": "trl", "trl": {"algorithm": "sft"}, "max_steps": steps, "lr": 1e-4,
                    "lr_schedule": "constant", "grad_clip": 1.0, "log_every": steps, "precision": args.trl_precision,
                    "strategy": args.trl_strategy, "accelerator": args.accelerator},
        "mitigations": [], "evals": [],
    }, check_hardware=False).recipe
    if args.trl_strategy.startswith("deepspeed"):
        ensure_distributed_env()
    model = make_model(args)
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            _sync()
            stamps.append(time.perf_counter())

    # already tokenized: TRL skips its tokenization; the char tokenizer only supplies the pad token
    ds = Dataset.from_list([{"input_ids": r["input_ids"].tolist()} for r in data])
    with tempfile.TemporaryDirectory() as d:
        kw = training_kwargs(rec.trainer, rec.data, Path(d), 0, progress=False, has_val=False)
        kw["save_strategy"] = "no"
        trainer = sft_trainer(model, build_char_tokenizer(), rec, kw, (ds, None), [Stamp()])
        trainer.mitigations, trainer.pending = [], {}
        trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:], flops_per_token(model, args.seq_len)


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    if not torch.cuda.is_available():
        raise SystemExit("bench_mfu: no CUDA GPU; run it on one, or --smoke (CPU, checks the script) with --peak-tflops")
    name = torch.cuda.get_device_name(0)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    raise SystemExit(f"bench_mfu: no known bf16 peak for {name!r}; pass --peak-tflops")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=[s for s in SIZES if s != "smoke"], default="350m")
    ap.add_argument("--backend", choices=["both", "lightning", "trl"], default="both")
    ap.add_argument("--strategy", default="deepspeed_stage_2", help="DeepSpeed strategy of both arms (or ddp/auto)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--attn", default="sdpa", help="model.attn_implementation: sdpa, eager, flash_attention_2")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU, a 2-layer model, 3 steps: checks the script runs")
    ap.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # an arm started by --backend both
    args = ap.parse_args()
    args.vocab = VOCAB
    if args.smoke:
        args.size, args.vocab, args.seq_len, args.batch, args.steps, args.warmup = "smoke", 256, 64, 2, 3, 1
        args.accelerator, args.precision, args.trl_precision = "cpu", "32-true", "32-true"
        args.lightning_strategy = "auto"  # Lightning's DeepSpeed strategy is CUDA-only
        args.peak_tflops = args.peak_tflops or 1.0
        torch.set_num_threads(1)
    else:
        args.accelerator, args.precision, args.trl_precision = "gpu", "bf16-mixed", "bf16-mixed"
        args.lightning_strategy = args.strategy
    args.trl_strategy = args.strategy
    peak = peak_tflops(args)
    if args.backend == "both":
        # One process per arm: each backend sets up (and leaves behind) its own process group and DeepSpeed engine,
        # and a second one in the same process would start from the first one's state, not from a clean one.
        print(f"command: python scripts/bench_mfu.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
        failed = [b for b in ("lightning", "trl")
                  if subprocess.run([sys.executable, __file__, *sys.argv[1:], "--backend", b, "--quiet"]).returncode]
        if failed:
            raise SystemExit(f"bench_mfu: the {' and '.join(failed)} arm failed (its error is above)")
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.smoke else platform.machine()
    if not args.quiet:
        print(f"command: python scripts/bench_mfu.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"device: {device}; peak {peak:g} TFLOP/s; torch {torch.__version__}")
    data = rows(args)
    arms = {"lightning": lightning_arm, "trl": trl_arm}
    for name, arm in arms.items():
        if args.backend != name:
            continue
        times, fpt = arm(args, data)
        step = statistics.median(times)
        tokens_s = args.batch * args.seq_len / step
        mfu = tokens_s * fpt / (peak * 1e12)
        params = (fpt - 12.0 * SIZES[args.size]["num_hidden_layers"] * SIZES[args.size]["hidden_size"] * args.seq_len) / 6
        print(f"{name} backend ({args.lightning_strategy if name == 'lightning' else args.trl_strategy}, "
              f"{args.precision}): {params / 1e6:.1f}M matmul parameters, batch {args.batch} x {args.seq_len}, "
              f"{step * 1000:.1f} ms/step (median of {len(times)}), {tokens_s:,.0f} tokens/s, "
              f"{fpt / 1e9:.2f} GFLOP/token, MFU {mfu:.1%}")


if __name__ == "__main__":
    main()
