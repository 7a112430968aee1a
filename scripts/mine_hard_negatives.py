"""Mines hard negatives for (anchor, positive) pairs with a model, in JAX; writes a training file.

    python scripts/mine_hard_negatives.py --model out/my-model \
        --pairs data/debian/python.jsonl.gz --output data/mined/python-hn.jsonl.gz \
        --num_negatives 3 --relative_margin 0.05

`--model` is resolved as in scripts/evaluate.py: a sentence-transformers or Hugging Face
folder (or Hub id), a training workdir (its latest checkpoint) or a checkpoint step folder.
Queries are embedded with the query tower, documents with the document tower. The corpus
is the positives (deduplicated), plus `--corpus` if given. Corpus and query embeddings
are written to `.npy` files chunk by chunk and read back in chunks, so memory does not
grow with the corpus; retrieval is exact (chunked matrix products in JAX over all
devices). The selection options and their defaults are those of sentence-transformers'
`util.mine_hard_negatives`; see embeddings/mining.py.

Writes gzip JSONL rows `[query, positive, neg_1, ..., neg_k]` (`--output_format n-tuple`,
one row per pair with all k negatives found), `[query, positive, negative]`
(`triplet`) or `{"query": q, "pos": [...], "neg": [neg_1, ..., neg_k]}` (`lists`, one
row per query, for `config.data.negatives_per_row`), and prints the data_config.json
entry that trains on the file.

Texts are embedded with the model's own prompts per role (those it was trained and is
evaluated with); `--query_prompt` and `--corpus_prompt` replace them, as the options of
sentence-transformers' `mine_hard_negatives` do. The written rows hold the texts without
prompts: the training pipeline adds its own.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from tqdm import tqdm

from embeddings import mining
from embeddings.data import DataConfigError, MalformedDataError
from embeddings.data.data_config import parse_entries
from embeddings.data.readers import BadRecord, infer_row_spec, make_source, parse_row
from scripts.evaluate import load_encode_fn

# Bad lines of an input file reported by name (the rest only counted).
_SHOWN_BAD_LINES = 5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model folder, Hub id, workdir or step")
    parser.add_argument(
        "--pairs", required=True, nargs="+", help="JSONL(.gz) files of [anchor, positive] rows"
    )
    parser.add_argument("--output", required=True, help="the .jsonl.gz file to write")
    parser.add_argument(
        "--corpus",
        help="extra documents: .jsonl(.gz) of JSON strings or {'text': ...}, or one text a line",
    )
    parser.add_argument("--num_negatives", type=int, default=3, help="negatives per row")
    parser.add_argument("--range_min", type=int, default=0, help="skip the best N candidates")
    parser.add_argument("--range_max", type=int, help="consider the best N (default: derived)")
    parser.add_argument("--max_score", type=float, help="drop candidates scoring above")
    parser.add_argument("--min_score", type=float, help="drop candidates scoring below")
    parser.add_argument(
        "--absolute_margin", type=float, help="drop candidates with score + margin > positive"
    )
    parser.add_argument(
        "--relative_margin", type=float, help="drop candidates above pos - |pos| * margin"
    )
    parser.add_argument("--sampling_strategy", choices=mining.SAMPLING_STRATEGIES, default="top")
    parser.add_argument("--output_format", choices=mining.OUTPUT_FORMATS, default="n-tuple")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sampling_strategy random")
    parser.add_argument(
        "--query_prompt", help="prompt before each query (default: the model's query prompt)"
    )
    parser.add_argument(
        "--corpus_prompt",
        help="prompt before each document (default: the model's document prompt)",
    )
    parser.add_argument(
        "--similarity", choices=("cosine", "dot"), help="override the model's similarity"
    )
    parser.add_argument("--batch_size", type=int, default=128, help="texts per forward pass")
    parser.add_argument(
        "--chunk_size", type=int, default=65536, help="texts per embedding chunk / product"
    )
    parser.add_argument("--query_block", type=int, default=4096, help="queries per retrieval")
    parser.add_argument(
        "--embeddings_dir", help="keep the .npy embeddings here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    for name in ("batch_size", "chunk_size", "query_block"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    return args


def read_pairs(path: str) -> list[tuple[str, str]]:
    """(anchor, positive) of every valid row, by the training readers' rules (data/README.md).

    Rows with more columns give their first two; malformed rows are skipped and reported.
    """
    file = Path(path)
    entry = parse_entries([{"name": file.name, "weight": 1}], file.parent, source=path)[0]
    source = make_source(entry, file.parent)
    spec = infer_row_spec(entry, source)
    if spec.layout.kind != "contrastive":
        raise ValueError(f"{path}: margin rows; mining needs (anchor, positive) rows.")
    pairs, bad = [], []
    for line, raw in source.records(0):
        try:
            texts = parse_row(source.decode(raw), spec, line).texts
        except BadRecord as error:
            bad.append(f"{source.where(line)}: {error}")
            continue
        pairs.append((texts[0], texts[1]))
    if bad:
        logging.warning(
            "%s: skipped %d malformed rows, e.g. %s",
            path,
            len(bad),
            "; ".join(bad[:_SHOWN_BAD_LINES]),
        )
    return pairs


def read_corpus(path: str) -> list[str]:
    """Texts of a corpus file: JSONL of strings or {"text": ...}, else one text a line."""
    opener = gzip.open if path.endswith(".gz") else open
    is_jsonl = ".jsonl" in Path(path).name or ".json" in Path(path).name
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not is_jsonl:
                texts.append(line.rstrip("\n"))
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not JSON ({error}).") from error
            if isinstance(value, dict):
                value = value.get("text")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f'{path}:{line_number}: expected a JSON string or {{"text": "..."}} object.'
                )
            texts.append(value)
    return texts


def run(args: argparse.Namespace) -> int:
    """Mines and writes the file; returns the number of rows written."""
    options = mining.MiningOptions(
        num_negatives=args.num_negatives,
        range_min=args.range_min,
        range_max=args.range_max,
        max_score=args.max_score,
        min_score=args.min_score,
        absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin,
        sampling_strategy=args.sampling_strategy,
        output_format=args.output_format,
    )
    options.check()
    pairs = [pair for path in args.pairs for pair in read_pairs(path)]
    index = mining.index_pairs(pairs, read_corpus(args.corpus) if args.corpus else ())
    options.candidate_window(index.max_positives)  # option errors before the model loads
    print(
        f"{len(pairs)} pairs: {len(index.queries)} distinct queries, "
        f"corpus of {len(index.corpus)} distinct documents"
    )
    prompts = {"query": args.query_prompt, "document": args.corpus_prompt}
    prompts = {role: prompt for role, prompt in prompts.items() if prompt is not None}
    encode, model_similarity = load_encode_fn(args.model, args.batch_size, prompts=prompts)
    similarity = args.similarity or model_similarity

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.embeddings_dir or scratch)
        folder.mkdir(parents=True, exist_ok=True)

        def embed(texts, role):
            return mining.embed_to_file(
                lambda chunk: encode(chunk, role),
                texts,
                folder / f"{role}_embeddings.npy",
                chunk_size=args.chunk_size,
                unit_length=similarity == "cosine",
                progress=lambda it: tqdm(it, desc=f"embed {role}s", unit="chunk"),
            )

        corpus_embeddings = embed(index.corpus, "document")
        query_embeddings = embed(index.queries, "query")
        rows = mining.mine(
            index,
            query_embeddings,
            corpus_embeddings,
            options,
            seed=args.seed,
            query_block=args.query_block,
            chunk_size=args.chunk_size,
            progress=lambda it: tqdm(it, desc="retrieve", unit="block"),
        )
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with gzip.open(output, "wt", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
        # Memmaps must close before the temporary folder goes.
        del corpus_embeddings, query_embeddings
    return written


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        written = run(args)
    except (FileNotFoundError, ValueError, DataConfigError, MalformedDataError) as err:
        # These carry a message saying what is wrong and what to do; a traceback adds nothing.
        sys.exit(f"mine_hard_negatives.py: error: {err}")
    print(f"wrote {written} rows to {args.output}")
    entry = {"name": os.path.relpath(args.output, "data"), "lines": written, "weight": written}
    print(f"data_config.json entry (name relative to data_folder): {json.dumps(entry)}")
    if args.output_format == "lists":
        print(
            f"train with --config.data.negatives_per_row=K (K <= {args.num_negatives}): one "
            "positive and K negatives are drawn from each row at every use."
        )


if __name__ == "__main__":
    main()
