"""Do today's recipes help? In-batch negatives vs + mined hard negatives vs + GIST (issue 20.6).

From the quickstart's model, steps and batch (configs/quickstart.py:
all-MiniLM-L6-v2 on the bundled Debian + STS mix), for N seeds from --first_seed (0):

  (a) "in-batch": the recipe as it is (in-batch negatives only);
  (b) "mined": the Debian sections replaced by the same sections with hard
      negatives mined by scripts/mine_hard_negatives.py with the starting
      model, from the Debian TRAINING sections only (never the dev split),
      with the script's defaults (3 negatives per pair, the top ones, no
      margin: sentence-transformers' documented defaults). One mining pass,
      shared by every seed. Each section keeps its own file and weight, so the
      mix, and the sections the in-batch negatives of a group come from, stay
      those of (a); the rest of the mix (STS) is unchanged;
  (c) "mined+gist": (b) with GIST (`loss.kind=gist`), the starting model as
      the frozen guide, the guide options' defaults (absolute margin 0) and
      scale 100 (GISTEmbedLoss's default temperature 0.01, as configs/default.py
      advises).

Each model is trained and exported by bench/_trainers.py and evaluated in a
fresh process by bench/quality.py's evaluators (sentence-transformers'
InformationRetrievalEvaluator on Debian dev, EmbeddingSimilarityEvaluator on
STS-B test), as is the starting model. Prints the mean and spread of each
metric per setting and each run's wall time; `--json` prints one JSON object
last.

    python bench/recipes.py --seeds 3 --output DIR --json
    python bench/recipes.py --seeds 2 --first_seed 3 --data DIR/data --json  # more seeds, no mining
    python bench/recipes.py --config configs/tiny.py --steps 2 --seeds 1 --sections 2  # smoke
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import _timing, _trainers, quality

SETTINGS = ("in-batch", "mined", "mined+gist")
DEBIAN = "debian/"  # data config names of the Debian training sections start with this
GIST_SCALE = 100.0  # sentence-transformers' GISTEmbedLoss temperature 0.01
PREPARED = "prepared.json"  # the summary of a prepared data folder, for --data


def _read_pairs(path: pathlib.Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [tuple(json.loads(line)[:2]) for line in f if line.strip()]


def _link_sources(entries: list[dict], source: pathlib.Path, folder: pathlib.Path) -> None:
    """Makes `folder` a data folder for `entries`: each top-level name links to `source`'s."""
    for top in {entry["name"].split("/")[0] for entry in entries}:
        link = folder / top
        if not link.exists():
            link.symlink_to((source / top).resolve())


def prepare_data(config, folder: pathlib.Path, args) -> dict[str, dict]:
    """The data of (a) and (b): data configs and folders, and the one mining pass.

    The summary is written to `folder`/prepared.json, so a later invocation can
    reuse the mined data (`--data`) instead of mining again.

    Returns:
      setting -> {"data_config": path, "data_folder": path, "mining_seconds": ...},
      and "mined_rows", "pairs".
    """
    folder = folder.resolve()  # prepared.json's paths hold from any working directory
    source = _trainers.REPO / config.data_folder
    entries = json.loads((_trainers.REPO / config.data_config).read_text())
    debian = [e for e in entries if e["name"].startswith(DEBIAN)]
    if args.sections:
        debian = debian[: args.sections]
    others = [e for e in entries if not e["name"].startswith(DEBIAN)]
    if not debian:
        raise SystemExit(f"{config.data_config} has no {DEBIAN}* entries to mine.")

    plain = folder / "in-batch"
    plain.mkdir(parents=True, exist_ok=True)
    (plain / "data_config.json").write_text(json.dumps(debian + others, indent=1))
    _link_sources(debian + others, source, plain)

    mined = folder / "mined"
    mined.mkdir(parents=True, exist_ok=True)
    output = mined / "all-sections.jsonl.gz"
    command = [
        sys.executable,
        str(_trainers.REPO / "scripts/mine_hard_negatives.py"),
        "--model",
        config.model.init,
        "--pairs",
        *[str(source / e["name"]) for e in debian],
        "--output",
        str(output),
        *args.mine_option,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=_trainers.REPO)
    if result.returncode:
        raise RuntimeError(f"mining failed:\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    mining_seconds = time.perf_counter() - start

    # One pass over every section (a corpus of all their positives); the rows go back to the
    # section of their (query, positive), so each section keeps its file and weight.
    section_of = {}
    for entry in debian:
        for pair in _read_pairs(source / entry["name"]):
            section_of.setdefault(pair, entry["name"])
    by_section: dict[str, list[str]] = {e["name"]: [] for e in debian}
    with gzip.open(output, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_section[section_of[tuple(row[:2])]].append(line)
    mined_entries = []
    for entry in debian:
        rows = by_section[entry["name"]]
        if not rows:
            continue
        path = mined / "data" / entry["name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(rows)
        mined_entries.append(dict(entry, lines=len(rows)))
    (mined / "data_config.json").write_text(json.dumps(mined_entries + others, indent=1))
    _link_sources(others, source, mined / "data")
    common = {"mining_seconds": mining_seconds}
    data = {
        "in-batch": dict(
            common, data_config=str(plain / "data_config.json"), data_folder=str(plain)
        ),
        "mined": dict(
            common, data_config=str(mined / "data_config.json"), data_folder=str(mined / "data")
        ),
        "mined_rows": sum(len(rows) for rows in by_section.values()),
        "pairs": len(section_of),
    }
    (folder / PREPARED).write_text(json.dumps(data, indent=1))
    return data


def reuse_data(folder: pathlib.Path) -> dict:
    """The data an earlier invocation prepared in `folder` (its prepared.json)."""
    summary = folder / PREPARED
    if not summary.is_file():
        raise SystemExit(
            f"--data {folder}: no {PREPARED} there. Point it at the data/ folder of an earlier "
            "`bench/recipes.py --output DIR` run (DIR/data), or leave --data out to mine again."
        )
    data = json.loads(summary.read_text())
    for setting in ("in-batch", "mined"):
        for key in ("data_config", "data_folder"):
            if not pathlib.Path(data[setting][key]).exists():
                raise SystemExit(
                    f"--data {folder}: {summary} names {data[setting][key]} ({setting} {key}), "
                    "which is gone; mine again (leave --data out)."
                )
    return data


def overrides(setting: str, data: dict, init: str) -> tuple[str, ...]:
    """Our config flags of one setting."""
    paths = data["in-batch" if setting == "in-batch" else "mined"]
    flags = [
        f"--config.data_config={paths['data_config']}",
        f"--config.data_folder={paths['data_folder']}",
    ]
    if setting == "mined+gist":
        flags += [
            "--config.loss.kind=gist",
            f"--config.loss.guide.init={init}",
            f"--config.loss.scale={GIST_SCALE}",
        ]
    return tuple(flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart.py", help="the base recipe")
    parser.add_argument("--steps", type=int, default=None, help="default: the config's")
    parser.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    parser.add_argument("--seeds", type=int, default=3, help="N seeds for each setting")
    parser.add_argument(
        "--first_seed", type=int, default=0, help="seeds first_seed..first_seed+N-1"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="reuse the mined data of an earlier --output DIR run (DIR/data) instead of mining",
    )
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument(
        "--sections", type=int, default=0, help="only the first N Debian sections (0 = all)"
    )
    parser.add_argument(
        "--mine_option",
        action="append",
        default=[],
        help="extra mine_hard_negatives.py flag (repeat), e.g. --mine_option=--range_min=10",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        help="--config.KEY=VALUE for every setting (repeat), e.g. "
        "--override=--config.data.datasets_per_batch=2",
    )
    parser.add_argument("--eval_queries", type=int, default=0, help="Debian queries (0 = all)")
    parser.add_argument("--sts_pairs", type=int, default=0, help="STS-B test pairs (0 = all)")
    parser.add_argument(
        "--eval_max_seq_length", type=int, default=256, help="token limit of every evaluation"
    )
    parser.add_argument("--output", default=None, help="keep data, runs and models here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = args.settings.split(",")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {SETTINGS}")
    if args.data and (args.sections or args.mine_option):
        parser.error(
            "--data reuses rows already mined: --sections and --mine_option would be ignored"
        )

    config = _trainers.our_config(args.config)
    steps = args.steps or config.total_steps
    batch_size = args.batch_size or config.batch_size
    init = config.model.init
    runs = []
    with _timing.output_folder(args.output, "recipes-") as folder:
        if args.data:
            data = reuse_data(pathlib.Path(args.data))
        else:
            data = prepare_data(config, folder / "data", args)
        start, _ = quality._evaluate_in_process(init, args)
        # Settings alternate within each seed, so load on the machine hits them alike.
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        for seed in seeds:
            for setting in settings:
                recipe = _trainers.Recipe(
                    config=args.config,
                    steps=steps,
                    batch_size=batch_size,
                    seed=seed,
                    overrides=overrides(setting, data, init) + tuple(args.override),
                    log_every=max(1, steps // 10),
                )
                out = folder / f"{setting}-{seed}"
                result = _trainers.run("ours", recipe, out)
                metrics, eval_seconds = quality._evaluate_in_process(out / "model", args)
                runs.append(
                    dict(
                        setting=setting,
                        seed=seed,
                        wall_seconds=result["wall_seconds"],
                        eval_seconds=eval_seconds,
                        final_loss=result["losses"][-1],
                        **metrics,
                    )
                )
                print(f"{setting} seed {seed}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)

    summary = {
        s: {m: quality._spread([r[m] for r in runs if r["setting"] == s]) for m in quality.METRICS}
        for s in settings
    }
    print(
        f"Recipes after {steps} steps of {args.config} (batch {batch_size}), seeds {list(seeds)}; "
        f"{data['mined_rows']} mined rows from {data['pairs']} Debian pairs in "
        f"{data['in-batch']['mining_seconds']:.0f} s; start: MRR@10 "
        f"{start['debian_mrr@10']:.4f}, STS-B {start['stsb_spearman']:.4f}"
    )
    _timing.print_table(
        ["setting", "metric", "mean", "std", "min", "max"],
        [
            [s, m, f"{v['mean']:.4f}", f"{v['std']:.4f}", f"{v['min']:.4f}", f"{v['max']:.4f}"]
            for s, per_metric in summary.items()
            for m, v in per_metric.items()
        ],
    )
    print()
    quality.print_runs(runs, "setting")
    if args.json:
        _timing.print_json(
            dict(
                config=args.config,
                steps=steps,
                batch_size=batch_size,
                seeds=list(seeds),
                reused_data=args.data,
                mine_options=args.mine_option,
                gist_scale=GIST_SCALE,
                mined_rows=data["mined_rows"],
                mining_seconds=data["in-batch"]["mining_seconds"],
                start=start,
                summary=summary,
                runs=runs,
                machine=_timing.machine(),
            )
        )


if __name__ == "__main__":
    main()
