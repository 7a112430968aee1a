"""The training program: config in, checkpoints, metrics and an exportable model out.

`train_and_evaluate` reads top to bottom in stages: processes and workdir →
mesh → model → input pipeline → optimizer and sharded state → restore →
evaluators → loop. Resume order: a checkpoint in the workdir, then
`config.resume_from`, then the pretrained (or random) init.
"""

import json
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from embeddings import flops
from embeddings.checkpointing import Checkpointer, restore_from_path
from embeddings.config_validation import validate
from embeddings.data import build_pipeline
from embeddings.evaluation import build_evaluators
from embeddings.metrics_writer import MetricWriter
from embeddings.model_setup import build_guide, build_model, save_model_files
from embeddings.models import packing
from embeddings.optim import make_optimizer
from embeddings.sharding import global_batch, make_mesh, replicated, tree_shardings
from embeddings.train_step import TrainState, init_state, make_train_step

HOST_ONLY_KEYS = ("dataset_index",)  # batch fields used for statistics, never sent to devices


class Throughput:
    """Rates over the steps since the last report: steps, pairs, real tokens, MFU."""

    def __init__(self, batch_size: int, peak_flops: float | None):
        self.batch_size, self.peak_flops = batch_size, peak_flops
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.tokens, self.flops = time.perf_counter(), 0, 0, 0.0

    def add(self, *, tokens: int, flops: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.flops += flops

    def report(self) -> dict[str, float]:
        """The rates (empty before any timed step), then starts a new window."""
        elapsed = time.perf_counter() - self.start
        rates = {}
        if self.steps:
            rates = {
                "steps_per_second": self.steps / elapsed,
                "pairs_per_second": self.steps * self.batch_size / elapsed,
                "tokens_per_second": self.tokens / elapsed,
            }
            if self.peak_flops:
                rates["mfu"] = self.flops / elapsed / self.peak_flops
        self.restart()
        return rates


class _StopSignal:
    """Remembers a SIGTERM (preemption) so the loop can checkpoint and exit."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping.")
        self.received = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            # Every host must stop at the same step; JAX's coordination service
            # agrees on it (and knows of TPU maintenance events too).
            return self.received or multihost_utils.reached_preemption_sync_point(step)
        return self.received

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def state_shardings(abstract_state: TrainState, mesh):
    """Parameters and optimizer moments by the FSDP rule; counters replicated."""
    return TrainState(
        step=replicated(mesh),
        params=tree_shardings(abstract_state.params, mesh),
        opt_state=tree_shardings(abstract_state.opt_state, mesh),
        rng=replicated(mesh),
        skipped=replicated(mesh),
    )


def _agree_shapes(batch: dict, groups: int, pack_levels: int) -> dict:
    """Gives every process's share of a batch the same shapes; adds token indices.

    Processes pick their padded lengths from their own rows; global arrays need
    one shape, so every column is padded to the longest length any process
    chose. With `pack_levels`, each column also gets its token index
    (`packing.token_index`, one row group per device) at a capacity that holds
    the fullest group of any process. One all-gather of 2 x columns integers.

    Args:
      batch: this process's rows (numpy).
      groups: devices the global batch is split over (this process holds
        groups / process_count of them).
      pack_levels: `config.model.pack_levels`; 0 adds no token index.
    """
    masks = batch["attention_mask"]
    local_groups = groups // jax.process_count()
    most_real = [
        int(packing.group_real_counts(m, local_groups).max()) if pack_levels else 0 for m in masks
    ]
    shape = np.array([m.shape[1] for m in masks] + most_real, np.int32)
    if jax.process_count() > 1:
        shape = np.max(multihost_utils.process_allgather(shape), axis=0)
    lengths, most_real = shape[: len(masks)], shape[len(masks) :]
    pad = lambda x, n: np.pad(x, ((0, 0), (0, n - x.shape[1])))
    batch = dict(
        batch,
        input_ids=tuple(pad(x, n) for x, n in zip(batch["input_ids"], lengths, strict=True)),
        attention_mask=tuple(pad(x, n) for x, n in zip(masks, lengths, strict=True)),
    )
    if pack_levels:
        batch["token_index"] = packing.batch_token_index(
            batch["attention_mask"], local_groups, pack_levels, most_real
        )
    return batch


def pipeline_state(pipeline) -> dict:
    """The input position of every process, for the checkpoint.

    Each process reads its own lines, so its position differs; the checkpoint
    (written by process 0) holds all of them and each process restores its own.
    """
    state = pipeline.get_state()
    if jax.process_count() == 1:
        return state
    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    everyone = multihost_utils.process_allgather(padded)
    return {
        "processes": [
            json.loads(bytes(row[:size]).decode())
            for row, size in zip(everyone, sizes, strict=True)
        ]
    }


def _device_batch(local: dict, mesh, pack_levels: int) -> dict:
    local = {k: v for k, v in local.items() if k not in HOST_ONLY_KEYS}
    return global_batch(_agree_shapes(local, mesh.size, pack_levels), mesh)


def make_encode_fn(model, params, tokenizer, config: ml_collections.ConfigDict):
    """(texts, role) -> embeddings with the current parameters, for the evaluators.

    Texts are truncated at the model's own inference length (what the exported
    model will use), not the training lengths, so numbers match the export's.
    """

    def encode(texts, role):
        return model.encoder.encode(
            params[model.tower(role)], tokenizer, list(texts), batch_size=config.eval.batch_size
        )

    return encode


def evaluate(evaluators, encode) -> dict[str, float]:
    results = {}
    for evaluator in evaluators:
        for metric, value in evaluator(encode).items():
            results[f"eval/{evaluator.name}/{metric}"] = float(value)
    return results


def _write_run_files(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    """The resolved config and the data mixture, next to the checkpoints."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    source = epath.Path(config.data_config)
    if source.exists():
        (workdir / "data_config.json").write_text(source.read_text())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains, evaluates and checkpoints as `config` says; returns the final state."""
    # ---- Processes and workdir ----
    workdir = epath.Path(workdir)
    process_index, process_count = jax.process_index(), jax.process_count()
    validate(config, process_count=process_count)
    logging.info(
        "Process %d of %d; %d local devices, %d in all (%s).",
        process_index,
        process_count,
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    if process_index == 0:
        _write_run_files(config, workdir)

    # ---- Mesh ----
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    logging.info("Mesh: %s", dict(mesh.shape))

    # ---- Model ----
    setup = build_model(config)
    model = setup.model
    if process_index == 0:
        save_model_files(setup, workdir)

    # ---- Input pipeline ----
    pipeline = build_pipeline(
        config, setup.tokenizer, process_index=process_index, process_count=process_count
    )

    # ---- Optimizer and sharded state ----
    optimizer, schedule = make_optimizer(config, config.total_steps)
    make_state = lambda params: init_state(params, optimizer, config.seed)
    abstract = jax.eval_shape(make_state, setup.params)
    shardings = state_shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )

    # ---- Restore: workdir checkpoint -> resume_from -> init ----
    checkpointer = Checkpointer(
        workdir,
        keep=config.keep_checkpoints,
        best_metric=config.best_metric,
        best_mode=config.best_mode,
    )
    restored = checkpointer.restore_latest(abstract)
    if restored is not None:
        state, data_state, _ = restored
        pipeline.set_state(data_state)
        logging.info("Resumed from %s at step %d.", workdir / "checkpoints", int(state.step))
    elif config.resume_from:
        state, data_state = restore_from_path(config.resume_from, abstract)
        pipeline.set_state(data_state)
        logging.info("Started from %s at step %d.", config.resume_from, int(state.step))
    else:
        params = jax.device_put(setup.params, shardings.params)
        state = jax.jit(make_state, out_shardings=shardings)(params)
    start_step = int(state.step)

    # ---- Update step, evaluators, writers ----
    guide = build_guide(config, setup.tokenizer) if config.loss.kind == "gist" else None
    train_step = make_train_step(
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        config=config,
        mesh=mesh,
        state_shardings=shardings,
        guide=guide,
    )
    evaluators = build_evaluators(config.eval, similarity=config.loss.similarity)
    writer = MetricWriter(workdir, enabled=process_index == 0, resume_step=start_step)
    stop = _StopSignal()

    def run_eval(step: int) -> dict:
        if not evaluators:
            return {}
        encode = make_encode_fn(model, state.params, setup.tokenizer, config)
        results = evaluate(evaluators, encode)
        writer.write(step, results)
        return results

    if start_step == 0 and config.eval_at_start:
        run_eval(0)

    # ---- Loop ----
    # GradCache chunks rows across devices, so its batches stay padded.
    pack_levels = 0 if config.grad_cache_chunk else config.model.pack_levels
    step = start_step
    batches = iter(pipeline)
    throughput = Throughput(config.batch_size, flops.peak_flops())
    progress = writer.progress_bar(config.total_steps, start_step)
    run_start = time.perf_counter()
    try:
        while step < config.total_steps:
            local = next(batches)
            batch = _device_batch(local, mesh, pack_levels)
            state, metrics = train_step(state, batch)
            step += 1
            progress.update(1)
            if step == start_step + 1:  # the first step compiles: leave it out of the rates
                jax.block_until_ready(state)
                throughput.restart()
            else:
                throughput.add(
                    tokens=process_count * int(sum(m.sum() for m in local["attention_mask"])),
                    flops=process_count
                    * flops.train_step_flops(
                        model.encoder.config,
                        local["attention_mask"],
                        bool(config.grad_cache_chunk),
                    ),
                )
            last = step == config.total_steps
            if step % config.log_every == 0 or last:
                metrics = jax.device_get(metrics)  # waits for the step: timings are real
                rates = throughput.report()
                eta = None
                if rates:
                    eta = (config.total_steps - step) / rates["steps_per_second"]
                writer.write(step, {**metrics, **rates}, eta_seconds=eta)
            if (config.eval_every and step % config.eval_every == 0) or last:
                results = run_eval(step)
                checkpointer.save_if_best(step, state, pipeline_state(pipeline), results)
            stopping = stop.should_stop(step)
            if step % config.checkpoint_every == 0 or last or stopping:
                checkpointer.save(step, state, pipeline_state(pipeline))
            if stopping:
                logging.warning("Stopped at step %d; checkpoint saved in %s.", step, workdir)
                break
        if config.total_steps == 0:  # import-only run: the export reproduces the init
            checkpointer.save(0, state, pipeline_state(pipeline))
    finally:
        progress.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        pipeline.close()
        stop.restore()
    if process_index == 0 and step > start_step:
        total = time.perf_counter() - run_start
        print(f"Trained steps {start_step}..{step} in {total:.1f} s; workdir {workdir}", flush=True)
        print_eval_summary(read_metrics(workdir))
    return state


def print_eval_summary(records: list[dict]) -> None:
    """Prints each evaluation metric at the first and the last evaluated step."""
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if len(evals) < 2:
        return
    first, last = evals[0], evals[-1]
    print(f"\n| metric | step {first['step']} | step {last['step']} | change |")
    print("|---|---|---|---|")
    for key in sorted(k for k in last if k.startswith("eval/") and k in first):
        change = last[key] - first[key]
        print(f"| {key} | {first[key]:.4f} | {last[key]:.4f} | {change:+.4f} |")
    sys.stdout.flush()


def read_metrics(workdir) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (for tests and scripts)."""
    path = epath.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
