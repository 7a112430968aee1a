"""Preview what a data mixture feeds the model: shares, duplicates, bad lines, padding.

    python scripts/inspect_data.py --data_config data_config.json --data_folder data \
        --num_batches 100 --batch_size 1024 [--json]

Runs the real input pipeline (readers, mixer, tokenizer; no model) for a few
batches and prints, per dataset, its configured weight and expected share of
groups next to the realised share of groups and of examples; then the
duplicates skipped, malformed lines (with file:line samples) and the share of
padding tokens per padded length. Settings not given default to the training
config's (configs/default.py). With --json the last line is one JSON object:
{"datasets": [{"name", "weight", "expected_share", "example_share",
"group_share", ...}, ...], "duplicates_skipped", "bad_lines", "padding_share",
...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone, no install

from configs import default as default_config
from embeddings.data import DataConfigError, InputPipeline, MalformedDataError, MixerError

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tokenizers" / "bert-uncased"


def parse_args(argv=None) -> argparse.Namespace:
    config = default_config.get_config()  # the defaults are the training config's
    data = config.data
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_config", required=True, help="data_config.json to preview")
    parser.add_argument("--data_folder", required=True, help="folder the config's names are under")
    parser.add_argument("--num_batches", type=int, required=True, help="global batches to draw")
    parser.add_argument("--batch_size", type=int, required=True, help="global batch size (rows)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer folder")
    parser.add_argument(
        "--datasets_per_batch", type=int, default=data.datasets_per_batch, help="groups per batch"
    )
    parser.add_argument(
        "--max_length_anchor", type=int, default=data.max_length_anchor, help="column 0 limit"
    )
    parser.add_argument(
        "--max_length_document",
        type=int,
        default=data.max_length_document,
        help="other columns' limit",
    )
    parser.add_argument(
        "--buckets",
        default=",".join(map(str, data.buckets)),
        help="padded lengths, comma-separated; '' = max length",
    )
    parser.add_argument(
        "--shuffle_buffer", type=int, default=data.shuffle_buffer, help="lines per chunk"
    )
    parser.add_argument("--seed", type=int, default=config.seed, help="seed of the mixture")
    parser.add_argument(
        "--max_bad_line_share",
        type=float,
        default=data.max_bad_line_share,
        help="stop above this malformed share",
    )
    return parser.parse_args(argv)


def summarize(stats: dict) -> dict:
    """The preview's numbers from InputPipeline.stats()."""
    examples = max(stats["examples"], 1)
    groups = max(stats["groups"], 1)
    return {
        "datasets": [
            {
                "name": d["name"],
                "weight": d["weight"],
                "expected_share": d["expected_share"],
                "example_share": d["examples"] / examples,
                "group_share": d["groups"] / groups,
                "layout": d["layout"],
                "examples": d["examples"],
                "groups": d["groups"],
                "duplicates_skipped": d["duplicates_skipped"],
                "bad_lines": d["bad_lines"],
                "bad_line_samples": d["bad_line_samples"],
            }
            for d in stats["datasets"]
        ],
        "batches": stats["step"],
        "examples": stats["examples"],
        "groups": stats["groups"],
        "duplicates_skipped": stats["duplicates_skipped"],
        "topped_up_groups": stats["topped_up_groups"],
        "bad_lines": stats["bad_lines"],
        "padding_share": stats["padding_share"],
        "padding_share_by_length": stats["padding_share_by_length"],
    }


def print_report(summary: dict) -> None:
    print(
        f"{summary['batches']} batches, {summary['examples']} examples, "
        f"{summary['groups']} groups\n"
    )
    print(
        "| dataset | layout | weight | expected share | group share | example share "
        "| groups | examples | duplicates | bad lines |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d in summary["datasets"]:
        print(
            f"| {d['name']} | {d['layout']} | {d['weight']:g} | {d['expected_share']:.2%} "
            f"| {d['group_share']:.2%} | {d['example_share']:.2%} | {d['groups']} "
            f"| {d['examples']} | {d['duplicates_skipped']} | {d['bad_lines']} |"
        )
    print(f"\nduplicates skipped: {summary['duplicates_skipped']}")
    print(f"groups topped up from another dataset: {summary['topped_up_groups']}")
    print(f"bad lines: {summary['bad_lines']}")
    for d in summary["datasets"]:
        for sample in d["bad_line_samples"]:
            print(f"  {sample}")
    print(f"padding share: {summary['padding_share']:.1%}")
    for width, share in summary["padding_share_by_length"].items():
        print(f"  padded to {width}: {share:.1%} padding")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers import AutoTokenizer

    buckets = tuple(int(b) for b in args.buckets.split(",") if b.strip())
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        with InputPipeline(
            data_config=args.data_config,
            data_folder=args.data_folder,
            tokenizer=tokenizer,
            batch_size=args.batch_size,
            datasets_per_batch=args.datasets_per_batch,
            max_length_anchor=args.max_length_anchor,
            max_length_document=args.max_length_document,
            buckets=buckets,
            shuffle_buffer=args.shuffle_buffer,
            seed=args.seed,
            max_bad_line_share=args.max_bad_line_share,
            prefetch=2,
        ) as pipeline:
            for _ in range(args.num_batches):
                next(pipeline)
            summary = summarize(pipeline.stats())
    except (DataConfigError, MalformedDataError, MixerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(summary)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
