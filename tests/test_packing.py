"""``data.packing: per_document`` keeps every packed document or example apart: its logits in a packed row equal its
logits alone (text blocks and question/answer rows on the Lightning backend, SFT rows through TRL's packing), and the
same rows with an attention mask (what packing did before) do not. Plus what each backend builds and trains."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch

from tests.conftest import TINY
from tests.test_trl_backend import trl_recipe, write
from llm_limits.trainers.build.data import build_datasets, pack_rows, real_tokens
from llm_limits.trainers.backends.lightning import CausalLMModule
from llm_limits.trainers.recipe.schema import DataSpec
from llm_limits.trainers.run import train
from llm_limits.trainers.build.tokenizers import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = build_char_tokenizer()


def tiny_model(attn: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def documents(row: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """``[start, end)`` of each document in a packed row: runs of consecutive position ids."""
    pos = row["position_ids"].tolist()
    starts = [i for i, p in enumerate(pos) if i == 0 or p != pos[i - 1] + 1]
    return list(zip(starts, starts[1:] + [len(pos)]))


def worst_gap(model: Any, row: dict[str, torch.Tensor], *, with_mask: bool = False) -> float:
    """Largest |logit difference| between each document of ``row`` in the packed forward and the document alone."""
    inputs = CausalLMModule._forward_inputs({k: v[None] for k, v in row.items()})
    if with_mask:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        gap = 0.0
        for s, e in documents(row):
            alone = model(input_ids=row["input_ids"][None, s:e], use_cache=False).logits[0]
            gap = max(gap, float((packed[s:e] - alone).abs().max()))
    return gap


def docs_file(tmp_path):
    docs = [{"text": "short one."}, {"text": "a somewhat longer document here."}, {"text": "x y z " * 6}] * 8
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def qa_file(tmp_path, n: int = 24):
    recs = [{"context": "filler " * (1 + i % 5) + f"key{i} is {i % 7}.", "query": f" key{i}?", "answer": f" {i % 7}"}
            for i in range(n)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["text", "qa"])
def test_packed_documents_attend_only_to_themselves(tmp_path, kind, attn):
    path = docs_file(tmp_path) if kind == "text" else qa_file(tmp_path)[0]
    spec = DataSpec(path=str(path), seq_len=96, packing="per_document", val_fraction=0.0)
    train_ds, _ = build_datasets(spec, TOK, seed=0)
    row = next(train_ds[i] for i in range(len(train_ds)) if len(documents(train_ds[i])) >= 3)
    assert "attention_mask" not in row
    model = tiny_model(attn)
    assert worst_gap(model, row) < 1e-5
    # The control: the same row with an all-ones mask lets later documents see earlier ones.
    assert worst_gap(model, row, with_mask=True) > 1e-3


def test_qa_examples_pack_whole_once_each_with_their_labels(tmp_path):
    path, recs = qa_file(tmp_path)
    one = DataSpec(path=str(path), seq_len=96, packing="none", val_fraction=0.25, loss_on="answer")
    packed_spec = one.model_copy(update={"packing": "per_document"})
    rows, val_rows = build_datasets(one, TOK, seed=0)
    packed, val_packed = build_datasets(packed_spec, TOK, seed=0)
    assert len(packed) < len(rows) and len(val_packed) <= len(val_rows)

    def examples(ds, padded: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        out = []
        for i in range(len(ds)):
            r = ds[i]
            if padded:
                n = int(r["attention_mask"].sum())
                out.append((tuple(r["input_ids"][:n].tolist()), tuple(r["labels"][:n].tolist())))
            else:
                out += [(tuple(r["input_ids"][s:e].tolist()), tuple(r["labels"][s:e].tolist()))
                        for s, e in documents(r)][: -1 if int(r["n_tokens"]) < len(r["input_ids"]) else None]
        return sorted(out)

    # Every training example once, whole, with its answer-only labels; validation examples stay in validation.
    assert examples(packed, False) == examples(rows, True)
    assert examples(val_packed, False) == examples(val_rows, True)
    assert sum(real_tokens({"n_tokens": packed[i]["n_tokens"][None]}) for i in range(len(packed))) == sum(
        int(rows[i]["attention_mask"].sum()) for i in range(len(rows)))


def test_pack_rows_drops_nothing_and_fills_rows():
    lengths = [5, 9, 3, 7, 1, 8, 2]
    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in lengths]
    packed = pack_rows(rows, seq_len=10, pad=0)
    assert sorted(e - s for r in packed for s, e in documents(r)[: len(documents(r)) - (int(r["n_tokens"]) < 10)]) \
        == sorted(lengths)
    assert len(packed) == 4  # 35 tokens in rows of 10: best fit decreasing needs the minimum, 4


@pytest.mark.parametrize("packing", ["per_document", "none"])
def test_lightning_trains_on_packed_qa_rows(tmp_path, packing):
    path, _ = qa_file(tmp_path)
    r = copy.deepcopy(TINY)
    r["data"] = {"path": str(path), "seq_len": 96, "batch_size": 4, "packing": packing, "val_fraction": 0.2}
    r.update(output_dir=str(tmp_path / "runs"), evals=[])
    r["trainer"]["max_steps"] = 2
    (tmp_path / "r.yaml").write_text(json.dumps(r))
    run_dir = train(str(tmp_path / "r.yaml"), progress=False, echo=lambda s: None)
    stats = json.loads((run_dir / "results.json").read_text())["train"]
    assert stats["steps"] == 2 and stats["val_loss"] == stats["val_loss"]  # trained, validated (not NaN)


# --- TRL: SFT rows through TRL's own packing ---------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sft_packed_batch_keeps_examples_apart(tmp_path, attn):
    from llm_limits.trainers.recipe.schema import validate_recipe
    from llm_limits.trainers.backends.trl import build_datasets as trl_datasets, sft_trainer, training_kwargs

    r = trl_recipe(tmp_path, "sft")
    r["data"].update(packing="per_document", val_fraction=0.0)
    recipe = validate_recipe(r).recipe
    model = tiny_model(attn)
    train_ds, _, _ = trl_datasets(recipe, TOK, model)
    kw = training_kwargs(recipe.trainer, recipe.data, tmp_path, 0, progress=False, has_val=False)
    trainer = sft_trainer(model, TOK, recipe, kw, (train_ds, None), [])
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1  # padding-free: one flat row
    row = {"input_ids": batch["input_ids"][0], "position_ids": batch["position_ids"][0]}
    assert len(documents(row)) >= 8  # whole examples: several packed rows of 64 tokens make the micro-batch
    model.eval()
    assert worst_gap(model, row) < 1e-5
    assert worst_gap(model, row, with_mask=True) > 1e-3


def test_sft_packing_trains_fewer_steps_for_the_same_token_budget(tmp_path):
    stats = {}
    for packing in ("none", "per_document"):
        r = trl_recipe(tmp_path / packing, "sft")
        r["data"]["packing"] = packing
        r["evals"] = []
        r["trainer"].update(max_steps=1000, max_tokens=3000)
        run_dir = train(str(write(tmp_path, r, f"{packing}.yaml")), progress=False, echo=lambda s: None)
        stats[packing] = json.loads((run_dir / "results.json").read_text())["train"]
    # Packed micro-batches hold several times the real tokens of 8 padded examples (rows of 64 tokens): fewer steps
    # buy the same budget, and each run stops within a step's tokens of it.
    assert stats["per_document"]["steps"] * 1.5 < stats["none"]["steps"]
    for s in stats.values():
        per_step = s["tokens_seen"] / s["steps"]
        assert 3000 - 1.5 * per_step <= s["tokens_seen"] <= 3000 + 1.5 * per_step
