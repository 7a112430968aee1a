"""Writes the bundled evaluation sets derived from the bundled data (see data/README.md).

    python scripts/make_eval_sets.py

From data/debian_retrieval_dev.jsonl.gz (held-out Debian packages, never trained on):
- data/debian_retrieval_dev/: the same set in the BEIR layout (one relevant document a query).
- data/debian_graded/: a small BEIR set with graded relevance and several relevant documents per
  query: for each Debian source package that builds 2 to 6 of the held-out binary packages, one
  query (the short description of the package named like the source, else the first by name);
  its own long description has grade 2 and those of the other packages of the same source
  grade 1. The corpus is every package of those sources.
- data/debian_reranking.jsonl.gz: 140 queries (every 12th package) with candidates: the
  package's own description and up to 2 same-source siblings as positives, 9 packages of the
  same archive section from other sources as negatives (drawn with a fixed seed).
From data/stsbenchmark.tsv.gz:
- data/stsb_pairs_dev.tsv.gz: the STS-benchmark dev pairs scored >= 4 (label 1) or <= 1.5
  (label 0) of 5; pairs in between are dropped as ambiguous.

The outputs are byte-for-byte reproducible (sorted ids, fixed seed, gzip timestamp 0).
"""

import collections
import csv
import gzip
import io
import json
import os
import random

SOURCE = "data/debian_retrieval_dev.jsonl.gz"
STS = "data/stsbenchmark.tsv.gz"
MAX_SIBLINGS = 6  # sources with more packages (e.g. 28 budgie applets) would dominate
RERANK_EVERY, RERANK_NEGATIVES, RERANK_SIBLINGS = 12, 9, 2
STS_POSITIVE, STS_NEGATIVE = 4.0, 1.5


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = text.encode("utf-8")
    if path.endswith(".gz"):
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def _jsonl(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _qrels(pairs) -> str:
    return "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in pairs)


def write_beir(folder: str, rows: list[dict], qrels: list[tuple[str, str, int]], gz: bool):
    """corpus/queries of `rows` (by package), qrels/test.tsv of `qrels`."""
    suffix = ".gz" if gz else ""
    queried = {q for q, _, _ in qrels}
    corpus = [{"_id": r["package"], "title": "", "text": r["document"]} for r in rows]
    queries = [{"_id": r["package"], "text": r["query"]} for r in rows if r["package"] in queried]
    _write(f"{folder}/corpus.jsonl{suffix}", _jsonl(corpus))
    _write(f"{folder}/queries.jsonl{suffix}", _jsonl(queries))
    _write(f"{folder}/qrels/test.tsv", _qrels(qrels))


def graded(rows: list[dict]) -> tuple[list[dict], list[tuple[str, str, int]]]:
    by_source = collections.defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    corpus, qrels = [], []
    for source in sorted(by_source):
        packages = sorted(by_source[source], key=lambda r: r["package"])
        if not 2 <= len(packages) <= MAX_SIBLINGS:
            continue
        named = [r for r in packages if r["package"] == source]
        query = (named or packages)[0]["package"]
        corpus += packages
        qrels += [(query, r["package"], 2 if r["package"] == query else 1) for r in packages]
    return corpus, qrels


def reranking(rows: list[dict]) -> list[dict]:
    rng = random.Random(0)
    by_source = collections.defaultdict(list)
    by_section = collections.defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
        by_section[row["section"]].append(row)
    samples = []
    for row in rows[::RERANK_EVERY]:
        siblings = [r for r in by_source[row["source"]] if r is not row][:RERANK_SIBLINGS]
        others = [r for r in by_section[row["section"]] if r["source"] != row["source"]]
        if len(others) < RERANK_NEGATIVES:
            others += [r for r in rng.sample(rows, 50) if r["source"] != row["source"]]
        negatives = rng.sample(others, RERANK_NEGATIVES)
        samples.append(
            {
                "query": row["query"],
                "positive": [row["document"]] + [r["document"] for r in siblings],
                "negative": [r["document"] for r in negatives],
            }
        )
    return samples


def sts_pairs() -> str:
    with gzip.open(STS, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        out = io.StringIO()
        out.write("sentence1\tsentence2\tlabel\n")
        for row in reader:
            score = float(row["score"])
            if row["split"] != "dev" or STS_NEGATIVE < score < STS_POSITIVE:
                continue
            out.write(f"{row['sentence1']}\t{row['sentence2']}\t{int(score >= STS_POSITIVE)}\n")
    return out.getvalue()


def main():
    with gzip.open(SOURCE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    qrels = [(r["package"], r["package"], 1) for r in rows]
    write_beir("data/debian_retrieval_dev", rows, qrels, gz=True)
    write_beir("data/debian_graded", *graded(rows), gz=False)
    _write("data/debian_reranking.jsonl.gz", _jsonl(reranking(rows)))
    _write("data/stsb_pairs_dev.tsv.gz", sts_pairs())


if __name__ == "__main__":
    main()
