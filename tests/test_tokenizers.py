"""The character tokenizer (exact ids, exact round trips, save/load through plain AutoTokenizer) and load_tokenizer."""

from __future__ import annotations

import json
import string

import pytest
import transformers

from llm_limits.trainers.recipe.errors import UserError
from llm_limits.trainers.build.tokenizers import DEFAULT_ALPHABET, SPECIAL_TOKENS, build_char_tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def char_id(c: str) -> int:
    return len(SPECIAL_TOKENS) + DEFAULT_ALPHABET.index(c)


def test_default_alphabet_is_printable_ascii_without_odd_whitespace():
    assert set(DEFAULT_ALPHABET) == set(string.printable) - set("\r\x0b\x0c\t")
    assert " " in DEFAULT_ALPHABET and "\n" in DEFAULT_ALPHABET
    assert len(DEFAULT_ALPHABET) == 96


def test_special_tokens_and_ids(tok):
    assert (tok.pad_token, tok.unk_token, tok.bos_token, tok.eos_token) == SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + 96
    assert tok.model_max_length >= 1_000_000


def test_exact_ids_one_token_per_character(tok):
    text = "Hi, yo!\n a"
    expected = [char_id(c) for c in text]
    assert tok(text)["input_ids"] == expected
    assert tok(text, add_special_tokens=False)["input_ids"] == expected  # neither adds <bos>/<eos>
    assert tok.convert_ids_to_tokens(expected) == list(text)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  two  leading spaces and trailing  ",
        "line one\nline two\n\n",
        "a , b . c ? don 't it 's  (x) [y] {z} ~`@#$%^&*_+-=|\\/<>\"';:",
        "Q: what is 12 + 30?\nA: 42",
        "",
    ],
)
def test_decode_encode_round_trip_is_exact(tok, text):
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text  # no spaces between characters, no clean-up of " ,"


def test_unknown_characters_become_unk(tok):
    ids = tok("a\té€")["input_ids"]
    assert ids == [char_id("a"), 1, 1, 1]


def test_long_text_is_not_truncated(tok):
    text = "abc \n" * 20_000
    assert len(tok(text)["input_ids"]) == len(text)


def test_batch_padding_uses_pad_id_zero(tok):
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [char_id("a"), char_id("b"), 0, 0]
    assert batch["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_custom_alphabet_dedupes_and_keeps_order():
    tok = build_char_tokenizer("ba\nab ")
    assert len(tok) == 4 + 4
    assert tok("ab \nc")["input_ids"] == [5, 4, 7, 6, 1]
    assert tok.decode(tok("a b\nba")["input_ids"]) == "a b\nba"


def test_save_and_load_with_plain_auto_tokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)  # no custom class, no remote code
    text = "The quick brown fox,\n  jumps over 13 lazy dogs!"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2, 3)
    assert len(loaded) == len(tok)


def test_empty_alphabet_is_a_user_error():
    with pytest.raises(UserError, match=r"^alphabet: expected a non-empty string"):
        build_char_tokenizer("")
    with pytest.raises(UserError, match=r"^model\.tokenizer\.alphabet: expected a non-empty string"):
        load_tokenizer("char", alphabet="")


def test_load_tokenizer_char_and_pretrained(tok, tmp_path):
    assert load_tokenizer("char")("ab")["input_ids"] == tok("ab")["input_ids"]
    assert len(load_tokenizer("char", alphabet="xyz")) == 7
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer("pretrained", str(tmp_path))
    assert loaded("a b\n")["input_ids"] == tok("a b\n")["input_ids"]


def test_load_tokenizer_missing_dir_names_the_field(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as err:
        load_tokenizer("pretrained", str(missing))
    assert str(err.value) == (
        f"model.tokenizer.path: {missing} does not exist "
        "(expected a local Hugging Face tokenizer directory with a tokenizer_config.json or tokenizer.json)"
    )
    with pytest.raises(UserError, match=r"^evals\.tokenizer\.path: .* is not a directory with a tokenizer_config"):
        load_tokenizer("pretrained", str(tmp_path), field_prefix="evals.tokenizer")


def test_load_tokenizer_uncached_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^model\.tokenizer\.path: 'no-such-org/no-such-tok' is not a local directory"):
        load_tokenizer("pretrained", "no-such-org/no-such-tok")


def test_load_tokenizer_from_a_cached_hub_id(tok, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "1" * 40  # the layout huggingface_hub writes: refs/main -> snapshots/<commit>/<files>
    repo = tmp_path / "models--tiny-org--char-tok"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    tok.save_pretrained(repo / "snapshots" / commit)
    loaded = load_tokenizer("pretrained", "tiny-org/char-tok")
    assert loaded("a b\n")["input_ids"] == tok("a b\n")["input_ids"]


def test_load_tokenizer_field_errors():
    with pytest.raises(UserError, match=r"^model\.tokenizer\.kind: 'bpe' is not one of char, pretrained$"):
        load_tokenizer("bpe")
    with pytest.raises(UserError, match=r"^model\.tokenizer\.path: required when kind is 'pretrained'"):
        load_tokenizer("pretrained", None)
    with pytest.raises(UserError, match=r"^model\.tokenizer\.path: must be unset when kind is 'char'"):
        load_tokenizer("char", "/some/dir")


def _save_without(tok, tmp_path, *keys: str):
    tok.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in keys:
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg))


def test_pretrained_without_pad_uses_eos(tok, tmp_path):
    _save_without(tok, tmp_path, "pad_token")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).pad_token is None  # the fixture really lacks it
    loaded = load_tokenizer("pretrained", str(tmp_path))
    assert loaded.pad_token == "<eos>" and loaded.pad_token_id == loaded.eos_token_id == 3


def test_pretrained_without_pad_or_eos_is_a_user_error(tok, tmp_path):
    _save_without(tok, tmp_path, "pad_token", "eos_token")
    with pytest.raises(UserError, match=r"^model\.tokenizer\.path: the tokenizer at .* has neither a pad nor an eos"):
        load_tokenizer("pretrained", str(tmp_path))
