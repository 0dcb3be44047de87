"""Retrievers (evals/retrievers.py): BM25 and dense MiniLM find the right passage for paraphrased questions, RRF
fusion orders a hand-made case, save/load round trips, recall@k by hand, and one-line errors for bad inputs."""

from __future__ import annotations

import json

import pytest

from llm_limits.evals.retrievers import (
    RETRIEVERS,
    BM25Retriever,
    DenseRetriever,
    HybridRetriever,
    build_retriever,
    load_retriever,
    recall_at_k,
    reciprocal_rank_fusion,
)

IDS = [f"p{i}" for i in range(8)]
TEXTS = [
    "Paris is the seat of the French government.",
    "The Amazon rainforest produces a large share of the planet's oxygen.",
    "Mount Everest is the highest mountain above sea level.",
    "Honeybees communicate the location of flowers by dancing.",
    "The Great Wall of China was built over many centuries.",
    "Penicillin was discovered by Alexander Fleming in 1928.",
    "Jupiter is the largest planet in the solar system.",
    "Coffee beans are the roasted seeds of a tropical shrub.",
]

# paraphrases that keep one rare content word of their passage (what BM25 can match)
LEXICAL = {
    "Who discovered penicillin?": "p5",
    "Which planet is the largest?": "p6",
    "Which insects dance to point at flowers?": "p3",
}
# paraphrases with almost no word in common with their passage (what only a dense model matches)
SEMANTIC = {
    "Which city is the capital of France?": "p0",
    "What is the tallest peak on Earth?": "p2",
    "Who found the first antibiotic?": "p5",
}


@pytest.fixture(scope="module")
def dense() -> DenseRetriever:
    """The packaged MiniLM, loaded once for the module (a few seconds), indexed over the 8 passages."""
    return build_retriever("dense", IDS, TEXTS)


# --- retrieval quality ----------------------------------------------------------------------------------------------
def test_bm25_finds_the_passage_sharing_a_rare_word():
    bm25 = build_retriever("bm25", IDS, TEXTS)
    results = bm25.search(list(LEXICAL), k=3)
    assert [r[0][0] for r in results] == list(LEXICAL.values())
    for r in results:
        scores = [s for _, s in r]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_bm25_returns_nothing_without_a_shared_term():
    # "capital" and "France" appear in no passage (no stemming: "France" != "French"): BM25 has nothing to go on
    assert build_retriever("bm25", IDS, TEXTS).search(["Which city is the capital of France?"], k=3) == [[]]


def test_dense_finds_paraphrases_with_low_lexical_overlap(dense):
    results = dense.search(list(SEMANTIC) + list(LEXICAL), k=3)
    assert [r[0][0] for r in results] == list(SEMANTIC.values()) + list(LEXICAL.values())
    for r in results:
        assert len(r) == 3
        assert r[0][1] >= r[1][1] >= r[2][1] and -1.0 <= r[2][1] <= r[0][1] <= 1.0 + 1e-6
    assert dense.embeddings.shape == (8, 384)


def test_dense_caps_k_at_the_index_size(dense):
    assert [d for d, _ in dense.search(["coffee"], k=100)[0]][0] == "p7"
    assert len(dense.search(["coffee"], k=100)[0]) == 8


def test_hybrid_finds_both_kinds_of_paraphrase(dense):
    hybrid = HybridRetriever(build_retriever("bm25", IDS, TEXTS), dense)
    queries = list(SEMANTIC) + list(LEXICAL)
    assert [r[0][0] for r in hybrid.search(queries, k=2)] == list(SEMANTIC.values()) + list(LEXICAL.values())


# --- fusion ---------------------------------------------------------------------------------------------------------
class _Fixed:
    """A retriever stub returning fixed rankings, recording the k it was asked for."""

    def __init__(self, ranking: list[str]) -> None:
        self.ranking, self.ids, self.asked = ranking, sorted(ranking), []

    def search(self, queries, k):
        self.asked.append(k)
        return [[(d, 1.0) for d in self.ranking[:k]] for _ in queries]


def test_rrf_order_by_hand():
    # dense ranks a, b, c; BM25 ranks c, a. a: 1/61 + 1/62, c: 1/63 + 1/61, b: 1/62 -> a, c, b
    dense_stub, bm25_stub = _Fixed(["a", "b", "c"]), _Fixed(["c", "a"])
    hybrid = HybridRetriever(bm25_stub, dense_stub)  # type: ignore[arg-type]
    [hits] = hybrid.search(["q"], k=3)
    assert [d for d, _ in hits] == ["a", "c", "b"]
    assert [s for _, s in hits] == pytest.approx([1 / 61 + 1 / 62, 1 / 61 + 1 / 63, 1 / 62])
    assert [d for d, _ in hybrid.search(["q"], k=2)[0]] == ["a", "c"]
    assert dense_stub.asked == bm25_stub.asked == [50, 50]  # each retriever's top max(k, 50)
    hybrid.search(["q"], k=70)
    assert dense_stub.asked[-1] == 70


def test_rrf_ties_go_to_the_first_seen_and_constant_matters():
    assert [d for d, _ in reciprocal_rank_fusion([["x", "y"], ["y", "x"]])] == ["x", "y"]
    # rrf_k = 0 gives 1/rank: b, second in all three lists (3 * 1/2), outscores a, first in one (1/1)
    fused = dict(reciprocal_rank_fusion([["a", "b"], ["c", "b"], ["d", "b"]], rrf_k=0))
    assert fused["b"] == pytest.approx(1.5) and fused["a"] == pytest.approx(1.0)


# --- save / load ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bm25", "dense", "hybrid"])
def test_save_load_round_trip(kind, dense, tmp_path):
    if kind == "bm25":
        retriever = build_retriever("bm25", IDS, TEXTS)
    elif kind == "dense":
        retriever = dense
    else:
        retriever = HybridRetriever(build_retriever("bm25", IDS, TEXTS), dense, rrf_k=30, depth=5)
    queries = list(SEMANTIC) + list(LEXICAL)
    retriever.save(tmp_path / kind)
    assert json.loads((tmp_path / kind / "kind.json").read_text())["kind"] == kind
    loaded = load_retriever(tmp_path / kind)
    assert type(loaded) is RETRIEVERS[kind]
    assert loaded.search(queries, k=4) == retriever.search(queries, k=4)
    if kind == "hybrid":
        assert (loaded.rrf_k, loaded.depth) == (30, 5)


def test_bm25_load_by_class_checks_kind(dense, tmp_path):
    dense.save(tmp_path / "d")
    with pytest.raises(ValueError, match=r"holds a 'dense' index \(expected 'bm25'"):
        BM25Retriever.load(tmp_path / "d")


# --- recall@k -------------------------------------------------------------------------------------------------------
def test_recall_at_k_by_hand():
    results = [
        [("a", 3.0), ("b", 2.0), ("c", 1.0)],
        [("c", 0.9), ("a", 0.5), ("b", 0.1)],
        [("b", 1.0)],
        [],
    ]
    gold = [["b"], ["a", "c"], ["c"], ["a"]]
    assert recall_at_k(results, gold, k=1) == 0.0
    assert recall_at_k(results, gold, k=2) == 0.5  # query 0 (b at 2) and query 1 (a and c in the top 2)
    assert recall_at_k(results, gold, k=3) == 0.5
    assert recall_at_k(results, [["b"], [], [], []], k=2) == 1.0  # queries without gold ids are left out


# --- bad inputs -----------------------------------------------------------------------------------------------------
def test_search_errors():
    with pytest.raises(ValueError, match="index is empty"):
        BM25Retriever().search(["q"], k=1)
    with pytest.raises(ValueError, match="index is empty"):
        DenseRetriever().search(["q"], k=1)  # the model is not loaded for this
    bm25 = build_retriever("bm25", IDS, TEXTS)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1 \(got 0\)"):
        bm25.search(["q"], k=0)
    with pytest.raises(ValueError, match=r"wrap it: \[query\]"):
        bm25.search("Who discovered penicillin?", k=1)  # type: ignore[arg-type]
    assert bm25.search([], k=1) == []


def test_index_errors():
    with pytest.raises(ValueError, match="2 ids for 1 texts"):
        BM25Retriever().index(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="duplicate passage id 'a'"):
        BM25Retriever().index(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match=r"retriever: expected one of bm25, dense, hybrid \(got 'tfidf'\)"):
        build_retriever("tfidf", IDS, TEXTS)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path}/missing: not a saved retriever index \(no such directory"):
        load_retriever(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path}/empty: not a saved retriever index \(expected kind.json"):
        load_retriever(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "kind.json").write_text('{"kind": "splade"}')
    with pytest.raises(ValueError, match=r"kind must be one of bm25, dense, hybrid \(got 'splade'\)"):
        load_retriever(tmp_path / "odd")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "kind.json").write_text('{"kind": "bm25"}')
    with pytest.raises(ValueError, match=rf"{tmp_path}/half: not a saved retriever index \(expected ids.json"):
        load_retriever(tmp_path / "half")
    (tmp_path / "half" / "ids.json").write_text('["a"]')
    with pytest.raises(ValueError, match=r"expected params.index.json"):
        load_retriever(tmp_path / "half")


def test_recall_errors():
    with pytest.raises(ValueError, match="2 result lists for 1 gold lists"):
        recall_at_k([[], []], [["a"]], k=1)
    with pytest.raises(ValueError, match=r"k must be an integer >= 1 \(got 0\)"):
        recall_at_k([[]], [["a"]], k=0)
    with pytest.raises(ValueError, match="wrap it"):
        recall_at_k([[]], ["a"], k=1)  # type: ignore[list-item]
