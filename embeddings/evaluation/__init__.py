"""Evaluation of sentence encoders: STS, retrieval (BEIR), reranking, pair classification."""

from embeddings.evaluation.beir import RetrievalSet, load_beir, load_beir_folder, load_nanobeir
from embeddings.evaluation.evaluators import (
    EncodeFn,
    Evaluator,
    PairClassificationEvaluator,
    RerankingEvaluator,
    RetrievalEvaluator,
    STSEvaluator,
    run_evaluators,
)
from embeddings.evaluation.pair_classification import load_pairs, pair_classification_metrics
from embeddings.evaluation.reranking import load_reranking, reranking_metrics
from embeddings.evaluation.retrieval import load_retrieval, retrieval_metrics
from embeddings.evaluation.sts import load_sts, sts_metrics
from embeddings.evaluation.tasks import (
    TASK_KINDS,
    TaskError,
    build_evaluators,
    evaluators_for,
    validate_eval,
)

__all__ = [
    "TASK_KINDS",
    "EncodeFn",
    "Evaluator",
    "PairClassificationEvaluator",
    "RerankingEvaluator",
    "RetrievalEvaluator",
    "RetrievalSet",
    "STSEvaluator",
    "TaskError",
    "build_evaluators",
    "evaluators_for",
    "load_beir",
    "load_beir_folder",
    "load_nanobeir",
    "load_pairs",
    "load_reranking",
    "load_retrieval",
    "load_sts",
    "pair_classification_metrics",
    "reranking_metrics",
    "retrieval_metrics",
    "run_evaluators",
    "sts_metrics",
    "validate_eval",
]
