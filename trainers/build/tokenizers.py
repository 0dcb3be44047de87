"""Tokenizers for a run: a character-level one built locally (tests, demos, tiny recipes) or a pretrained one read
from a local directory (or a hub id already in the local Hugging Face cache). Nothing here touches the network.

Both kinds come back as a ``transformers`` tokenizer, so every caller (the backends, the evals, the task loaders)
sees one interface: ``tok(text)["input_ids"]``, ``tok.decode(ids)``, ``tok.pad_token_id``, ``save_pretrained``.
"""

from __future__ import annotations

import logging
import string

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from llm_limits.trainers.recipe.errors import UserError

logger = logging.getLogger(__name__)

TOKENIZER_KINDS = ("char", "pretrained")
"""Values of ``model.tokenizer.kind`` in a recipe."""

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
"""The character tokenizer's special tokens, ids 0..3 in this order (``<pad>`` is id 0)."""

DEFAULT_ALPHABET = "".join(c for c in string.printable if c not in "\r\x0b\x0c\t")
"""Printable ASCII: letters, digits, punctuation, space and ``'\\n'`` (95 + 1 characters). Covers any English-like
task; ``'\\t'``, ``'\\r'`` and the form feeds are left out so a task's text has one way to write white space."""

CHAR_MODEL_MAX_LENGTH = 1_000_000
"""``model_max_length`` of the character tokenizer: large, so ``transformers`` never warns about truncation. The
context length a run trains at is the recipe's business, not the tokenizer's."""


def build_char_tokenizer(alphabet: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer: every character of ``alphabet`` (spaces and ``'\\n'`` included) is one token.

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3, then the alphabet's characters in their order (a repeated
    character keeps its first id). A character outside the alphabet encodes to ``<unk>``. For text made of alphabet
    characters ``tok.decode(tok(text)["input_ids"]) == text`` exactly: no normalizer, no added spaces, no clean-up.

    ``add_special_tokens`` (``True`` by default in ``tok(text)``) adds nothing: the encoding is a plain character
    stream and callers put ``<bos>``/``<eos>`` where their data format wants them. The literal text ``"<eos>"`` (and
    the other special tokens' text) encodes to the special token, as with any ``transformers`` tokenizer.

    The result saves with ``save_pretrained(dir)`` and loads back with plain ``AutoTokenizer.from_pretrained(dir)``
    (no custom class, no remote code) with identical ids.
    """
    alphabet = DEFAULT_ALPHABET if alphabet is None else alphabet
    _check_alphabet(alphabet, "alphabet")
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # An empty pattern matches between every two characters, so each character is its own pre-token (spaces and
    # newlines included; the default whitespace pre-tokenizer would drop them).
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    # Fuse joins tokens with no separator; the default WordLevel decoding would put a space between every character.
    backend.decoder = decoders.Fuse()
    # No post-processor: add_special_tokens=True adds no <bos>/<eos> (see the docstring).
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=CHAR_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,  # it would turn " ," into "," and break the exact round trip
    )


def load_tokenizer(
    kind: str = "char",
    path: str | None = None,
    *,
    alphabet: str | None = None,
    trust_remote_code: bool = False,
    field_prefix: str = "model.tokenizer",
) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer a recipe's ``model.tokenizer`` section asks for.

    - ``kind="char"``: :func:`build_char_tokenizer` over ``alphabet`` (``None``: :data:`DEFAULT_ALPHABET`); ``path``
      must be unset.
    - ``kind="pretrained"``: ``AutoTokenizer.from_pretrained(path, local_files_only=True)``. ``path`` is a local
      directory, or a hub id already in the local Hugging Face cache (never downloaded). A tokenizer with no pad
      token gets ``pad = eos`` (the usual choice for causal LMs: padded positions are masked out of the loss, so
      sharing the id with eos changes nothing the model learns); one with neither is a :class:`UserError`.

    ``field_prefix`` names the recipe section in error messages (``model.tokenizer.path: ...``).
    """
    if kind == "char":
        if path is not None:
            raise UserError(f"{field_prefix}.path: must be unset when kind is 'char' (got {path!r})")
        if alphabet is not None:
            _check_alphabet(alphabet, f"{field_prefix}.alphabet")
        return build_char_tokenizer(alphabet)
    if kind != "pretrained":
        raise UserError(f"{field_prefix}.kind: {kind!r} is not one of {', '.join(TOKENIZER_KINDS)}")
    if alphabet is not None:
        raise UserError(f"{field_prefix}.alphabet: only used when kind is 'char' (kind is 'pretrained')")
    if not path:
        raise UserError(f"{field_prefix}.path: required when kind is 'pretrained' (a local tokenizer directory)")

    from llm_limits.trainers.build.models import resolve_pretrained  # local import: models.py is the heavier module

    source = resolve_pretrained(path, f"{field_prefix}.path", marker_files=_TOKENIZER_FILES, what="tokenizer")
    if trust_remote_code:
        logger.warning("%s: trusting remote code from %s (trust_remote_code=True runs Python that ships with it)",
                       field_prefix, path)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            source, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise UserError(f"{field_prefix}.path: could not load a tokenizer from {path}: {_one_line(err)}") from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(
                f"{field_prefix}.path: the tokenizer at {path} has neither a pad nor an eos token "
                "(expected one of them to pad batches; set pad_token in its tokenizer_config.json)"
            )
        tok.pad_token = tok.eos_token
        logger.info("%s: no pad token in %s, using eos %r as pad", field_prefix, path, tok.eos_token)
    return tok


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
"""Any one of these in a directory makes it a tokenizer directory."""


def _check_alphabet(alphabet: object, field: str) -> None:
    if not isinstance(alphabet, str) or not alphabet:
        raise UserError(f"{field}: expected a non-empty string of characters (got {alphabet!r})")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
