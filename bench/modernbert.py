"""ModernBERT training-step throughput at short and long lengths: ours vs sentence-transformers.

    python bench/modernbert.py [--json] [--lengths 128,1024] [--batch_size 8] \
        [--hidden 256] [--layers 4] [--dtype float32] [--steps 3] [--warmup 1]

No ModernBERT weights are available offline, so the model is a random
`ModernBertModel` built by `transformers` from a small config (--hidden,
--layers, heads of 64, GeGLU width 1.5 x hidden, a 128-token local window and
every third layer global, as ModernBERT-base) with the project's BERT
tokenizer; throughput does not depend on the weights' values. For each length
it runs `bench/step.py`'s comparison (`step.measure`: our jitted step and
sentence-transformers' trainer step, each in its own worker process, driven in
turn) on random ids filling every text to that length (--full_length: no
padding, so both sides do the same work), and reports tokens/s (two columns
of --batch_size texts per step).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

from bench import _timing, step

REPO = pathlib.Path(__file__).resolve().parents[1]


def random_modernbert(hidden: int, layers: int) -> pathlib.Path:
    """A random ModernBertModel folder of these sizes, built once in the temp folder
    (every worker process loads the same weights)."""
    import transformers

    folder = pathlib.Path(tempfile.gettempdir()) / f"embeddings-bench-modernbert-{hidden}-{layers}"
    if (folder / "model.safetensors").is_file():
        return folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(REPO / "data/tokenizers/bert-uncased")
    config = transformers.ModernBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1),
        intermediate_size=hidden * 3 // 2,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        local_attention=128,
        global_attn_every_n_layers=3,
    )
    building = pathlib.Path(tempfile.mkdtemp(prefix=folder.name + "-"))
    tokenizer.model_max_length = 8192
    tokenizer.save_pretrained(building)
    transformers.ModernBertModel(config).save_pretrained(building)  # weights last: the marker
    try:
        building.rename(folder)
    except OSError:  # another process was first; use its model
        shutil.rmtree(building, ignore_errors=True)
    return folder


def step_args(args, model: pathlib.Path, length: int) -> argparse.Namespace:
    """`bench/step.py`'s arguments for one length."""
    parser = argparse.ArgumentParser()
    step.add_model_args(parser)
    step.add_batch_args(parser)
    return parser.parse_args(
        [
            *("--model", str(model), "--dtype", args.dtype),
            *("--steps", str(args.steps), "--warmup", str(args.warmup)),
            *("--batch_size", str(args.batch_size), "--max_length", str(length)),
            "--full_length",
        ]
    )


def measure(args) -> dict:
    model = random_modernbert(args.hidden, args.layers)
    rows = []
    for length in args.lengths:
        r = step.measure(step_args(args, model, length))
        tokens = 2 * args.batch_size * length  # two columns of full-length texts
        rows.append(
            {
                "max_length": length,
                "tokens_per_second": tokens / r["step_seconds"],
                "reference_tokens_per_second": tokens / r["reference_step_seconds"],
                "speedup": r["speedup"],
                "step_seconds": r["step_seconds"],
                "reference_step_seconds": r["reference_step_seconds"],
                "peak_rss_mib": r["peak_rss_mib"],
                "reference_peak_rss_mib": r["reference_peak_rss_mib"],
                "load_1min": r["load_1min"],
            }
        )
    return {
        "benchmark": "modernbert",
        "hidden": args.hidden,
        "layers": args.layers,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        "device": r["device"],
        "jax_version": r["jax_version"],
        "torch_version": r["torch_version"],
        **_timing.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="128,1024", help="comma-separated text lengths")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per step")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=sorted(step.DTYPES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    args = parser.parse_args()
    args.lengths = [int(x) for x in args.lengths.split(",")]
    r = measure(args)
    print(
        f"ModernBERT training step (random, hidden {r['hidden']}, {r['layers']} layers), "
        f"{r['batch_size']} pairs, {r['dtype']}, {r['cpu']} ({r['cores']} cores), median of "
        f"{r['steps']} alternated steps\n"
    )
    header = ["tokens", "ours tokens/s", "sentence-transformers tokens/s", "speedup"]
    table = [
        [
            str(row["max_length"]),
            f"{row['tokens_per_second']:,.0f}",
            f"{row['reference_tokens_per_second']:,.0f}",
            f"{row['speedup']:.2f}x",
        ]
        for row in r["rows"]
    ]
    _timing.print_table(header, table)
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
