"""Evaluation of sentence encoders: STS correlation and retrieval ranking metrics."""

from embeddings.evaluation.evaluators import (
    EncodeFn,
    Evaluator,
    RetrievalEvaluator,
    STSEvaluator,
    build_evaluators,
)
from embeddings.evaluation.retrieval import load_retrieval, retrieval_metrics
from embeddings.evaluation.sts import load_sts, sts_metrics

__all__ = [
    "EncodeFn",
    "Evaluator",
    "RetrievalEvaluator",
    "STSEvaluator",
    "build_evaluators",
    "load_retrieval",
    "load_sts",
    "retrieval_metrics",
    "sts_metrics",
]
