"""Training data: text records pack into blocks; needle records become one padded row each with exact token spans."""

from __future__ import annotations

import json

import pytest

from llm_limits.evals.tasks.ruler import RulerConfig, generate
from llm_limits.trainers.build.data import build_datasets, qa_rows
from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.recipe.schema import DataSpec
from llm_limits.trainers.build.tokenizers import build_char_tokenizer

TOK = build_char_tokenizer()


def test_generated_needle_rows_fill_the_window_with_exact_spans():
    train, val = build_datasets(DataSpec(task="ruler", params={"num_examples": 40}, seq_len=64, val_fraction=0.1), TOK, 0)
    assert len(train) == 36 and len(val) == 4
    for i in range(len(train)):
        row = train[i]
        assert row["input_ids"].shape == (64,) and int(row["attention_mask"].sum()) == 64  # char tokenizer: exact fit
        needle = TOK.decode(row["input_ids"][row["needle_start"] : row["needle_end"]])
        assert needle.startswith("#") and needle.endswith(".")  # the `#key:value.` needle, whole
        text = TOK.decode(row["input_ids"][: row["context_end"]])
        assert needle in text and int(row["context_start"]) == 0


def test_loss_on_answer_masks_everything_but_the_answer_and_eos():
    rec = generate(RulerConfig(num_examples=1, context_chars=40, seed=5))[0]
    (row,), dropped = qa_rows([rec], TOK, 64, "answer")
    assert dropped == 0
    kept = row["labels"][row["labels"] != -100]
    assert TOK.decode(kept) == rec["answer"] + TOK.eos_token
    (full,), _ = qa_rows([rec], TOK, 64, "all")
    n = int(full["attention_mask"].sum())
    assert (full["labels"][:n] == full["input_ids"][:n]).all() and (full["labels"][n:] == -100).all()


def test_rows_that_do_not_fit_are_dropped_and_none_fitting_is_an_error():
    recs = generate(RulerConfig(num_examples=3, context_chars=100, seed=1))
    rows, dropped = qa_rows(recs, TOK, 64, "all")
    assert rows == [] and dropped == 3
    with pytest.raises(UserError, match="none of the 3 question/answer examples fits data.seq_len=32"):
        build_datasets(DataSpec(task="ruler", params={"num_examples": 3, "context_chars": 100}, seq_len=32), TOK, 0)


def test_user_jsonl_of_needle_records_or_text(tmp_path):
    qa = tmp_path / "needles.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in generate(RulerConfig(num_examples=5, context_chars=40, seed=2))))
    train, _ = build_datasets(DataSpec(path=str(qa), seq_len=64, val_fraction=0.0), TOK, 0)
    assert len(train) == 5 and int(train[0]["needle_start"]) >= 0
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": "the red fox sees a cat. " * 4}) + "\n" for _ in range(8)))
    blocks, _ = build_datasets(DataSpec(path=str(text), seq_len=32, val_fraction=0.0), TOK, 0)
    assert blocks[0]["input_ids"].shape == (32,) and int(blocks[0]["needle_start"]) == -1  # plain rows carry -1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "abc", "query": "?"}\n')
    with pytest.raises(UserError, match=r"^data\.path: .*bad\.jsonl:1: missing field"):
        build_datasets(DataSpec(path=str(bad), seq_len=32), TOK, 0)


def test_data_root_admits_files_inside_and_refuses_links_and_evals_outside(tmp_path):
    """``data.root``: a data file inside trains; a symlink inside that points outside, and an eval path outside, are
    refused with one line naming the field."""
    import copy

    from tests.conftest import TINY
    from llm_limits.trainers.recipe.schema import validate_recipe
    from llm_limits.trainers.build.assemble import build

    root = tmp_path / "data"
    root.mkdir()
    line = json.dumps({"text": "a line of text long enough to make a block or two of characters. " * 3})
    (root / "in.jsonl").write_text(line + "\n")
    (tmp_path / "out.jsonl").write_text(line + "\n")
    (root / "link.jsonl").symlink_to(tmp_path / "out.jsonl")

    def recipe(path, evals=()):
        r = copy.deepcopy(TINY)
        r["data"] = {"root": str(root), "path": str(path), "seq_len": 32, "batch_size": 2, "val_fraction": 0.0}
        r["evals"] = list(evals)
        return validate_recipe(r, "r.yaml")

    build(recipe(root / "in.jsonl"))  # inside: builds
    with pytest.raises(UserError, match=r"data.path: .*link.jsonl is outside data.root"):
        build(recipe(root / "link.jsonl"))
    kb = tmp_path / "kb.jsonl"
    kb.write_text("")
    with pytest.raises(UserError, match=r"evals\[0\].path: .* is outside data.root"):
        build(recipe(root / "in.jsonl", [{"name": "multimodal", "task": "image_folder", "path": str(kb)}]))


@pytest.mark.parametrize("packing", ["blocks", "per_document", "none"])
def test_packing_modes_build_their_rows_and_train(tmp_path, packing):
    """``blocks``: continuous positions (none given); ``per_document``: positions restart after each EOS, exactly;
    ``none``: one padded row per document, no loss on padding. Each trains 2 steps."""
    import copy

    from tests.conftest import TINY
    from llm_limits.trainers.run import train

    tok = build_char_tokenizer()
    docs = [{"text": "short one."}, {"text": "a somewhat longer document here."}, {"text": "x" * 80}] * 10
    spec = DataSpec(path=None, task="synthetic_text", seq_len=32, packing=packing, val_fraction=0.0)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = spec.model_copy(update={"path": str(path)})
    train_ds, _ = build_datasets(spec, tok, seed=0)
    row = train_ds[0]
    if packing == "blocks":
        assert "position_ids" not in row
    elif packing == "per_document":
        ids, pos = row["input_ids"], row["position_ids"]
        eos_at = (ids == tok.eos_token_id).nonzero().flatten().tolist()
        assert eos_at and pos[0] == 0
        for i in eos_at:
            if i + 1 < len(ids):
                assert pos[i + 1] == 0 and pos[i] == pos[i - 1] + 1
        assert len(train_ds) == len(build_datasets(spec.model_copy(update={"packing": "blocks"}), tok, 0)[0])
    else:
        assert len(train_ds) == len(docs)
        n = int(row["attention_mask"].sum())
        assert tok.decode(row["input_ids"][:n]) == "short one.<eos>"
        assert (row["labels"][n:] == -100).all() and (row["labels"][:n] == row["input_ids"][:n]).all()
    r = copy.deepcopy(TINY)
    r["data"] = {"path": str(path), "seq_len": 32, "batch_size": 4, "packing": packing, "val_fraction": 0.0}
    r.update(output_dir=str(tmp_path / "runs"), evals=[])
    r["trainer"]["max_steps"] = 2
    (tmp_path / "r.yaml").write_text(json.dumps(r))
    run_dir = train(str(tmp_path / "r.yaml"), progress=False, echo=lambda s: None)
    assert json.loads((run_dir / "results.json").read_text())["train"]["steps"] == 2


def test_validation_rows_are_sharded_across_ranks_once_each(monkeypatch):
    from llm_limits.trainers.build.data import ResumableRandomSampler, ShardSampler

    shares = []
    for rank in range(3):
        monkeypatch.setattr(ResumableRandomSampler, "_world", staticmethod(lambda r=rank: (r, 3)))
        s = ShardSampler(10)
        shares.append(list(s))
        assert len(s) == len(shares[-1])
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]  # every row once, none padded in
