"""Domain pieces the trainer injects into mitigations (docs/architecture.md: mitigations never import evals).

:func:`injected_for` is the one entry point: ``bounded_retrieval`` gets its retriever and renderers from
:mod:`trainers.retrieval`; ``process_rewards`` gets the callables below.

``process_rewards`` needs three callables, all built here from the ``chains`` task of ``evals/tasks`` (or a trained
process reward model):

- ``outcome(prompts, completions, **columns) -> list[float]``: 1.0 when the completion's final answer is the gold one;
- ``score_steps(prompts, completions, **columns) -> list[list[float]]``: one score in [0, 1] per step end (each step,
  then the answer), from the exact step verifier or from a PRM;
- ``step_ends(completion) -> list[int]``: the character offsets those scores belong to.

``columns`` are the dataset columns TRL passes to reward functions: ``question``, ``gold_answer``, ``modulus``,
``task`` (see :func:`trainers.trl_backend.grpo_rows`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from llm_limits.evals.tasks.chains import TASK as CHAIN_TASK
from llm_limits.evals.tasks.chains import answer_follows, check_answer, parse_completion, step_end_offsets, verify_steps
from llm_limits.trainers.recipe.errors import UserError


def chain_outcome(prompts: Sequence[str], completions: Sequence[str], gold_answer: Sequence[str], **_: Any) -> list[float]:
    """1.0 per completion whose parsed final answer equals the gold answer, else 0.0.

    >>> chain_outcome(["Q:3+4\\n"] * 2, ["3+4=7\\nA:7", "3+4=7\\nA:8"], gold_answer=["7", "7"])
    [1.0, 0.0]
    """
    return [float(check_answer(parse_completion(c)[1], g)) for c, g in zip(completions, gold_answer)]


def chain_step_scores(
    prompts: Sequence[str], completions: Sequence[str], question: Sequence[str], gold_answer: Sequence[str],
    modulus: Sequence[int], prefix: Sequence[str] | None = None, **_: Any,
) -> list[list[float]]:
    """Exact step scores, each judged given the chain written before it: 1.0 per step the verifier accepts, then the
    answer line (when there is one) as a last step: 1.0 when it follows from the written chain
    (:func:`~evals.tasks.chains.answer_follows`). ``prefix`` holds the steps a prompt already wrote (partial-chain
    prompts, ``"\\n"``-separated): the completion is verified as their continuation, so a step must start from the
    value written before it, right or wrong. With clean prompts an all-valid chain ends at the gold answer; the gold
    answer itself is the outcome reward's business (:func:`chain_outcome`).

    >>> chain_step_scores(["Q:3+4*2\\n"], ["3+4=7\\n7*2=5\\nA:5"], question=["3+4*2"], gold_answer=["4"], modulus=[10])
    [[1.0, 0.0, 1.0]]
    >>> chain_step_scores(["Q:3+4*2\\n3+4=8\\n"], ["8*2=6\\nA:6", "7*2=4\\nA:4"], question=["3+4*2"] * 2,
    ...                   gold_answer=["4"] * 2, modulus=[10] * 2, prefix=["3+4=8"] * 2)  # faithful vs shortcut
    [[1.0, 1.0], [0.0, 1.0]]
    """
    out = []
    prefixes = prefix if prefix is not None else [""] * len(completions)
    for c, q, g, m, pre in zip(completions, question, gold_answer, modulus, prefixes):
        steps, answer = parse_completion(c)
        written = [st for st in pre.split("\n") if st.strip()]
        scores = [float(v) for v in verify_steps(q, written + steps, int(m))[len(written):]]
        if answer is not None:
            scores.append(float(answer_follows(q, written + steps, answer, int(m))))
        out.append(scores)
    return out


def injected_for(
    name: str, config: Any, *, where: str, task: str | None, device: str = "cpu", records: list[dict[str, Any]] | None = None,
    tokenizer: Any = None, data_params: dict[str, Any] | None = None, index_dir: Path | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``MITIGATIONS[name](config, **kwargs)``; ``task`` is the training records' ``task``
    field and ``records`` the records (``None`` when there is no training data, e.g. ``llm-limits eval``). Bad
    combinations are one-line :class:`UserError`s naming ``where`` (``mitigations[0]``)."""
    if not getattr(config, "enabled", True):
        return {}
    if name == "bounded_retrieval":
        if records is None:
            return {}  # nothing to build: the mitigation only shapes training data
        from llm_limits.trainers.build.retrieval import retrieval_injected

        return retrieval_injected(config, records=records, tokenizer=tokenizer, data_params=data_params, where=where,
                                  index_dir=index_dir)
    if name != "process_rewards":
        return {}
    kwargs: dict[str, Any] = {"outcome": chain_outcome, "step_ends": step_end_offsets}
    if config.scorer == "prm":
        path = Path(config.prm_path or "")
        if not (path / "config.json").is_file():
            raise UserError(f"{where}.prm_path: {config.prm_path} is not a model directory (expected config.json inside; "
                            "train one with trainer.trl.algorithm: prm)")
        from llm_limits.evals.lm import PRMScorer

        scorer = PRMScorer(str(path), device=device)
        kwargs["score_steps"] = lambda prompts, completions, **_: scorer.score(list(prompts), list(completions))
    else:
        if task is not None and task != CHAIN_TASK and config.reward != "outcome":
            raise UserError(
                f"{where}.scorer: the exact verifier checks {CHAIN_TASK} steps only (the data is {task!r}); "
                "use scorer: prm with a trained PRM, or reward: outcome"
            )
        kwargs["score_steps"] = chain_step_scores
    return kwargs
