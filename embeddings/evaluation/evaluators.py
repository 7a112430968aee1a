"""Evaluators run during training and by scripts/evaluate.py.

An evaluator loads its data once and, when called with an encode function, returns a flat dict of
metrics. It knows nothing about models: the caller supplies `encode(texts, role)`, where `role` is
"query" or "document" so that untied (asymmetric) towers use the right encoder. The trainer logs
each metric as f"eval/{evaluator.name}/{metric}".
"""

from collections.abc import Callable, Sequence
from typing import Protocol

import ml_collections
import numpy as np

from embeddings.evaluation.retrieval import load_retrieval, retrieval_metrics
from embeddings.evaluation.sts import load_sts, sts_metrics

# (texts, role) -> [len(texts), D] embeddings; role is "query" or "document". The function does
# its own batching (the evaluators pass whole lists).
EncodeFn = Callable[[Sequence[str], str], np.ndarray]


class Evaluator(Protocol):
    """Anything with a `name` that maps an encode function to metrics."""

    name: str

    def __call__(self, encode: EncodeFn) -> dict[str, float]: ...


def encode_checked(encode: EncodeFn, texts: Sequence[str], role: str) -> np.ndarray:
    """Calls `encode` and checks it returned one finite row per text."""
    embeddings = np.asarray(encode(list(texts), role))
    if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
        raise ValueError(
            f"encode(texts, {role!r}) returned shape {embeddings.shape} for {len(texts)} texts; "
            "expected [len(texts), D]."
        )
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(f"encode(texts, {role!r}) returned non-finite embeddings (NaN or inf).")
    return embeddings


def _every_nth(items: list, limit: int) -> list:
    """At most `limit` items spread evenly over the list (0 = all), deterministic."""
    if limit <= 0 or limit >= len(items):
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


class STSEvaluator:
    """Spearman/Pearson of pair similarities on an STS-benchmark split.

    Both sentences of a pair are encoded with role "query" (STS pairs are symmetric).
    """

    def __init__(
        self,
        path,
        split: str = "dev",
        *,
        name: str = "sts",
        max_pairs: int = 0,
        similarities: Sequence[str] = ("cosine",),
    ):
        """Loads the split.

        Args:
          path: STS benchmark file (data/stsbenchmark.tsv.gz).
          split: "train", "dev" or "test".
          name: the evaluator's name in metric keys.
          max_pairs: evaluate at most this many pairs, spread over the split (0 = all).
          similarities: pair similarities to report, e.g. ("cosine", "dot").
        """
        self.name = name
        self.similarities = tuple(similarities)
        sentences1, sentences2, scores = load_sts(path, split)
        keep = _every_nth(list(range(len(scores))), max_pairs)
        self.sentences1 = [sentences1[i] for i in keep]
        self.sentences2 = [sentences2[i] for i in keep]
        self.scores = scores[keep]

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        emb1 = encode_checked(encode, self.sentences1, "query")
        emb2 = encode_checked(encode, self.sentences2, "query")
        return sts_metrics(emb1, emb2, self.scores, self.similarities)


class RetrievalEvaluator:
    """MRR@10, nDCG@10, Recall@1/10/100, Accuracy@1 of queries against the whole corpus.

    Queries are encoded with role "query", the corpus with role "document".
    """

    def __init__(
        self,
        path,
        *,
        name: str = "retrieval",
        max_queries: int = 0,
        similarity: str = "cosine",
    ):
        """Loads queries and corpus.

        Args:
          path: query/document file (data/debian_retrieval_dev.jsonl.gz).
          name: the evaluator's name in metric keys.
          max_queries: use at most this many queries, spread over the file (0 = all); the corpus
            stays whole, so the task is as hard as the full one, only noisier.
          similarity: "cosine" or "dot", as the model is trained.
        """
        self.name = name
        self.similarity = similarity
        queries, self.corpus, self.relevant = load_retrieval(path)
        self.query_ids = _every_nth(list(queries), max_queries)
        self.queries = [queries[qid] for qid in self.query_ids]
        self.corpus_ids = list(self.corpus)

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        query_emb = encode_checked(encode, self.queries, "query")
        corpus_emb = encode_checked(encode, [self.corpus[c] for c in self.corpus_ids], "document")
        return retrieval_metrics(
            query_emb,
            corpus_emb,
            self.query_ids,
            self.corpus_ids,
            self.relevant,
            similarity=self.similarity,
        )


def build_evaluators(
    config_eval: ml_collections.ConfigDict, *, similarity: str = "cosine"
) -> list[Evaluator]:
    """The evaluators `config.eval` asks for.

    Keys used: `sts_file`, `sts_split`, `retrieval_file` (an empty path disables that evaluator)
    and `max_queries`. `batch_size` belongs to the encode function the caller builds.

    Args:
      config_eval: `config.eval`.
      similarity: the model's similarity (`config.loss.similarity`): retrieval ranks with it, and
        STS reports it next to cosine.

    Returns:
      [STSEvaluator named "sts"] and/or [RetrievalEvaluator named "retrieval"].
    """
    evaluators: list[Evaluator] = []
    if config_eval.sts_file:
        similarities = ("cosine",) if similarity == "cosine" else ("cosine", similarity)
        evaluators.append(
            STSEvaluator(config_eval.sts_file, config_eval.sts_split, similarities=similarities)
        )
    if config_eval.retrieval_file:
        if config_eval.max_queries < 0:
            raise ValueError(
                f"config.eval.max_queries must be >= 0 (0 = all), got {config_eval.max_queries}."
            )
        evaluators.append(
            RetrievalEvaluator(
                config_eval.retrieval_file,
                max_queries=config_eval.max_queries,
                similarity=similarity,
            )
        )
    return evaluators
