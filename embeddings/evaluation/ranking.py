"""Scores of one ranked list: average precision and nDCG, as scikit-learn defines them.

sentence-transformers' `RerankingEvaluator` and `BinaryClassificationEvaluator` call scikit-learn's
`average_precision_score` and `ndcg_score`; these are the same definitions in numpy (tied scores
form one group, as scikit-learn treats them), so the project needs no scikit-learn at run time.
The tests check them against scikit-learn on random inputs with many ties.
"""

import numpy as np


def _score_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, ends): `order` sorts scores descending; `ends` is the last sorted position of
    each group of equal scores."""
    order = np.argsort(-scores, kind="stable")
    ordered = scores[order]
    ends = np.flatnonzero(np.r_[ordered[1:] != ordered[:-1], True])
    return order, ends


def average_precision(labels, scores) -> float:
    """Σ (R_n − R_{n−1}) P_n over the distinct score thresholds, highest first.

    Args:
      labels: 0/1 per item (at least one 1).
      scores: one score per item; higher means more likely relevant.
    """
    labels = np.asarray(labels, np.float64)
    scores = np.asarray(scores, np.float64)
    order, ends = _score_groups(scores)
    true_positives = np.cumsum(labels[order])[ends]
    precision = true_positives / (ends + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _tie_averaged_dcg(gains: np.ndarray, scores: np.ndarray, discounts: np.ndarray) -> float:
    # Items with equal scores share the mean gain of their group over the group's positions.
    order, ends = _score_groups(scores)
    starts = np.r_[0, ends[:-1] + 1]
    cumulative = np.r_[0.0, np.cumsum(discounts)]
    group_gain = np.add.reduceat(gains[order], starts) / (ends - starts + 1)
    return float(np.sum(group_gain * (cumulative[ends + 1] - cumulative[starts])))


def ndcg(gains, scores, k: int) -> float:
    """nDCG@k with log2 discounts, tied scores averaged (scikit-learn's `ndcg_score`).

    Args:
      gains: relevance per item (0 = not relevant).
      scores: one score per item.
      k: cut-off.

    Returns:
      DCG@k of the ranking by score over DCG@k of the ideal ranking (0 when nothing is relevant).
    """
    gains = np.asarray(gains, np.float64)
    discounts = 1.0 / np.log2(np.arange(len(gains)) + 2.0)
    discounts[k:] = 0.0
    ideal = float(np.sum(np.sort(gains)[::-1] * discounts))
    if ideal == 0.0:
        return 0.0
    return _tie_averaged_dcg(gains, np.asarray(scores, np.float64), discounts) / ideal
