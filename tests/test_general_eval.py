"""The ``general`` eval (issue #23): perplexity against a hand computation, lm-eval's own numbers before and after a
2-step run, the retained interval, the report's gain/cost lines and the shipped task's data."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from llm_limits.evals import EVALS
from llm_limits.evals.base import EvalResult, LimitSpec, compare, retained
from llm_limits.evals.general import CORPORA, SHIPPED_TASK, TASKS_DIR, General, GeneralConfig
from llm_limits.trainers.build.tokenizers import build_char_tokenizer
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")


class Bigram(torch.nn.Module):
    """A model whose next-token distribution depends on the current token only, through a fixed table of
    probabilities: its perplexity on a text can be worked out by hand."""

    def __init__(self, probs: torch.Tensor, n_positions: int = 64):
        super().__init__()
        self.register_buffer("logp", probs.log())  # [vocab, vocab]
        self.config = SimpleNamespace(max_position_embeddings=n_positions, model_type="bigram")
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.logp[input_ids])  # [batch, seq, vocab]


def bigram_ab() -> tuple[Bigram, object]:
    """Alphabet "ab": ids <pad> 0, <unk> 1, <bos> 2, <eos> 3, a 4, b 5. After "a": p(a) = 1/2, p(b) = 1/4, each special
    1/16; after "b": p(a) = 3/4, p(b) = 1/8, each special 1/32."""
    tok = build_char_tokenizer("ab")
    probs = torch.full((6, 6), 1 / 6)
    probs[4] = torch.tensor([1 / 16] * 4 + [1 / 2, 1 / 4])
    probs[5] = torch.tensor([1 / 32] * 4 + [3 / 4, 1 / 8])
    return Bigram(probs), tok


@pytest.mark.parametrize("batch_size", [1, 2])
def test_perplexity_equals_hand_computation_on_two_texts(tmp_path, batch_size):
    # "aab": p(a|a) = 1/2, p(b|a) = 1/4; "ba": p(a|b) = 3/4. Three predictions:
    # NLL = ln 2 + ln 4 + ln(4/3) = ln(32/3); perplexity = (32/3) ** (1/3) = 2.2013
    corpus = tmp_path / "two.jsonl"
    corpus.write_text('{"text": "aab"}\n{"text": "ba"}\n')
    model, tok = bigram_ab()
    ev = General(GeneralConfig(path=str(corpus), tasks=[], seq_len=8, batch_size=batch_size))
    ev.check(model, tok)
    res = ev.run(model, tok, progress=False)
    assert res.scalars["perplexity"] == pytest.approx((32 / 3) ** (1 / 3), rel=1e-6)
    assert round(res.scalars["perplexity"], 4) == 2.2013
    assert res.scalars["perplexity_tokens"] == 3 and res.scalars["perplexity_docs"] == 2
    assert res.curve == {0.0: pytest.approx(1 / res.scalars["perplexity"])}
    # per-document mean losses, weighted by their tokens: (ln 2 + ln 4) / 2 and ln(4/3)
    assert res.item_scores["perplexity"]["values"] == pytest.approx([math.log(8) / 2, math.log(4 / 3)])
    assert res.item_scores["perplexity"]["weights"] == [2, 1]


def test_seq_len_cuts_each_document(tmp_path):
    # seq_len 2 keeps "aa" of "aab" (p(a|a) = 1/2) and "ba" (3/4): perplexity = (2 * 4/3) ** (1/2)
    corpus = tmp_path / "two.jsonl"
    corpus.write_text('{"text": "aab"}\n{"text": "ba"}\n')
    model, tok = bigram_ab()
    res = General(GeneralConfig(path=str(corpus), tasks=[], seq_len=2)).run(model, tok, progress=False)
    assert res.scalars["perplexity"] == pytest.approx((8 / 3) ** 0.5, rel=1e-6)


def test_retained_is_paired_and_can_say_lost():
    spec = LimitSpec("score", "component", (0.0,), True)

    def res(values):
        return EvalResult("general", spec, {0.0: sum(values) / len(values)}, 0.0, 0.0,
                          item_scores={"qa": {"values": values, "weights": None, "transform": "mean"}})

    before = res([1.0] * 40 + [0.0] * 10)  # 0.8
    after = res([1.0] * 20 + [0.0] * 30)  # 0.4: half kept
    kept = compare(before, after)["retained"]
    assert kept["retained"] == pytest.approx(0.5)
    assert kept["high"] < 1.0  # a clear loss: the interval excludes "nothing lost"
    same = retained(before, before)
    assert same["retained"] == 1.0 and same["low"] == same["high"] == 1.0  # paired: identical answers, no spread


def test_shipped_task_and_corpus():
    rows = [json.loads(line) for line in (TASKS_DIR / "capitals" / "capitals.jsonl").read_text().splitlines()]
    assert len(rows) == 193
    assert all(len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["label"] < 4 for r in rows)
    france = next(r for r in rows if r["country"] == "France")
    assert france["choices"][france["label"]] == "Paris"
    cfg = yaml.safe_load((TASKS_DIR / "capitals" / "capitals.yaml").read_text())
    assert cfg["task"] == SHIPPED_TASK and cfg["output_type"] == "multiple_choice"
    docs = [json.loads(line) for line in CORPORA["python_docs"].read_text().splitlines()]
    assert len(docs) == 64 and all(d["text"] for d in docs)
    assert "general" in EVALS


def test_chat_is_refused():
    with pytest.raises(ValueError, match="general: prompt_format: chat does not apply"):
        General(GeneralConfig(prompt_format="chat")).spec()


@pytest.mark.slow
def test_lm_eval_task_before_and_after_a_two_step_run(tmp_path, tiny_recipe, monkeypatch):
    """The shipped multiple-choice task through lm-eval on a tiny model, before and after 2 training steps: every
    number in results.json is lm-eval's own (recorded from ``simple_evaluate``'s output), and the run report puts the
    targeted limit's delta beside the general ability retained."""
    import lm_eval

    from llm_limits.trainers.run import train

    outputs = []
    real = lm_eval.simple_evaluate

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(out)
        return out

    monkeypatch.setattr(lm_eval, "simple_evaluate", recording)
    r = tiny_recipe
    r["trainer"]["max_steps"] = 2
    r["output_dir"] = str(tmp_path)
    r["evals"] = [
        {"name": "positional_loss", "seq_len": 64, "bucket_size": 16, "num_examples": 4, "batch_size": 4},
        {"name": "general", "seq_len": 32, "num_docs": 4, "limit": 12, "batch_size": 16},
    ]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    run_dir = train(str(path), progress=False, echo=lambda s: None)

    assert len(outputs) == 2  # before, after
    results = json.loads((run_dir / "results.json").read_text())
    entry = results["evals"]["general"]
    for phase, out in zip(("before", "after"), outputs):
        lm = out["results"][SHIPPED_TASK]
        res = entry[phase]
        assert res["scalars"][f"{SHIPPED_TASK}/acc"] == lm["acc,none"]
        assert res["scalars"][f"{SHIPPED_TASK}/acc_stderr"] == lm["acc_stderr,none"]
        assert res["curve"]["1"] == lm["acc,none"]
        samples = sorted(out["samples"][SHIPPED_TASK], key=lambda s: s["doc_id"])
        assert len(samples) == 12 == res["scalars"][f"{SHIPPED_TASK}/n"]
        assert res["item_scores"][SHIPPED_TASK]["values"] == [s["acc"] for s in samples]
    kept = entry["compare"]["retained"]
    assert set(kept["components"]) == {"perplexity", SHIPPED_TASK}
    assert kept["low"] <= kept["retained"] <= kept["high"]
    assert kept["components"][SHIPPED_TASK]["before"] == outputs[0]["results"][SHIPPED_TASK]["acc,none"]
    assert kept["components"][SHIPPED_TASK]["after"] == outputs[1]["results"][SHIPPED_TASK]["acc,none"]
    report = (run_dir / "report.md").read_text()
    assert "- targeted limit positional_loss: " in report
    assert "- general ability retained: " in report


def _with_general(run_dir: Path, before_acc: list[float], after_acc: list[float]) -> None:
    """Add a ``general`` entry (before, after, compare with its retained block) to a run made by
    ``tests.test_compare.write_run``."""
    spec = LimitSpec("score", "component", (0.0,), True, limit="general", limit_unit="score", limit_on_axis=False)

    def res(acc):
        return EvalResult("general", spec, {0.0: sum(acc) / len(acc)}, sum(acc) / len(acc), 0.0, version="1",
                          item_scores={SHIPPED_TASK: {"values": acc, "weights": None, "transform": "mean"}})

    b, a = res(before_acc), res(after_acc)
    results = json.loads((run_dir / "results.json").read_text())
    cmp = compare(b, a)
    cmp["curve_delta"] = {str(int(k)): v for k, v in cmp["curve_delta"].items()}
    results["evals"]["general"] = {"eval": "general", "limit_key": "general", "before": b.to_dict(),
                                   "after": a.to_dict(), "compare": cmp}
    (run_dir / "results.json").write_text(json.dumps(results))


def test_compare_shows_gain_against_general_cost(tmp_path):
    """Two arms, one seed each: the gain of the targeted limit beside the general ability retained, with the run's
    own paired interval, as a table (markdown, HTML, the wandb Table) and a scatter plot."""
    from llm_limits.trainers.results.compare import compare as compare_runs, summary_keys, tables
    from tests.test_compare import write_run

    keep = write_run(tmp_path / "control", "control", 0, after_limit=64.0, acc64=0.5)
    _with_general(keep, [1.0] * 30 + [0.0] * 10, [1.0] * 30 + [0.0] * 10)  # nothing lost
    cost = write_run(tmp_path / "treated", "treated", 0, after_limit=256.0, acc64=1.0)
    _with_general(cost, [1.0] * 30 + [0.0] * 10, [1.0] * 15 + [0.0] * 25)  # half lost
    out = compare_runs([keep, cost], out_dir=tmp_path / "cmp", wandb_mode="disabled", progress=False)
    c = json.loads((out / "compare.json").read_text())
    t = c["tradeoff"]
    assert t["general"] == "general" and t["targets"] == ["context"]
    treated = t["arms"]["treated"]
    assert treated["gains"]["context"]["mean"] == 256.0
    assert treated["retained"]["mean"] == pytest.approx(0.5) and treated["retained"]["interval"] == "items"
    assert treated["retained"]["high"] < 1.0  # the cost is clear from one run's questions
    assert t["arms"]["control"]["retained"]["mean"] == 1.0
    assert (out / "plots" / "tradeoff.png").is_file() and c["plots"]["tradeoff"] == "plots/tradeoff.png"
    md = (out / "compare.md").read_text()
    assert "## Gain vs general ability" in md and "![gain vs general ability](plots/tradeoff.png)" in md
    assert "| treated | context (tokens) | 256 (n=1) | 50.0% [" in md
    assert 'id="tradeoff"' in (out / "compare.html").read_text()
    assert "tradeoff" in [tb.key for tb in tables(c)]  # what log_wandb writes as the wandb Table tables/tradeoff
    assert summary_keys(c)["compare/general_retained/treated"] == pytest.approx(0.5)


@pytest.mark.slow
def test_a_users_task_reads_its_data_beside_its_yaml(tmp_path, monkeypatch):
    """A task YAML under include_path with a relative data_files path runs from any working directory; its score is
    lm-eval's own ``acc``."""
    import transformers

    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "my_quiz.yaml").write_text(
        "task: my_quiz\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: quiz.jsonl}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    rows = [{"question": f"{a}+{b}=", "choices": [str(a + b), str(a + b + 1)], "label": 0} for a in range(3) for b in range(2)]
    (tasks / "quiz.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64)).eval()
    ev = General(GeneralConfig(perplexity=False, tasks=["my_quiz"], include_path=str(tasks)))
    ev.check(model, tok)
    res = ev.run(model, tok, progress=False)
    assert res.scalars["my_quiz/n"] == 6
    assert res.curve[0.0] == res.scalars["my_quiz/acc"] == pytest.approx(sum(res.item_scores["my_quiz"]["values"]) / 6)
    assert res.limit_value == res.curve[0.0]
