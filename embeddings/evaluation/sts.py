"""Semantic textual similarity: correlation of embedding similarities with gold scores.

The numbers are those of sentence-transformers' `EmbeddingSimilarityEvaluator` (Pearson and
Spearman of the pairwise similarity against the gold scores, via scipy).
"""

import csv
import io
from collections.abc import Sequence

import numpy as np
from scipy import stats

from embeddings.evaluation.files import read_text
from embeddings.evaluation.retrieval import l2_normalize_rows

SPLITS = ("train", "dev", "test")
STS_COLUMNS = ("split", "score", "sentence1", "sentence2")
STS_SIMILARITIES = ("cosine", "dot")


def load_sts(path, split: str) -> tuple[list[str], list[str], np.ndarray]:
    """Reads one split of the STS benchmark (data/stsbenchmark.tsv.gz).

    The file is tab-separated with a header naming at least `split`, `score` (0..5),
    `sentence1` and `sentence2`; quotes are ordinary characters.

    Args:
      path: a .tsv or .tsv.gz file (local or gs://).
      split: "train", "dev" or "test".

    Returns:
      (sentences1, sentences2, scores) with scores a float64 array in 0..5.

    Raises:
      ValueError: on an unknown split, a missing column or a bad row (named by file and line).
    """
    if split not in SPLITS:
        raise ValueError(
            f"STS split must be one of {SPLITS}, got {split!r} (config.eval.sts_split)."
        )
    text = read_text(path, "config.eval.sts_file")
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None) or []
    missing = [name for name in STS_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{path}, line 1: the header lacks columns {missing}; found {header}.")
    index = {name: header.index(name) for name in STS_COLUMNS}

    sentences1, sentences2, scores = [], [], []
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {number}: {len(row)} tab-separated fields, expected {len(header)}."
            )
        if row[index["split"]] != split:
            continue
        try:
            score = float(row[index["score"]])
        except ValueError:
            score = float("nan")
        if not 0.0 <= score <= 5.0:
            raise ValueError(
                f"{path}, line {number}: score {row[index['score']]!r} is not a number in 0..5."
            )
        sentences1.append(row[index["sentence1"]])
        sentences2.append(row[index["sentence2"]])
        scores.append(score)
    if not scores:
        raise ValueError(f"{path} has no rows of split {split!r}.")
    return sentences1, sentences2, np.asarray(scores, np.float64)


def pairwise_similarity(emb1: np.ndarray, emb2: np.ndarray, similarity: str) -> np.ndarray:
    """sim(emb1[i], emb2[i]) in float32, as ST's `pairwise_cos_sim` / `pairwise_dot_score`."""
    if similarity not in STS_SIMILARITIES:
        raise ValueError(f"similarity must be one of {STS_SIMILARITIES}, got {similarity!r}.")
    if similarity == "cosine":
        emb1, emb2 = l2_normalize_rows(emb1), l2_normalize_rows(emb2)
    return np.sum(np.asarray(emb1, np.float32) * np.asarray(emb2, np.float32), axis=-1)


def sts_metrics(
    emb1: np.ndarray,
    emb2: np.ndarray,
    scores: Sequence[float],
    similarities: Sequence[str] = ("cosine",),
) -> dict[str, float]:
    """Pearson and Spearman correlation of pair similarities with the gold scores.

    Args:
      emb1: [N, D] embeddings of the first sentences.
      emb2: [N, D] embeddings of the second sentences.
      scores: N gold scores (any scale: correlations do not depend on it).
      similarities: which pair similarities to report ("cosine", "dot").

    Returns:
      {"pearson_<sim>", "spearman_<sim>"} for each similarity, as ST names them.
    """
    scores = np.asarray(scores, np.float64)
    if not len(emb1) == len(emb2) == len(scores):
        raise ValueError(
            f"sts_metrics got {len(emb1)} and {len(emb2)} embeddings for {len(scores)} scores."
        )
    metrics = {}
    for similarity in similarities:
        predicted = pairwise_similarity(emb1, emb2, similarity)
        metrics[f"pearson_{similarity}"] = float(stats.pearsonr(scores, predicted)[0])
        metrics[f"spearman_{similarity}"] = float(stats.spearmanr(scores, predicted)[0])
    return metrics
