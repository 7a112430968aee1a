"""`config.eval`: the evaluation tasks, checked at start-up and built into evaluators.

`config.eval.tasks` is a list of dicts, each one named task:

    dict(name="debian", kind="retrieval", data="data/debian_retrieval_dev")   # BEIR folder
    dict(name="sts", kind="sts", data="data/stsbenchmark.tsv.gz", split="test")
    dict(name="nano", kind="retrieval", data="NanoBEIR")                      # needs the Hub

Keys: `name` (metric keys are "eval/<name>/<metric>"), `kind` (`TASK_KINDS`), `data`, and
optionally `split` and `max_queries` (see `TASK_KEYS`). The older fields `sts_file`/`sts_split`
and `retrieval_file`/`max_queries` still work: each non-empty one adds a task named "sts" or
"retrieval" before the listed ones. `config.eval.mean_of` lists "<name>/<metric>" keys whose
mean is logged as "eval/mean" (usable as `config.best_metric`).
"""

import ml_collections

from embeddings.evaluation import beir
from embeddings.evaluation.evaluators import (
    PAIR_METRICS,
    RERANKING_METRICS,
    RETRIEVAL_METRICS,
    Evaluator,
    PairClassificationEvaluator,
    RerankingEvaluator,
    RetrievalEvaluator,
    SetsMeanEvaluator,
    STSEvaluator,
)
from embeddings.evaluation.sts import SPLITS as STS_SPLITS

TASK_KINDS = ("sts", "retrieval", "reranking", "pair_classification")
# key -> what it means (the error for an unknown key lists these).
TASK_KEYS = {
    "name": "metric keys are eval/<name>/<metric>",
    "kind": f"one of {TASK_KINDS}",
    "data": "sts: STS-benchmark .tsv(.gz); retrieval: a BEIR folder, a Debian .jsonl(.gz), a Hub "
    "BEIR dataset id, or 'NanoBEIR' / 'NanoBEIR:msmarco,nq'; reranking: .jsonl(.gz); "
    "pair_classification: .tsv(.gz)",
    "split": "sts: train|dev|test (default dev); BEIR retrieval: the qrels split (default test)",
    "max_queries": "use at most this many queries (pairs for sts/pair_classification), 0 = all",
}
NANOBEIR = "nanobeir"


class TaskError(ValueError):
    """A task in config.eval is invalid; the message names it and says what to do."""


def _similarities(similarity: str) -> tuple[str, ...]:
    # Cosine is always reported (what published numbers use); a dot model adds its own.
    return ("cosine",) if similarity == "cosine" else ("cosine", similarity)


def eval_tasks(config_eval) -> list[tuple[str, dict]]:
    """(config key, task dict with defaults) for every task, the older fields' first."""
    tasks = []
    if config_eval.get("sts_file"):
        task = dict(name="sts", kind="sts", data=config_eval.sts_file, split=config_eval.sts_split)
        tasks.append(("config.eval.sts_file", task))
    if config_eval.get("retrieval_file"):
        task = dict(name="retrieval", kind="retrieval", data=config_eval.retrieval_file)
        task["max_queries"] = config_eval.get("max_queries", 0)
        tasks.append(("config.eval.retrieval_file", task))
    listed = config_eval.get("tasks") or ()
    if not isinstance(listed, (list, tuple)):
        raise TaskError(f"config.eval.tasks must be a list of dicts, got {type(listed).__name__}.")
    for i, task in enumerate(listed):
        key = f"config.eval.tasks[{i}]"
        if not isinstance(task, dict):
            raise TaskError(f"{key} must be a dict with keys {tuple(TASK_KEYS)}, got {task!r}.")
        tasks.append((key, dict(task)))
    return tasks


def _nanobeir_sets(data: str) -> list[str] | None:
    """The NanoBEIR set names `data` asks for, or None when it does not name NanoBEIR."""
    head, _, names = data.partition(":")
    if head.lower() != NANOBEIR:
        return None
    if not names:
        return list(beir.NANOBEIR_SETS)
    return [name.strip().lower().removeprefix("nano") for name in names.split(",")]


def _is_beir_source(data: str) -> bool:
    return not data.endswith((".jsonl", ".jsonl.gz"))


def _check_task(key: str, task: dict) -> None:
    unknown = sorted(set(task) - set(TASK_KEYS))
    if unknown:
        raise TaskError(
            f"{key} has unknown keys {unknown}; the keys are: "
            + "; ".join(f"{k} ({meaning})" for k, meaning in TASK_KEYS.items())
        )
    for required in ("name", "kind", "data"):
        if not isinstance(task.get(required), str) or not task[required]:
            raise TaskError(f"{key}.{required} is missing or empty ({TASK_KEYS[required]}).")
    if "/" in task["name"] or task["name"] == "mean":
        raise TaskError(f"{key}.name={task['name']!r}: a name may not contain '/' or be 'mean'.")
    if task["kind"] not in TASK_KINDS:
        raise TaskError(f"{key}.kind={task['kind']!r} is not one of {TASK_KINDS}.")
    max_queries = task.get("max_queries", 0)
    if not isinstance(max_queries, int) or max_queries < 0:
        raise TaskError(f"{key}: max_queries must be >= 0 (0 = all), got {max_queries!r}.")
    split = task.get("split")
    if task["kind"] == "sts" and split is not None and split not in STS_SPLITS:
        raise TaskError(f"{key}.split={split!r} is not one of {STS_SPLITS}.")
    uses_split = task["kind"] == "sts" or (
        task["kind"] == "retrieval" and _is_beir_source(task["data"])
    )
    if split is not None and not uses_split:
        raise TaskError(
            f"{key}.split={split!r} is set, but a {task['kind']} task on {task['data']!r} has no "
            "splits; remove it."
        )
    sets = _nanobeir_sets(task["data"])
    if sets is not None:
        if task["kind"] != "retrieval":
            raise TaskError(f"{key}: NanoBEIR is a retrieval set; set kind='retrieval'.")
        wrong = [name for name in sets if name not in beir.NANOBEIR_SETS]
        if wrong:
            raise TaskError(
                f"{key}.data={task['data']!r}: {wrong} are not NanoBEIR sets; choose from "
                f"{sorted(beir.NANOBEIR_SETS)}."
            )


def task_metric_names(task: dict, similarity: str = "cosine") -> tuple[str, ...]:
    """The metric names a task reports (without the "eval/<name>/" prefix)."""
    kind = task["kind"]
    if kind == "sts":
        return tuple(
            f"{stat}_{sim}" for sim in _similarities(similarity) for stat in ("pearson", "spearman")
        )
    if kind == "reranking":
        return RERANKING_METRICS
    if kind == "pair_classification":
        return tuple(f"{sim}_{m}" for sim in _similarities(similarity) for m in PAIR_METRICS)
    sets = _nanobeir_sets(task["data"])
    if sets is None:
        return RETRIEVAL_METRICS
    per_set = tuple(
        f"Nano{beir.NANOBEIR_SETS[name]}/{metric}" for name in sets for metric in RETRIEVAL_METRICS
    )
    return RETRIEVAL_METRICS + per_set


def validate_eval(config: ml_collections.ConfigDict) -> None:
    """Start-up checks of config.eval and config.best_metric; reads no data.

    Raises:
      TaskError: naming the key (e.g. config.eval.tasks[1].kind) and what to do.
    """
    config_eval = config.eval
    if config_eval.batch_size <= 0:
        raise TaskError(f"config.eval.batch_size={config_eval.batch_size!r} must be > 0.")
    names: dict[str, dict] = {}
    for key, task in eval_tasks(config_eval):
        _check_task(key, task)
        if task["name"] in names:
            raise TaskError(
                f"{key}.name={task['name']!r} is used by another task (config.eval.sts_file and "
                "retrieval_file add tasks named 'sts' and 'retrieval'); names must be unique."
            )
        names[task["name"]] = task
    similarity = config.loss.similarity
    available = {
        f"{name}/{metric}"
        for name, task in names.items()
        for metric in task_metric_names(task, similarity)
    }
    for i, entry in enumerate(config_eval.get("mean_of") or ()):
        if entry not in available:
            example = sorted(available)[:3]
            raise TaskError(
                f"config.eval.mean_of[{i}]={entry!r} is not a metric of the tasks; use "
                f"'<task name>/<metric>', e.g. {example}."
            )
    if config.best_metric:
        keys = {f"eval/{metric}" for metric in available}
        if config_eval.get("mean_of"):
            keys.add("eval/mean")
        if not names:
            raise TaskError(
                f"config.best_metric={config.best_metric!r} needs an evaluator, but "
                "config.eval.sts_file, config.eval.retrieval_file and config.eval.tasks are all "
                "empty."
            )
        if config.best_metric not in keys:
            raise TaskError(
                f"config.best_metric={config.best_metric!r} must name an evaluation metric, "
                "e.g. 'eval/retrieval/mrr@10', 'eval/sts/spearman_cosine' or 'eval/mean' (with "
                "config.eval.mean_of)."
            )


def _build(key: str, task: dict, similarity: str) -> Evaluator:
    name, kind, data = task["name"], task["kind"], task["data"]
    limit = task.get("max_queries", 0)
    where = f"{key}.data" if key.startswith("config.eval.tasks") else key
    if kind == "sts":
        return STSEvaluator(
            data,
            task.get("split") or "dev",
            name=name,
            max_pairs=limit,
            similarities=_similarities(similarity),
        )
    if kind == "reranking":
        return RerankingEvaluator(
            data, name=name, max_queries=limit, similarity=similarity, config_key=where
        )
    if kind == "pair_classification":
        return PairClassificationEvaluator(
            data,
            name=name,
            max_pairs=limit,
            similarities=_similarities(similarity),
            config_key=where,
        )
    sets = _nanobeir_sets(data)
    if sets is not None:
        return SetsMeanEvaluator(
            name,
            [
                RetrievalEvaluator(
                    beir.load_nanobeir(set_name),
                    name=f"Nano{beir.NANOBEIR_SETS[set_name]}",
                    max_queries=limit,
                    similarity=similarity,
                )
                for set_name in sets
            ],
        )
    if _is_beir_source(data):
        data = beir.load_beir(data, task.get("split") or "test", where)
    return RetrievalEvaluator(
        data, name=name, max_queries=limit, similarity=similarity, config_key=where
    )


def build_evaluators(
    config_eval: ml_collections.ConfigDict, *, similarity: str = "cosine"
) -> list[Evaluator]:
    """The evaluators of every task in `config.eval` (`eval_tasks`), in order.

    Args:
      config_eval: `config.eval`.
      similarity: the model's similarity (`config.loss.similarity`): retrieval and reranking
        rank with it; STS and pair classification report it next to cosine.
    """
    evaluators: list[Evaluator] = []
    for key, task in eval_tasks(config_eval):
        _check_task(key, task)
        evaluators.append(_build(key, task, similarity))
    return evaluators


def evaluators_for(
    kind: str, data: str, *, similarity: str = "cosine", split: str | None = None, **options
) -> list[Evaluator]:
    """One task's evaluators, built as a `config.eval.tasks` entry named `kind` would be."""
    task = dict(name=kind, kind=kind, data=data, **options)
    if split is not None:
        task["split"] = split
    return build_evaluators(ml_collections.ConfigDict({"tasks": (task,)}), similarity=similarity)
