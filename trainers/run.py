"""The run lifecycle: validate -> build -> eval before -> train -> eval after -> report.

Everything that can fail on the user's input (recipe, data, model, eval/model fit) fails in :func:`build`, before the
run directory exists, so a bad recipe never writes into a run directory. Under DDP every rank builds the same model
and data; only rank 0 creates the run directory, runs the evals and writes the report (evals are never duplicated).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import yaml

from llm_limits.evals import EVALS
from llm_limits.evals.base import Eval, EvalResult, compare
from llm_limits.mitigations import MITIGATIONS
from llm_limits.mitigations.base import Mitigation
from llm_limits.trainers.backends import BACKENDS, Backend, HookDriver
from llm_limits.trainers.backends.base import ADAPTER_DIR, MODEL_DIR, is_rank_zero  # noqa: F401  (the run directory's layout)
from llm_limits.trainers.build import vlm
from llm_limits.trainers.build.models import apply_lora, build_model, count_parameters
from llm_limits.trainers.build.pretrained import with_path
from llm_limits.trainers.build.retrieval import INDEX_DIR
from llm_limits.trainers.build.rewards import injected_for
from llm_limits.trainers.build.tokenizers import load_tokenizer
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import ResolvedRecipe, load_recipe
from llm_limits.trainers.results.report import plot_eval, plot_grids, plot_series, plot_training, read_results, render_markdown, write_atomic, write_results
from llm_limits.trainers.results.tracking import Tracker

RUN_DIR_ENV = "LLM_LIMITS_RUN_DIR"
"""Set by rank 0 before training so processes a launcher starts later write into the same run directory."""

RECIPE_FILE = "recipe.yaml"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"


@dataclasses.dataclass
class Built:
    """What :func:`build` makes from a recipe: everything a backend needs, nothing written to disk yet."""

    resolved: ResolvedRecipe
    tokenizer: Any
    model: torch.nn.Module
    mitigations: list[Mitigation]
    evals: list[tuple[str, Eval, list[str]]]
    """(result key, eval, when) in recipe order; the key is the eval name, suffixed when a name repeats."""
    backend: Backend
    """The recipe's ``trainer.backend``: it built the data and will fit and save (:mod:`~llm_limits.trainers.backends`)."""


def build(
    resolved: ResolvedRecipe, *, checkpoint: str | None = None, with_data: bool = True, index_dir: Path | None = None
) -> tuple[Built, Any, Any]:
    """Tokenizer, model (+LoRA), mitigations, evals and the training data: Lightning data loaders, or the TRL
    backend's datasets (``trainer.backend: trl``, after the mitigations' ``transform_records``). ``index_dir``: a
    run's saved retrieval index to load rather than rebuild (``--resume``). Raises :class:`UserError` on bad input,
    always naming the recipe file."""
    try:
        return _build(resolved, checkpoint=checkpoint, with_data=with_data, index_dir=index_dir)
    except UserError as e:
        if str(e).startswith(f"{resolved.source}: "):
            raise
        raise UserError(f"{resolved.source}: {e}") from None


def _build(resolved: ResolvedRecipe, *, checkpoint: str | None, with_data: bool, index_dir: Path | None) -> tuple[Built, Any, Any]:
    r = resolved.recipe
    L.seed_everything(r.seed, workers=True, verbose=False)
    _check_data_root(resolved)
    trl = r.trainer.backend == "trl"
    m = with_path(r.model)  # model.pretrained: its directory in the cache, pulled on first use
    tok_path = m.tokenizer.path or (m.path if m.tokenizer.kind == "pretrained" else None)
    tokenizer = load_tokenizer(m.tokenizer.kind, tok_path, alphabet=m.tokenizer.alphabet, trust_remote_code=m.trust_remote_code)
    vision = vlm.is_vlm_recipe(m) if checkpoint is None else vlm.is_vlm_recipe(m.model_copy(update={"model_type": None, "path": checkpoint}))
    _check_vision_fit(r, vision)
    if vision:
        vlm.add_image_token(tokenizer)
        model = vlm.build_vlm(m, tokenizer, checkpoint=checkpoint)
        vlm.freeze(model, m.freeze)
    else:
        model = build_model(
            m.model_type if checkpoint is None else None,
            m.config if checkpoint is None else {},
            m.path if checkpoint is None else checkpoint,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            dtype=m.dtype,
            trust_remote_code=m.trust_remote_code,
            attn_implementation=m.attn_implementation,
            field_prefix="model" if checkpoint is None else "--checkpoint",
            head="token_classification" if trl and r.trainer.trl.algorithm == "prm" else "causal_lm",
        )
    if m.gradient_checkpointing:
        enable_checkpointing(model)
    if m.lora is not None and checkpoint is None:
        model = apply_lora(model, m.lora.r, m.lora.alpha, m.lora.dropout, m.lora.target_modules)
    backend = BACKENDS[r.trainer.backend](r)
    data: tuple[Any, Any] = (None, None)
    records = backend.load_records(r, tokenizer, vision=vision) if with_data else None
    task = records[0].get("task") if records else None
    mitigations = [
        MITIGATIONS[name](config, **injected_for(name, config, where=f"mitigations[{i}]", task=task, records=records,
                                                 tokenizer=tokenizer, data_params=r.data.params, index_dir=index_dir))
        for i, (name, config) in enumerate(resolved.mitigations)
    ]
    for i, mit in enumerate(mitigations):
        if mit.enabled and mit.limit == "multimodal" and not vision:
            raise UserError(f"mitigations[{i}]: {mit.name} aligns images with text: it needs a vision-language model "
                            "(model.model_type: llava) and an image task (data.task: digits, shapes or image_folder)")
    for i, mit in enumerate(mitigations):
        if not mit.enabled or type(mit).transform_records is Mitigation.transform_records:
            continue
        if not trl and not vision:
            raise UserError(f"mitigations[{i}]: {mit.name} builds prompt/completion training data: it needs "
                            "trainer.backend: trl")
        if records is not None:
            try:
                records = mit.transform_records(records, seed=r.seed)
            except ValueError as e:
                raise UserError(f"mitigations[{i}]: {mit.name}: {e}") from None
    if with_data:
        data = backend.build_data(r, tokenizer, model, records, mitigations, vision=vision)
    if trl and r.trainer.trl.algorithm == "grpo" and not any(m.enabled and m.reward_fns() for m in mitigations):
        raise UserError("mitigations: GRPO needs a reward: add an enabled mitigation that provides one "
                        "(e.g. - name: process_rewards)")
    evals = []
    seen: dict[str, int] = {}
    for i, (name, config, when) in enumerate(resolved.evals):
        ev = EVALS[name](config)
        try:
            ev.check(model, tokenizer)
        except ValueError as e:
            raise UserError(f"evals[{i}]: {e}") from None
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}.{seen[name]}"
        evals.append((key, ev, when))
    return Built(resolved, tokenizer, model, mitigations, evals, backend), *data


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing on every decoder layer, non-reentrant; the KV cache off (it only serves
    generation, and transformers refuses it with checkpointing while training)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.config.use_cache = False


def _check_data_root(resolved: ResolvedRecipe) -> None:
    """``data.root`` set: every data file the recipe names (``data.path``, ``data.params.root``, each eval's ``path``)
    must resolve inside it (symlinks followed), so a recipe from another hand cannot read outside the declared folder."""
    r = resolved.recipe
    if r.data.root is None:
        return
    root = Path(r.data.root).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"data.root: {r.data.root} is not a directory")
    named = [("data.path", r.data.path), ("data.params.root", r.data.params.get("root"))]
    named += [(f"evals[{i}].path", getattr(config, "path", None)) for i, (_, config, _) in enumerate(resolved.evals)]
    for field, value in named:
        if value is None:
            continue
        target = Path(str(value)).expanduser()
        target = (target if target.is_absolute() else Path.cwd() / target).resolve()
        if not target.is_relative_to(root):
            raise UserError(f"{field}: {value} is outside data.root {root}")


def _check_vision_fit(r: Any, vision: bool) -> None:
    """A vision-language model needs an image task and vice versa; freeze controls and stages need one."""
    image_task = r.data.task in vlm.IMAGE_TASKS
    if vision and not image_task and r.data.path is None:
        raise UserError(f"data.task: {r.data.task!r} has no images; a vision-language model trains on one of "
                        f"{', '.join(vlm.IMAGE_TASKS)}")
    if not vision and image_task:
        raise UserError(f"data.task: {r.data.task!r} is an image task; it needs a vision-language model "
                        "(model.model_type: llava, or a model.path to a LLaVA-style checkpoint)")
    if not vision and r.model.freeze:
        raise UserError("model.freeze: only vision-language models have parts to freeze (model.model_type: llava)")
    if not vision and r.trainer.stages:
        raise UserError("trainer.stages: only vision-language models train in stages (model.model_type: llava)")
    if vision and r.trainer.backend != "lightning":
        raise UserError("trainer.backend: vision-language models train with the lightning backend")
    for i, stage in enumerate(r.trainer.stages):
        both = sorted(set(stage.train) & set(r.model.freeze))
        if both:
            raise UserError(f"trainer.stages[{i}].train: {both[0]} is frozen for the whole run by model.freeze")


def new_run_dir(output_dir: str, name: str) -> Path:
    """``<output_dir>/<name>/<YYYYmmdd-HHMMSS>``, suffixed if that exists (never reuses a directory)."""
    base = Path(output_dir) / name / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


_STARTED = __import__("time").time()
"""When this process imported the run module (the ranks of one launch start within seconds of each other)."""

LAUNCH_WAIT_S = 600.0
"""How long a rank started by torchrun waits for rank 0 to name the run directory (rank 0 builds first)."""


def _launch_file(root: Path) -> Path | None:
    """Where rank 0 of a torchrun / deepspeed-launcher job writes the run directory for the other ranks (keyed by
    the job's rendezvous address, so two jobs of one recipe do not mix); ``None`` outside a multi-process launch."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return None
    key = f"{os.environ.get('MASTER_ADDR', 'local')}-{os.environ.get('MASTER_PORT', '0')}".replace("/", "_")
    return root / f".launch-{key}"


def announce_run_dir(root: Path, run_dir: Path) -> None:
    """Rank 0: tell the ranks the launcher started beside it which run directory to share (checkpoint shards of a
    ZeRO run must land in one folder)."""
    f = _launch_file(root)
    if f is not None:
        write_atomic(f, str(run_dir.resolve()))


def await_run_dir(root: Path) -> Path:
    """Ranks > 0: the run directory rank 0 announced for this launch (written after this process started)."""
    import time

    f = _launch_file(root)
    if f is None:
        return new_run_dir(str(root.parent), root.name)
    started = _STARTED - 30.0  # ranks start together; an older file is a previous launch's
    deadline = time.time() + LAUNCH_WAIT_S
    while time.time() < deadline:
        if f.is_file() and f.stat().st_mtime >= started:
            return Path(f.read_text().strip())
        time.sleep(0.2)
    raise UserError(f"{f}: rank 0 did not name a run directory within {LAUNCH_WAIT_S:.0f} s (did it fail? see its log)")


def limit_key(spec_limit: str, eval_key: str, all_limits: list[str]) -> str:
    """The summary key of an eval's limit: the limit's name (``context``) when one eval measures it, else
    ``context.<eval>``."""
    if not spec_limit:
        return eval_key
    return spec_limit if all_limits.count(spec_limit) == 1 else f"{spec_limit}.{eval_key}"


def run_evals(
    built: Built, model: torch.nn.Module, phase: str, *, progress: bool, on_result: Callable[[str, EvalResult], None]
) -> dict[str, EvalResult]:
    """Run every eval whose ``when`` includes ``phase`` on ``model``; ``on_result`` sees each result as it lands."""
    out = {}
    device = str(next(model.parameters()).device)
    for key, ev, when in built.evals:
        if phase not in when:
            continue
        res = ev.run(model, built.tokenizer, device=device, progress=progress)
        out[key] = res
        on_result(key, res)
    return out


def launch_command(recipe_path: str | None, overrides: list[str], resume: str | None, *, cli_args: list[str]) -> list[str] | None:
    """The launcher command that re-runs this ``train`` in ``trainer.devices x trainer.num_nodes`` processes, or
    ``None`` to train in this process (:mod:`trainers.launch`). Validates the recipe (schema and this machine's
    devices) first, so a bad recipe or too many devices fail here, before any process starts."""
    from llm_limits.trainers import launch

    if launch.under_launcher():
        return None
    source = Path(resume) / RECIPE_FILE if resume is not None else recipe_path
    if resume is not None and not Path(source).is_file():
        return None  # train() names the problem
    resolved = load_recipe(source, overrides)
    return launch.command(resolved.recipe.trainer, cli_args)


def train(
    recipe_path: str, overrides: list[str] | None = None, *, resume: str | None = None, progress: bool = True,
    echo: Callable[[str], None] = print, run_dir: str | None = None,
) -> Path:
    """``llm-limits train``: the whole lifecycle. Returns the run directory (``run_dir`` when given: it must not hold
    a run yet; an ablation uses it to put each arm where it will look for it).

    ``LLM_LIMITS_RUN_DIR`` (set while the run trains, for the ranks Lightning's launcher starts) is restored when the
    run ends: left behind in a process that trains again or launches torchrun (a test suite, a notebook), it sent
    rank 1 of the next launch into the previous run's directory, where its ZeRO shards were lost to the new run."""
    previous = os.environ.get(RUN_DIR_ENV)
    try:
        return _train(recipe_path, overrides, resume=resume, progress=progress, echo=echo, run_dir=run_dir)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def _train(
    recipe_path: str, overrides: list[str] | None, *, resume: str | None, progress: bool,
    echo: Callable[[str], None], run_dir: str | None,
) -> Path:
    fixed_dir = run_dir
    # --- validate -----------------------------------------------------------------------------------------------
    if fixed_dir is not None and is_rank_zero() and Path(fixed_dir).exists() and any(Path(fixed_dir).iterdir()):
        raise UserError(f"--run-dir {fixed_dir}: already holds files (use --resume to continue a run there)")
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / RECIPE_FILE).is_file():
            raise UserError(f"--resume {resume}: not a run directory (expected {RECIPE_FILE} inside)")
        resolved = load_recipe(run_dir / RECIPE_FILE, overrides)
        resolved.source = str(run_dir / RECIPE_FILE)
    else:
        resolved = load_recipe(recipe_path, overrides)
        run_dir = None  # made below, once everything has been built
    r = resolved.recipe
    # --- build (all user errors surface here, before anything is written) ----------------------------------------
    built, train_data, val_data = build(resolved, index_dir=(run_dir / INDEX_DIR) if run_dir is not None else None)
    # Every mitigation's setup, exactly once, before the optimizer exists and before the evals measure the model.
    model, hooks = HookDriver.prepare(built.model, built.mitigations, built.tokenizer, max_tokens=r.trainer.max_tokens)
    built.model = model
    built.backend.check(hooks)
    rank0 = is_rank_zero()

    if run_dir is None:
        env_dir = os.environ.get(RUN_DIR_ENV)
        if env_dir and not rank0:
            run_dir = Path(env_dir)
        elif fixed_dir is not None:
            run_dir = Path(fixed_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        elif rank0:
            run_dir = new_run_dir(r.output_dir, r.name)
            announce_run_dir(Path(r.output_dir) / r.name, run_dir)
        else:
            run_dir = await_run_dir(Path(r.output_dir) / r.name)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # ranks that Lightning launches later inherit it
    results_path = run_dir / RESULTS_FILE
    results = read_results(results_path) if (resume and results_path.exists()) else _new_results(resolved, run_dir)

    tracker = None
    if rank0:
        write_atomic(run_dir / RECIPE_FILE, _recipe_text(resolved))
        save_artifacts(built.mitigations, run_dir)
        tracker = Tracker(r.tracking.wandb, run_dir, r.name, resolved.to_dict())
        results["wandb"] = {"mode": tracker.mode, "dir": tracker.files_dir}
        trainable, total = count_parameters(model)
        results["model"] = {"trainable_params": trainable, "total_params": total, "type": type(model).__name__}
        echo(f"run directory: {run_dir}")
        echo(f"model: {type(model).__name__}, {total:,} parameters ({trainable:,} trainable)")
        for m in built.mitigations:  # what a data-building mitigation made of the records (kinds, tokens)
            if m.enabled and getattr(m, "stats", None):
                results.setdefault("data", {})[m.name] = dict(m.stats)
                echo(f"data: {m.name}: " + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in m.stats.items()))
    limits = [ev.spec().limit for _, ev, _ in built.evals]

    # --- eval before ----------------------------------------------------------------------------------------------
    if rank0 and not any(e.get("before") for e in results["evals"].values()):
        def on_before(key: str, res: EvalResult) -> None:
            results["evals"].setdefault(key, {"eval": res.eval, "limit_key": limit_key(res.spec.limit, key, limits)})
            results["evals"][key]["before"] = res.to_dict()
            tracker.log_eval(key, res, "before", step=0)
            echo(f"eval before: {key}: limit {res.limit_value:g} {res.spec.limit_unit}")

        run_evals(built, model, "before", progress=progress, on_result=on_before)
        write_results(results_path, results)

    # --- train, save ----------------------------------------------------------------------------------------------
    fitted = built.backend.fit(built, hooks, (train_data, val_data), run_dir, tracker, resume=bool(resume),
                               progress=progress, echo=echo)
    model = built.backend.save(fitted, built, run_dir)  # every rank saves its part; rank 0 gets the whole model back
    if model is None:
        return run_dir
    stats, history = fitted.stats, fitted.history

    # --- eval after, report -----------------------------------------------------------------------------------------
    results["train"] = stats
    model.eval()
    step = int(stats["steps"])

    def on_after(key: str, res: EvalResult) -> None:
        entry = results["evals"].setdefault(key, {"eval": res.eval, "limit_key": limit_key(res.spec.limit, key, limits)})
        entry["after"] = res.to_dict()
        if entry.get("before"):
            entry["compare"] = _jsonable(compare(EvalResult.from_dict(entry["before"]), res))
        tracker.log_eval(key, res, "after", step=step)
        echo(f"eval after:  {key}: limit {res.limit_value:g} {res.spec.limit_unit}")

    run_evals(built, model, "after", progress=progress, on_result=on_after)
    finish_report(results, run_dir, history=history)
    tracker.summarize(
        {e["limit_key"]: e.get("compare", _phase_limits(e)) for e in results["evals"].values()},
        {"train/wall_s": stats["wall_s"], "train/tokens_seen": stats["tokens_seen"]},
    )
    tracker.finish()
    if fixed_dir is None:
        point_latest(run_dir)
        f = _launch_file(Path(r.output_dir) / r.name)
        if f is not None:
            f.unlink(missing_ok=True)
    return run_dir


def save_artifacts(mitigations: list[Mitigation], run_dir: Path) -> None:
    """Write what the trainer built for the mitigations (a retrieval index: ``artifacts`` name -> ``save(dir)``) into
    the run directory, once; a resumed run already has them and loads them (:func:`build`'s ``index_dir``)."""
    for m in mitigations:
        for name, save in (m.injected.get("artifacts") or {}).items():
            target = run_dir / name
            if not target.exists():
                save(target)


LATEST = "latest"
"""``<output_dir>/<name>/latest`` points at the newest finished run, so a recipe can start from another's model:
``model.path: runs/reasoning-tiny-sft/latest/model``."""


def point_latest(run_dir: Path) -> None:
    """Point ``<run_dir's parent>/latest`` at ``run_dir`` (a relative symlink, swapped in atomically)."""
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:  # a file system without symlinks: the timestamped directory is still there
        return


def evaluate(
    target: str, overrides: list[str] | None = None, *, checkpoint: str | None = None, progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """``llm-limits eval``: the recipe's evals alone, on a fresh model, a run's trained model or a checkpoint.

    ``target`` is a recipe file or a run directory; for a run directory the model defaults to its trained ``model/``.
    Results go to ``<run_dir>/evals/<time>/`` (a run directory) or ``<output_dir>/<name>/eval-<time>/`` (a recipe).
    """
    tpath = Path(target)
    if tpath.is_dir():
        if not (tpath / RECIPE_FILE).is_file():
            raise UserError(f"{target}: not a run directory (expected {RECIPE_FILE} inside) nor a recipe file")
        resolved = load_recipe(tpath / RECIPE_FILE, overrides)
        if checkpoint is None and (tpath / MODEL_DIR).is_dir():
            checkpoint = str(tpath / MODEL_DIR)
        out_root = tpath / "evals"
    else:
        resolved = load_recipe(target, overrides)
        out_root = Path(resolved.recipe.output_dir) / resolved.recipe.name
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise UserError(f"--checkpoint {checkpoint}: expected a model directory saved by a run (its model/ folder)")
    built, _, _ = build(resolved, checkpoint=checkpoint, with_data=False)
    if not built.evals:
        raise UserError(f"{resolved.source}: evals: the recipe lists no evals to run")
    out_dir = out_root / f"eval-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    while out_dir.exists():
        out_dir = out_dir.with_name(out_dir.name + "-b")
    results = _new_results(resolved, out_dir)
    results["checkpoint"] = checkpoint
    limits = [ev.spec().limit for _, ev, _ in built.evals]
    phase = "after" if checkpoint else "before"

    def on_result(key: str, res: EvalResult) -> None:
        results["evals"][key] = {"eval": res.eval, "limit_key": limit_key(res.spec.limit, key, limits), phase: res.to_dict()}
        echo(f"eval: {key}: limit {res.limit_value:g} {res.spec.limit_unit}")

    if checkpoint is not None:
        _restore_mitigations(built, checkpoint)
    built.model.eval()
    # Every eval runs here whatever its `when`: `eval` is the command for measuring, and says which model it measured.
    for key, ev, _ in built.evals:
        on_result(key, ev.run(built.model, built.tokenizer, device=str(next(built.model.parameters()).device), progress=progress))
    out_dir.mkdir(parents=True)
    finish_report(results, out_dir, history=None)
    return out_dir


def _restore_mitigations(built: Built, checkpoint: str) -> None:
    """Re-apply the recipe's mitigations to a loaded checkpoint: ``setup`` re-creates what they add to the model (e.g.
    SSMax's attention function and its ``ssmax_s`` parameters), then the saved values of exactly those added tensors
    are loaded, since ``from_pretrained`` drops weights that the bare architecture does not have."""
    from safetensors.torch import load_file

    before = set(built.model.state_dict())
    built.model, _ = HookDriver.prepare(built.model, built.mitigations, built.tokenizer)
    added = set(built.model.state_dict()) - before
    if not added:
        return
    saved: dict[str, torch.Tensor] = {}
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        saved.update(load_file(str(f)))
    missing = sorted(added - set(saved))
    if missing:
        raise UserError(f"--checkpoint {checkpoint}: lacks {missing[0]} (and {len(missing) - 1} more) that the recipe's "
                        "mitigations add; was it trained with the same mitigations?")
    built.model.load_state_dict({k: saved[k] for k in added}, strict=False)


def finish_report(results: dict[str, Any], out_dir: Path, history: list[dict[str, float]] | None) -> None:
    """results.json, one PNG per eval (+ the training loss), report.md."""
    plots: dict[str, str] = {}
    for key, entry in results["evals"].items():
        name = f"{key}.png"
        plot_eval(key, entry, out_dir / "plots" / name)
        plots[key] = f"plots/{name}"
        phases = [p for p in ("before", "after") if entry.get(p)]
        for kind, draw in (("series", plot_series), ("grids", plot_grids)):
            for n in sorted({n for p in phases for n in entry[p].get(kind, {})}):
                per_phase = {p: entry[p][kind][n] for p in phases if n in entry[p].get(kind, {})}
                draw(f"{key}: {n}", per_phase, out_dir / "plots" / f"{key}.{n}.png")
                plots[f"{key}.{n}"] = f"plots/{key}.{n}.png"
    if history:
        plot_training(history, out_dir / "plots" / "training.png")
        plots["training"] = "plots/training.png"
    results["plots"] = plots
    write_results(out_dir / RESULTS_FILE, results)
    write_atomic(out_dir / REPORT_FILE, render_markdown(results, plots))


def _new_results(resolved: ResolvedRecipe, run_dir: Path) -> dict[str, Any]:
    return {
        "name": resolved.recipe.name,
        "run_dir": str(run_dir),
        "recipe_source": resolved.source,
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "mitigations": [{"name": n, **dataclasses.asdict(c)} for n, c in resolved.mitigations],
        "evals": {},
    }


def _recipe_text(resolved: ResolvedRecipe) -> str:
    head = f"# llm-limits train --resume <this run directory>   (resolved from {resolved.source})\n"
    return head + yaml.safe_dump(resolved.to_dict(), sort_keys=False)


def _phase_limits(entry: dict[str, Any]) -> dict[str, Any]:
    out = {}
    if entry.get("before"):
        out["limit_before"] = entry["before"]["limit_value"]
    if entry.get("after"):
        out["limit_after"] = entry["after"]["limit_value"]
    return out


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = dict(d)
    out["curve_delta"] = {(str(int(x)) if float(x).is_integer() else str(x)): v for x, v in d["curve_delta"].items()}
    return out
