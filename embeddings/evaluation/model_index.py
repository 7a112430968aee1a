"""Evaluation results as the Hugging Face Hub's `model-index` metadata (a model card's YAML).

The Hub reads a card's front matter `model-index: [{name, results: [{task, dataset, metrics}]}]`
to show results and leaderboards. Each evaluated task of the run (`config.eval`) becomes one
result: its kind gives the task type (the names sentence-transformers' cards use), its data the
dataset, and its logged metrics the metrics.
"""

import json
from collections.abc import Mapping

import ml_collections

from embeddings.evaluation.tasks import eval_tasks

# kind -> (Hub task type, readable name), as sentence-transformers writes them.
TASK_TYPES = {
    "sts": ("semantic-similarity", "Semantic Similarity"),
    "retrieval": ("information-retrieval", "Information Retrieval"),
    "reranking": ("reranking", "Reranking"),
    "pair_classification": ("binary-classification", "Binary Classification"),
}


def _dataset_name(data: str) -> str:
    """The last part of a path or Hub id, without the file suffixes."""
    name = str(data).rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".jsonl", ".tsv"):
        name = name.removesuffix(suffix)
    return name or str(data)


def model_index(
    model_name: str, evaluation: Mapping[str, float], config: Mapping | None
) -> list[dict]:
    """The `model-index` value for a run's evaluation ("eval/<task>/<metric>" -> value).

    Args:
      model_name: the model's name on the Hub.
      evaluation: one evaluation's metrics, as metrics.jsonl holds them.
      config: the run's config.json (for each task's kind, data and split); None = unknown, in
        which case only the older tasks "sts" and "retrieval" are recognised by their names.

    Returns:
      [{"name", "results": [...]}], or [] when no metric belongs to a known task.
    """
    config_eval = ml_collections.ConfigDict(dict((config or {}).get("eval") or {}))
    tasks = {task["name"]: task for _, task in eval_tasks(config_eval)}
    tasks.setdefault("sts", {"name": "sts", "kind": "sts", "data": "stsbenchmark"})
    tasks.setdefault("retrieval", {"name": "retrieval", "kind": "retrieval", "data": "retrieval"})
    results = []
    for name, task in tasks.items():
        prefix = f"eval/{name}/"
        metrics = [
            {"type": key.removeprefix(prefix), "value": float(value), "name": key[len(prefix) :]}
            for key, value in evaluation.items()
            if key.startswith(prefix) and task.get("kind") in TASK_TYPES
        ]
        if not metrics:
            continue
        task_type, task_name = TASK_TYPES[task["kind"]]
        dataset = {"name": _dataset_name(task["data"]), "type": str(task["data"])}
        if task.get("split"):
            dataset["split"] = task["split"]
        results.append(
            {"task": {"type": task_type, "name": task_name}, "dataset": dataset, "metrics": metrics}
        )
    return [{"name": model_name, "results": results}] if results else []


def _yaml(value, indent: int) -> list[str]:
    """Block YAML of nested dicts/lists; scalars as JSON (valid YAML flow scalars)."""
    pad = " " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                lines.append(f"{pad}{key}:")
                lines += _yaml(item, indent + (0 if isinstance(item, list) else 2))
            else:
                lines.append(f"{pad}{key}: {json.dumps(item, ensure_ascii=False)}")
    else:
        for item in value:
            nested = _yaml(item, indent + 2)
            lines.append(f"{pad}- {nested[0].lstrip()}")
            lines += nested[1:]
    return lines


def model_index_yaml(
    model_name: str, evaluation: Mapping[str, float] | None, config: Mapping | None
) -> list[str]:
    """Front-matter lines `model-index: ...` (none without evaluation results)."""
    index = model_index(model_name, evaluation or {}, config)
    return ["model-index:", *_yaml(index, 0)] if index else []
