"""Seeded synthetic English-like text for character-level language modelling, and its JSONL loader.

Sentences come from a small template grammar over a few hundred words ("the red fox sees a small cat near the old
tree."), joined into a stream with an occasional paragraph break, and each document is that stream cut at exactly
``doc_chars`` characters. A tiny char-level model has real structure to learn (spelling, word order, agreement of
"a"/"an"), yet learns it within a few hundred steps. Only the characters of :data:`ALPHABET` are ever emitted, so a
character tokenizer built over it never needs an unknown token.

Both entry points yield the same records, ``{"text": str}``: :func:`generate` (seeded, deterministic; the training run
uses the recipe's seed, the evals their own) and :func:`load_jsonl` (a user's own corpus, one JSON object per line).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from os import PathLike

from llm_limits.evals.tasks import TaskDataError
from llm_limits.evals.tasks.jsonl import json_objects, json_type

VERSION = "1"
"""Version of the records this task yields: bump it when they change, so that results over different records are
not compared as equals."""

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"
"""Every character :func:`generate` can emit, and no other: lowercase letters, space, ``.``, ``,`` and newline."""

# --- the grammar's words (lowercase a-z only; subjects are singular, so verbs take the third-person "s") ----------
DETERMINERS = ("the", "a", "this", "that", "every", "one", "some", "no", "each", "my", "your", "his", "her", "our",
               "their")
ADJECTIVES = (
    "red", "blue", "green", "old", "young", "small", "big", "tall", "short", "quiet", "loud", "happy", "sad", "brave",
    "calm", "dark", "bright", "cold", "warm", "wild", "gentle", "clever", "lazy", "quick", "slow", "soft", "hard",
    "tiny", "huge", "proud", "shy", "busy", "empty", "heavy", "light", "rich", "poor", "strange", "kind", "cruel",
    "silent", "noisy", "golden", "silver", "wooden", "sharp", "round", "narrow", "wide", "deep", "thin", "clean",
    "dirty", "fresh", "sweet", "bitter", "hungry", "tired", "angry", "lonely", "famous", "humble", "ancient", "modern",
    "hidden", "broken", "lucky", "curious", "eager", "fierce", "friendly", "grey", "pale", "pink", "purple", "yellow",
    "white", "black", "brown", "orange", "early", "late", "honest", "odd", "icy", "itchy", "open", "ugly", "elegant",
)
NOUNS = (
    "fox", "cat", "dog", "bird", "horse", "king", "queen", "child", "farmer", "baker", "sailor", "doctor", "teacher",
    "student", "wolf", "bear", "rabbit", "mouse", "owl", "fish", "frog", "snake", "lion", "tiger", "goat", "sheep",
    "cow", "duck", "tree", "river", "mountain", "house", "garden", "city", "village", "road", "bridge", "castle",
    "tower", "forest", "field", "lake", "boat", "ship", "window", "door", "table", "chair", "book", "letter", "lamp",
    "stone", "flower", "apple", "bread", "cake", "cup", "bottle", "box", "basket", "hat", "coat", "shoe", "ring", "key",
    "clock", "bell", "song", "story", "map", "wagon", "candle", "mirror", "blanket", "pillow", "hammer", "rope",
    "ladder", "fence", "well", "barn", "mill", "market", "church", "school", "island", "valley", "hill", "cave",
    "desert", "meadow", "pond", "stream", "cloud", "star", "moon", "sun", "storm", "wind", "painter", "poet",
    "soldier", "hunter", "merchant", "prince", "princess", "knight", "wizard", "giant", "dragon", "goose", "eagle",
    "elephant", "otter", "ant", "insect", "orchard", "egg", "umbrella", "engine", "artist", "uncle", "aunt",
)
TRANSITIVE = (
    "sees", "finds", "follows", "watches", "likes", "loves", "hates", "helps", "carries", "builds", "paints", "draws",
    "reads", "writes", "chases", "catches", "feeds", "visits", "leaves", "meets", "calls", "holds", "pushes", "pulls",
    "opens", "closes", "wants", "takes", "brings", "sells", "buys", "hides", "keeps", "greets", "thanks", "fears",
    "trusts", "admires", "remembers", "forgets", "cleans", "fixes", "breaks", "guards", "teaches", "answers", "hears",
    "touches", "lifts", "throws", "washes", "cooks", "eats", "knows", "guides", "warns", "rescues", "ignores",
    "praises", "blames",
)
INTRANSITIVE = (
    "sleeps", "runs", "walks", "sings", "dances", "waits", "laughs", "cries", "smiles", "sits", "stands", "falls",
    "jumps", "swims", "flies", "rests", "listens", "wanders", "shouts", "whispers", "works", "plays", "dreams",
    "arrives", "returns", "stays", "grows", "shines", "glows", "trembles",
)
ADVERBS = ("quickly", "slowly", "quietly", "loudly", "happily", "sadly", "gently", "often", "rarely", "softly",
           "calmly", "bravely", "carefully", "suddenly", "proudly", "eagerly", "boldly", "warmly", "again", "alone")
PREPOSITIONS = ("near", "under", "behind", "beside", "above", "below", "across", "inside", "outside", "around",
                "beyond", "past", "along", "toward", "through", "over", "with", "without", "by", "on", "in", "at",
                "from", "into")
CONJUNCTIONS = ("and", "but", "while", "because", "so", "until", "although")
OPENERS = ("today", "yesterday", "at dawn", "at night", "in the morning", "in the evening", "later", "once", "soon",
           "every day", "in winter", "in summer")

PARAGRAPH_BREAK_P = 0.12
"""Probability that a sentence starts a new paragraph (joined by ``\\n`` instead of a space)."""


@dataclass
class SyntheticTextConfig:
    num_docs: int = 512
    """Number of documents (records) to generate."""
    doc_chars: int = 256
    """Length of each document in characters: a stream of sentences cut at exactly this length."""
    seed: int = 0
    """Seed of the generator; the same config always gives the same text."""


def noun_phrase(rng: random.Random) -> str:
    """A determiner, zero to two adjectives and a noun: ``"an old red fox"``."""
    words = [rng.choice(NOUNS)]
    for _ in range(rng.choices((0, 1, 2), weights=(4, 4, 2))[0]):
        words.insert(0, rng.choice(ADJECTIVES))
    det = rng.choice(DETERMINERS)
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    return " ".join([det, *words])


def clause(rng: random.Random) -> str:
    """A subject and a predicate: transitive (with an object), intransitive (with an adverb), or ``is`` + adjective;
    each may end in a prepositional phrase."""
    kind = rng.random()
    if kind < 0.5:
        words = [noun_phrase(rng), rng.choice(TRANSITIVE), noun_phrase(rng)]
    elif kind < 0.85:
        words = [noun_phrase(rng), rng.choice(INTRANSITIVE)]
        if rng.random() < 0.5:
            words.append(rng.choice(ADVERBS))
    else:
        words = [noun_phrase(rng), "is", rng.choice(ADJECTIVES)]
    if rng.random() < 0.4:
        words += [rng.choice(PREPOSITIONS), noun_phrase(rng)]
    return " ".join(words)


def sentence(rng: random.Random) -> str:
    """One sentence ending in ``.``, e.g. ``"the red fox sees a small cat near the old tree."``; some are compound
    (``", but ..."``) or open with a time phrase (``"at dawn, ..."``)."""
    kind = rng.random()
    if kind < 0.6:
        text = clause(rng)
    elif kind < 0.85:
        text = f"{clause(rng)}, {rng.choice(CONJUNCTIONS)} {clause(rng)}"
    else:
        text = f"{rng.choice(OPENERS)}, {clause(rng)}"
    return text + "."


def generate(config: SyntheticTextConfig) -> list[dict]:
    """``config.num_docs`` records ``{"text": str}``: consecutive pieces of exactly ``config.doc_chars`` characters cut
    from one stream of sentences. Deterministic: it draws only from ``random.Random(config.seed)``.

    Documents start wherever the cut falls (mid-sentence, mid-word), so the text is the same at every position of a
    document: a position's loss reflects how much context precedes it and whether the model was trained there, not
    an easy "every document starts a sentence" opening.
    """
    if config.num_docs < 0:
        raise ValueError(f"synthetic_text: num_docs must be >= 0 (got {config.num_docs})")
    if config.doc_chars < 1:
        raise ValueError(f"synthetic_text: doc_chars must be >= 1 (got {config.doc_chars})")
    rng = random.Random(config.seed)
    records = []
    stream = ""  # what the last sentence left over past the previous document's end
    for _ in range(config.num_docs):
        parts = [stream]
        length = len(stream)
        while length < config.doc_chars:
            sep = ("\n" if rng.random() < PARAGRAPH_BREAK_P else " ") if records or len(parts) > 1 else ""
            part = sep + sentence(rng)
            parts.append(part)
            length += len(part)
        stream = "".join(parts)
        records.append({"text": stream[: config.doc_chars]})
        stream = stream[config.doc_chars :]
    return records


def load_jsonl(path: str | PathLike, text_field: str = "text") -> list[dict]:
    """Records ``{"text": str}`` from a JSONL file with one JSON object per line holding a string ``text_field``.

    Blank lines are skipped. Any other problem raises :class:`~evals.tasks.TaskDataError` with a one-line message
    naming the file and line, e.g. ``data.jsonl:3: not valid JSON (Expecting ',' delimiter)``.
    """
    expected = f'expected a JSON object with a string "{text_field}"'
    records = []
    for where, obj in json_objects(path, expected):
        if text_field not in obj:
            raise TaskDataError(f'{where}: missing field "{text_field}" ({expected})')
        text = obj[text_field]
        if not isinstance(text, str):
            raise TaskDataError(f'{where}: field "{text_field}" is a JSON {json_type(text)} ({expected})')
        records.append({"text": text})
    return records
