"""Pair classification: how well one similarity threshold separates similar from dissimilar pairs.

The numbers are those of sentence-transformers' `BinaryClassificationEvaluator`: the best accuracy
over all thresholds, the best F1 (with its precision and recall), the average precision of the
similarity as a score, and the Matthews correlation at the F1 threshold, each prefixed by the
similarity ("cosine_ap"). Thresholds sit halfway between adjacent distinct similarities, as ST
places them.
"""

import csv
import io

import numpy as np

from embeddings.evaluation.files import read_text
from embeddings.evaluation.ranking import average_precision
from embeddings.evaluation.sts import pairwise_similarity

PAIR_COLUMNS = ("sentence1", "sentence2", "label")
METRICS = (
    "accuracy",
    "accuracy_threshold",
    "f1",
    "f1_threshold",
    "precision",
    "recall",
    "ap",
    "mcc",
)


def load_pairs(
    path, config_key: str = "config.eval.tasks"
) -> tuple[list[str], list[str], np.ndarray]:
    """Reads labelled pairs: TSV with a header naming sentence1, sentence2 and label (0 or 1).

    Returns:
      (sentences1, sentences2, labels) with labels an int array of 0/1.

    Raises:
      ValueError: on a missing column or a bad row, named by file and line.
    """
    reader = csv.reader(
        io.StringIO(read_text(path, config_key)), delimiter="\t", quoting=csv.QUOTE_NONE
    )
    header = next(reader, None) or []
    missing = [name for name in PAIR_COLUMNS if name not in header]
    if missing:
        raise ValueError(f"{path}, line 1: the header lacks columns {missing}; found {header}.")
    index = [header.index(name) for name in PAIR_COLUMNS]
    sentences1, sentences2, labels = [], [], []
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(
                f"{path}, line {number}: {len(row)} tab-separated fields, expected {len(header)}."
            )
        first, second, label = (row[i] for i in index)
        if label not in ("0", "1") or not first.strip() or not second.strip():
            raise ValueError(
                f"{path}, line {number}: need two non-empty sentences and a label 0 or 1, got "
                f"label {label!r}."
            )
        sentences1.append(first)
        sentences2.append(second)
        labels.append(int(label))
    if len(set(labels)) < 2:
        raise ValueError(
            f"{path}: needs pairs of both labels (0 and 1), found {sorted(set(labels))}."
        )
    return sentences1, sentences2, np.asarray(labels, np.int64)


def _groups(scores: np.ndarray, labels: np.ndarray):
    """Sorted descending: (sorted scores, positives and items up to the end of each tie group,
    the end positions)."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    return ordered, np.cumsum(labels[order])[ends], ends + 1, ends


def _threshold(ordered: np.ndarray, end: int):
    """Halfway to the next distinct score (the score itself when rounding lands on the next, or
    at the last)."""
    if end == len(ordered) - 1:
        return ordered[end]
    middle = (ordered[end] + ordered[end + 1]) / 2
    return ordered[end] if middle == ordered[end + 1] else middle


def best_accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, threshold) of the best "similar if score >= threshold" rule."""
    ordered, positives, predicted, ends = _groups(scores, labels)
    negatives_total = int(np.sum(labels == 0))
    # Everything predicted dissimilar: the threshold just above the highest score.
    best, threshold = negatives_total / len(labels), np.nextafter(ordered[0], np.inf)
    accuracy = (positives + (negatives_total - (predicted - positives))) / len(labels)
    for position in range(len(ends)):
        if accuracy[position] > best:
            best, threshold = accuracy[position], _threshold(ordered, ends[position])
    return float(best), float(threshold)


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """(f1, precision, recall, threshold) of the best "similar if score >= threshold" rule."""
    ordered, positives, predicted, ends = _groups(scores, labels)
    best = (0.0, 0.0, 0.0, 0.0)
    for position in range(len(ends)):
        if positives[position] == 0:
            continue
        precision = positives[position] / predicted[position]
        recall = positives[position] / positives[-1]
        f1 = 2 * precision * recall / (precision + recall)
        if f1 > best[0]:
            best = (f1, precision, recall, _threshold(ordered, ends[position]))
    return tuple(float(value) for value in best)


def matthews_correlation(labels: np.ndarray, predicted: np.ndarray) -> float:
    """MCC of 0/1 predictions (0 when a margin is empty, as scikit-learn returns)."""
    labels, predicted = labels.astype(bool), predicted.astype(bool)
    tp = float(np.sum(labels & predicted))
    tn = float(np.sum(~labels & ~predicted))
    fp = float(np.sum(~labels & predicted))
    fn = float(np.sum(labels & ~predicted))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else float((tp * tn - fp * fn) / denominator)


def pair_classification_metrics(
    emb1: np.ndarray,
    emb2: np.ndarray,
    labels,
    similarities=("cosine",),
) -> dict[str, float]:
    """`METRICS` for each similarity, named "<similarity>_<metric>".

    Args:
      emb1: [N, D] embeddings of the first sentences.
      emb2: [N, D] embeddings of the second sentences.
      labels: N labels, 1 = similar.
      similarities: "cosine" and/or "dot".
    """
    labels = np.asarray(labels, np.int64)
    metrics = {}
    for similarity in similarities:
        scores = pairwise_similarity(emb1, emb2, similarity)
        accuracy, accuracy_threshold = best_accuracy(scores, labels)
        f1, precision, recall, f1_threshold = best_f1(scores, labels)
        values = {
            "accuracy": accuracy,
            "accuracy_threshold": accuracy_threshold,
            "f1": f1,
            "f1_threshold": f1_threshold,
            "precision": precision,
            "recall": recall,
            "ap": average_precision(labels, scores),
            "mcc": matthews_correlation(labels, scores >= f1_threshold),
        }
        metrics.update({f"{similarity}_{name}": value for name, value in values.items()})
    return metrics
