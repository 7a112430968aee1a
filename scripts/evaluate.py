"""Evaluates a model without training, with the training evaluators (config.eval.tasks).

    python scripts/evaluate.py --model out/my-model --task retrieval \
        --data data/debian_retrieval_dev            # a BEIR folder (qrels/test.tsv)
    python scripts/evaluate.py --model PATH --task retrieval \
        --data data/debian_retrieval_dev.jsonl.gz   # the Debian query/document format
    python scripts/evaluate.py --model PATH --task sts --data data/stsbenchmark.tsv.gz \
        --split test --json
    python scripts/evaluate.py --model PATH --task reranking --data data/debian_reranking.jsonl.gz
    python scripts/evaluate.py --model PATH --task pair_classification \
        --data data/stsb_pairs_dev.tsv.gz
    python scripts/evaluate.py --model PATH --task retrieval --data NanoBEIR   # needs the Hub

`--model` is a sentence-transformers or Hugging Face model folder (or Hub id), a training
workdir (its latest checkpoint) or a checkpoint step folder, loaded with the project's JAX
encoders; each batch is split over all local devices. Texts get the model's prompt for their
role (queries and STS sentences "query", documents "document": a folder's
config_sentence_transformers.json prompts, a workdir's config.data.prompts), as
sentence-transformers' encode_query/encode_document do. Prints a table of metrics; with --json
the last line is one JSON object.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etils import epath

from embeddings.evaluation import TASK_KINDS, EncodeFn, evaluators_for


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Evaluate a model without training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Model folder (sentence-transformers or HF), Hub id, or training workdir.",
    )
    parser.add_argument(
        "--task", required=True, choices=list(TASK_KINDS), help="Which evaluation to run."
    )
    parser.add_argument(
        "--data",
        required=True,
        help="sts: .tsv(.gz); retrieval: BEIR folder, Debian .jsonl(.gz), Hub id or "
        "NanoBEIR[:a,b]; reranking: .jsonl(.gz); pair_classification: .tsv(.gz).",
    )
    parser.add_argument(
        "--split",
        default=None,
        help="sts: train|dev|test (default dev); BEIR retrieval: qrels split (default test).",
    )
    parser.add_argument("--batch_size", type=int, default=128, help="Texts per encoding batch.")
    parser.add_argument(
        "--max_queries",
        type=int,
        default=0,
        help="At most this many queries (pairs for sts/pair_classification), 0 = all; a "
        "retrieval corpus stays whole.",
    )
    parser.add_argument(
        "--similarity",
        choices=["cosine", "dot"],
        default=None,
        help="Override the model's similarity (default: its own).",
    )
    parser.add_argument(
        "--json", action="store_true", help="Print the metrics as one JSON object on the last line."
    )
    args = parser.parse_args(argv)
    if args.batch_size <= 0 or args.max_queries < 0:
        parser.error("--batch_size must be > 0 and --max_queries >= 0.")
    return args


# Files a training workdir (or one of its checkpoint step folders) has and a model folder lacks.
_WORKDIR_MARKERS = ("checkpoints", "state", "metrics.jsonl")


def load_encode_fn(
    path: str, batch_size: int, prompts: dict[str, str] | None = None
) -> tuple[EncodeFn, str]:
    """An encode function for the model at `path`, and the model's similarity.

    Texts of each role get the model's prompt for that role (see embeddings/prompts.py).

    Args:
      path: a sentence-transformers or Hugging Face folder, a Hub id, a training workdir
        (its latest checkpoint) or a checkpoint step folder (WORKDIR/checkpoints/<step>).
      batch_size: texts per forward pass.
      prompts: role -> prompt replacing the model's own for that role ("" = none).

    Returns:
      (encode(texts, role) -> embeddings, "cosine" or "dot"). Untied (query/document) models
      from a workdir encode each role with its own tower.
    """
    # Imported here so that --help and argument errors do not pay for loading JAX and Flax.
    import jax

    from embeddings.sharding import make_mesh, replicated

    folder = epath.Path(path)
    if any((folder / marker).exists() for marker in _WORKDIR_MARKERS):
        from embeddings.checkpointing import find_checkpoint, restore_params
        from embeddings.workdir import load_model_files

        checkpoint = find_checkpoint(folder)
        files = load_model_files(checkpoint.parent.parent)
        mesh = make_mesh()
        params = jax.device_put(restore_params(checkpoint), replicated(mesh))
        model, tokenizer = files.model.with_prompts(prompts or {}), files.tokenizer

        def encode_checkpoint(texts, role):
            return model.encode(params, tokenizer, texts, role, batch_size=batch_size, mesh=mesh)

        return encode_checkpoint, files.spec.similarity or "cosine"

    from embeddings.models import SentenceEncoder, load_pretrained
    from embeddings.models.dual_encoder import DualEncoder

    pretrained = load_pretrained(path)
    # One tower for both roles; the role still picks the folder's prompt.
    model = DualEncoder(SentenceEncoder(pretrained.config, pretrained.spec), tied=True)
    model = model.with_prompts(prompts or {})
    tokenizer = pretrained.tokenizer()
    mesh = make_mesh()
    params = {"encoder": jax.device_put(pretrained.params, replicated(mesh))}

    def encode(texts, role):
        return model.encode(params, tokenizer, texts, role, batch_size=batch_size, mesh=mesh)

    return encode, pretrained.spec.similarity or "cosine"


def print_table(metrics: dict[str, float]) -> None:
    width = max(len(name) for name in metrics)
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.4f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        encode, model_similarity = load_encode_fn(args.model, args.batch_size)
        similarity = args.similarity or model_similarity
        (evaluator,) = evaluators_for(
            args.task,
            args.data,
            similarity=similarity,
            split=args.split,
            max_queries=args.max_queries,
        )
        metrics = evaluator(encode)
    except (FileNotFoundError, ValueError) as err:  # TaskError is a ValueError
        # These carry a message saying what is wrong and what to do; a traceback adds nothing.
        sys.exit(f"evaluate.py: error: {err}")

    print(f"{args.task} on {args.data} ({args.model}, similarity {similarity})")
    print_table(metrics)
    if args.json:
        summary = {"model": args.model, "task": args.task, "data": args.data}
        if args.split:
            summary["split"] = args.split
        print(json.dumps({**summary, "similarity": similarity, **metrics}))


if __name__ == "__main__":
    main()
