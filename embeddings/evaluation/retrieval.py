"""Retrieval evaluation: rank a corpus for each query, score the ranking (nDCG, MRR, MAP, ...).

The metric definitions, the tie-breaking (equal scores ordered by corpus id) and the similarity
functions are those of sentence-transformers' `InformationRetrievalEvaluator`, so the numbers are
comparable with published ones; the tests check equality on the real all-MiniLM-L6-v2.
"""

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from embeddings.evaluation.files import read_jsonl, text_field
from embeddings.losses import SIMILARITIES

# The cut-offs reported: sentence-transformers' defaults plus Recall@100 (the project's earlier
# metric set); the corpus ranking is kept to the largest of them.
ACCURACY_AT = (1, 3, 5, 10)
PRECISION_AT = (1, 3, 5, 10)
RECALL_AT = (1, 3, 5, 10, 100)
MRR_AT = (10,)
NDCG_AT = (10,)
MAP_AT = (100,)
TOP_K = max(*ACCURACY_AT, *PRECISION_AT, *RECALL_AT, *MRR_AT, *NDCG_AT, *MAP_AT)
METRIC_NAMES = tuple(
    f"{name}@{k}"
    for name, ks in (
        ("accuracy", ACCURACY_AT),
        ("precision", PRECISION_AT),
        ("recall", RECALL_AT),
        ("mrr", MRR_AT),
        ("ndcg", NDCG_AT),
        ("map", MAP_AT),
    )
    for k in ks
)
# Corpus rows scored at once: memory is queries x chunk float32, whatever the corpus size.
CORPUS_CHUNK = 4096
RETRIEVAL_FIELDS = ("package", "query", "document")


def load_retrieval(
    path, config_key: str = "config.eval.retrieval_file"
) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """Reads a query/document set such as data/debian_retrieval_dev.jsonl.gz.

    Each line is a JSON object with at least "package", "query" and "document" (other keys, such
    as "source" and "section", are ignored). The package's document is the one relevant document
    of its query; every document is part of the corpus.

    Args:
      path: a .jsonl or .jsonl.gz file (local or gs://).
      config_key: the config field that names the file, for error messages.

    Returns:
      (queries, corpus, relevant): package -> query text, package -> document text, and
      package -> {package}.

    Raises:
      ValueError: on a malformed line (named by file and line number) or a repeated package.
    """
    queries, corpus = {}, {}
    for where, row in read_jsonl(path, config_key):
        try:
            package, query, document = (text_field(row, key, where) for key in RETRIEVAL_FIELDS)
        except ValueError as err:
            raise ValueError(f"{err} Every line needs {RETRIEVAL_FIELDS}.") from None
        if package in queries:
            raise ValueError(f"{where}: package {package!r} appears twice; ids must be unique.")
        queries[package] = query
        corpus[package] = document
    if not queries:
        raise ValueError(f"{path} holds no queries.")
    return queries, corpus, {package: {package} for package in queries}


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit-norm rows in float32, as `torch.nn.functional.normalize` (norm clamped at 1e-12).

    The host-side (numpy) twin of `models.pooling.l2_normalize`: evaluation scores
    chunks of embeddings already on the host, which a jax call would copy back.
    """
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def prepare(x: np.ndarray, similarity: str) -> np.ndarray:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
    return l2_normalize_rows(x) if similarity == "cosine" else np.asarray(x, np.float32)


class TopK:
    """Each query's best corpus rows so far, merged chunk by chunk (memory: Q x (k + chunk)).

    Feeding the corpus in any chunking gives the ranking of scoring it whole: ties are broken by
    `tie_rank`, never by arrival order.

    Args:
      queries: [Q, D] query embeddings, already prepared (`prepare`).
      tie_rank: [C] ints; among equal scores the smaller rank comes first (ST orders ties by
        corpus id, so pass each row's position in the sorted ids).
      top_k: ranking depth.
    """

    def __init__(self, queries: np.ndarray, tie_rank: np.ndarray, top_k: int = TOP_K):
        self.queries = queries
        self.tie_rank = np.asarray(tie_rank)
        self.top_k = top_k
        self.scores = np.empty((queries.shape[0], 0), np.float32)
        self.rows = np.empty((queries.shape[0], 0), np.int64)

    def add(self, corpus: np.ndarray, start: int, *, chunk: int | None = None) -> None:
        """Scores prepared corpus rows `start..start + len(corpus)` and keeps the best."""
        chunk = chunk or CORPUS_CHUNK
        for offset in range(0, corpus.shape[0], chunk):
            scores = self.queries @ corpus[offset : offset + chunk].T
            first = start + offset
            rows = np.broadcast_to(np.arange(first, first + scores.shape[1]), scores.shape)
            scores = np.concatenate([self.scores, scores], axis=1)
            rows = np.concatenate([self.rows, rows], axis=1)
            # Sort by score descending, then tie rank ascending (lexsort's last key is primary).
            order = np.lexsort((self.tie_rank[rows], -scores), axis=-1)[:, : self.top_k]
            self.scores = np.take_along_axis(scores, order, axis=1)
            self.rows = np.take_along_axis(rows, order, axis=1)


def rank_corpus(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    tie_rank: np.ndarray,
    *,
    similarity: str = "cosine",
    top_k: int = TOP_K,
    chunk: int | None = None,
) -> np.ndarray:
    """Indices of each query's `top_k` best corpus rows, best first.

    Args:
      query_emb: [Q, D] query embeddings.
      corpus_emb: [C, D] corpus embeddings.
      tie_rank: [C] ints, as `TopK`'s.
      similarity: "cosine" or "dot".
      top_k: ranking depth.
      chunk: corpus rows scored at once (default CORPUS_CHUNK).

    Returns:
      [Q, min(top_k, C)] int array of corpus row indices.
    """
    best = TopK(prepare(query_emb, similarity), tie_rank, top_k)
    best.add(prepare(corpus_emb, similarity), 0, chunk=chunk)
    return best.rows


def tie_ranks(corpus_ids: Sequence[str]) -> np.ndarray:
    """Each corpus row's position in the sorted ids (ST breaks equal scores by id)."""
    order = sorted(range(len(corpus_ids)), key=corpus_ids.__getitem__)
    ranks = np.empty(len(corpus_ids), np.int64)
    ranks[order] = np.arange(len(corpus_ids))
    return ranks


def _dcg(relevances: Sequence[int], k: int) -> float:
    return sum(rel / math.log2(i + 2) for i, rel in enumerate(relevances[:k]))


def ranking_metrics(is_relevant: np.ndarray, num_relevant: Sequence[int]) -> dict[str, float]:
    """`METRIC_NAMES` from ranked relevance flags, as ST's `InformationRetrievalEvaluator`.

    Args:
      is_relevant: [Q, K] bools, whether each query's k-th ranked document is relevant.
      num_relevant: the number of relevant documents of each query (the recall denominator, also
        counting relevant documents missing from the corpus, as ST does).

    Returns:
      Metric name -> mean over queries.
    """
    per_query: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for flags, total in zip(is_relevant.tolist(), num_relevant, strict=True):
        hits = [int(flag) for flag in flags]
        values = {}
        for k in ACCURACY_AT:
            values[f"accuracy@{k}"] = float(any(hits[:k]))
        for k in PRECISION_AT:
            values[f"precision@{k}"] = sum(hits[:k]) / k
        for k in RECALL_AT:
            values[f"recall@{k}"] = sum(hits[:k]) / total
        for k in MRR_AT:
            first = next((rank for rank, hit in enumerate(hits[:k]) if hit), None)
            values[f"mrr@{k}"] = 0.0 if first is None else 1.0 / (first + 1)
        for k in NDCG_AT:
            values[f"ndcg@{k}"] = _dcg(hits, k) / _dcg([1] * total, k)
        for k in MAP_AT:
            found = np.cumsum(hits[:k])
            precisions = [found[rank] / (rank + 1) for rank, hit in enumerate(hits[:k]) if hit]
            values[f"map@{k}"] = float(sum(precisions)) / min(k, total)
        for name, value in values.items():
            per_query[name].append(value)
    return {name: float(np.mean(values)) for name, values in per_query.items()}


def score_ranking(
    ranked: np.ndarray,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    relevant: Mapping[str, Collection[str]],
) -> dict[str, float]:
    """`ranking_metrics` of ranked corpus rows ([Q, K] indices into `corpus_ids`)."""
    ranked_ids = np.asarray(corpus_ids, dtype=object)[ranked]
    is_relevant = np.array(
        [
            [cid in relevant[qid] for cid in row]
            for qid, row in zip(query_ids, ranked_ids, strict=True)
        ],
        dtype=bool,
    ).reshape(ranked.shape)
    return ranking_metrics(is_relevant, [len(relevant[qid]) for qid in query_ids])


def check_ids(query_ids, corpus_ids, relevant) -> None:
    """Raises ValueError unless corpus ids are distinct and every query has a relevant id."""
    if len(set(corpus_ids)) != len(corpus_ids):
        raise ValueError("corpus_ids must be distinct.")
    missing = [qid for qid in query_ids if not relevant.get(qid)]
    if missing:
        raise ValueError(
            f"{len(missing)} queries have no relevant document (first: {missing[0]!r}); drop them "
            "or add their relevant ids."
        )


def retrieval_metrics(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    relevant: Mapping[str, Collection[str]],
    *,
    similarity: str = "cosine",
) -> dict[str, float]:
    """Ranks the whole corpus for every query and scores the ranking.

    Args:
      query_emb: [Q, D] embeddings of the queries, in `query_ids` order.
      corpus_emb: [C, D] embeddings of the documents, in `corpus_ids` order.
      query_ids: Q query ids.
      corpus_ids: C distinct document ids (equal scores are ranked by id, as in ST).
      relevant: query id -> ids of its relevant documents (at least one each).
      similarity: "cosine" (ST's `cos_sim`) or "dot" (`dot_score`).

    Returns:
      `METRIC_NAMES`, each the mean over queries.
    """
    query_ids, corpus_ids = list(query_ids), list(corpus_ids)
    if len(query_ids) != len(query_emb) or len(corpus_ids) != len(corpus_emb):
        raise ValueError(
            f"Got {len(query_emb)} query and {len(corpus_emb)} corpus embeddings for "
            f"{len(query_ids)} query ids and {len(corpus_ids)} corpus ids; they must match."
        )
    check_ids(query_ids, corpus_ids, relevant)
    ranked = rank_corpus(query_emb, corpus_emb, tie_ranks(corpus_ids), similarity=similarity)
    return score_ranking(ranked, query_ids, corpus_ids, relevant)
