"""Model FLOPs utilisation on a GPU (issues 8 and 20): a 350M-1B Llama in bf16 through the Lightning backend and the TRL
backend, the baseline and each training switch side by side; not a test, and not in `make bench` (it needs a CUDA GPU;
this project's CI machine has none).

Variants (``--variants``, in this order; each one a set of ``trainer`` fields, applied through the same code the
backends use, trainers/build/kernels.py):

    baseline   strategy deepspeed_stage_2, precision bf16-mixed (issue 20's measured table)
    best       strategy auto (no DeepSpeed), liger, compile, fused_optimizer: every switch at once
    plain      strategy auto: one plain GPU process, no DeepSpeed
    liger      baseline + liger (RMSNorm, SwiGLU, RoPE; Lightning also the fused linear cross-entropy)
    compile    baseline + compile (torch.compile of the model's forward)
    fused      baseline + fused_optimizer: true (Lightning only: the TRL backend's AdamW is fused already, by
               transformers' default)
    bf16-true  strategy auto, precision bf16-true: bf16 weights and optimizer state (Lightning only)

Each arm (size x backend x variant) runs in its own process: it builds the model from a config (random weights,
vocabulary 32,000) on the GPU, trains ``--steps`` timed steps after ``--warmup`` (compilation happens there) on
random token ids (every row full: no padding), with the backend's own trainer: ``build_trainer`` + ``CausalLMModule``
and ``sft_trainer`` (the ids handed over already tokenized). Step time is the median interval between the starts of
consecutive steps (``torch.cuda.synchronize`` at each stamp); peak memory is ``torch.cuda.max_memory_allocated``
over the whole arm (warm-up included).

Model FLOPs per token (PaLM, arXiv 2204.02311, appendix B): ``6 N + 12 L H S``, N the parameters that take part in
matrix multiplies (all but the input embedding), L layers, H the hidden size, S the sequence length: forward and
backward, attention counted in full (causal kernels skip half; the convention does not). Activation recomputation is
not counted. MFU = tokens/s x FLOPs per token / peak, the peak being the GPU's dense bf16 tensor throughput (H100 and
H200 SXM: 989 TFLOP/s; others: pass ``--peak-tflops``).

Usage (GPU):  python scripts/bench_mfu.py --sizes 350m 1b [--backend both|lightning|trl] [--variants baseline best ...]
              [--seq-len 2048] [--batch 8] [--steps 15] [--warmup 5] [--deadline-s 480]
CPU smoke (checks the script; the MFU it prints means nothing):
              python scripts/bench_mfu.py --sizes tiny --device cpu      # every variant the CPU can run
              python scripts/bench_mfu.py --smoke                        # the baseline only, both backends
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
}
BATCH = {"125m": 8, "350m": 8, "1b": 4, "tiny": 2}
"""Rows per step by size (issue 20's baseline: 8 at 350M, 4 at 1B)."""
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts), matched against ``torch.cuda.get_device_name``."""
VOCAB = 32000

DS2 = {"strategy": "deepspeed_stage_2", "precision": "bf16-mixed"}
VARIANTS: dict[str, dict] = {
    "baseline": DS2,
    "best": {"strategy": "auto", "precision": "bf16-mixed", "liger": True, "compile": True, "fused_optimizer": True},
    "plain": {"strategy": "auto", "precision": "bf16-mixed"},
    "liger": {**DS2, "liger": True},
    "compile": {**DS2, "compile": True},
    "fused": {**DS2, "fused_optimizer": True},
    "bf16-true": {"strategy": "auto", "precision": "bf16-true"},
}
"""``trainer`` fields of each variant, on the GPU."""
LIGHTNING_ONLY = {"fused", "bf16-true"}


def cpu_fields(fields: dict) -> dict | None:
    """A variant's fields on the CPU (the smoke mode): no DeepSpeed for Lightning, fp32, no Liger; ``None`` when
    nothing of it is left to run there."""
    if fields.get("liger") and not (fields.get("compile") or fields.get("fused_optimizer")):
        return None
    out = {**fields, "strategy": "auto", "precision": "32-true", "liger": False}
    return out


def make_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = SIZES[args.size]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, max_position_embeddings=args.seq_len, num_key_value_heads=shape["num_attention_heads"],
                         attn_implementation=args.attn, use_cache=False, **shape)
    with torch.device("cuda" if args.device == "gpu" else "cpu"):  # built where it trains: a 1B init on CPU takes s
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


def lightning_arm(args, data, fields: dict) -> tuple[list[float], float]:
    import lightning as L

    from llm_limits.trainers.backends.hooks import HookDriver
    from llm_limits.trainers.backends.lightning import CausalLMModule, build_trainer
    from llm_limits.trainers.build import kernels
    from llm_limits.trainers.build.data import RowDataset
    from llm_limits.trainers.recipe.schema import TrainerSpec

    model = make_model(args)
    steps = args.steps + args.warmup
    spec = TrainerSpec(max_steps=steps, lr=1e-4, lr_schedule="constant", grad_clip=1.0, log_every=steps,
                       accelerator=args.device, devices=1, **fields)
    hooks = HookDriver([])
    if spec.liger:  # as LightningBackend.fit: no mitigation reads the logits, so the fused cross-entropy too
        kernels.apply_liger(model, fused_linear_cross_entropy=True)
    module = CausalLMModule(model, hooks, spec)
    loader = torch.utils.data.DataLoader(RowDataset(data), batch_size=args.batch, shuffle=False)
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync()
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as d:
        trainer = build_trainer(spec, Path(d), logger=None, has_val=False, progress=False)
        trainer.callbacks.append(Stamp())
        with kernels.compiled_forward(module.model, enabled=spec.compile):
            trainer.fit(module, train_dataloaders=loader)
    return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:], flops_per_token(model, args.seq_len)


def trl_arm(args, data, fields: dict) -> tuple[list[float], float]:
    from datasets import Dataset
    from transformers import TrainerCallback

    from llm_limits.trainers.backends.trl import ensure_distributed_env, sft_trainer, training_kwargs
    from llm_limits.trainers.build import kernels
    from llm_limits.trainers.build.tokenizers import build_char_tokenizer
    from llm_limits.trainers.recipe.schema import validate_recipe

    steps = args.steps + args.warmup
    rec = validate_recipe({
        "name": "bench-mfu", "model": {"model_type": "llama"},
        "data": {"task": "chains", "seq_len": args.seq_len, "batch_size": args.batch, "val_fraction": 0.0},
        "trainer": {"backend": "trl", "trl": {"algorithm": "sft"}, "max_steps": steps, "lr": 1e-4,
                    "lr_schedule": "constant", "grad_clip": 1.0, "log_every": steps, "accelerator": args.device,
                    **fields},
        "mitigations": [], "evals": [],
    }, check_hardware=False).recipe
    if rec.trainer.strategy.startswith("deepspeed"):
        ensure_distributed_env()
    model = make_model(args)
    if rec.trainer.liger:  # as the TRL backend: layer kernels; the loss goes through TRL's chunked LM head
        kernels.apply_liger(model, fused_linear_cross_entropy=False)
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
        with kernels.compiled_forward(model, enabled=rec.trainer.compile):
            trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])][args.warmup:], flops_per_token(model, args.seq_len)


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device == "cpu":
        return 1.0  # the CPU smoke mode: the MFU it prints means nothing
    if not torch.cuda.is_available():
        raise SystemExit("bench_mfu: no CUDA GPU; run it on one, or in the smoke mode (--sizes tiny --device cpu)")
    name = torch.cuda.get_device_name(0)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    raise SystemExit(f"bench_mfu: no known bf16 peak for {name!r}; pass --peak-tflops")


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated by torch; on the CPU, the process's peak resident memory (what the smoke mode has)."""
    if device == "gpu":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_arm(args) -> None:
    """One arm, in this process: prints its line and, for the parent, one JSON line."""
    backend, variant = args.arm.split(":")
    fields = VARIANTS[variant] if args.device == "gpu" else cpu_fields(VARIANTS[variant])
    if args.device == "cpu":
        torch.set_num_threads(1)
    args.batch = args.batch or BATCH[args.size]
    peak = peak_tflops(args)
    device = torch.cuda.get_device_name(0) if args.device == "gpu" else platform.machine()
    print(f"device: {device}; peak {peak:g} TFLOP/s; torch {torch.__version__}", flush=True)
    arm = {"lightning": lightning_arm, "trl": trl_arm}[backend]
    times, fpt = arm(args, rows(args), fields)
    step = statistics.median(times)
    tokens_s = args.batch * args.seq_len / step
    mfu = tokens_s * fpt / (peak * 1e12)
    mem = peak_memory_gib(args.device)
    params = (fpt - 12.0 * SIZES[args.size]["num_hidden_layers"] * SIZES[args.size]["hidden_size"] * args.seq_len) / 6
    switches = ", ".join(f"{k} {v}" for k, v in fields.items())
    print(f"{backend} backend ({variant}: {switches}): {args.size}, {params / 1e6:.1f}M matmul parameters, batch "
          f"{args.batch} x {args.seq_len}, {step * 1000:.1f} ms/step (median of {len(times)}), {tokens_s:,.0f} tokens/s, "
          f"{fpt / 1e9:.2f} GFLOP/token, MFU {mfu:.1%}, peak memory {mem:.2f} GiB", flush=True)
    print("ARM " + json.dumps({"size": args.size, "backend": backend, "variant": variant, "ms_step": step * 1000,
                               "tokens_s": tokens_s, "mfu": mfu, "peak_gib": mem}), flush=True)


def arms_of(args) -> list[tuple[str, str, str]]:
    """(size, backend, variant) in run order: per size, the variants in ``--variants`` order, both backends each."""
    out = []
    backends = ["lightning", "trl"] if args.backend == "both" else [args.backend]
    for size in args.sizes:
        for variant in args.variants:
            for backend in backends:
                if backend == "trl" and variant in LIGHTNING_ONLY:
                    continue
                if args.device == "cpu" and cpu_fields(VARIANTS[variant]) is None:
                    continue  # Liger alone: nothing the CPU can run
                out.append((size, backend, variant))
    return out


def table(results: list[dict]) -> str:
    lines = ["| size | backend | variant | ms/step | tokens/s | MFU | peak memory (GiB) |", "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['backend']} | {r['variant']} | {r['error']} | | | |")
        else:
            lines.append(f"| {r['size']} | {r['backend']} | {r['variant']} | {r['ms_step']:.1f} | {r['tokens_s']:,.0f} | "
                         f"{r['mfu']:.1%} | {r['peak_gib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None)
    ap.add_argument("--size", choices=list(SIZES), default=None, help="one size (the same as --sizes SIZE)")
    ap.add_argument("--backend", choices=["both", "lightning", "trl"], default="both")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=[v for v in VARIANTS if v != "bf16-true"])
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=None, help="rows per step (default: 8 at 350m, 4 at 1b)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=5, help="untimed first steps (torch.compile compiles in them)")
    ap.add_argument("--attn", default="sdpa", help="model.attn_implementation: sdpa, eager, flash_attention_2")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--deadline-s", type=float, default=0, help="start no arm after this many seconds (0: none)")
    ap.add_argument("--arm-timeout-s", type=float, default=240, help="an arm running longer is stopped")
    ap.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    ap.add_argument("--smoke", action="store_true", help="the CPU smoke of the baseline: --sizes tiny --device cpu "
                    "--variants baseline")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # BACKEND:VARIANT, run by the parent
    args = ap.parse_args()
    args.sizes = args.sizes or ([args.size] if args.size else ["350m"])
    if args.smoke:
        args.sizes, args.device, args.variants = ["tiny"], "cpu", ["baseline"]
    args.vocab = 256 if args.sizes == ["tiny"] else VOCAB
    if args.device == "cpu" and args.sizes == ["tiny"]:
        args.seq_len, args.steps, args.warmup = min(args.seq_len, 64), min(args.steps, 3), min(args.warmup, 1)
    if args.arm:
        args.size = args.sizes[0]
        run_arm(args)
        return
    peak_tflops(args)  # no GPU: say so before starting any arm
    print(f"command: python scripts/bench_mfu.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    t0, results = time.perf_counter(), []
    for size, backend, variant in arms_of(args):
        row = {"size": size, "backend": backend, "variant": variant}
        if args.deadline_s and time.perf_counter() - t0 > args.deadline_s:
            results.append({**row, "error": "not run (deadline)"})
            continue
        # One process per arm: each backend sets up (and leaves behind) its own process group, DeepSpeed engine,
        # compiled graphs and allocator state; a second arm in the same process would start from the first's.
        cmd = [sys.executable, __file__, "--arm", f"{backend}:{variant}", "--sizes", size, "--device", args.device,
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup), "--attn", args.attn]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.arm_timeout_s)
        except subprocess.TimeoutExpired:
            results.append({**row, "error": f"timed out after {args.arm_timeout_s:g} s"})
            print(f"{backend} backend ({variant}): {size}: timed out after {args.arm_timeout_s:g} s", flush=True)
            continue
        out = [s for s in proc.stdout.splitlines() if s.startswith("ARM ")]
        for s in proc.stdout.splitlines():
            if not s.startswith("ARM "):
                print(s, flush=True)
        if proc.returncode or not out:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            results.append({**row, "error": f"failed: {tail}"})
            print(f"{backend} backend ({variant}): {size}: failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        results.append(json.loads(out[-1][4:]))
    print(f"\n{table(results)}\n\n({time.perf_counter() - t0:.0f} s for {len(results)} arms)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    if any("error" in r and "failed" in r["error"] for r in results):
        raise SystemExit("bench_mfu: an arm failed (its error is above)")


if __name__ == "__main__":
    main()
