"""Tiny models for the chains evals (reasoning, prm): 2-layer Llama causal LMs and token classifiers built from a
config, and scripted oracles: a chain solver (:class:`ChainOracle`) and a reward model that runs the task's verifier
(:class:`VerifierPRM`). Both work on the character tokenizer (one token per character)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification

from llm_limits.evals.tasks import chains


def tiny_config(vocab_size: int, **kwargs):
    return AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab_size,
                                max_position_embeddings=256, **kwargs)


def tiny_llama(vocab_size: int, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(vocab_size))


def tiny_prm(vocab_size: int, num_labels: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForTokenClassification.from_config(tiny_config(vocab_size, num_labels=num_labels,
                                                                   initializer_range=0.5))


def split_text(text: str) -> tuple[str, str, str]:
    """``(prompt, question, completion)`` of a decoded ``Q:...\\n...`` text (the last question in it)."""
    q = text.rindex(chains.PROMPT_PREFIX)
    nl = text.index("\n", q)
    return text[: nl + 1], text[q + 2 : nl], text[nl + 1 :]


class ChainOracle(torch.nn.Module):
    """A scripted chain solver. It continues from whatever is written: each step starts from the last written step's
    result (lines without ``=``, e.g. filler dots, are skipped) and applies the question's next operation; after the
    last operation, or after a forced ``A:``, it answers the running value (``answer="follow"``) or the gold answer
    whatever was written (``answer="gold"``: its steps are disposable). From step ``fail_from`` on it writes result
    + 1. With ``coin=True`` every step's result is a coin flip between the right value and value + 1 (the right one
    has the higher logit, so greedy decoding takes it). It returns no KV cache, so the decoder feeds it the whole
    text."""

    def __init__(self, tokenizer, answer: str = "follow", fail_from: int | None = None, coin: bool = False,
                 modulus: int = 10):
        super().__init__()
        self.tok, self.answer, self.fail_from, self.coin, self.modulus = tokenizer, answer, fail_from, coin, modulus
        self.config = SimpleNamespace(max_position_embeddings=4096, model_type="oracle")

    def _next(self, text: str) -> list[str]:
        """The next characters it may write (several for a coin flip), ``"<eos>"`` to stop."""
        m = self.modulus
        _, question, generated = split_text(text)
        start, operations = chains.parse_question(question, m)
        *lines, partial = generated.split("\n")
        value, i = start, 0
        for line in lines:
            if "=" in line:
                value, i = int(line.rsplit("=", 1)[1]), i + 1
        final = chains.gold_steps(question, m)[1] if self.answer == "gold" else str(value)
        if partial.startswith(chains.ANSWER_PREFIX) or i >= len(operations):
            targets = [chains.ANSWER_PREFIX + final]
        else:
            op, b = operations[i]
            c = chains.apply_op(value, op, b, m)
            if self.fail_from is not None and i >= self.fail_from:
                c = (c + 1) % m
            results = [c, (c + 1) % m] if self.coin else [c]
            targets = [f"{value}{op}{b}={r}" for r in results]
        out = []
        for target in targets:
            if partial == target:
                out.append("<eos>" if target.startswith(chains.ANSWER_PREFIX) else "\n")
            elif target.startswith(partial):
                out.append(target[len(partial)])
        return list(dict.fromkeys(out)) or ["<eos>"]

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, len(self.tok))  # [batch, seq, vocab]
        for b in range(input_ids.shape[0]):
            ids = input_ids[b] if attention_mask is None else input_ids[b][attention_mask[b].bool()]
            # the right character first: it gets the top logit, so greedy decoding stays right; a coin's other side
            # gets nearly as much, so sampling takes either about half the time (anything else ~1e-7)
            for rank, ch in enumerate(self._next(self.tok.decode(ids.tolist()))):
                logits[b, -1, self.tok.convert_tokens_to_ids(ch)] = 20.0 - 0.1 * rank
        return SimpleNamespace(logits=logits)


class VerifierPRM(torch.nn.Module):
    """A scripted process reward model over the char tokenizer (one token per character): logit +5 at each step end
    whose step the task's verifier accepts, -5 where it rejects it, and at the answer's last character +5 when the
    answer is right; 0 elsewhere."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tok = tokenizer
        self.config = SimpleNamespace(num_labels=1)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        logits = torch.zeros(*input_ids.shape, 1)  # [batch, seq, 1]
        for b in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[b][attention_mask[b].bool()].tolist())
            prompt, question, completion = split_text(text)
            steps, answer = chains.parse_completion(completion)
            verdicts = chains.verify_steps(question, steps)
            verdicts.append(chains.check_answer(answer, chains.gold_steps(question)[1]))
            for ok, off in zip(verdicts, chains.step_end_offsets(completion)):
                logits[b, len(prompt) + off, 0] = 5.0 if ok else -5.0
        return SimpleNamespace(logits=logits)
