"""Retrieval evaluation: rank a corpus for each query, score the ranking (MRR, nDCG, recall).

The metric definitions, the tie-breaking (equal scores ordered by corpus id) and the similarity
functions are those of sentence-transformers' `InformationRetrievalEvaluator`, so the numbers are
comparable with published ones; the tests check equality on the real all-MiniLM-L6-v2.
"""

import gzip
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

SIMILARITIES = ("cosine", "dot")
# The cut-offs reported; the corpus ranking is kept to the largest of them.
MRR_AT, NDCG_AT, RECALL_AT, ACCURACY_AT = (10,), (10,), (1, 10, 100), (1,)
TOP_K = max(*MRR_AT, *NDCG_AT, *RECALL_AT, *ACCURACY_AT)
# Corpus rows scored at once: memory is queries x chunk float32, whatever the corpus size.
CORPUS_CHUNK = 4096
RETRIEVAL_FIELDS = ("package", "query", "document")


def read_text(path, config_key: str) -> str:
    """The whole UTF-8 text of a local or gs:// file, gunzipped when its name ends in .gz.

    Args:
      path: the file.
      config_key: the config field that names the file, for the error message.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (set by {config_key}).")
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


def load_retrieval(path) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]]:
    """Reads a query/document set such as data/debian_retrieval_dev.jsonl.gz.

    Each line is a JSON object with at least "package", "query" and "document" (other keys, such
    as "source" and "section", are ignored). The package's document is the one relevant document
    of its query; every document is part of the corpus.

    Args:
      path: a .jsonl or .jsonl.gz file (local or gs://).

    Returns:
      (queries, corpus, relevant): package -> query text, package -> document text, and
      package -> {package}.

    Raises:
      ValueError: on a malformed line (named by file and line number) or a repeated package.
    """
    text = read_text(path, "config.eval.retrieval_file")
    queries, corpus = {}, {}
    for number, line in enumerate(text.split("\n"), start=1):
        where = f"{path}, line {number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err}).") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with {RETRIEVAL_FIELDS}.")
        for key in RETRIEVAL_FIELDS:
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(
                    f"{where}: key {key!r} is missing or not a non-empty string; every line "
                    f"needs {RETRIEVAL_FIELDS}."
                )
        package = row["package"]
        if package in queries:
            raise ValueError(f"{where}: package {package!r} appears twice; ids must be unique.")
        queries[package] = row["query"]
        corpus[package] = row["document"]
    if not queries:
        raise ValueError(f"{path} holds no queries.")
    return queries, corpus, {package: {package} for package in queries}


def l2_normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit-norm rows in float32, as `torch.nn.functional.normalize` (norm clamped at 1e-12)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def _prepare(x: np.ndarray, similarity: str) -> np.ndarray:
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}.")
    return l2_normalize_rows(x) if similarity == "cosine" else np.asarray(x, np.float32)


def rank_corpus(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    tie_rank: np.ndarray,
    *,
    similarity: str = "cosine",
    top_k: int = TOP_K,
    chunk: int = CORPUS_CHUNK,
) -> np.ndarray:
    """Indices of each query's `top_k` best corpus rows, best first.

    Args:
      query_emb: [Q, D] query embeddings.
      corpus_emb: [C, D] corpus embeddings.
      tie_rank: [C] ints; among equal scores the smaller rank comes first (ST orders ties by
        corpus id, so pass each row's position in the sorted ids).
      similarity: "cosine" or "dot".
      top_k: ranking depth.
      chunk: corpus rows scored at once.

    Returns:
      [Q, min(top_k, C)] int array of corpus row indices.
    """
    queries = _prepare(query_emb, similarity)
    corpus = _prepare(corpus_emb, similarity)
    num_queries = queries.shape[0]
    best_scores = np.empty((num_queries, 0), np.float32)
    best_rows = np.empty((num_queries, 0), np.int64)
    for start in range(0, corpus.shape[0], chunk):
        scores = queries @ corpus[start : start + chunk].T
        rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, rows], axis=1)
        # Sort by score descending, then tie rank ascending (lexsort's last key is the primary).
        order = np.lexsort((tie_rank[rows], -scores), axis=-1)[:, :top_k]
        best_scores = np.take_along_axis(scores, order, axis=1)
        best_rows = np.take_along_axis(rows, order, axis=1)
    return best_rows


def _dcg(relevances: Sequence[int], k: int) -> float:
    return sum(rel / math.log2(i + 2) for i, rel in enumerate(relevances[:k]))


def ranking_metrics(is_relevant: np.ndarray, num_relevant: Sequence[int]) -> dict[str, float]:
    """MRR@10, nDCG@10, Recall@1/10/100 and Accuracy@1 from ranked relevance flags.

    Args:
      is_relevant: [Q, K] bools, whether each query's k-th ranked document is relevant.
      num_relevant: the number of relevant documents of each query (the recall denominator, also
        counting relevant documents missing from the corpus, as ST does).

    Returns:
      Metric name -> mean over queries.
    """
    per_query: dict[str, list[float]] = {}
    for flags, total in zip(is_relevant.tolist(), num_relevant, strict=True):
        hits = [int(flag) for flag in flags]
        values = {}
        for k in MRR_AT:
            first = next((rank for rank, hit in enumerate(hits[:k]) if hit), None)
            values[f"mrr@{k}"] = 0.0 if first is None else 1.0 / (first + 1)
        for k in NDCG_AT:
            values[f"ndcg@{k}"] = _dcg(hits, k) / _dcg([1] * total, k)
        for k in RECALL_AT:
            values[f"recall@{k}"] = sum(hits[:k]) / total
        for k in ACCURACY_AT:
            values[f"accuracy@{k}"] = float(any(hits[:k]))
        for name, value in values.items():
            per_query.setdefault(name, []).append(value)
    return {name: float(np.mean(values)) for name, values in per_query.items()}


def retrieval_metrics(
    query_emb: np.ndarray,
    corpus_emb: np.ndarray,
    query_ids: Sequence[str],
    corpus_ids: Sequence[str],
    relevant: Mapping[str, set[str]],
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
      {"mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100", "accuracy@1"}, each the mean
      over queries.
    """
    query_ids, corpus_ids = list(query_ids), list(corpus_ids)
    if len(query_ids) != len(query_emb) or len(corpus_ids) != len(corpus_emb):
        raise ValueError(
            f"Got {len(query_emb)} query and {len(corpus_emb)} corpus embeddings for "
            f"{len(query_ids)} query ids and {len(corpus_ids)} corpus ids; they must match."
        )
    if len(set(corpus_ids)) != len(corpus_ids):
        raise ValueError("corpus_ids must be distinct.")
    missing = [qid for qid in query_ids if not relevant.get(qid)]
    if missing:
        raise ValueError(
            f"{len(missing)} queries have no relevant document (first: {missing[0]!r}); drop them "
            "or add their relevant ids."
        )
    order = sorted(range(len(corpus_ids)), key=corpus_ids.__getitem__)
    tie_rank = np.empty(len(corpus_ids), np.int64)
    tie_rank[order] = np.arange(len(corpus_ids))

    ranked = rank_corpus(query_emb, corpus_emb, tie_rank, similarity=similarity)
    ranked_ids = np.asarray(corpus_ids, dtype=object)[ranked]
    is_relevant = np.array(
        [
            [cid in relevant[qid] for cid in row]
            for qid, row in zip(query_ids, ranked_ids, strict=True)
        ],
        dtype=bool,
    ).reshape(ranked.shape)
    return ranking_metrics(is_relevant, [len(relevant[qid]) for qid in query_ids])
