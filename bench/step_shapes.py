"""The step shapes a config's run compiles, and the dense-layer rows each step runs.

Every distinct (padded length, packed size) combination of a batch's columns
compiles train.py's step once (about as much CPU as several steps on a small
CPU), so a short run pays for each. This script runs a config's input pipeline
for `--steps` batches through the trainer's own host code
(`host_batch.agree_shapes`, `host_batch.batch_token_index`; no model, no
compilation) and reports: the distinct shapes, the step at which each first
appears, and per column the real tokens, the bucket-padded tokens, the tokens
of padding each batch to its longest text (what sentence-transformers'
collator does) and the dense-layer rows the packed step runs.

    python bench/step_shapes.py --config configs/quickstart.py --steps 250 [--json]
    python bench/step_shapes.py --config configs/quickstart.py --config.model.pack_levels=8
"""

from __future__ import annotations

import collections
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bench import _timing
from embeddings import host_batch
from embeddings.data import build_pipeline
from embeddings.models.pretrained import load_tokenizer, resolve_model_dir


def count_shapes(config, steps: int, devices: int = 1) -> dict:
    """Shapes and token counts of the first `steps` batches of `config`'s pipeline,
    split over `devices` row groups as train.py splits them."""
    m = config.model
    tokenizer = load_tokenizer(m.tokenizer or resolve_model_dir(m.init))
    levels = 0 if config.grad_cache_chunk else m.pack_levels
    first: dict = {}
    count: collections.Counter = collections.Counter()
    columns: dict = collections.defaultdict(lambda: collections.Counter())
    with build_pipeline(config, tokenizer) as pipeline:
        for step in range(steps):
            local = next(pipeline)
            shapes = host_batch.agree_shapes(local, devices, levels)
            index = (None,) * len(shapes.lengths)
            if levels:
                masks = local["attention_mask"]
                index = host_batch.batch_token_index(masks, devices, levels, shapes.most_real)
            key = tuple(
                (length, None if i is None else int(i.size))
                for length, i in zip(shapes.lengths, index, strict=True)
            )
            first.setdefault(key, step)
            count[key] += 1
            for c, (mask, (length, packed)) in enumerate(
                zip(local["attention_mask"], key, strict=True)
            ):
                real = np.asarray(mask).sum(axis=1)
                columns[c]["real"] += int(real.sum())
                columns[c]["bucket_padded"] += int(mask.shape[0] * length)
                columns[c]["longest_padded"] += int(mask.shape[0] * real.max())
                columns[c]["dense_rows"] += packed or int(mask.shape[0] * length)
    return {
        "shapes": [
            {"columns": [list(col) for col in key], "first_step": first[key], "batches": count[key]}
            for key in sorted(first, key=first.get)
        ],
        "per_step": {
            f"column_{c}": {k: v / steps for k, v in sorted(counts.items())}
            for c, counts in sorted(columns.items())
        },
    }


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    r = count_shapes(config, _STEPS.value)
    print(
        f"{len(r['shapes'])} distinct step shapes in {_STEPS.value} batches "
        f"(pack_levels={config.model.pack_levels}); per column (padded length, packed size)"
    )
    _timing.print_table(
        ["shape", "first step", "batches"],
        [[s["columns"], s["first_step"], s["batches"]] for s in r["shapes"]],
    )
    fields = ("real", "bucket_padded", "longest_padded", "dense_rows")
    print("\nTokens per batch")
    _timing.print_table(
        ["column", *fields],
        [[c, *(f"{v[f]:.0f}" for f in fields)] for c, v in r["per_step"].items()],
    )
    if _JSON.value:
        _timing.print_json(
            dict(
                benchmark="step_shapes",
                config=flags.FLAGS["config"].config_filename,
                steps=_STEPS.value,
                pack_levels=config.model.pack_levels,
                distinct_shapes=len(r["shapes"]),
                **r,
            )
        )


if __name__ == "__main__":
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Config file (configs/*.py); override fields with --config.KEY=VALUE."
    )
    _STEPS = flags.DEFINE_integer("steps", 250, "Batches to read (the run's steps).")
    _JSON = flags.DEFINE_bool("json", False, "Last line: one JSON object.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
