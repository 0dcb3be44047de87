"""Prompt formats (issue 19): instruct models are prompted as they were trained.

Every eval's ``prompt_format`` (``auto | chat | plain``, :class:`evals.base.EvalConfig`) goes through one helper,
:func:`evals.lm.format_prompt`; the TRL backend writes its training prompts with the same helper
(``data.prompt_format``). The tests use the project's character tokenizer with a small Jinja chat template set on it
(:data:`CHAT`: no special tokens, so one token is still one character), and scripted models that answer ONLY a
prompt wrapped in that template (:class:`ChatOnly`), so a run that scores right under ``chat`` shows both that the
wrapping happened and that answers, step ends and needle spans are still found after it.

Under ``auto`` a tokenizer without a template gives byte for byte the prompts of before (the task's own text).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tokenizers import processors

from llm_limits import evals
from llm_limits.evals import EVALS, EvalResult
from llm_limits.evals.base import FieldError
from llm_limits.evals.context import Context, ContextConfig, needle_attention, needle_tokens
from llm_limits.evals.hallucination import Hallucination, HallucinationConfig
from llm_limits.evals.lm import (PRMScorer, format_prompt, instructed, own_prompt_format, resolve_prompt_format,
                                 step_positions)
from llm_limits.evals.prm import ProcessReward, ProcessRewardConfig
from llm_limits.evals.reasoning import INSTRUCTION as REASONING_INSTRUCTION
from llm_limits.evals.reasoning import Reasoning, ReasoningConfig, instruction_text
from llm_limits.evals.retrieval import INSTRUCTION as RETRIEVAL_INSTRUCTION
from llm_limits.evals.retrieval import Retrieval, RetrievalConfig
from llm_limits.evals.tasks import chains, kb
from llm_limits.evals.tasks.ruler import prompt_text
from llm_limits.trainers.build.tokenizers import build_char_tokenizer
from llm_limits.trainers.recipe.errors import UserError
from tests.chains_fixtures import ChainOracle, tiny_prm
from tests.conftest import TINY
from tests.test_context_eval import CopyOracle, records_of_mixed_lengths
from tests.test_context_eval import tiny as tiny_causal_lm
from tests.test_hallucination_eval import asked, knowledge_of
from tests.test_retrieval_eval import SCRIPTED, reader

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = ("{% for m in messages %}<{{ m['role'] }}>\n{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>\n{% endif %}")
"""A small chat template over the char tokenizer's alphabet: ``<user>\\n{prompt}<assistant>\\n``."""
HEAD, GEN = "<user>\n", "<assistant>\n"


def chat_tokenizer(template: str = CHAT):
    tok = build_char_tokenizer()
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def plain_tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return chat_tokenizer()


def unwrap(text: str) -> str:
    """The plain text inside a :data:`CHAT` prompt (and what was written after it); fails on anything else."""
    assert text.startswith(HEAD) and GEN in text, f"not a chat prompt: {text[:40]!r}"
    return text[len(HEAD):].replace(GEN, "", 1)


class ChatOnly(torch.nn.Module):
    """Runs a scripted model that predicts only the next token (its logits at the last position) on the text with
    the :data:`CHAT` markers taken out; a prompt without them fails the test."""

    def __init__(self, inner: torch.nn.Module, tokenizer: Any):
        super().__init__()
        self.inner, self.tok, self.config = inner, tokenizer, inner.config

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, len(self.tok))  # [batch, seq, vocab]
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            plain = torch.tensor([self.tok(unwrap(self.tok.decode(ids.tolist())), add_special_tokens=False)["input_ids"]])
            logits[b, -1] = self.inner(plain, attention_mask=torch.ones_like(plain)).logits[0, -1]
        return SimpleNamespace(logits=logits)


class ChatVerifierPRM(torch.nn.Module):
    """The verifier PRM of ``tests/chains_fixtures.py`` for :data:`CHAT` prompts: +5 at each step end the verifier
    accepts, -5 where it rejects, placed at the CHARACTER offsets of the chain after the generation prompt (one token
    per character), so the scorer reads the right values only if ``step_positions`` finds the same tokens."""

    def __init__(self, tokenizer: Any):
        super().__init__()
        self.tok, self.config = tokenizer, SimpleNamespace(num_labels=1)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, 1)  # [batch, seq, 1]
        for b in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[b][attention_mask[b].bool()].tolist())
            assert text.startswith(HEAD) and GEN in text
            start = text.index(GEN) + len(GEN)
            prompt, completion = text[:start], text[start:]
            q = prompt.rindex(chains.PROMPT_PREFIX)
            question = prompt[q + 2 : prompt.index("\n", q)]
            steps, answer = chains.parse_completion(completion)
            verdicts = chains.verify_steps(question, steps) + [chains.check_answer(answer, chains.gold_steps(question)[1])]
            for ok, off in zip(verdicts, chains.step_end_offsets(completion)):
                logits[b, start + off, 0] = 5.0 if ok else -5.0
        return SimpleNamespace(logits=logits)


# --- the helpers -------------------------------------------------------------------------------------------------------
def test_resolve_and_format(plain_tok, chat_tok):
    assert resolve_prompt_format(chat_tok, "auto") == "chat" and resolve_prompt_format(plain_tok, "auto") == "plain"
    assert resolve_prompt_format(chat_tok, "plain") == "plain" and resolve_prompt_format(chat_tok, "chat") == "chat"
    with pytest.raises(FieldError, match=r"^prompt_format: chat, but the tokenizer has no chat template$") as err:
        resolve_prompt_format(plain_tok, "chat")
    assert err.value.field == "prompt_format"
    with pytest.raises(ValueError, match=r"^prompt_format: expected one of auto, chat, plain \(got 'chta'\)$"):
        resolve_prompt_format(chat_tok, "chta")
    text = "Q:3+4*2\n"
    assert format_prompt(plain_tok, text, "auto") == format_prompt(chat_tok, text, "plain") == text
    assert format_prompt(chat_tok, text, "auto") == format_prompt(chat_tok, text, "chat") == HEAD + text + GEN
    assert own_prompt_format(chat_tok, "chat") == own_prompt_format(chat_tok, "auto") == "chat"
    assert own_prompt_format(plain_tok, "chat") == own_prompt_format(chat_tok, "plain") == "plain"


def test_a_template_bos_is_not_doubled():
    """A template that writes the BOS itself: the evals' ``add_special_tokens=False`` encoding holds it once."""
    tok = chat_tokenizer("{{ bos_token }}" + CHAT)
    ids = tok(format_prompt(tok, "Q:1+2\n", "auto"), add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids[1:]) == HEAD + "Q:1+2\n" + GEN


def test_the_field_is_declared_once_with_its_doc():
    fields = {name: cls.Config.__dataclass_fields__["prompt_format"] for name, cls in EVALS.items()}
    assert all(f.default == "auto" for f in fields.values())
    assert "prompt_format" not in {f for name, cls in EVALS.items() for f in vars(cls.Config).get("__annotations__", {})}
    src = Path(evals.base.__file__).read_text()
    assert 'prompt_format: Literal["auto", "chat", "plain"] = "auto"\n    """How the eval writes' in src


@pytest.mark.parametrize("name, why", [("positional_loss", "raw text"), ("multimodal", "image-token rows")])
def test_evals_without_prompts_are_plain_and_refuse_chat(name, why):
    cls = EVALS[name]
    extra = {"seq_len": 64, "bucket_size": 16} if name == "positional_loss" else {}
    with pytest.raises(ValueError, match=rf"^{name}: prompt_format: chat does not apply \(.*{why}.*\); use auto or "
                                         rf"plain$"):
        cls(cls.Config(**extra, prompt_format="chat")).spec()
    cls(cls.Config(**extra, prompt_format="auto")).spec()


def test_positional_loss_result_says_plain(chat_tok):
    ev = EVALS["positional_loss"](EVALS["positional_loss"].Config(seq_len=48, bucket_size=16, num_examples=2))
    result = ev.run(tiny_causal_lm("llama", len(chat_tok)), chat_tok, progress=False)
    assert result.prompt_format == "plain"


# --- every eval: the prompts it decodes from -------------------------------------------------------------------------
def recorded_prompts(
    name: str, tokenizer: Any, fmt: str, monkeypatch, **extra: Any,
) -> tuple[list[str], list[str], str]:
    """``(prompts the model was given, the task's plain prompts, result.prompt_format)`` of one small run of ``name``
    whose model calls are recorded (and answered with nothing); ``extra``: more config fields (reasoning, retrieval)."""
    seen: list[str] = []

    def decode(model, tok, prompts, *args, **kwargs):
        seen.extend(prompts)
        return [""] * len(prompts)

    if name == "context":
        monkeypatch.setattr(evals.context, "decode_texts", decode)
        ev = Context(ContextConfig(lengths=[32, 64], depths=[0.0, 1.0], examples_per_cell=2, attention_mass=False,
                                   position_loss=False, prompt_format=fmt))
        result = ev.run(None, tokenizer, progress=False)
        plain = [prompt_text(r) for recs in ev._cells(tokenizer)[0].values() for r in recs]
    elif name == "reasoning":
        monkeypatch.setattr(evals.reasoning, "decode_texts", decode)
        ev = Reasoning(ReasoningConfig(lengths=[2, 3], examples_per_length=3, mediation=False, probes=False,
                                       prompt_format=fmt, **extra))
        result = ev.run(None, tokenizer, progress=False)
        plain = [r["prompt"] for n in (2, 3) for r in ev._records(n)]
    elif name == "prm":
        def score(self, prompts, completions):
            seen.extend(prompts)
            return [[0.9] * len(chains.step_end_offsets(c)) for c in completions]

        monkeypatch.setattr(PRMScorer, "score", score)
        ev = ProcessReward(ProcessRewardConfig(lengths=[2, 3], examples_per_length=4, prompt_format=fmt))
        result = ev.run(SimpleNamespace(config=SimpleNamespace(num_labels=1)), tokenizer, progress=False)
        plain = [r["prompt"] for n in (2, 3) for r in evals.lm.processbench_records(ev.config, n, "prm")]
    elif name == "retrieval":
        ev = Retrieval(RetrievalConfig(**SCRIPTED, prompt_format=fmt, **extra))
        ev.answer = lambda model, tok, prompts, device="cpu": decode(model, tok, prompts)
        result = ev.run(None, tokenizer, progress=False)
        plain = [c.prompt for part in ("distractors", "budget", "position", "poison", "negative")
                 for c in ev.contexts(tokenizer)[0] if c.part == part]
    else:
        ev = Hallucination(HallucinationConfig(num_entities=20, rank_buckets=[5, 20], examples_per_bucket=2,
                                               unanswerable_examples=2, rag_distractors=2, prompt_format=fmt))
        ev.answer = lambda model, tok, prompts, device="cpu": decode(model, tok, prompts)
        ev.confidence = lambda model, tok, prompts, completions, device="cpu": decode(model, tok, prompts)
        result = ev.run(None, tokenizer, progress=False)
        questions = ev.questions(knowledge_of(ev.config))
        plain = [q.prompt for part in ("closed_book", "unanswerable", "unanswerable_rag") for q in questions
                 if q.part == part] + [q.prompt for q in questions if q.part == "closed_book"]
    return seen, plain, result.prompt_format


PROMPT_EVALS = ("context", "reasoning", "prm", "retrieval", "hallucination")


@pytest.mark.parametrize("name", PROMPT_EVALS)
def test_auto_without_a_template_is_todays_prompts_byte_for_byte(name, plain_tok, monkeypatch):
    seen, plain, fmt = recorded_prompts(name, plain_tok, "auto", monkeypatch)
    assert seen == plain and fmt == "plain" and len(seen) > 0


@pytest.mark.parametrize("name", PROMPT_EVALS)
def test_chat_wraps_every_prompt_as_one_user_turn(name, chat_tok, monkeypatch):
    seen, plain, fmt = recorded_prompts(name, chat_tok, "auto", monkeypatch)
    assert fmt == "chat" and seen == [HEAD + p + GEN for p in plain]
    seen, plain, fmt = recorded_prompts(name, chat_tok, "plain", monkeypatch)
    assert fmt == "plain" and seen == plain


@pytest.mark.parametrize("name", ["reasoning", "retrieval"])
def test_instruct_puts_the_instruction_in_the_chat_turn_only(name, chat_tok, plain_tok, monkeypatch):
    """With ``instruct`` each chat turn is the eval's instruction around the task's text; ``plain`` is refused (the
    plain prompts stay the task's text), and so is ``auto`` on a tokenizer without a template."""
    instruction = (instruction_text(REASONING_INSTRUCTION, 10) if name == "reasoning" else RETRIEVAL_INSTRUCTION)
    seen, plain, fmt = recorded_prompts(name, chat_tok, "auto", monkeypatch, instruct=True)
    assert fmt == "chat" and seen == [HEAD + instructed(instruction, p) + GEN for p in plain]
    assert all(p in turn and turn != HEAD + p + GEN for p, turn in zip(plain, seen))
    custom = "Please answer.\n{task}"
    seen, plain, _ = recorded_prompts(name, chat_tok, "chat", monkeypatch, instruct=True, instruction=custom)
    assert seen == [HEAD + "Please answer.\n" + p + GEN for p in plain]
    seen, plain, fmt = recorded_prompts(name, chat_tok, "plain", monkeypatch)  # instruct off: the task's text
    assert fmt == "plain" and seen == plain and not any("Please" in p or "Answer the" in p for p in seen)
    with pytest.raises(ValueError, match=rf"^{name}: instruct writes chat prompts, but prompt_format is plain"):
        recorded_prompts(name, chat_tok, "plain", monkeypatch, instruct=True)
    with pytest.raises(FieldError, match=r"^instruct: true needs a chat prompt"):
        recorded_prompts(name, plain_tok, "auto", monkeypatch, instruct=True)


@pytest.mark.parametrize("name", PROMPT_EVALS)
def test_chat_without_a_template_fails_the_check(name, plain_tok):
    cls = EVALS[name]
    model = tiny_prm(len(plain_tok)) if name == "prm" else tiny_causal_lm("llama", len(plain_tok))
    with pytest.raises(FieldError, match=r"^prompt_format: chat, but the tokenizer has no chat template$"):
        cls(cls.Config(prompt_format="chat")).check(model, plain_tok)


# --- answers, step ends and needles are still found after the wrapping --------------------------------------------------
def test_context_oracle_retrieves_everywhere_in_chat(chat_tok):
    config = ContextConfig(lengths=[32, 64, 128], depths=[0.0, 0.5, 1.0], examples_per_cell=2, batch_size=8,
                           position_loss=False, attention_mass=False)
    result = Context(config).run(ChatOnly(CopyOracle(chat_tok), chat_tok), chat_tok, progress=False)
    assert result.curve == {32.0: 1.0, 64.0: 1.0, 128.0: 1.0} and result.prompt_format == "chat"
    # the same model reading plain prompts is refused by ChatOnly: the wrapping is what it answered
    with pytest.raises(AssertionError, match="not a chat prompt"):
        Context(ContextConfig(**{**vars(config), "prompt_format": "plain"})).run(
            ChatOnly(CopyOracle(chat_tok), chat_tok), chat_tok, progress=False)


def test_needle_spans_move_with_the_context(chat_tok, plain_tok):
    for r in records_of_mixed_lengths("niah_multivalue"):
        ids, needle, others = needle_tokens(chat_tok, r, "chat")
        assert chat_tok.decode(ids).startswith(HEAD) and len(ids) == len(prompt_text(r)) + len(HEAD) + len(GEN)
        shown = "".join(chat_tok.decode([i]) for i, m in zip(ids, needle) if m)
        assert shown == "".join(r["context"][s:e] for s, e in r["needle_spans"])
        assert (ids[len(HEAD):len(HEAD) + len(prompt_text(r))], needle[len(HEAD):len(HEAD) + len(prompt_text(r))],
                others) == needle_tokens(plain_tok, r, "plain")
    model = tiny_causal_lm("llama", len(chat_tok))
    for layer in model.model.layers:  # uniform attention: the needle's share is its share of the prompt's tokens
        torch.nn.init.zeros_(layer.self_attn.q_proj.weight)
    records = records_of_mixed_lengths()
    masses, _ = needle_attention(model, chat_tok, records, batch_size=9, prompt_format="chat")
    for r, mass in zip(records, masses):
        (s, e), = r["needle_spans"]
        assert mass == pytest.approx((e - s) / len(format_prompt(chat_tok, prompt_text(r), "chat")), rel=1e-4)


def test_reasoning_oracle_scores_the_same_in_chat(chat_tok, plain_tok):
    """Accuracy, step validity, mediation, early answering and filler: what the probes write after the prompt follows
    the generation prompt, and the scripted solver (which reads only chat prompts) gives plain's numbers."""
    config = ReasoningConfig(lengths=[2, 3, 4], examples_per_length=4, max_new_tokens=32)
    chat = Reasoning(config).run(ChatOnly(ChainOracle(chat_tok), chat_tok), chat_tok, progress=False)
    plain = Reasoning(config).run(ChainOracle(plain_tok), plain_tok, progress=False)
    assert chat.prompt_format == "chat" and plain.prompt_format == "plain"
    assert chat.curve == plain.curve == {2.0: 1.0, 3.0: 1.0, 4.0: 1.0}
    assert chat.scalars == plain.scalars and chat.series == plain.series and chat.scalars["mediation"] == 1.0


def test_reasoning_oracle_scores_the_same_instructed(chat_tok, plain_tok):
    """The instructed chat prompts, read by the prose reader: the scripted solver (which finds its problem after the
    instruction's worked example) gives plain's numbers, probes included."""
    config = dict(lengths=[2, 3, 4], examples_per_length=4, max_new_tokens=32)
    chat = Reasoning(ReasoningConfig(**config, instruct=True)).run(ChatOnly(ChainOracle(chat_tok), chat_tok), chat_tok,
                                                                   progress=False)
    plain = Reasoning(ReasoningConfig(**config)).run(ChainOracle(plain_tok), plain_tok, progress=False)
    assert chat.curve == plain.curve == {2.0: 1.0, 3.0: 1.0, 4.0: 1.0}
    assert chat.scalars == plain.scalars and chat.series == plain.series and chat.scalars["mediation"] == 1.0
    assert chat.notes == plain.notes + [chat.notes[-1]] and "prose reader" in chat.notes[-1]


def test_step_positions_after_the_wrapping(chat_tok):
    r = chains.generate(chains.ChainsConfig(num_examples=1, min_steps=3, max_steps=3, seed=5))[0]
    prompt = format_prompt(chat_tok, r["prompt"], "chat")
    ids, positions = step_positions(chat_tok, prompt, r["completion"])
    text = chat_tok.decode(ids)
    assert text == prompt + r["completion"]
    assert [text[p] for p in positions] == ["\n"] * 3 + [r["completion"][-1]]
    assert positions == [len(prompt) + off for off in chains.step_end_offsets(r["completion"])]


def test_prm_verifier_scores_exactly_in_chat(chat_tok, monkeypatch):
    policy = ChatOnly(ChainOracle(chat_tok, coin=True), chat_tok)
    monkeypatch.setattr(evals.prm, "_load_policy", lambda path, device: (policy, chat_tok))
    config = ProcessRewardConfig(lengths=[2, 3], examples_per_length=8, ops="+-", max_new_tokens=24, best_of_n=4,
                                 policy_path="scripted")
    result = ProcessReward(config).run(ChatVerifierPRM(chat_tok), chat_tok, progress=False)
    s = result.scalars
    assert result.curve == {2.0: 1.0, 3.0: 1.0} and result.prompt_format == "chat"
    assert s["step_f1"] == s["step_auc"] == s["answer_auc"] == 1.0 and 0.0 < s["bon_first"] < s["bon_pass_at_n"] == s["bon_prm"]


def test_retrieval_reader_scores_the_same_in_chat(chat_tok, plain_tok):
    def chat_reader(model, tok, prompts, device="cpu"):
        assert all(p.startswith(HEAD) and p.endswith(GEN) for p in prompts)
        return reader(model, tok, prompts, device)

    chat, plain = Retrieval(RetrievalConfig(**SCRIPTED)), Retrieval(RetrievalConfig(**SCRIPTED))
    chat.answer, plain.answer = chat_reader, reader
    a, b = chat.run(None, chat_tok, progress=False), plain.run(None, plain_tok, progress=False)
    assert a.prompt_format == "chat" and b.prompt_format == "plain"
    assert a.curve == b.curve and a.scalars == b.scalars and a.series == b.series and a.limit_value == 8.0


def test_hallucination_knower_scores_the_same_in_chat(chat_tok):
    config = HallucinationConfig()
    knowledge = knowledge_of(config)

    def answer(model, tok, prompts, device="cpu"):
        out = []
        for prompt in prompts:
            assert prompt.startswith(HEAD) and prompt.endswith(GEN)
            attribute, entity = asked(prompt)
            known = 1 <= knowledge.rank(entity) <= 50
            out.append(f"A:{knowledge.facts[(entity, attribute)] if known else kb.ABSTAIN}")
        return out

    ev = Hallucination(config)
    ev.answer = answer
    ev.confidence = lambda model, tok, prompts, completions, device="cpu": [0.9] * len(prompts)
    result = ev.run(None, chat_tok, progress=False)
    assert result.prompt_format == "chat" and result.limit_value == 50.0
    assert result.curve == {10.0: 1.0, 25.0: 1.0, 50.0: 1.0, 100.0: 0.0, 200.0: 0.0}


def test_hallucination_confidence_is_read_after_the_wrapping(chat_tok):
    """The teacher-forced confidence of a chat prompt's answer is the model's probability of the answer tokens after
    the generation prompt: the same number as scoring the whole string by hand."""
    from llm_limits.evals.hallucination import answer_confidences

    model = tiny_causal_lm("llama", len(chat_tok), init=0.5).eval()
    prompt = format_prompt(chat_tok, kb.render_prompt([], "home of Vokar?"), "chat")
    (p,) = answer_confidences(model, chat_tok, [prompt], ["A:teln"], batch_size=1)
    ids = chat_tok(prompt + "A:teln", add_special_tokens=False)["input_ids"] + [chat_tok.eos_token_id]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    first = len(prompt) + 2  # after "A:"
    expected = math.exp(sum(float(logp[i - 1, ids[i]]) for i in range(first, len(ids))))
    assert p == pytest.approx(expected, rel=1e-5)


# --- the result: results.json and report.md -----------------------------------------------------------------------------
def test_result_and_report_carry_the_format(chat_tok):
    from llm_limits.trainers.results.report import render_markdown

    result = Reasoning(ReasoningConfig(lengths=[2], examples_per_length=2, mediation=False, probes=False)).run(
        ChatOnly(ChainOracle(chat_tok), chat_tok), chat_tok, progress=False)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["prompt_format"] == "chat" and EvalResult.from_dict(d) == result
    old = {k: v for k, v in d.items() if k != "prompt_format"}  # a result written before prompt formats
    assert EvalResult.from_dict(old).prompt_format == ""
    results = {"name": "r", "run_dir": "runs/r", "evals": {"reasoning": {"eval": "reasoning", "limit_key": "reasoning", "before": d}}}
    report = render_markdown(results, {})
    assert "- before: limit 2 steps" in report and "\n  - prompt format: chat\n" in report
    results["evals"]["reasoning"]["before"] = old
    assert "prompt format" not in render_markdown(results, {})


# --- the TRL backend's training prompts ---------------------------------------------------------------------------------
def trl_sft_recipe(tmp_path: Path, tokenizer_dir: Path | None = None, **data: Any) -> dict[str, Any]:
    r = copy.deepcopy(TINY)
    r.update(name="chat-sft", output_dir=str(tmp_path / "runs"), mitigations=[])
    if tokenizer_dir is not None:
        r["model"]["tokenizer"] = {"kind": "pretrained", "path": str(tokenizer_dir)}
    r["data"] = {"task": "chains", "params": {"num_examples": 24}, "seq_len": 64, "batch_size": 8, **data}
    r["trainer"] = {"backend": "trl", "trl": {"algorithm": "sft"}, "max_steps": 2, "lr": 3e-3, "log_every": 1}
    r["evals"] = [{"name": "reasoning", "lengths": [2], "examples_per_length": 2, "probes": False,
                   "mediation": False, "batch_size": 8, "max_new_tokens": 8}]
    return r


def test_sft_rows_use_the_evals_chat_prompts_and_the_loss_stays_on_the_completion(tmp_path, chat_tok, plain_tok):
    from llm_limits.trainers.backends.trl import build_datasets, sft_trainer, training_kwargs
    from llm_limits.trainers.recipe.schema import validate_recipe

    recipe = validate_recipe(trl_sft_recipe(tmp_path), "r").recipe
    model = tiny_causal_lm("llama", len(chat_tok))
    records = chains.generate(chains.ChainsConfig(num_examples=24, seed=0))
    plain_rows, _, _ = build_datasets(recipe, plain_tok, model, records=records)
    assert plain_rows["prompt"] == [r["prompt"] for r in records[: len(plain_rows)]]  # auto, no template: as before
    datasets = build_datasets(recipe, chat_tok, model, records=records)[:2]
    train = datasets[0]
    assert train["prompt"] == [format_prompt(chat_tok, r["prompt"], "auto") for r in records[: len(train)]]
    assert train["completion"] == [r["completion"] for r in records[: len(train)]]
    kw = training_kwargs(recipe.trainer, recipe.data, tmp_path, 0, progress=False, has_val=datasets[1] is not None)
    trainer = sft_trainer(model, chat_tok, recipe, kw, datasets, [])
    row = trainer.train_dataset[0]  # TRL folds the completion mask into the labels: -100 on the prompt
    ids, labels = row["input_ids"], row["labels"]
    assert chat_tok.decode([i for i, y in zip(ids, labels) if y == -100]) == train[0]["prompt"]
    assert chat_tok.decode([i for i, y in zip(ids, labels) if y != -100]) == train[0]["completion"] + chat_tok.eos_token
    with pytest.raises(UserError, match=r"^data\.prompt_format: chat, but the tokenizer has no chat template$"):
        build_datasets(recipe.model_copy(update={"data": recipe.data.model_copy(update={"prompt_format": "chat"})}),
                       plain_tok, model, records=records)


def test_grpo_and_reward_model_rows_in_chat(tmp_path, chat_tok):
    from llm_limits.trainers.backends.trl.data import format_prompts, grpo_rows, prm_rows

    records = chains.generate(chains.ChainsConfig(num_examples=4, seed=0, corruptions={"wrong_step": 0.5}))
    formatted, fmt = format_prompts(records, chat_tok, "auto")
    assert fmt == "chat" and [r["prompt"] for r in formatted] == [HEAD + r["prompt"] + GEN for r in records]
    assert [r["prompt"] for r in grpo_rows(formatted)] == [r["prompt"] for r in formatted]
    rows, skipped = prm_rows(formatted, chat_tok, "process", 256)
    assert not skipped
    for row, rec in zip(rows, formatted):
        text = chat_tok.decode(row["input_ids"])
        ends = [i for i, y in enumerate(row["labels"]) if y != -100]
        assert text.startswith(rec["prompt"]) and [text[i] for i in ends[:-1]] == ["\n"] * (len(ends) - 1)
        assert [row["labels"][i] for i in ends] == [float(x) for x in rec["labels"]] + [float(rec["answer_correct"])]


def test_trl_prompt_keeps_one_bos_for_a_tokenizer_that_adds_it():
    """TRL tokenizes its string rows with the tokenizer's special tokens: where the tokenizer adds its BOS itself, the
    row drops the template's, and the ids equal the evals' encoding of the whole chat string."""
    from llm_limits.trainers.backends.trl.data import trl_prompt

    tok = chat_tokenizer("{{ bos_token }}" + CHAT)
    chat = format_prompt(tok, "Q:1+2\n", "auto")
    assert trl_prompt(tok, chat, "chat") == chat  # the char tokenizer adds nothing: the row keeps the template's BOS
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    assert tok("Q")["input_ids"][0] == tok.bos_token_id
    row = trl_prompt(tok, chat, "chat")
    assert row == chat[len("<bos>"):] and tok(row)["input_ids"] == tok(chat, add_special_tokens=False)["input_ids"]
    assert trl_prompt(tok, "<bos>plain", "plain") == "<bos>plain"


def test_a_chat_fine_tune_and_its_eval_end_to_end(tmp_path, chat_tok):
    """A chat-template tokenizer saved as a directory: the SFT run trains on chat prompts and results.json and
    report.md say the eval used them."""
    from llm_limits.trainers.run import train

    tok_dir = tmp_path / "tok"
    chat_tok.save_pretrained(str(tok_dir))
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(trl_sft_recipe(tmp_path, tok_dir)))
    run_dir = Path(train(str(path), progress=False, echo=lambda s: None))
    results = json.loads((run_dir / "results.json").read_text())
    entry = results["evals"]["reasoning"]
    assert entry["before"]["prompt_format"] == entry["after"]["prompt_format"] == "chat"
    assert (run_dir / "report.md").read_text().count("  - prompt format: chat") == 2


# --- the real model (slow): one eval, 2 examples, auto vs plain ------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer, from the pulled cache (skips when it is not pulled)."""
    from llm_limits.trainers.build import pretrained

    name = "smollm2-135m-instruct"
    if not pretrained.is_ready(name):
        pytest.skip(f"{name} is not pulled here ({pretrained.model_dir(name)}); `llm-limits models pull {name}` "
                    f"makes it (test_pretrained.py pulls its own copy)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(pretrained.model_dir(name))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval(), tok


@pytest.mark.slow
def test_smollm2_context_auto_is_chat(smollm2):
    model, tok = smollm2
    results = {}
    for fmt in ("auto", "plain"):
        ev = Context(ContextConfig(lengths=[64], depths=[0.5], examples_per_cell=2, batch_size=2, attention_mass=True,
                                   position_loss=False, prompt_format=fmt))
        ev.check(model, tok)
        results[fmt] = ev.run(model, tok, progress=False)
    assert results["auto"].prompt_format == "chat" and results["plain"].prompt_format == "plain"
    for r in results.values():
        assert 0.0 <= r.curve[64.0] <= 1.0 and 0.0 < r.scalars["needle_attention_mass@64"] < 1.0
    record = ev._cells(tok)[0][(64.0, 0.5)][0]
    ids, needle, _ = needle_tokens(tok, record, "chat")
    assert tok.decode(ids).startswith("<|im_start|>system") and ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert record["context"][record["needle_spans"][0][0]:record["needle_spans"][0][1]] in tok.decode(
        [i for i, m in zip(ids, needle) if m])


@pytest.mark.slow
def test_smollm2_instructed_retrieval_and_reasoning(smollm2):
    """The chat versions on the real model: the instruction goes through its template and check(), the readers run,
    and the result says how the prompts were written and read (a few prompts: the numbers are docs/results.md's)."""
    model, tok = smollm2
    retrieval = Retrieval(RetrievalConfig(examples=4, distractors=[0, 2], budgets=[], position_distractors=0,
                                          poison_counts=[2], negative_distractors=2, max_new_tokens=24, instruct=True))
    reasoning = Reasoning(ReasoningConfig(lengths=[2], examples_per_length=4, max_new_tokens=24, instruct=True))
    for ev, reader in ((retrieval, "contains"), (reasoning, "prose")):
        ev.check(model, tok)
        result = ev.run(model, tok, progress=False)
        assert result.prompt_format == "chat" and all(0.0 <= v <= 1.0 for v in result.curve.values())
        assert any(f"answers read by the {reader} reader" in n for n in result.notes)
