"""Our whole trainer against sentence-transformers' whole trainer, on a real workload.

Each side runs as a user runs it, in a process of its own (bench/_trainers.py):
`train.py` with evaluation off (input pipeline, host to device, step, metrics,
the final checkpoint) and `SentenceTransformerTrainer` on the same data mixture
and recipe. Runs alternate (ours, st, ours, st, ...) so that load from other
programs hits both alike; both use every core this process may use. Reported
per side (medians over the repeats): steady-state steps/s, pairs/s and real
(non-padding) tokens/s over the steps after `--skip`, the whole run's time
(process start to exit: imports, model load, compilations, checkpoint), time to
the first finished step, peak resident memory, and the mean loss of the last
10 logged steps.

    python bench/trainer.py --workload quickstart [--repeats 2] [--json]
    python bench/trainer.py --workload long --steps 100
    python bench/trainer.py --workload quickstart --steps 4 --skip 1   # smoke run

Workloads:
  quickstart: configs/quickstart.py as it is (all-MiniLM-L6-v2, batch 32,
    Debian + STS, ours 32/64 token limits and buckets; the reference 64).
  long: the same, but documents up to 256 tokens on both sides (ours with
    buckets 32, 64, 128, 256).
  triplet: the quickstart's settings on (title, description, hard negative)
    rows (configs/data/debian_hard_negatives.json, data/README.md): ours one-way
    against [positives; hard negatives] (`loss.symmetric="pairs"`), the
    reference MultipleNegativesRankingLoss on (anchor, positive, negative).
Our side records each step (`--config.log_every=1`, which waits for each step
to finish; the reference's per-step loss logging waits likewise).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import _timing, _trainers

WORKLOADS = {
    "quickstart": dict(max_seq_length=64, overrides=()),
    "long": dict(
        max_seq_length=256,
        overrides=(
            "--config.data.max_length_document=256",
            "--config.data.buckets=(32,64,128,256)",
        ),
    ),
    "triplet": dict(
        max_seq_length=64, overrides=(), data_config="configs/data/debian_hard_negatives.json"
    ),
}
FIELDS = (
    "steps_per_second",
    "pairs_per_second",
    "tokens_per_second",
    "wall_seconds",
    "first_step_seconds",
    "peak_rss_mib",
    "final_loss",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="quickstart")
    parser.add_argument("--config", default="configs/quickstart.py")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out of rates")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="keep the runs here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.skip + 2 > args.steps:
        parser.error("--steps must exceed --skip by at least 2 (rates need two timed steps)")

    workload = WORKLOADS[args.workload]
    results: dict[str, list[dict]] = {side: [] for side in _trainers.SIDES}
    with _timing.output_folder(args.output, "trainer-bench-") as folder:
        for repeat in range(args.repeats):
            for side in _trainers.SIDES:
                recipe = _trainers.Recipe(
                    config=args.config,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    max_seq_length=workload["max_seq_length"],
                    overrides=workload["overrides"] if side == "ours" else (),
                    log_every=1,
                    data_config=workload.get("data_config", ""),
                )
                raw = _trainers.run(side, recipe, folder / f"{side}-{repeat}", export=False)
                summary = _trainers.summarize(raw, args.batch_size, args.skip)
                data = {k: raw[k] for k in ("layouts", "columns") if k in raw}
                results[side].append(dict(summary, step_times=raw["step_times"], **data))
                print(f"{side} run {repeat}: {summary}", file=sys.stderr, flush=True)

    medians = {
        side: {
            f: statistics.median(r[f] for r in runs if r.get(f) is not None)
            for f in FIELDS
            if any(r.get(f) is not None for r in runs)
        }
        for side, runs in results.items()
    }
    ours, theirs = medians["ours"], medians["st"]
    ratios = {
        "steady_speedup": ours["steps_per_second"] / theirs["steps_per_second"],
        "whole_run_speedup": theirs["wall_seconds"] / ours["wall_seconds"],
        "memory_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
    }
    print(
        f"Whole trainers, workload {args.workload}: {args.steps} steps of batch "
        f"{args.batch_size}, median of {args.repeats} run(s) per side"
    )
    _timing.print_table(
        ["", *FIELDS],
        [[side, *(f"{m.get(f, float('nan')):.3f}" for f in FIELDS)] for side, m in medians.items()],
    )
    print(
        f"ours / reference: steady {ratios['steady_speedup']:.2f}x, whole run "
        f"{ratios['whole_run_speedup']:.2f}x, peak memory {ratios['memory_ratio']:.2f}x"
    )
    if args.json:
        _timing.print_json(
            dict(
                workload=args.workload,
                steps=args.steps,
                batch_size=args.batch_size,
                skip=args.skip,
                repeats=args.repeats,
                ours=medians["ours"],
                reference=medians["st"],
                runs=results,
                **ratios,
                machine=_timing.machine(),
            )
        )


if __name__ == "__main__":
    main()
