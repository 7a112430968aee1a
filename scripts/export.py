"""Exports a training checkpoint as a sentence-transformers model (and to the Hub).

    python scripts/export.py --workdir runs/quickstart --output out/my-model
    python scripts/export.py --workdir runs/quickstart --best --output out/my-model \
        --push_to_hub my-org/my-model
    python scripts/export.py --workdir runs/asym --output out/asym --split_towers

`--workdir` may also be a checkpoint step folder (WORKDIR/checkpoints/<step>).
The latest checkpoint is exported unless --step or --best says otherwise.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import app, flags

from embeddings.export.run import export_run

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir, or a checkpoint step folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write the sentence-transformers model to.")
_STEP = flags.DEFINE_integer("step", None, "Export this step (default: the latest).")
_BEST = flags.DEFINE_bool("best", False, "Export the best step (WORKDIR/best).")
_LATEST = flags.DEFINE_bool("latest", False, "Export the latest step (the default).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty --output.")
_SPLIT = flags.DEFINE_bool(
    "split_towers", False, "Untied models: also write OUTPUT-Q and OUTPUT-A single-tower folders."
)
_PUSH = flags.DEFINE_string("push_to_hub", None, "Upload the export to this Hub repo (org/name).")
_PRIVATE = flags.DEFINE_bool("private", False, "Create the Hub repo as private.")
_MESSAGE = flags.DEFINE_string(
    "commit_message", "Upload sentence-transformers model", "Hub commit message."
)
_NO_CHECK = flags.DEFINE_bool(
    "skip_parity_check", False, "Do not compare with sentence-transformers."
)
_JSON = flags.DEFINE_bool("json", False, "Print a JSON summary as the last line.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv):
    del argv
    if sum([_STEP.value is not None, _BEST.value, _LATEST.value]) > 1:
        raise app.UsageError("Pass at most one of --step, --best, --latest.")
    summary = export_run(
        _WORKDIR.value,
        _OUTPUT.value,
        step=_STEP.value,
        best=_BEST.value,
        overwrite=_OVERWRITE.value,
        split_towers=_SPLIT.value,
        parity_check=not _NO_CHECK.value,
        push_to_hub=_PUSH.value,
        private=_PRIVATE.value,
        commit_message=_MESSAGE.value,
    )
    if _JSON.value:
        print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
