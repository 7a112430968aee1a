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
encoders; each batch is split over all local devices. Prints a table of metrics; with --json
the last line is one JSON object.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import app, flags
from etils import epath

from embeddings.evaluation import TASK_KINDS, EncodeFn, evaluators_for

_MODEL = flags.DEFINE_string(
    "model", None, "Model folder (sentence-transformers or HF), Hub id, or training workdir."
)
_TASK = flags.DEFINE_enum("task", None, list(TASK_KINDS), "Which evaluation to run.")
_DATA = flags.DEFINE_string(
    "data",
    None,
    "sts: .tsv(.gz); retrieval: BEIR folder, Debian .jsonl(.gz), Hub id or NanoBEIR[:a,b]; "
    "reranking: .jsonl(.gz); pair_classification: .tsv(.gz).",
)
_SPLIT = flags.DEFINE_string(
    "split", None, "sts: train|dev|test (default dev); BEIR retrieval: qrels split (default test)."
)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Texts per encoding batch.")
_MAX_QUERIES = flags.DEFINE_integer(
    "max_queries",
    0,
    "At most this many queries (pairs for sts/pair_classification), 0 = all; a retrieval "
    "corpus stays whole.",
)
_SIMILARITY = flags.DEFINE_enum(
    "similarity", None, ["cosine", "dot"], "Override the model's similarity (default: its own)."
)
_JSON = flags.DEFINE_bool("json", False, "Print the metrics as one JSON object on the last line.")
flags.mark_flags_as_required(["model", "task", "data"])

# Files a training workdir (or one of its checkpoint step folders) has and a model folder lacks.
_WORKDIR_MARKERS = ("checkpoints", "state", "metrics.jsonl")


def load_encode_fn(path: str, batch_size: int) -> tuple[EncodeFn, str]:
    """An encode function for the model at `path`, and the model's similarity.

    Args:
      path: a sentence-transformers or Hugging Face folder, a Hub id, a training workdir
        (its latest checkpoint) or a checkpoint step folder (WORKDIR/checkpoints/<step>).
      batch_size: texts per forward pass.

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
        model, tokenizer = files.model, files.tokenizer

        def encode_checkpoint(texts, role):
            tower = params[model.tower(role)]
            return model.encoder.encode(
                tower, tokenizer, list(texts), batch_size=batch_size, mesh=mesh
            )

        return encode_checkpoint, files.spec.similarity or "cosine"

    from embeddings.models import SentenceEncoder, load_pretrained

    pretrained = load_pretrained(path)
    encoder = SentenceEncoder(pretrained.config, pretrained.spec)
    tokenizer = pretrained.tokenizer()
    mesh = make_mesh()
    params = jax.device_put(pretrained.params, replicated(mesh))

    def encode(texts, role):
        del role  # one tower: queries and documents share the encoder
        return encoder.encode(params, tokenizer, list(texts), batch_size=batch_size, mesh=mesh)

    return encode, pretrained.spec.similarity or "cosine"


def print_table(metrics: dict[str, float]) -> None:
    width = max(len(name) for name in metrics)
    for name, value in metrics.items():
        print(f"{name:<{width}}  {value:.4f}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _BATCH.value <= 0 or _MAX_QUERIES.value < 0:
        raise app.UsageError("--batch_size must be > 0 and --max_queries >= 0.")
    try:
        encode, model_similarity = load_encode_fn(_MODEL.value, _BATCH.value)
        similarity = _SIMILARITY.value or model_similarity
        (evaluator,) = evaluators_for(
            _TASK.value,
            _DATA.value,
            similarity=similarity,
            split=_SPLIT.value,
            max_queries=_MAX_QUERIES.value,
        )
        metrics = evaluator(encode)
    except (FileNotFoundError, ValueError) as err:  # TaskError is a ValueError
        # These carry a message saying what is wrong and what to do; a traceback adds nothing.
        sys.exit(f"evaluate.py: error: {err}")

    print(f"{_TASK.value} on {_DATA.value} ({_MODEL.value}, similarity {similarity})")
    print_table(metrics)
    if _JSON.value:
        summary = {"model": _MODEL.value, "task": _TASK.value, "data": _DATA.value}
        if _SPLIT.value:
            summary["split"] = _SPLIT.value
        print(json.dumps({**summary, "similarity": similarity, **metrics}))


if __name__ == "__main__":
    app.run(main)
