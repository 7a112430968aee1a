"""The training program: config in, checkpoints, metrics and an exportable model out.

`train_and_evaluate` reads top to bottom in stages: processes → mesh → model
→ evaluators → input pipeline → optimizer and sharded state → restore → run
files → loop. Resume order: a checkpoint in the workdir, then
`config.resume_from`, then the pretrained (or random) init. Nothing is written
to the workdir before every start-up check has passed.
"""

import functools
import signal
import sys
import time

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from embeddings import flops, host_batch, host_memory
from embeddings.checkpointing import Checkpointer, StateMismatchError, restore_from_path
from embeddings.config_validation import validate
from embeddings.data import build_pipeline
from embeddings.evaluation import build_evaluators, run_evaluators
from embeddings.metrics_writer import MetricWriter
from embeddings.model_setup import build_guide, build_model, inference_model
from embeddings.sharding import make_mesh
from embeddings.step_setup import build_training
from embeddings.train_step import TrainState
from embeddings.workdir import (
    CHECKPOINTS,
    CONFIG,
    config_differences,
    read_metrics,
    save_model_files,
    write_run_files,
)


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


EXIT_STOPPED_EARLY = 75  # train.py's exit status after a SIGTERM (EX_TEMPFAIL: run it again)


class StoppedEarly(Exception):
    """Training stopped before `total_steps` on a SIGTERM, after saving a checkpoint.

    Not a failure: the same command resumes the run. train.py exits with
    `EXIT_STOPPED_EARLY`, so a launcher can tell a preemption from the end.
    """

    def __init__(self, step: int, workdir):
        self.step = step
        super().__init__(
            f"Stopped early at step {step} (SIGTERM or a preemption notice); the checkpoint is "
            f"saved in {workdir}. "
            "Run the same command again to resume."
        )


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


def make_encode_fn(model, params, tokenizer, config: ml_collections.ConfigDict, mesh=None):
    """(texts, role) -> embeddings with the current parameters, for the evaluators.

    Texts are truncated at the model's own inference length (what the exported
    model will use), not the training lengths, so numbers match the export's.
    With a mesh, each batch's rows are split over all its devices.
    """

    return functools.partial(
        model.encode, params, tokenizer, batch_size=config.eval.batch_size, mesh=mesh
    )


def _open_checkpointer(config: ml_collections.ConfigDict, workdir: epath.Path) -> Checkpointer:
    return Checkpointer(
        workdir,
        keep=config.keep_checkpoints,
        best_metric=config.best_metric,
        best_mode=config.best_mode,
    )


def _restore_latest(checkpointer: Checkpointer, abstract, config, workdir: epath.Path):
    """The workdir's newest readable checkpoint, or None; refuses one of another config."""
    try:
        return checkpointer.restore_latest(abstract)
    except StateMismatchError as e:
        changed = config_differences(workdir, config)
        saved = workdir / CONFIG
        settings = f"{saved} shows no differing setting"
        if changed:
            settings = f"Settings that differ from the run's saved config {saved}: " + "; ".join(
                changed
            )
        raise ValueError(
            f"Refusing to start: {e.path} is a readable checkpoint of this workdir, but the "
            f"config builds other arrays ({'; '.join(e.differences)}). {settings}. Nothing in "
            f"{workdir} was changed: rerun with the saved settings to resume, or use another "
            "--workdir for a new run."
        ) from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Trains, evaluates and checkpoints as `config` says; returns the final state.

    Every start-up check (config, model, data, the checkpoint to resume) runs
    before anything is written, so a refused start leaves the workdir as it was.
    """
    # ---- Processes ----
    workdir = epath.Path(workdir)
    process_index, process_count = jax.process_index(), jax.process_count()
    validate(config, process_count=process_count, device_count=jax.device_count())
    logging.info(
        "Process %d of %d; %d local devices, %d in all (%s).",
        process_index,
        process_count,
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )

    # Every compilation's freed memory goes back to the OS before its step runs.
    host_memory.trim_after_compiles()

    # ---- Mesh ----
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
    logging.info("Mesh: %s", dict(mesh.shape))

    # ---- Model ----
    setup = build_model(config, mesh=mesh)
    model = setup.model

    # ---- Evaluators ----
    evaluators = build_evaluators(config.eval, similarity=config.loss.similarity)

    # ---- Input pipeline ----
    pipeline = build_pipeline(
        config, setup.tokenizer, process_index=process_index, process_count=process_count
    )

    # ---- Optimizer and sharded state ----
    guide = build_guide(config, setup.tokenizer) if config.loss.kind == "gist" else None
    training = build_training(config, model, setup.params, mesh, guide=guide)
    abstract, shardings = training.abstract_state, training.shardings

    # ---- Restore: workdir checkpoint -> resume_from -> init ----
    checkpointer, restored = None, None
    try:
        if (workdir / CHECKPOINTS).exists():  # opening it in a new workdir would create it
            checkpointer = _open_checkpointer(config, workdir)
            restored = _restore_latest(checkpointer, abstract, config, workdir)
        if restored is not None:
            state, data_state, _ = restored
            pipeline.set_state(data_state)
            logging.info("Resumed from %s at step %d.", workdir / CHECKPOINTS, int(state.step))
        elif config.resume_from:
            state, data_state = restore_from_path(config.resume_from, abstract)
            pipeline.set_state(data_state)
            logging.info("Started from %s at step %d.", config.resume_from, int(state.step))
        else:
            params = jax.device_put(setup.params, shardings.params)
            state = jax.jit(training.make_state, out_shardings=shardings)(params)
    except BaseException:
        if checkpointer is not None:
            checkpointer.close()
        pipeline.close()
        raise
    start_step = int(state.step)

    # ---- Run files: only now, when they describe the run that continues ----
    if process_index == 0:
        write_run_files(workdir, config)
        save_model_files(setup, workdir)
    checkpointer = checkpointer or _open_checkpointer(config, workdir)

    # ---- Update step, writers ----
    train_step = training.train_step
    writer = MetricWriter(workdir, enabled=process_index == 0, resume_step=start_step)
    stop = _StopSignal()

    eval_model = inference_model(model, config.eval.dtype, jax.default_backend())

    def run_eval(step: int) -> dict:
        if not evaluators:
            return {}
        encode = make_encode_fn(eval_model, state.params, setup.tokenizer, config, mesh)
        results = run_evaluators(evaluators, encode, config.eval.mean_of)
        writer.write(step, results)
        return results

    if start_step == 0 and config.eval_at_start:
        run_eval(0)

    # ---- Loop ----
    pack_levels = setup.pack_levels  # resolved for the backend (0 with GradCache)
    step = start_step
    batches = iter(pipeline)  # this process's rows of each global batch (numpy)
    throughput = Throughput(config.batch_size, flops.peak_flops())
    progress = writer.progress_bar(config.total_steps, start_step)
    run_start = time.perf_counter()
    try:
        while step < config.total_steps:
            local = next(batches)
            # The step's one exchange between hosts: agreeing on the batch's shapes.
            shapes = host_batch.agree_shapes(local, mesh.size, pack_levels)
            state, metrics = train_step(state, host_batch.device_batch(local, shapes, mesh))
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
            results = {}
            if (config.eval_every and step % config.eval_every == 0) or last:
                results = run_eval(step)
            stopping = stop.should_stop(step)
            saving = step % config.checkpoint_every == 0 or last or stopping
            if results or saving:
                # An all-gather between hosts: once per step, for both saves.
                data_state = host_batch.pipeline_state(pipeline)
                if results:
                    checkpointer.save_if_best(step, state, data_state, results)
                if saving:
                    checkpointer.save(step, state, data_state)
            if stopping:
                break
        if config.total_steps == 0:  # import-only run: the export reproduces the init
            checkpointer.save(0, state, host_batch.pipeline_state(pipeline))
    finally:
        progress.close()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        pipeline.close()
        stop.restore()
    if step < config.total_steps:  # only a stop signal ends the loop early
        raise StoppedEarly(step, workdir)
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
