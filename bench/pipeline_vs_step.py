"""Input pipeline vs training step: pairs/s the pipeline delivers vs pairs/s the step consumes.

    python bench/pipeline_vs_step.py [--json] [--model minilm|tiny|PATH] [--batch_size 64] \
        [--pipeline_batches 100] [--num_batches 6] [--buckets 32,64,128] [--max_length 128] \
        [--pack_levels 8] [--workers 0] [--steps 2] [--warmup 1]

- Delivered: `bench/input_pipeline.py`'s measurement, in this process: a fresh
  pipeline on the bundled mixture reads the gzip JSONL files (parsing each as
  it is first drawn), shuffles, mixes, deduplicates, tokenizes with the
  model's tokenizer and pads to the buckets, with prefetch off, for
  --pipeline_batches batches of --batch_size pairs; tokenizing and padding in
  --workers processes (0: in the calling thread).
- Consumed: our jitted MiniLM training step on one CPU device over
  --num_batches such batches (`bench/padding.py`'s bucketed worker), with
  the dense layers on real tokens only as train.py runs them (--pack_levels,
  0 = off), median of --steps passes after --warmup passes that compile every
  shape.

In training the pipeline runs in a background thread beside the step, so the
ratio says how much of the CPU the pipeline takes away: at 5x, about a sixth.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

from bench import _timing, padding
from bench import input_pipeline as pipeline_bench
from bench.step import add_model_args, model_dir
from embeddings.models import load_tokenizer

PADDING_SCRIPT = str(pathlib.Path(padding.__file__).resolve())


def measure(args) -> dict:
    folder = model_dir(args.model)
    pipeline_args = argparse.Namespace(
        data_config=args.data_config,
        data_folder=args.data_folder,
        batch_size=args.batch_size,
        num_batches=args.pipeline_batches,
        max_length=args.max_length,
        shuffle_buffer=args.shuffle_buffer,
    )
    buckets = padding.parse_buckets(args.buckets)
    delivered = pipeline_bench.measure(
        pipeline_args, load_tokenizer(folder), buckets, workers=args.workers
    )

    skip = ("pipeline_batches", "shuffle_buffer", "workers")  # pipeline-only arguments
    step_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in skip})
    worker = _timing.worker_args(PADDING_SCRIPT, step_args, serve="buckets", model=str(folder))
    step = _timing.alternate_processes(
        {"step": (worker, None)}, steps=args.steps, warmup=args.warmup
    )["step"]
    step_pairs = args.batch_size * args.num_batches / _timing.median(step["times"])
    return {
        "benchmark": "pipeline_vs_step",
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "buckets": list(buckets),
        "max_length": args.max_length,
        "pack_levels": args.pack_levels,
        "workers": args.workers,
        "pipeline_pairs_per_second": delivered["pairs_per_second"],
        "step_pairs_per_second": step_pairs,
        "ratio": delivered["pairs_per_second"] / step_pairs,
        "pipeline": delivered,
        "step_pass_times": step["times"],
        "step_num_batches": args.num_batches,
        "device": step["device"],
        **_timing.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    padding.add_pipeline_args(parser)
    parser.set_defaults(steps=2, warmup=1)
    parser.add_argument("--pipeline_batches", type=int, default=100, help="batches timed")
    parser.add_argument("--pack_levels", type=int, default=8, help="step: packing levels, 0 = off")
    parser.add_argument("--shuffle_buffer", type=int, default=100_000, help="lines per chunk")
    parser.add_argument(
        "--workers", type=int, default=0, help="pipeline worker processes (config.data.workers)"
    )
    args = parser.parse_args()
    r = measure(args)
    print(
        f"Input pipeline vs training step, {r['model']} {r['dtype']}, batches of "
        f"{r['batch_size']} pairs, buckets {tuple(r['buckets'])}, "
        f"{r['cpu']} ({r['cores']} cores)\n"
    )
    _timing.print_table(
        [f"pipeline pairs/s ({r['workers']} workers)", "step pairs/s", "ratio"],
        [
            [
                f"{r['pipeline_pairs_per_second']:,.0f}",
                f"{r['step_pairs_per_second']:.2f}",
                f"{r['ratio']:,.1f}x",
            ]
        ],
    )
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
