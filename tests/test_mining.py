"""Hard-negative mining against sentence-transformers' `util.mine_hard_negatives`.

Both sides get the same fixed embeddings: ours through `embeddings.mining`, theirs through a
stand-in model whose `encode_query`/`encode_document` return those vectors. Random Gaussian
vectors keep scores apart, so no tie or rounding decides a selection.
"""

import dataclasses
import gzip
import json
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset
from sentence_transformers import util as st_util

from embeddings import mining
from embeddings.data.data_config import parse_entries
from embeddings.data.readers import infer_row_spec, make_source, parse_row

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "mine_hard_negatives.py"
DIM = 16


class FixedModel:
    """Just what `mine_hard_negatives` uses of a SentenceTransformer, with fixed embeddings."""

    device = torch.device("cpu")

    def __init__(self, vectors: dict[str, np.ndarray], similarity: str):
        self.vectors = vectors
        self.similarity = st_util.cos_sim if similarity == "cosine" else st_util.dot_score
        self.similarity_pairwise = (
            st_util.pairwise_cos_sim if similarity == "cosine" else st_util.pairwise_dot_score
        )

    def encode_query(self, texts, **kwargs):
        return np.stack([self.vectors[text] for text in texts])

    encode_document = encode_query


def toy_data(seed: int, n_queries: int = 40, n_extra: int = 30):
    """Pairs (some queries with two or three positives, one duplicated pair), extra corpus."""
    rng = np.random.default_rng(seed)
    pairs = []
    for q in range(n_queries):
        for p in range(1 + (q % 7 == 0) + (q % 11 == 0)):
            pairs.append((f"query {q}", f"doc {q}-{p}"))
    pairs.append(pairs[3])  # a repeated row counts towards max_positives, as in ST
    extra = [f"extra {i}" for i in range(n_extra)]
    texts = {t for pair in pairs for t in pair} | set(extra)
    vectors = {t: rng.normal(size=DIM).astype(np.float32) for t in sorted(texts)}
    # Most positives near their query, so margins and max_score have something to strike;
    # every fifth query's far from it (a negative score, where a relative margin's sign matters).
    for i, (query, positive) in enumerate(pairs):
        sign = -0.5 if i % 5 == 4 else 1.0
        vectors[positive] = sign * vectors[query] + 0.8 * vectors[positive]
    return pairs, extra, vectors


def ours(pairs, extra, vectors, similarity, options, seed, **kwargs):
    index = mining.index_pairs(pairs, extra)
    queries = np.stack([vectors[t] for t in index.queries])
    corpus = np.stack([vectors[t] for t in index.corpus])
    if similarity == "cosine":
        queries, corpus = mining.normalize(queries), mining.normalize(corpus)
    return list(mining.mine(index, queries, corpus, options, seed=seed, **kwargs))


def theirs(pairs, extra, vectors, similarity, options, seed):
    if similarity == "cosine":
        vectors = {t: v / np.linalg.norm(v) for t, v in vectors.items()}
    dataset = Dataset.from_dict(
        {"anchor": [q for q, _ in pairs], "positive": [p for _, p in pairs]}
    )
    random.seed(seed)  # ST samples with Python's global `random`
    mined = st_util.mine_hard_negatives(
        dataset,
        FixedModel(vectors, similarity),
        corpus=list(extra) or None,
        range_min=options.range_min,
        range_max=options.range_max,
        max_score=options.max_score,
        min_score=options.min_score,
        absolute_margin=options.absolute_margin,
        relative_margin=options.relative_margin,
        num_negatives=options.num_negatives,
        sampling_strategy=options.sampling_strategy,
        output_format=options.output_format,
        verbose=False,
    )
    return [list(row.values()) for row in mined]


CASES = {
    "defaults": ("cosine", {}),
    "window": ("cosine", dict(range_min=2, range_max=15, num_negatives=4)),
    "relative_random": (
        "cosine",
        dict(relative_margin=0.05, sampling_strategy="random", num_negatives=3),
    ),
    "absolute_max_triplet": (
        "cosine",
        dict(absolute_margin=0.1, max_score=0.5, output_format="triplet", num_negatives=2),
    ),
    "min_score_top": ("cosine", dict(min_score=0.2, num_negatives=2, range_max=12)),
    "dot_random_triplet": (
        "dot",
        dict(range_max=20, sampling_strategy="random", output_format="triplet", num_negatives=5),
    ),
    "dot_relative": ("dot", dict(relative_margin=0.1, range_min=1, num_negatives=2)),
    # A window over the whole corpus reaches candidates near a negative positive score.
    "dot_wide_relative": ("dot", dict(relative_margin=0.5, range_max=60, num_negatives=2)),
    "random_window_ntuple": (
        "cosine",
        dict(range_min=3, range_max=25, sampling_strategy="random", num_negatives=6),
    ),
}


@pytest.mark.parametrize("use_extra", [False, True], ids=["positives", "extra_corpus"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_selection_equals_sentence_transformers(case, use_extra):
    similarity, kwargs = CASES[case]
    options = mining.MiningOptions(**kwargs)
    pairs, extra, vectors = toy_data(seed=len(case))
    extra = extra if use_extra else []
    expected = theirs(pairs, extra, vectors, similarity, options, seed=7)
    # Small blocks and chunks: the streaming must not change a single row.
    got = ours(pairs, extra, vectors, similarity, options, 7, query_block=9, chunk_size=5)
    assert len(expected) > 0
    assert got == expected


@pytest.mark.parametrize("case", ["defaults", "window", "relative_random", "short"])
def test_list_rows_regroup_the_n_tuples_of_sentence_transformers(case):
    """Each "lists" row holds what sentence-transformers' n-tuple rows of its query hold:
    the positives (first-seen order) and the k negatives they all share; a query without
    k negatives gets no row, as it gets no n-tuple."""
    # "short": a narrow window and a wide margin leave some queries fewer than k negatives.
    short = ("cosine", dict(range_max=6, num_negatives=5, relative_margin=0.3))
    similarity, kwargs = short if case == "short" else CASES[case]
    options = mining.MiningOptions(**kwargs)
    pairs, extra, vectors = toy_data(seed=len(case))
    expected = {}
    for query, positive, *negatives in theirs(pairs, extra, vectors, similarity, options, 7):
        row = expected.setdefault(query, {"query": query, "pos": [], "neg": negatives})
        assert row["neg"] == negatives
        if positive not in row["pos"]:
            row["pos"].append(positive)
    lists = dataclasses.replace(options, output_format="lists")
    got = ours(pairs, extra, vectors, similarity, lists, 7, query_block=9, chunk_size=5)
    assert got == list(expected.values())
    assert any(len(row["pos"]) > 1 for row in got)  # the regrouping is exercised
    if case == "short":  # and the dropping of queries short of k negatives
        assert len(got) < len({query for query, _ in pairs})


def test_short_corpus_is_padded_like_sentence_transformers():
    # Fewer documents than range_max + max_positives: the missing candidates count as absent.
    pairs = [(f"q{i}", f"d{i}") for i in range(6)]
    rng = np.random.default_rng(3)
    vectors = {t: rng.normal(size=DIM).astype(np.float32) for pair in pairs for t in pair}
    for kwargs in (
        dict(range_max=30, num_negatives=4),
        dict(range_max=30, num_negatives=4, sampling_strategy="random"),
        dict(range_max=30, num_negatives=3, output_format="triplet"),
    ):
        options = mining.MiningOptions(**kwargs)
        expected = theirs(pairs, [], vectors, "cosine", options, seed=1)
        assert ours(pairs, [], vectors, "cosine", options, 1, chunk_size=4) == expected


def test_chunked_top_k_equals_full_sort():
    rng = np.random.default_rng(0)
    for n, m, k, chunk in ((13, 50, 7, 6), (5, 9, 12, 4), (32, 101, 20, 101), (3, 40, 1, 3)):
        queries = rng.normal(size=(n, DIM)).astype(np.float32)
        corpus = rng.normal(size=(m, DIM)).astype(np.float32)
        scores, indices = mining.top_k(queries, corpus, k, chunk_size=chunk)
        full = queries.astype(np.float64) @ corpus.T.astype(np.float64)
        expected = np.argsort(-full, axis=1)[:, :k]
        width = min(k, m)
        np.testing.assert_array_equal(indices[:, :width], expected)
        np.testing.assert_allclose(
            scores[:, :width], np.take_along_axis(full, expected, axis=1), rtol=1e-5, atol=1e-5
        )
        assert (indices[:, width:] == -1).all() and np.isneginf(scores[:, width:]).all()


def test_options_are_checked():
    with pytest.raises(ValueError, match="num_negatives"):
        mining.MiningOptions(num_negatives=0).check()
    with pytest.raises(ValueError, match="sampling_strategy"):
        mining.MiningOptions(sampling_strategy="best").check()
    with pytest.raises(ValueError, match="range_min"):
        mining.MiningOptions(range_min=5, range_max=5).candidate_window(1)
    with pytest.raises(ValueError, match="only 2 candidates"):
        mining.MiningOptions(range_min=3, range_max=5, num_negatives=3).candidate_window(1)
    # ST's derived window: range_min + num_negatives (x10 with a filter) + max_positives.
    assert mining.MiningOptions(range_min=2, num_negatives=3).candidate_window(2) == 7
    assert mining.MiningOptions(num_negatives=3, max_score=0.9).candidate_window(1) == 31


def read_through_pipeline(path: pathlib.Path):
    """The rows of a file as the training readers parse them, and the layout they fix."""
    entry = parse_entries([{"name": path.name, "weight": 1}], path.parent, "test")[0]
    source = make_source(entry, path.parent)
    spec = infer_row_spec(entry, source)
    rows = [parse_row(source.decode(raw), spec, line).texts for line, raw in source.records(0)]
    return spec.layout, rows


def test_script_end_to_end_on_a_tiny_model(tmp_path):
    """The CLI on a tiny exported model over Debian pairs writes a file the pipeline reads.

    The same folder loaded by sentence-transformers mines (nearly) the same rows: the two
    encoders agree to float rounding, which can only swap candidates whose scores tie.
    """
    from hf_tiny import make_tiny_sentence_transformer
    from sentence_transformers import SentenceTransformer

    model = make_tiny_sentence_transformer("bert", tmp_path / "models")
    with gzip.open(REPO / "data" / "debian" / "education.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f][:19]
    with gzip.open(REPO / "data" / "debian" / "embedded.jsonl.gz", "rt") as f:
        rows += [json.loads(line) for line in f][:20]
    pairs_file = tmp_path / "pairs.jsonl.gz"
    with gzip.open(pairs_file, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    output = tmp_path / "mined" / "hn.jsonl.gz"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model), "--pairs", str(pairs_file),
         "--output", str(output), "--num_negatives", "2", "--range_min", "1",
         "--chunk_size", "8", "--query_block", "16", "--batch_size", "8",
         "--embeddings_dir", str(tmp_path / "emb")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"weight"' in result.stdout
    assert np.load(tmp_path / "emb" / "document_embeddings.npy").shape == (len(rows), 32)

    layout, mined = read_through_pipeline(output)
    assert layout.kind == "contrastive" and layout.columns == 4
    positives = {q: p for q, p in rows}
    assert [row[:2] for row in mined] == [tuple(r) for r in rows]  # every pair kept, in order
    for _query, positive, *negatives in mined:
        assert positive not in negatives and len(set(negatives)) == 2
        assert all(n in positives.values() and n != positive for n in negatives)

    reference = st_util.mine_hard_negatives(
        Dataset.from_dict({"q": [q for q, _ in rows], "p": [p for _, p in rows]}),
        SentenceTransformer(str(model), device="cpu"),
        num_negatives=2,
        range_min=1,
        output_format="n-tuple",
        verbose=False,
    )
    same = sum(list(r.values()) == list(m) for r, m in zip(reference, mined, strict=True))
    assert same >= 0.9 * len(rows), f"{same} of {len(rows)} rows as sentence-transformers mines"


def test_script_reports_bad_options_without_a_traceback(tmp_path):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text('["a", "b"]\n["c", "d"]\n')
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tmp_path / "none"), "--pairs",
         str(pairs_file), "--output", str(tmp_path / "o.jsonl.gz"), "--range_min", "4",
         "--range_max", "4"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode != 0
    assert "range_min (4) must be smaller than range_max (4)" in result.stderr
    assert "Traceback" not in result.stderr


def test_script_list_rows_train(tmp_path):
    """--output_format lists on a tiny corpus writes {"query", "pos", "neg"} rows with
    several negatives that the pipeline samples k of, and the tiny config trains on them."""
    from hf_tiny import make_tiny_sentence_transformer

    from configs import tiny
    from embeddings.trainer import train_and_evaluate

    model = make_tiny_sentence_transformer("bert", tmp_path / "models")
    with gzip.open(REPO / "data" / "debian" / "education.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f][:24]
    pairs_file = tmp_path / "pairs.jsonl.gz"
    with gzip.open(pairs_file, "wt") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    output = tmp_path / "mined.jsonl.gz"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model), "--pairs", str(pairs_file),
         "--output", str(output), "--num_negatives", "3", "--output_format", "lists",
         "--query_prompt", "query: ", "--batch_size", "8"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "negatives_per_row" in result.stdout
    with gzip.open(output, "rt") as f:
        mined = [json.loads(line) for line in f]
    assert len(mined) == len({q for q, _ in rows})
    for row in mined:
        assert sorted(row) == ["neg", "pos", "query"]
        assert len(row["neg"]) == 3 and not set(row["neg"]) & set(row["pos"])
        assert not row["query"].startswith("query: ")  # prompts are not written

    (tmp_path / "data_config.json").write_text(json.dumps([{"name": output.name, "weight": 1}]))
    config = tiny.get_config()
    config.data_folder = str(tmp_path)
    config.data_config = str(tmp_path / "data_config.json")
    config.data.negatives_per_row = 2
    config.data.datasets_per_batch = 1
    config.data.skip_duplicates = False  # 24 queries' negatives repeat across a batch
    config.batch_size = 8
    config.total_steps = 2
    config.log_every = 1
    config.eval.sts_file = config.eval.retrieval_file = ""
    train_and_evaluate(config, str(tmp_path / "run"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines if '"loss"' in line]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(np.isfinite(m["loss"]) for m in steps)
