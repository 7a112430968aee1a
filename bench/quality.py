"""The models both whole trainers make on the same data and recipe, side by side.

Trains the quickstart recipe (configs/quickstart.py: all-MiniLM-L6-v2, the
bundled weighted Debian + STS mix, symmetric in-batch loss at scale 20, lr 5e-5,
25 warmup steps, linear decay, clip 1.0, weight decay 0.01, batch 32) with
`train.py` and with sentence-transformers' `SentenceTransformerTrainer`
(bench/_trainers.py says how it is configured), over several seeds, each run in
a process of its own; exports ours; then evaluates every model, and the
starting model, with the same sentence-transformers evaluators in a fresh
process: `InformationRetrievalEvaluator` on data/debian_retrieval_dev.jsonl.gz
and `EmbeddingSimilarityEvaluator` on the STS-benchmark test split. Prints the
mean and spread of each metric per trainer and each run's wall time.

    python bench/quality.py --steps 250 --seeds 3 [--json]
    python bench/quality.py --steps 3 --seeds 1 --eval_queries 50   # smoke run
    # an ablation of ours (the reference runs unchanged):
    python bench/quality.py --ours_override=--config.data.datasets_per_batch=32
    # both trainers without dropout (is a gain the recipe's or the trainer's?):
    python bench/quality.py --no_dropout
    # the reference trains on our batches, in our order (is a gap the trainer's or
    # the batches'?):
    python bench/quality.py --same_batches [--no_dropout]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import _timing, _trainers

METRICS = (
    "debian_mrr@10",
    "debian_ndcg@10",
    "debian_recall@1",
    "debian_recall@10",
    "stsb_spearman",
)


def evaluate(
    model_folder: str, max_queries: int, sts_pairs: int, max_seq_length: int = 0
) -> dict[str, float]:
    """sentence-transformers' own evaluators on one saved model (run in a fresh process).

    Texts are truncated at `max_seq_length` tokens, or (0) at the model's saved
    limit: 256 for all-MiniLM-L6-v2 and our exports of it, but the reference
    trainer saves the limit it trained with (64 in the quickstart recipe), so
    comparing the trainers at their saved limits mixes in a difference of
    evaluation. The result says which limit was used.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import (
        EmbeddingSimilarityEvaluator,
        InformationRetrievalEvaluator,
    )

    from embeddings.evaluation.retrieval import load_retrieval
    from embeddings.evaluation.sts import load_sts

    repo = _trainers.REPO
    model = SentenceTransformer(model_folder, device="cpu")
    saved_max_seq_length = model.max_seq_length
    if max_seq_length:
        model.max_seq_length = max_seq_length
    queries, corpus, relevant = load_retrieval(repo / "data/debian_retrieval_dev.jsonl.gz")
    if max_queries:
        queries = dict(list(queries.items())[:max_queries])  # the corpus stays whole
    retrieval = InformationRetrievalEvaluator(
        queries,
        corpus,
        {q: relevant[q] for q in queries},
        name="debian",
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[1, 10],
        precision_recall_at_k=[1, 10],
        map_at_k=[10],
        batch_size=128,
        show_progress_bar=False,
    )(model)
    s1, s2, scores = load_sts(repo / "data/stsbenchmark.tsv.gz", "test")
    if sts_pairs:
        s1, s2, scores = s1[:sts_pairs], s2[:sts_pairs], scores[:sts_pairs]
    sts = EmbeddingSimilarityEvaluator(
        s1, s2, [float(x) / 5 for x in scores], name="stsb", batch_size=128
    )(model)
    pick = lambda d, suffix: next(v for k, v in d.items() if k.endswith(suffix))
    return {
        "debian_mrr@10": pick(retrieval, "cosine_mrr@10"),
        "debian_ndcg@10": pick(retrieval, "cosine_ndcg@10"),
        "debian_recall@1": pick(retrieval, "cosine_recall@1"),
        "debian_recall@10": pick(retrieval, "cosine_recall@10"),
        "stsb_spearman": pick(sts, "spearman_cosine"),
        "saved_max_seq_length": saved_max_seq_length,
        "eval_max_seq_length": model.max_seq_length,
    }


def _evaluate_in_process(folder, args) -> tuple[dict, float]:
    start = time.perf_counter()
    command = [
        sys.executable,
        __file__,
        "--evaluate",
        str(folder),
        "--eval_queries",
        str(args.eval_queries),
        "--sts_pairs",
        str(args.sts_pairs),
        "--eval_max_seq_length",
        str(args.eval_max_seq_length),
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=_trainers.REPO)
    if out.returncode:
        raise RuntimeError(
            f"evaluation of {folder} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def print_runs(runs: list[dict], label: str) -> None:
    """One table row per run: its `label` column (trainer or setting), seed, wall
    time, MRR@10, STS-B and final loss (bench/recipes.py prints the same)."""
    _timing.print_table(
        [label, "seed", "train wall s", "MRR@10", "STS-B", "loss (last logs)"],
        [
            [
                r[label],
                r["seed"],
                f"{r['wall_seconds']:.1f}",
                f"{r['debian_mrr@10']:.4f}",
                f"{r['stsb_spearman']:.4f}",
                f"{r['final_loss']:.4f}",
            ]
            for r in runs
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart.py", help="our config (recipe)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for each trainer")
    parser.add_argument(
        "--first_seed",
        type=int,
        default=0,
        help="start at this seed (first_seed..first_seed+N-1): to split the seeds over runs",
    )
    parser.add_argument("--trainers", default="ours,st", help="comma-separated: ours, st")
    parser.add_argument("--max_seq_length", type=int, default=64, help="the reference's limit")
    parser.add_argument(
        "--ours_override",
        action="append",
        default=[],
        help="--config.KEY=VALUE for our runs only (repeat); for ablations",
    )
    parser.add_argument(
        "--no_dropout", action="store_true", help="both trainers with every dropout off"
    )
    parser.add_argument(
        "--same_batches",
        action="store_true",
        help="the reference trains on our pipeline's batches, in our order, one a step",
    )
    parser.add_argument("--eval_queries", type=int, default=0, help="Debian queries (0 = all)")
    parser.add_argument("--sts_pairs", type=int, default=0, help="STS-B test pairs (0 = all)")
    parser.add_argument(
        "--eval_max_seq_length",
        type=int,
        default=256,
        help="token limit of every evaluated model (0 = each model's saved limit)",
    )
    parser.add_argument("--output", default=None, help="keep runs and models here")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--evaluate", default=None, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.evaluate:
        metrics = evaluate(
            args.evaluate, args.eval_queries, args.sts_pairs, args.eval_max_seq_length
        )
        print(json.dumps(metrics))
        return

    sides = args.trainers.split(",")
    runs = []
    with _timing.output_folder(args.output, "quality-") as folder:
        init = _trainers.our_config(args.config).model.init
        start, _ = _evaluate_in_process(init, args)
        # Alternated (ours, st, ours, st, ...), so load on the machine hits both alike.
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for side in sides:
                recipe = _trainers.Recipe(
                    config=args.config,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    seed=seed,
                    max_seq_length=args.max_seq_length,
                    overrides=tuple(args.ours_override)
                    if side == "ours" or args.same_batches
                    else (),
                    log_every=max(1, args.steps // 10),
                    dropout=not args.no_dropout,
                    same_batches=args.same_batches,
                )
                out = folder / f"{side}-{seed}"
                result = _trainers.run(side, recipe, out)
                metrics, eval_seconds = _evaluate_in_process(out / "model", args)
                losses = result["losses"][-5:]
                extra = {}
                if result.get("our_tokens") is not None:
                    # Steps whose real tokens differ from our batch's: a text that did not
                    # tokenize back to our ids (see _trainers.our_batches).
                    extra["steps_off_our_tokens"] = sum(
                        a != b for a, b in zip(result["tokens"], result["our_tokens"], strict=True)
                    )
                runs.append(
                    dict(
                        trainer=side,
                        seed=seed,
                        wall_seconds=result["wall_seconds"],
                        export_seconds=result.get("export_seconds", 0.0),
                        eval_seconds=eval_seconds,
                        final_loss=sum(losses) / len(losses),
                        **metrics,
                        **extra,
                    )
                )
                print(f"{side} seed {seed}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)

    summary = {
        side: {m: _spread([r[m] for r in runs if r["trainer"] == side]) for m in METRICS}
        for side in sides
    }
    print(
        f"Quality after {args.steps} steps of {args.config}, {args.seeds} seed(s) per trainer"
        f"{', every dropout off on both sides' if args.no_dropout else ''}"
        f"{', the reference on our batches' if args.same_batches else ''}; "
        f"start: MRR@10 {start['debian_mrr@10']:.4f}, STS-B {start['stsb_spearman']:.4f}"
    )
    rows = [
        [side, m, f"{s['mean']:.4f}", f"{s['std']:.4f}", f"{s['min']:.4f}", f"{s['max']:.4f}"]
        for side, per_metric in summary.items()
        for m, s in per_metric.items()
    ]
    _timing.print_table(["trainer", "metric", "mean", "std", "min", "max"], rows)
    print()
    print_runs(runs, "trainer")
    if args.json:
        _timing.print_json(
            dict(
                steps=args.steps,
                seeds=args.seeds,
                first_seed=args.first_seed,
                config=args.config,
                ours_overrides=args.ours_override,
                dropout=not args.no_dropout,
                same_batches=args.same_batches,
                start=start,
                summary=summary,
                runs=runs,
                machine=_timing.machine(),
            )
        )


if __name__ == "__main__":
    main()
