"""Input pipeline throughput: raw files to padded int32 arrays, with buckets vs max length.

    python bench/input_pipeline.py [--batch_size 1024] [--num_batches 40] [--workers 0,2] [--json]

For each padding mode a fresh pipeline reads the bundled mixture (gzip JSONL,
parsing included, as each file is first drawn), shuffles, mixes, deduplicates,
tokenizes and pads, with prefetch off so the time is the pipeline's own work.
With buckets it runs once per --workers value: 0 does everything in the
calling thread (the Rust tokenizer using its own threads), N > 0 mixes there
and tokenizes and pads in N worker processes of one core each
(`config.data.workers`). The first batch, which starts the workers, is not
timed. It reports pairs (rows) per second, non-padding tokens per second and
the share of padding tokens, as a Markdown table; --json adds one JSON object
on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from embeddings.data import InputPipeline

REPO = Path(__file__).resolve().parents[1]


def measure(args, tokenizer, buckets: tuple[int, ...], workers: int = 0) -> dict:
    """Builds a fresh pipeline with `buckets` and `workers` and times num_batches
    batches after the first."""
    start = time.perf_counter()
    pipeline = InputPipeline(
        data_config=args.data_config,
        data_folder=args.data_folder,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_length_anchor=args.max_length,
        max_length_document=args.max_length,
        buckets=buckets,
        shuffle_buffer=args.shuffle_buffer,
        prefetch=0,
        workers=workers,
    )
    with pipeline:
        next(pipeline)
        first = pipeline.stats()
        started = time.perf_counter()
        for _ in range(args.num_batches):
            next(pipeline)
        elapsed = time.perf_counter() - started
        stats = pipeline.stats()
    real = stats["real_tokens"] - first["real_tokens"]
    padding = stats["padding_tokens"] - first["padding_tokens"]
    return {
        "padding": f"buckets {buckets}" if buckets else f"max length {args.max_length}",
        "buckets": list(buckets),
        "workers": workers,
        "startup_seconds": started - start,
        "seconds": elapsed,
        "pairs_per_second": (stats["examples"] - first["examples"]) / elapsed,
        "tokens_per_second": real / elapsed,
        "padding_share": padding / (real + padding),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_config", default=str(REPO / "data_config.json"))
    parser.add_argument("--data_folder", default=str(REPO / "data"))
    parser.add_argument("--tokenizer", default=str(REPO / "data" / "tokenizers" / "bert-uncased"))
    parser.add_argument("--batch_size", type=int, default=1024, help="global batch (rows)")
    parser.add_argument("--num_batches", type=int, default=40, help="batches timed per mode")
    parser.add_argument("--max_length", type=int, default=128, help="token limit, both sides")
    parser.add_argument("--buckets", default="32,64,128", help="padded lengths, comma-separated")
    parser.add_argument("--shuffle_buffer", type=int, default=100_000, help="lines per chunk")
    parser.add_argument(
        "--workers", default="0", help="worker processes to time with buckets, comma-separated"
    )
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    buckets = tuple(int(b) for b in args.buckets.split(",") if b.strip())
    workers = [int(w) for w in args.workers.split(",")]
    results = [measure(args, tokenizer, buckets, w) for w in workers]
    results.append(measure(args, tokenizer, ()))

    print(
        f"Input pipeline, {args.num_batches} batches of {args.batch_size} rows, "
        f"bundled mixture, {os.cpu_count()} CPUs\n"
    )
    print("| padding | workers | pairs/s | non-padding tokens/s | padding share | start-up (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['padding']} | {r['workers']} | {r['pairs_per_second']:,.0f} "
            f"| {r['tokens_per_second']:,.0f} | {r['padding_share']:.1%} "
            f"| {r['startup_seconds']:.2f} |"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "batch_size": args.batch_size,
                    "num_batches": args.num_batches,
                    "cpus": os.cpu_count(),
                    "results": results,
                    "padding_share_buckets": results[0]["padding_share"],
                    "padding_share_max_length": results[-1]["padding_share"],
                }
            )
        )


if __name__ == "__main__":
    main()
