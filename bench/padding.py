"""Length buckets vs padding to the max length: real (non-padding) tokens/s of the training step.

    python bench/padding.py [--json] [--model minilm|tiny|PATH] [--dtype float32|bfloat16] \
        [--batch_size 64] [--num_batches 6] [--buckets 32,64,128] [--max_length 128] \
        [--pack_levels 0] [--datasets_per_batch 2] [--steps 2] [--warmup 1]

Two worker processes each build the input pipeline on the bundled mixture
(data_config.json, data/) with the same seed and settings except the padding
(--buckets, or every column padded to --max_length), take the same
--num_batches batches of --batch_size pairs, and time passes of our jitted
training step (`bench/step.py`'s `OurStep`, one CPU device) over them,
alternated after --warmup untimed passes (which compile every shape). Reports
non-padding tokens per second of each (the same tokens, so the ratio is the
speed-up) and, for the bucketed run, how often each column got each padded
length: a column is padded to the smallest bucket that holds its longest text
in the batch, so one long text pads the whole batch. With --pack_levels N the
bucketed side also runs its dense layers on real tokens only (train.py's
config.model.pack_levels; its default is 8), the padded side never does.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

import jax

from bench import _timing
from bench.step import OurStep, add_model_args, model_dir
from embeddings.data import InputPipeline
from embeddings.models import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
COLUMN_NAMES = ("anchor", "document")


def parse_buckets(text: str) -> tuple[int, ...]:
    """Parses --buckets: "32,64,128" -> (32, 64, 128); "" -> () (pad to the max length)."""
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError as error:
        raise SystemExit(
            f"--buckets {text!r}: give comma-separated token counts, e.g. 32,64,128."
        ) from error


def pipeline_batches(args, tokenizer, buckets: tuple[int, ...]) -> list[dict]:
    """The first --num_batches batches of the bundled mixture (ids and masks only)."""
    with InputPipeline(
        data_config=args.data_config,
        data_folder=args.data_folder,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        datasets_per_batch=args.datasets_per_batch,
        max_length_anchor=args.max_length,
        max_length_document=args.max_length,
        buckets=buckets,
        prefetch=0,
    ) as pipeline:
        batches = [next(pipeline) for _ in range(args.num_batches)]
    return [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]


def token_counts(batches: list[dict]) -> dict:
    """Real and padded tokens, and per column how many batches got each padded length."""
    real = sum(int(m.sum()) for b in batches for m in b["attention_mask"])
    padded = sum(m.size for b in batches for m in b["attention_mask"])
    lengths = {name: collections.Counter() for name in COLUMN_NAMES}
    for b in batches:
        for column, ids in enumerate(b["input_ids"]):
            lengths[COLUMN_NAMES[min(column, 1)]][ids.shape[1]] += 1
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": 1 - real / padded,
        "padded_lengths": {k: dict(sorted(v.items())) for k, v in lengths.items()},
    }


def serve(args) -> None:
    """Worker: one pass of training steps over the batches per request."""
    folder = model_dir(args.model)
    buckets = parse_buckets(args.buckets) if args.serve == "buckets" else ()
    batches = pipeline_batches(args, load_tokenizer(folder), buckets)
    ours = OurStep(folder, dtype=args.dtype, devices=jax.devices()[:1])
    pack_levels = args.pack_levels if args.serve == "buckets" else 0
    on_device = [ours.device_batch(b, pack_levels) for b in batches]

    def one_pass():
        for batch in on_device:
            ours(batch)

    _timing.serve(one_pass, lambda: {**token_counts(batches), **_timing.jax_facts()})


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """The options that say which batches the step runs on (shared with pipeline_vs_step)."""
    parser.add_argument("--batch_size", type=int, default=64, help="pairs per step")
    parser.add_argument("--num_batches", type=int, default=6, help="batches per timed pass")
    parser.add_argument("--buckets", default="32,64,128", help="padded lengths, comma-separated")
    parser.add_argument("--max_length", type=int, default=128, help="token limit, both sides")
    parser.add_argument("--datasets_per_batch", type=int, default=2, help="groups per batch")
    parser.add_argument("--data_config", default=str(REPO / "data_config.json"))
    parser.add_argument("--data_folder", default=str(REPO / "data"))


def measure(args) -> dict:
    model = str(model_dir(args.model))
    runs = _timing.alternate_processes(
        {
            mode: (_timing.worker_args(__file__, args, serve=mode, model=model), None)
            for mode in ("buckets", "max_length")
        },
        steps=args.steps,
        warmup=args.warmup,
    )
    results = {}
    for mode, run in runs.items():
        seconds = _timing.median(run["times"])
        results[mode] = {
            **{k: run[k] for k in ("real_tokens", "padded_tokens", "padding_share")},
            "padded_lengths": run["padded_lengths"],
            "pass_seconds": seconds,
            "pass_times": run["times"],
            "real_tokens_per_second": run["real_tokens"] / seconds,
            "pairs_per_second": args.batch_size * args.num_batches / seconds,
        }
    bucketed, padded = results["buckets"], results["max_length"]
    if bucketed["real_tokens"] != padded["real_tokens"]:
        raise RuntimeError(
            "the two pipelines drew different examples "
            f"({bucketed['real_tokens']} vs {padded['real_tokens']} real tokens): "
            "the comparison needs the same batches."
        )
    return {
        "benchmark": "padding",
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "num_batches": args.num_batches,
        "buckets": list(parse_buckets(args.buckets)),
        "max_length": args.max_length,
        "pack_levels": args.pack_levels,
        "datasets_per_batch": args.datasets_per_batch,
        "steps": args.steps,
        "buckets_real_tokens_per_second": bucketed["real_tokens_per_second"],
        "max_length_real_tokens_per_second": padded["real_tokens_per_second"],
        "speedup": bucketed["real_tokens_per_second"] / padded["real_tokens_per_second"],
        "results": results,
        "device": runs["buckets"]["device"],
        **_timing.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    add_pipeline_args(parser)
    parser.add_argument(
        "--pack_levels",
        type=int,
        default=0,
        help="bucketed side: dense layers on real tokens only (capacity levels); 0 = off",
    )
    parser.add_argument("--serve", choices=("buckets", "max_length"), help=argparse.SUPPRESS)
    parser.set_defaults(steps=2, warmup=1)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    r = measure(args)
    print(
        f"Padding, {r['model']} {r['dtype']}, {r['num_batches']} batches of {r['batch_size']} "
        f"pairs from the bundled mixture, median of {r['steps']} alternated passes, "
        f"{r['cpu']} ({r['cores']} cores)\n"
    )
    rows = []
    packing = f" + packing ({r['pack_levels']} levels)" if r["pack_levels"] else ""
    for mode, label in (("buckets", f"buckets {tuple(r['buckets'])}{packing}"), ("max_length", "")):
        x = r["results"][mode]
        lengths = "; ".join(
            f"{column} " + ", ".join(f"{n}x{length}" for length, n in counts.items())
            for column, counts in x["padded_lengths"].items()
        )
        rows.append(
            [
                label if mode == "buckets" else f"max length {r['max_length']}",
                f"{x['real_tokens_per_second']:,.0f}",
                f"{x['pairs_per_second']:.2f}",
                f"{x['padding_share']:.1%}",
                lengths,
            ]
        )
    _timing.print_table(
        ["padding", "real tokens/s", "pairs/s", "padding share", "padded lengths (batches)"], rows
    )
    print(f"\nspeed-up of buckets{packing}: {r['speedup']:.2f}x")
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
