"""Exports a training checkpoint as a sentence-transformers model (and to the Hub).

    python scripts/export.py --workdir runs/quickstart --output out/my-model
    python scripts/export.py --workdir runs/quickstart --best --output out/my-model \
        --push_to_hub my-org/my-model
    python scripts/export.py --workdir runs/asym --output out/asym --split_towers

`--workdir` may also be a checkpoint step folder (WORKDIR/checkpoints/<step>).
The latest checkpoint is exported unless --step or --best says otherwise.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from embeddings.export.run import export_run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export a training checkpoint as a sentence-transformers model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--workdir", required=True, help="Training workdir, or a checkpoint step folder."
    )
    parser.add_argument(
        "--output", required=True, help="Folder to write the sentence-transformers model to."
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="Export this step.")
    which.add_argument("--best", action="store_true", help="Export the best step (WORKDIR/best).")
    which.add_argument(
        "--latest", action="store_true", help="Export the latest step (the default)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output.")
    parser.add_argument(
        "--split_towers",
        action="store_true",
        help="Untied models: also write OUTPUT-Q and OUTPUT-A single-tower folders.",
    )
    parser.add_argument(
        "--push_to_hub", default=None, help="Upload the export to this Hub repo (org/name)."
    )
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--commit_message", default="Upload sentence-transformers model", help="Hub commit message."
    )
    parser.add_argument(
        "--skip_parity_check",
        action="store_true",
        help="Do not compare with sentence-transformers.",
    )
    parser.add_argument(
        "--json", action="store_true", help="Print a JSON summary as the last line."
    )
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    summary = export_run(
        args.workdir,
        args.output,
        step=args.step,
        best=args.best,
        overwrite=args.overwrite,
        split_towers=args.split_towers,
        parity_check=not args.skip_parity_check,
        push_to_hub=args.push_to_hub,
        private=args.private,
        commit_message=args.commit_message,
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
