"""The two whole trainers as a user runs them, each in a process of its own.

- ours: `train.py` with a config (evaluation off), then `scripts/export.py`;
- theirs: sentence-transformers' `SentenceTransformerTrainer` configured as its
  documentation recommends for the same recipe: `MultipleNegativesRankingLoss`
  in both directions with one softmax per direction (what our symmetric loss
  computes), the NO_DUPLICATES batch sampler, the HF Trainer's AdamW with its
  linear warmup schedule, on the same data mixture drawn row by row in
  proportion to the data config's weights.

`run(side, ...)` starts one run and measures it from outside the process: wall
time, time to the first finished step, the time of every step after it (from
the trainer's own per-step records), peak resident memory (`os.wait4`), and the
loss. `bench/trainer.py` (speed) and `bench/quality.py` (the trained models)
are the drivers.

The sentence-transformers side runs in this file's worker mode:
    python bench/_trainers.py --st_worker SETTINGS.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SIDES = ("ours", "st")


@dataclasses.dataclass
class Recipe:
    """One training recipe, expressed for both trainers.

    Attributes:
      config: our config file (its optimizer, loss, data config and model).
      steps: optimizer updates.
      batch_size: rows per batch.
      seed: seed of both trainers (init of nothing random, data order, dropout).
      max_seq_length: the reference's token limit (both columns); ours takes its
        limits and buckets from the config and `overrides`.
      overrides: extra `--config.KEY=VALUE` flags for ours only (ablations);
        with `same_batches` the reference's batches are those of ours with them.
      log_every: steps between our metric records (each record waits for its step).
      data_config: the data config of both sides (relative to the repository);
        "" = the config file's.
      dropout: False turns every dropout off on both sides (ours
        `model.dropout=False`; the reference's every `torch.nn.Dropout`, which
        its attention's dropout probability is read from too).
      same_batches: the reference trains on our pipeline's batches (those of
        `config`, `overrides` and `seed`), in our order, one a step, instead of
        drawing its own: the two trainers then differ only in their arithmetic
        and their dropout draws (see `our_batches`).
    """

    config: str = "configs/quickstart.py"
    steps: int = 250
    batch_size: int = 32
    seed: int = 0
    max_seq_length: int = 64
    overrides: tuple[str, ...] = ()
    log_every: int = 1
    data_config: str = ""
    dropout: bool = True
    same_batches: bool = False


def our_config(path: str):
    """The settings of our config file `path` (relative to the repository)."""
    import importlib.util

    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("recipe_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _our_command(recipe: Recipe, workdir: pathlib.Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "train.py"),
        "--config",
        str(REPO / recipe.config),
        "--workdir",
        str(workdir),
        f"--config.total_steps={recipe.steps}",
        f"--config.batch_size={recipe.batch_size}",
        f"--config.seed={recipe.seed}",
        f"--config.log_every={recipe.log_every}",
        f"--config.checkpoint_every={recipe.steps}",
        "--config.eval_at_start=False",
        "--config.eval.sts_file=",
        "--config.eval.retrieval_file=",
        "--config.best_metric=",
        *([f"--config.data_config={recipe.data_config}"] if recipe.data_config else []),
        *([] if recipe.dropout else ["--config.model.dropout=False"]),
        *recipe.overrides,
    ]


def _with_overrides(config, overrides):
    """`config` with `--config.KEY=VALUE` flags applied (values as Python literals)."""
    import ast

    for flag in overrides:
        match = re.fullmatch(r"--config\.([\w.]+)=(.*)", flag, re.DOTALL)
        if not match:
            raise ValueError(f"an override must read --config.KEY=VALUE, got {flag!r}")
        *path, key = match[1].split(".")
        try:
            value = ast.literal_eval(match[2])
        except (ValueError, SyntaxError):
            value = match[2]
        node = config
        for name in path:
            node = node[name]
        node[key] = value
    return config


def _timed(command, *, env, log: pathlib.Path):
    """Runs `command` (output appended to `log`); returns (seconds, peak RSS MiB of
    the process and its children, return code)."""
    start = time.perf_counter()
    with open(log, "a") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, process.returncode


def _watch_metrics(path: pathlib.Path, start: float, stop: threading.Event, seen: dict):
    """Timestamps each new line of metrics.jsonl (our trainer writes one per logged step)."""
    done = 0
    while not stop.is_set():
        if path.exists():
            lines = path.read_text().splitlines()
            for line in lines[done:]:
                if line.strip():
                    record = json.loads(line)
                    if "loss" in record:
                        seen[record["step"]] = (time.perf_counter() - start, record)
            done = len(lines)
        stop.wait(0.05)


def run(side: str, recipe: Recipe, out: pathlib.Path, *, export: bool = True) -> dict:
    """Trains once with `side`'s trainer; `out/model` gets the sentence-transformers model.

    Returns:
      A dict: wall_seconds (the whole process, compilation included),
      first_step_seconds (start to the first finished step), step_times (seconds
      from the start at which each recorded step finished), tokens (real tokens
      per recorded step), losses (per recorded step), peak_rss_mib, the data's
      layout (ours: `layouts`, as the pipeline logged them; theirs: the dataset's
      `columns`), and export_seconds (ours).
    """
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text("")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if side == "ours":
        workdir = out / "workdir"
        seen: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(
            target=_watch_metrics,
            args=(workdir / "metrics.jsonl", time.perf_counter(), stop, seen),
            daemon=True,
        )
        watcher.start()
        wall, rss, code = _timed(_our_command(recipe, workdir), env=env, log=log)
        stop.set()
        watcher.join()
        if code:
            raise RuntimeError(f"train.py failed (exit {code}); see {out / 'log.txt'}")
        layouts = re.findall(r"Input pipeline: layout (\S+),", log.read_text())
        records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
        records = [r for r in records if "loss" in r]
        times = {s: t for s, (t, _) in seen.items()}
        result = dict(
            wall_seconds=wall,
            peak_rss_mib=rss,
            steps=[r["step"] for r in records],
            losses=[r["loss"] for r in records],
            step_times=[times.get(r["step"]) for r in records],
            layouts=layouts,  # the batch layouts the pipeline logged, e.g. "contrastive/3"
            # The trainer's own count of real (non-padding) tokens of each logged window.
            tokens=[
                r["tokens_per_second"] / r["steps_per_second"] * recipe.log_every
                if "tokens_per_second" in r
                else None
                for r in records
            ],
        )
        if export:
            start = time.perf_counter()
            command = [
                sys.executable,
                str(REPO / "scripts/export.py"),
                "--workdir",
                str(workdir),
                "--output",
                str(out / "model"),
                "--overwrite",
                "--skip_parity_check",
            ]
            _, _, code = _timed(command, env=env, log=log)
            if code:
                raise RuntimeError(f"export failed (exit {code}); see {out / 'log.txt'}")
            result["export_seconds"] = time.perf_counter() - start
        return result
    if side != "st":
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    settings = out / "settings.json"
    settings.write_text(json.dumps(dict(dataclasses.asdict(recipe), output=str(out))))
    command = [sys.executable, str(REPO / "bench/_trainers.py"), "--st_worker", str(settings)]
    wall, rss, code = _timed(command, env=env, log=log)
    if code:
        raise RuntimeError(f"sentence-transformers run failed (exit {code}); see {out}/log.txt")
    result = json.loads((out / "st_result.json").read_text())
    return dict(result, wall_seconds=wall, peak_rss_mib=rss)


# ---- The reference side (runs in its own process) ----


def _read_rows(path: pathlib.Path) -> list[list[str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not all(isinstance(r, list) and len(r) >= 2 for r in rows):
        raise ValueError(f"{path}: the reference side reads JSON-list rows (pairs or triplets).")
    return rows


def weighted_rows(config, count: int, seed: int) -> list[list[str]]:
    """`count` rows of the data config, each from a dataset drawn by weight.

    Each dataset is read in a seeded shuffled order and restarted (reshuffled)
    when used up, as our pipeline does; the choice of dataset is independent
    row by row (sentence-transformers has no per-batch dataset groups).
    """
    import numpy as np

    folder = pathlib.Path(config.data_folder)
    if not folder.is_absolute():
        folder = REPO / folder
    config_path = pathlib.Path(config.data_config)
    entries = json.loads(
        (config_path if config_path.is_absolute() else REPO / config_path).read_text()
    )
    data = [_read_rows(folder / e["name"]) for e in entries]
    width = {len(r) for rows in data for r in rows}
    if len(width) != 1:
        raise ValueError(f"the reference side needs one row layout; the data config has {width}")
    weights = np.array([e["weight"] for e in entries], np.float64)
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(len(rows)) for rows in data]
    positions = [0] * len(data)
    out = []
    for d in rng.choice(len(data), size=count, p=weights / weights.sum()):
        if positions[d] == len(data[d]):
            orders[d], positions[d] = rng.permutation(len(data[d])), 0
        out.append(data[d][orders[d][positions[d]]])
        positions[d] += 1
    return out


def our_batches(recipe: Recipe) -> tuple[list[list[list[str]]], list[int]]:
    """The texts of our pipeline's first `recipe.steps` batches, and the real
    tokens of each batch.

    Each text is our token ids decoded (the tokenizer's `decode`, special
    tokens left out), so the reference tokenizes what our encoder saw, cut at
    our limits; the pipeline hands out token ids, not texts. On the
    quickstart's 250 batches the round trip gives our ids back for 15,998 of
    the 16,000 texts (the others: an unknown character and a cut word).
    """
    import numpy as np

    from embeddings.data import build_pipeline
    from embeddings.models.pretrained import load_tokenizer, resolve_model_dir

    config = _with_overrides(our_config(recipe.config), recipe.overrides)
    config.update(dict(batch_size=recipe.batch_size, seed=recipe.seed))
    if recipe.data_config:
        config.data_config = recipe.data_config
    config.data.prefetch, config.data.workers = 0, 0  # this process only mixes and tokenizes
    tokenizer = load_tokenizer(config.model.tokenizer or resolve_model_dir(config.model.init))
    batches, tokens = [], []
    with build_pipeline(config, tokenizer) as pipeline:
        for _ in range(recipe.steps):
            batch = next(pipeline)
            columns, real = [], 0
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                ids, mask = np.asarray(ids), np.asarray(mask) > 0
                columns.append(
                    [
                        tokenizer.decode(i[m], skip_special_tokens=True)
                        for i, m in zip(ids, mask, strict=True)
                    ]
                )
                real += int(mask.sum())
            batches.append([list(row) for row in zip(*columns, strict=True)])
            tokens.append(real)
    return batches, tokens


def turn_off_dropout(model) -> None:
    """Sets every `torch.nn.Dropout` of `model` to p=0, as our `model.dropout=False`
    (transformers' BERT attention takes its dropout probability from one too)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _st_worker(settings_path: str) -> None:
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.base.sampler import BatchSamplers, DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    settings = json.loads(pathlib.Path(settings_path).read_text())
    out = pathlib.Path(settings.pop("output"))
    recipe = Recipe(**{k: tuple(v) if k == "overrides" else v for k, v in settings.items()})
    config = our_config(recipe.config)  # without `overrides`: ours alone
    if recipe.data_config:
        config.data_config = recipe.data_config
    start = time.perf_counter()
    init = config.model.init
    model = SentenceTransformer(init, device="cpu")
    model.max_seq_length = recipe.max_seq_length
    if not recipe.dropout:
        turn_off_dropout(model)
    if recipe.same_batches:
        batches, our_tokens = our_batches(recipe)
        rows = [row for batch in batches for row in batch]

        class InOrder(DefaultBatchSampler):
            """Our batches, in our order (our mixer already skipped duplicates)."""

            def __init__(self, dataset, **kwargs):
                super().__init__(SequentialSampler(dataset), **kwargs)

        sampler = InOrder
    else:
        # NO_DUPLICATES moves a row whose text is already in the batch to a later batch,
        # so draw more rows than the steps consume.
        rows = weighted_rows(config, int(recipe.steps * recipe.batch_size * 1.5) + 64, recipe.seed)
        sampler, our_tokens = BatchSamplers.NO_DUPLICATES, None
    negatives = len(rows[0]) - 2
    names = ["anchor", "positive"] + (
        ["negative"] if negatives == 1 else [f"negative_{k}" for k in range(negatives)]
    )
    dataset = Dataset.from_dict({n: [r[c] for r in rows] for c, n in enumerate(names)})
    loss = MultipleNegativesRankingLoss(
        model,
        scale=config.loss.scale,
        directions=("query_to_doc", "doc_to_query") if len(names) == 2 else ("query_to_doc",),
        partition_mode="per_direction",
    )
    opt = config.optimizer
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st_trainer"),
        per_device_train_batch_size=recipe.batch_size,
        max_steps=recipe.steps,
        learning_rate=opt.learning_rate,
        warmup_steps=opt.warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=opt.weight_decay,
        max_grad_norm=opt.grad_clip_norm,
        # The HF Trainer's own default epsilon (1e-8), as a user of that trainer gets.
        batch_sampler=sampler,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=recipe.seed,
        data_seed=recipe.seed,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    tokens = {"count": 0}

    def count_tokens(module, inputs):
        features = inputs[0]
        if isinstance(features, dict) and "attention_mask" in features:
            tokens["count"] += int(features["attention_mask"].sum())

    model.register_forward_pre_hook(count_tokens)
    times, token_counts = [], []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - start)
            token_counts.append(tokens["count"])
            tokens["count"] = 0

    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[StepTimes()]
    )
    trainer.train()
    model.save(str(out / "model"))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = dict(
        steps=list(range(1, len(times) + 1)),
        step_times=times,
        losses=losses,
        tokens=token_counts,
        columns=names,
        torch_threads=torch.get_num_threads(),
        # With same_batches: the real tokens of each of our batches (the reference's own
        # count per step is `tokens`; equal where the decoded texts tokenize back alike).
        our_tokens=our_tokens,
        adam_epsilon=args.adam_epsilon,
    )
    (out / "st_result.json").write_text(json.dumps(result))


# ---- Summaries ----


def summarize(result: dict, batch_size: int, skip: int) -> dict:
    """Steady-state rates from the per-step times after the first `skip` steps."""
    times = [t for t in result["step_times"] if t is not None]
    steps = result["steps"][: len(times)]
    summary = dict(
        wall_seconds=result["wall_seconds"],
        peak_rss_mib=result["peak_rss_mib"],
        first_step_seconds=times[0] if times else None,
    )
    if len(times) > skip + 1:
        span = times[-1] - times[skip]
        done = steps[-1] - steps[skip]
        summary["steps_per_second"] = done / span
        summary["pairs_per_second"] = done * batch_size / span
        tokens = [t for t in result["tokens"][skip + 1 :] if t is not None]
        if len(tokens) == len(result["tokens"][skip + 1 :]):
            summary["tokens_per_second"] = sum(tokens) / span
    tail = result["losses"][-10:]
    summary["final_loss"] = sum(tail) / len(tail) if tail else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--st_worker", required=True, help="settings file (written by run())")
    _st_worker(parser.parse_args().st_worker)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
