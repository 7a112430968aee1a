"""Writes the STS-benchmark train pairs with score >= 4 as paraphrase pairs (JSONL, gzip).

    python scripts/make_sts_pairs.py            # data/stsbenchmark.tsv.gz -> data/sts/...

A score of 4 or more (of 5) means the two sentences are (nearly) equivalent, so
each such pair is a positive pair for contrastive training. Only the train split
is used: dev and test stay unseen for evaluation. A pair whose two sentences are
identical is dropped (it teaches nothing and the mixer would skip it anyway).
The output is byte-for-byte reproducible (fixed gzip timestamp).
"""

import argparse
import csv
import gzip
import io
import json
import os

DEFAULT_INPUT = "data/stsbenchmark.tsv.gz"
DEFAULT_OUTPUT = "data/sts/stsb_train_score4.jsonl.gz"


def paraphrase_pairs(tsv_gz: str, split: str, min_score: float) -> list[list[str]]:
    """[sentence1, sentence2] of the rows of `split` with score >= min_score, in file order."""
    with gzip.open(tsv_gz, "rt", encoding="utf-8", newline="") as f:
        # Sentences contain bare quote characters: the file has no quoting.
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [
            [row["sentence1"], row["sentence2"]]
            for row in rows
            if row["split"] == split
            and float(row["score"]) >= min_score
            and row["sentence1"].strip() != row["sentence2"].strip()
        ]


def write_jsonl_gz(rows: list[list[str]], path: str) -> None:
    """One JSON list per line, gzip with mtime 0 so that reruns give identical bytes."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        text = io.TextIOWrapper(gz, encoding="utf-8")
        for row in rows:
            text.write(json.dumps(row, ensure_ascii=False) + "\n")
        text.flush()
        text.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=DEFAULT_INPUT, help="STS benchmark TSV (gzip)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSONL.gz to write")
    parser.add_argument("--split", default="train", help="split to take pairs from")
    parser.add_argument("--min_score", type=float, default=4.0, help="lowest score kept (0-5)")
    args = parser.parse_args()
    pairs = paraphrase_pairs(args.input, args.split, args.min_score)
    write_jsonl_gz(pairs, args.output)
    print(f"wrote {len(pairs)} pairs to {args.output}")


if __name__ == "__main__":
    main()
