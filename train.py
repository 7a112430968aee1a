"""Trains a sentence-embedding dual encoder.

    python train.py --config configs/quickstart.py --workdir runs/quickstart
    python train.py --config configs/minilm_l6.py --workdir gs://bucket/run \
        --config.data_folder=gs://bucket/1b-pairs --config.batch_size=1024

Exit status: 0 when training reached total_steps; 75 (EX_TEMPFAIL) when a
SIGTERM (preemption, scripts/tpu_vm.sh stop) stopped it early after saving a
checkpoint: run the same command again to resume; anything else is an error.

All local devices are used. On a multi-host TPU slice every worker runs the same
command (scripts/tpu_vm.sh run does this) and JAX's distributed runtime is
started automatically; elsewhere pass --coordinator_address, --num_processes
and --process_id to every process.

--compilation_cache_dir=DIR keeps the compiled steps (one per batch shape) in
DIR, so running the same config again, or resuming it, loads them instead of
compiling (quickstart: ~19% less CPU time over 60 steps, bench/README.md).
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); override fields with --config.KEY=VALUE."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (local or gs://): checkpoints, logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs off Cloud TPU."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (from 0).")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir",
    None,
    "Folder (local or gs://) of JAX's persistent compilation cache: a rerun or a resumed "
    "run with the same config loads its compiled steps from it instead of compiling them "
    "again. Unset: the JAX_COMPILATION_CACHE_DIR environment variable's, else no cache.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _is_multihost_tpu() -> bool:
    """Cloud TPU VMs of more than one host list their workers in this variable."""
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax

    if _COMPILATION_CACHE_DIR.value:  # before the first compilation
        cache_dir = os.path.expanduser(_COMPILATION_CACHE_DIR.value)  # gs://... unchanged
        jax.config.update("jax_compilation_cache_dir", cache_dir)
    if _COORDINATOR.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif _is_multihost_tpu():
        jax.distributed.initialize()
    logging.set_verbosity(logging.INFO if jax.process_index() == 0 else logging.WARNING)

    from embeddings.trainer import EXIT_STOPPED_EARLY, StoppedEarly, train_and_evaluate

    try:
        train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except StoppedEarly as stopped:
        if jax.process_index() == 0:
            print(stopped, flush=True)
        sys.exit(EXIT_STOPPED_EARLY)


if __name__ == "__main__":
    app.run(main)
