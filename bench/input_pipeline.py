"""Input pipeline throughput: raw files to padded int32 arrays, with buckets vs max length.

    python bench/input_pipeline.py [--batch_size 1024] [--num_batches 40] [--json]

For each padding mode a fresh pipeline reads the bundled mixture (gzip JSONL,
parsing included, as each file is first drawn), shuffles, mixes, deduplicates,
tokenizes and pads, with prefetch off so the time is the pipeline's own work
on one thread. It reports pairs (rows) per second, non-padding tokens per second
and the share of padding tokens, as a Markdown table; --json adds one JSON
object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from embeddings.data import InputPipeline

REPO = Path(__file__).resolve().parents[1]


def measure(args, tokenizer, buckets: tuple[int, ...]) -> dict:
    """Builds a fresh pipeline with `buckets` and times num_batches batches."""
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
    )
    built = time.perf_counter()
    with pipeline:
        for _ in range(args.num_batches):
            next(pipeline)
        elapsed = time.perf_counter() - built
        stats = pipeline.stats()
    return {
        "padding": f"buckets {buckets}" if buckets else f"max length {args.max_length}",
        "buckets": list(buckets),
        "startup_seconds": built - start,
        "seconds": elapsed,
        "pairs_per_second": stats["examples"] / elapsed,
        "tokens_per_second": stats["real_tokens"] / elapsed,
        "padding_share": stats["padding_share"],
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
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    buckets = tuple(int(b) for b in args.buckets.split(",") if b.strip())
    results = [measure(args, tokenizer, buckets), measure(args, tokenizer, ())]

    print(
        f"Input pipeline, {args.num_batches} batches of {args.batch_size} rows, "
        "bundled mixture, one thread\n"
    )
    print("| padding | pairs/s | non-padding tokens/s | padding share | start-up (s) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['padding']} | {r['pairs_per_second']:,.0f} | {r['tokens_per_second']:,.0f} "
            f"| {r['padding_share']:.1%} | {r['startup_seconds']:.2f} |"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "batch_size": args.batch_size,
                    "num_batches": args.num_batches,
                    "results": results,
                    "padding_share_buckets": results[0]["padding_share"],
                    "padding_share_max_length": results[1]["padding_share"],
                }
            )
        )


if __name__ == "__main__":
    main()
