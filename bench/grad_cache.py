"""GradCache: peak memory at batch 1024 vs the plain step at 64, and time per pair at one batch.

    python bench/grad_cache.py [--json] [--model minilm|tiny|PATH] [--max_length 64] \
        [--batch_size 1024] [--chunk 64] [--plain_batch_size 64] [--time_batch_size 256] \
        [--steps 2] [--warmup 1]

Every configuration runs our jitted training step (`bench/step.py`'s `OurStep`)
on one CPU device in its own process, so its peak resident memory
(`ru_maxrss`: parameters, optimizer state, compilation and the step's buffers)
is its own:

1. memory: GradCache at --batch_size (chunks of --chunk rows) vs the plain step
   at --plain_batch_size, one step each (compilation included);
2. time: GradCache vs the plain step at --time_batch_size, which both can run
   in reasonable time and memory (the plain step at 1024 needs ~16x the
   activation memory of 64), alternated after --warmup steps; reported per pair.

Inputs are Debian pairs padded to --max_length tokens (64 keeps the 1024-pair
step near a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

import jax

from bench import _timing
from bench.step import OurStep, add_model_args, model_dir, sample_pairs, tokenize_pairs


def serve(args) -> None:
    """Worker: a step at --serve_batch rows (GradCache when --serve_chunk > 0) per request."""
    ours = OurStep(
        model_dir(args.model),
        dtype=args.dtype,
        grad_cache_chunk=args.serve_chunk,
        devices=jax.devices()[:1],
    )
    pairs = sample_pairs(args.serve_batch)
    batch = ours.device_batch(tokenize_pairs(ours.tokenizer, pairs, args.max_length))
    _timing.serve(lambda: ours(batch), _timing.jax_facts)


def _worker(args, batch: int, chunk: int) -> tuple[list[str], None]:
    return (
        _timing.worker_args(
            __file__, args, serve=True, serve_batch=batch, serve_chunk=chunk, model=args.model_path
        ),
        None,
    )


def _summary(run: dict, batch: int) -> dict:
    seconds = _timing.median(run["times"])
    return {
        "peak_rss_mib": run["peak_rss_mib"],
        "step_seconds": seconds,
        "seconds_per_pair": seconds / batch,
        "times": run["times"],
    }


def measure(args) -> dict:
    args.model_path = str(model_dir(args.model))
    # Memory pair: one step each; the first step's time includes compilation.
    memory = _timing.alternate_processes(
        {
            "grad_cache": _worker(args, args.batch_size, args.chunk),
            "plain": _worker(args, args.plain_batch_size, 0),
        },
        steps=1,
        warmup=0,
    )
    timing = _timing.alternate_processes(
        {
            "grad_cache": _worker(args, args.time_batch_size, args.chunk),
            "plain": _worker(args, args.time_batch_size, 0),
        },
        steps=args.steps,
        warmup=args.warmup,
    )
    gc_memory = _summary(memory["grad_cache"], args.batch_size)
    plain_memory = _summary(memory["plain"], args.plain_batch_size)
    gc_time = _summary(timing["grad_cache"], args.time_batch_size)
    plain_time = _summary(timing["plain"], args.time_batch_size)
    return {
        "benchmark": "grad_cache",
        "model": args.model,
        "dtype": args.dtype,
        "max_length": args.max_length,
        "chunk": args.chunk,
        "batch_size": args.batch_size,
        "plain_batch_size": args.plain_batch_size,
        "time_batch_size": args.time_batch_size,
        "steps": args.steps,
        "peak_rss_mib": gc_memory["peak_rss_mib"],
        "plain_peak_rss_mib": plain_memory["peak_rss_mib"],
        "memory_ratio": gc_memory["peak_rss_mib"] / plain_memory["peak_rss_mib"],
        "seconds_per_pair": gc_time["seconds_per_pair"],
        "plain_seconds_per_pair": plain_time["seconds_per_pair"],
        "time_ratio": gc_time["seconds_per_pair"] / plain_time["seconds_per_pair"],
        "memory_runs": {"grad_cache": gc_memory, "plain": plain_memory},
        "time_runs": {"grad_cache": gc_time, "plain": plain_time},
        "device": memory["plain"]["device"],
        **_timing.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.set_defaults(steps=2, warmup=1)
    parser.add_argument("--max_length", type=int, default=64, help="tokens per text (padded)")
    parser.add_argument("--batch_size", type=int, default=1024, help="GradCache batch (memory)")
    parser.add_argument("--chunk", type=int, default=64, help="GradCache chunk rows")
    parser.add_argument("--plain_batch_size", type=int, default=64, help="plain batch (memory)")
    parser.add_argument("--time_batch_size", type=int, default=256, help="batch of the timing")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve_batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve_chunk", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model_path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    r = measure(args)
    print(
        f"GradCache, {r['model']} {r['dtype']}, length {r['max_length']}, chunk {r['chunk']}, "
        f"one CPU device, {r['cpu']} ({r['cores']} cores)\n"
    )
    _timing.print_table(
        ["measure", "GradCache", "plain", "ratio"],
        [
            [
                f"peak RSS (GradCache at {r['batch_size']}, plain at {r['plain_batch_size']})",
                f"{r['peak_rss_mib']:,.0f} MiB",
                f"{r['plain_peak_rss_mib']:,.0f} MiB",
                f"{r['memory_ratio']:.2f}x",
            ],
            [
                f"step time per pair (both at {r['time_batch_size']}, median of {r['steps']})",
                f"{r['seconds_per_pair'] * 1e3:.1f} ms",
                f"{r['plain_seconds_per_pair'] * 1e3:.1f} ms",
                f"{r['time_ratio']:.2f}x",
            ],
        ],
    )
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
