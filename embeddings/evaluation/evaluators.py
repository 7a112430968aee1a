"""Evaluators run during training and by scripts/evaluate.py.

An evaluator loads its data once and, when called with an encode function, returns a flat dict of
metrics. It knows nothing about models: the caller supplies `encode(texts, role)`, where `role` is
"query" or "document" so that untied (asymmetric) towers use the right encoder. The trainer logs
each metric as f"eval/{evaluator.name}/{metric}".
"""

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from embeddings.evaluation.beir import RetrievalSet
from embeddings.evaluation.pair_classification import METRICS as PAIR_METRICS
from embeddings.evaluation.pair_classification import load_pairs, pair_classification_metrics
from embeddings.evaluation.reranking import METRIC_NAMES as RERANKING_METRICS
from embeddings.evaluation.reranking import load_reranking, reranking_metrics
from embeddings.evaluation.retrieval import METRIC_NAMES as RETRIEVAL_METRICS
from embeddings.evaluation.retrieval import (
    TopK,
    check_ids,
    load_retrieval,
    prepare,
    score_ranking,
    tie_ranks,
)
from embeddings.evaluation.sts import load_sts, sts_metrics

# (texts, role) -> [len(texts), D] embeddings; role is "query" or "document". The function does
# its own batching (the evaluators pass whole lists).
EncodeFn = Callable[[Sequence[str], str], np.ndarray]


class Evaluator(Protocol):
    """Anything with a `name` that maps an encode function to metrics."""

    name: str
    # The metric names __call__ returns, known before it runs (to check config.eval.mean_of).
    metric_names: tuple[str, ...]

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
        self.metric_names = tuple(
            f"{stat}_{sim}" for sim in self.similarities for stat in ("pearson", "spearman")
        )
        sentences1, sentences2, scores = load_sts(path, split)
        keep = _every_nth(list(range(len(scores))), max_pairs)
        self.sentences1 = [sentences1[i] for i in keep]
        self.sentences2 = [sentences2[i] for i in keep]
        self.scores = scores[keep]

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        emb1 = encode_checked(encode, self.sentences1, "query")
        emb2 = encode_checked(encode, self.sentences2, "query")
        return sts_metrics(emb1, emb2, self.scores, self.similarities)


# Corpus documents encoded per call: the corpus's embeddings are never all held at once, so a
# corpus of millions of documents needs host memory only for its texts and the running top-k.
ENCODE_CHUNK = 50_000


class RetrievalEvaluator:
    """Ranks the whole corpus for each query: nDCG@10, MRR@10, MAP@100, Recall/Precision/Accuracy@k.

    Queries are encoded with role "query", the corpus with role "document", in chunks of
    `ENCODE_CHUNK` documents whose scores are merged into a running top-k.
    """

    def __init__(
        self,
        data,
        *,
        name: str = "retrieval",
        max_queries: int = 0,
        similarity: str = "cosine",
        config_key: str = "config.eval.retrieval_file",
    ):
        """Loads queries and corpus.

        Args:
          data: a `RetrievalSet` (see `beir.py`) or a Debian-format query/document file
            (data/debian_retrieval_dev.jsonl.gz).
          name: the evaluator's name in metric keys.
          max_queries: use at most this many queries, spread over the set (0 = all); the corpus
            stays whole, so the task is as hard as the full one, only noisier.
          similarity: "cosine" or "dot", as the model is trained.
          config_key: the config field that names the data, for error messages.
        """
        self.name = name
        self.similarity = similarity
        self.metric_names = RETRIEVAL_METRICS
        if isinstance(data, RetrievalSet):
            queries, self.corpus, self.relevant = data.queries, data.corpus, data.relevant()
        else:
            queries, self.corpus, self.relevant = load_retrieval(data, config_key)
        self.query_ids = _every_nth(list(queries), max_queries)
        self.queries = [queries[qid] for qid in self.query_ids]
        self.corpus_ids = list(self.corpus)
        check_ids(self.query_ids, self.corpus_ids, self.relevant)

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        query_emb = encode_checked(encode, self.queries, "query")
        best = TopK(prepare(query_emb, self.similarity), tie_ranks(self.corpus_ids))
        for start in range(0, len(self.corpus_ids), ENCODE_CHUNK):
            ids = self.corpus_ids[start : start + ENCODE_CHUNK]
            chunk = encode_checked(encode, [self.corpus[c] for c in ids], "document")
            best.add(prepare(chunk, self.similarity), start)
        return score_ranking(best.rows, self.query_ids, self.corpus_ids, self.relevant)


class RerankingEvaluator:
    """MAP, MRR@10 and nDCG@10 of each query's candidates ranked by similarity.

    Queries are encoded with role "query", candidates with role "document".
    """

    def __init__(
        self,
        path,
        *,
        name: str = "reranking",
        max_queries: int = 0,
        similarity: str = "cosine",
        config_key: str = "config.eval.tasks",
    ):
        """Loads the samples (`reranking.load_reranking`'s format).

        Args:
          path: JSONL of {"query", "positive": [...], "negative": [...]}.
          name: the evaluator's name in metric keys.
          max_queries: use at most this many samples, spread over the file (0 = all).
          similarity: "cosine" or "dot".
          config_key: the config field that names the file, for error messages.
        """
        self.name = name
        self.similarity = similarity
        self.metric_names = RERANKING_METRICS
        self.samples = _every_nth(load_reranking(path, config_key), max_queries)

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        query_emb = encode_checked(encode, [s.query for s in self.samples], "query")
        candidates = [text for s in self.samples for text in (*s.positive, *s.negative)]
        candidate_emb = encode_checked(encode, candidates, "document")
        return reranking_metrics(
            query_emb,
            candidate_emb,
            [len(s.positive) for s in self.samples],
            [len(s.negative) for s in self.samples],
            similarity=self.similarity,
        )


class PairClassificationEvaluator:
    """Best-threshold accuracy and F1, and average precision, of labelled pairs by similarity.

    Both sentences of a pair are encoded with role "query" (pairs are symmetric), each distinct
    sentence once.
    """

    def __init__(
        self,
        path,
        *,
        name: str = "pair_classification",
        max_pairs: int = 0,
        similarities: Sequence[str] = ("cosine",),
        config_key: str = "config.eval.tasks",
    ):
        """Loads the pairs (`pair_classification.load_pairs`'s format).

        Args:
          path: TSV with sentence1, sentence2, label (0/1).
          name: the evaluator's name in metric keys.
          max_pairs: use at most this many pairs, spread over the file (0 = all).
          similarities: "cosine" and/or "dot".
          config_key: the config field that names the file, for error messages.
        """
        self.name = name
        self.similarities = tuple(similarities)
        self.metric_names = tuple(
            f"{sim}_{metric}" for sim in self.similarities for metric in PAIR_METRICS
        )
        sentences1, sentences2, labels = load_pairs(path, config_key)
        keep = _every_nth(list(range(len(labels))), max_pairs)
        self.sentences1 = [sentences1[i] for i in keep]
        self.sentences2 = [sentences2[i] for i in keep]
        self.labels = labels[keep]

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        texts = list(dict.fromkeys([*self.sentences1, *self.sentences2]))
        embeddings = encode_checked(encode, texts, "query")
        row = {text: i for i, text in enumerate(texts)}
        emb1 = embeddings[[row[t] for t in self.sentences1]]
        emb2 = embeddings[[row[t] for t in self.sentences2]]
        return pair_classification_metrics(emb1, emb2, self.labels, self.similarities)


class SetsMeanEvaluator:
    """Several evaluators of one kind as one (NanoBEIR's 13 sets): each set's metrics as
    "<set>/<metric>", and their mean over the sets as "<metric>"."""

    def __init__(self, name: str, evaluators: Sequence[Evaluator]):
        self.name = name
        self.evaluators = list(evaluators)
        first = self.evaluators[0].metric_names
        self.metric_names = tuple(first) + tuple(
            f"{e.name}/{metric}" for e in self.evaluators for metric in e.metric_names
        )

    def __call__(self, encode: EncodeFn) -> dict[str, float]:
        per_set = {e.name: e(encode) for e in self.evaluators}
        first = self.evaluators[0].metric_names
        means = {m: float(np.mean([metrics[m] for metrics in per_set.values()])) for m in first}
        return means | {
            f"{name}/{metric}": value
            for name, metrics in per_set.items()
            for metric, value in metrics.items()
        }


def run_evaluators(
    evaluators: Sequence[Evaluator], encode: EncodeFn, mean_of: Sequence[str] = ()
) -> dict[str, float]:
    """Every evaluator's metrics as "eval/<name>/<metric>", and "eval/mean" of `mean_of`.

    Args:
      evaluators: the evaluators to run, in order.
      encode: (texts, role) -> embeddings.
      mean_of: "<name>/<metric>" keys whose plain mean is reported as "eval/mean" (e.g. to pick
        the best checkpoint on several tasks at once); () = no mean.
    """
    results: dict[str, float] = {}
    for evaluator in evaluators:
        for metric, value in evaluator(encode).items():
            results[f"eval/{evaluator.name}/{metric}"] = float(value)
    if mean_of:
        results["eval/mean"] = float(np.mean([results[f"eval/{key}"] for key in mean_of]))
    return results
