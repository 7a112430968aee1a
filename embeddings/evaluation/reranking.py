"""Reranking: order each query's candidate documents, score the order (MAP, MRR@k, nDCG@k).

The numbers are those of sentence-transformers' `RerankingEvaluator` (batched encoding): per query,
average precision over all candidates, the reciprocal rank of the first positive within the top
k, and scikit-learn's nDCG@k with binary gains; each averaged over queries.
"""

import dataclasses

import numpy as np

from embeddings.evaluation.files import read_jsonl, text_field
from embeddings.evaluation.ranking import average_precision, ndcg
from embeddings.evaluation.retrieval import prepare

RERANKING_AT = 10  # the k of MRR@k and nDCG@k (ST's default)
METRIC_NAMES = ("map", f"mrr@{RERANKING_AT}", f"ndcg@{RERANKING_AT}")


@dataclasses.dataclass
class RerankingSample:
    """One query with its positive and negative candidates (at least one of each)."""

    query: str
    positive: list[str]
    negative: list[str]


def _text_list(row: dict, key: str, where: str) -> list[str]:
    value = row.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: key {key!r} must be a non-empty list of strings.")
    return [text_field({key: text}, key, where) for text in value]


def load_reranking(path, config_key: str = "config.eval.tasks") -> list[RerankingSample]:
    """Reads a reranking set: JSONL of {"query": str, "positive": [str], "negative": [str]}.

    This is the sample format `RerankingEvaluator` takes (a single string counts as a list of
    one).

    Raises:
      ValueError: on a malformed line, named by file and line number.
    """
    samples = [
        RerankingSample(
            text_field(row, "query", where),
            _text_list(row, "positive", where),
            _text_list(row, "negative", where),
        )
        for where, row in read_jsonl(path, config_key)
    ]
    if not samples:
        raise ValueError(f"{path} holds no reranking samples.")
    return samples


def reranking_metrics(
    query_emb: np.ndarray,
    candidate_emb: np.ndarray,
    num_positive: list[int],
    num_negative: list[int],
    *,
    similarity: str = "cosine",
) -> dict[str, float]:
    """MAP, MRR@10 and nDCG@10 of the candidates ranked by similarity to their query.

    Args:
      query_emb: [Q, D] embeddings, one per query.
      candidate_emb: [sum of candidates, D]: each query's positives then negatives, query after
        query.
      num_positive: Q positive counts.
      num_negative: Q negative counts.
      similarity: "cosine" or "dot".

    Returns:
      {"map", "mrr@10", "ndcg@10"}, each the mean over queries.
    """
    if len(num_positive) != len(query_emb) or sum(num_positive) + sum(num_negative) != len(
        candidate_emb
    ):
        raise ValueError(
            f"reranking_metrics got {len(query_emb)} queries and {len(candidate_emb)} candidates "
            f"for counts of {len(num_positive)} queries and "
            f"{sum(num_positive) + sum(num_negative)} candidates."
        )
    queries = prepare(query_emb, similarity)
    candidates = prepare(candidate_emb, similarity)
    values: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    start = 0
    for query, positives, negatives in zip(queries, num_positive, num_negative, strict=True):
        scores = candidates[start : start + positives + negatives] @ query
        start += positives + negatives
        labels = np.r_[np.ones(positives), np.zeros(negatives)]
        top = np.argsort(-scores, kind="stable")[:RERANKING_AT]
        first = np.flatnonzero(labels[top])
        values["map"].append(average_precision(labels, scores))
        values[f"mrr@{RERANKING_AT}"].append(1.0 / (first[0] + 1) if first.size else 0.0)
        values[f"ndcg@{RERANKING_AT}"].append(ndcg(labels, scores, RERANKING_AT))
    return {name: float(np.mean(per_query)) for name, per_query in values.items()}
