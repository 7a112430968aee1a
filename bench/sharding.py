"""Sharding overhead: the training step on 8 fake CPU devices vs 1 device, same global batch.

    python bench/sharding.py [--json] [--model minilm|tiny|PATH] [--dtype float32|bfloat16] \
        [--batch_size 64] [--max_length 128] [--devices 8] [--steps 3] [--warmup 1]

Two worker processes, one started with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and one with a single CPU
device, run our jitted training step (`bench/step.py`'s `OurStep`) on the same
global batch: on 8 devices the rows are split 8 ways and XLA inserts the
all-gathers of the embeddings for the in-batch negatives and the all-reduce of
the gradients. The CPU cores are the same, so the ratio is the cost of the
sharded path; it should stay near 1 (a jump is a regression in the sharded
path, e.g. a replicated computation or a resharding of the parameters).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

from bench import _timing
from bench.step import OurStep, add_model_args, model_dir, sample_pairs, tokenize_pairs

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def serve(args) -> None:
    """Worker: one step over all of this process's devices per request."""
    import jax

    ours = OurStep(model_dir(args.model), dtype=args.dtype, devices=jax.devices())
    host = tokenize_pairs(ours.tokenizer, sample_pairs(args.batch_size), args.max_length)
    batch = ours.device_batch(host)
    _timing.serve(lambda: ours(batch), _timing.jax_facts)


def xla_flags(devices: int) -> str:
    """This process's XLA_FLAGS with the host device count set to `devices`."""
    kept = [
        f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)
    ]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])


def measure(args) -> dict:
    if args.batch_size % args.devices:
        raise SystemExit(f"--batch_size {args.batch_size} must be divisible by --devices.")
    model = str(model_dir(args.model))
    workers = {
        name: (
            _timing.worker_args(__file__, args, serve=True, model=model),
            {"XLA_FLAGS": xla_flags(count)},
        )
        for name, count in (("sharded", args.devices), ("single", 1))
    }
    runs = _timing.alternate_processes(workers, steps=args.steps, warmup=args.warmup)
    sharded, single = runs["sharded"], runs["single"]
    if sharded["devices"] != args.devices or single["devices"] != 1:
        raise RuntimeError(
            f"the workers saw {sharded['devices']} and {single['devices']} devices, not "
            f"{args.devices} and 1: is JAX_PLATFORMS set to a platform other than cpu?"
        )
    sharded_s, single_s = _timing.median(sharded["times"]), _timing.median(single["times"])
    return {
        "benchmark": "sharding",
        "model": args.model,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "devices": args.devices,
        "steps": args.steps,
        "step_seconds": sharded_s,
        "single_device_step_seconds": single_s,
        "ratio": sharded_s / single_s,
        "pairs_per_second": args.batch_size / sharded_s,
        "single_device_pairs_per_second": args.batch_size / single_s,
        "step_times": sharded["times"],
        "single_device_step_times": single["times"],
        "peak_rss_mib": sharded["peak_rss_mib"],
        "single_device_peak_rss_mib": single["peak_rss_mib"],
        "device": single["device"],
        **_timing.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser)
    parser.set_defaults(steps=3, warmup=1)
    parser.add_argument("--batch_size", type=int, default=64, help="global batch (pairs)")
    parser.add_argument("--max_length", type=int, default=128, help="tokens per text (padded)")
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices, sharded run")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    r = measure(args)
    print(
        f"Sharding, {r['model']} {r['dtype']}, global batch {r['batch_size']} x "
        f"{r['max_length']} tokens, median of {r['steps']} alternated steps, "
        f"{r['cpu']} ({r['cores']} cores)\n"
    )
    _timing.print_table(
        ["devices", "s/step", "pairs/s", "ratio to 1 device"],
        [
            [r["devices"], f"{r['step_seconds']:.3f}", f"{r['pairs_per_second']:.2f}",
             f"{r['ratio']:.2f}x"],
            [1, f"{r['single_device_step_seconds']:.3f}",
             f"{r['single_device_pairs_per_second']:.2f}", "1.00x"],
        ],
    )  # fmt: skip
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
