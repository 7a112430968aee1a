"""Tokenizing and padding in worker processes, batches still handed out in order.

Mixing is sequential (which lines a batch takes depends on what the batches
before it took and skipped), but turning a mixed batch into arrays is a pure
function of its examples, and it is most of the pipeline's work (the
tokenizer, the text hashes, the padding). `CollatorPool` runs the `Collator`
in `workers` processes, up to `depth` batches ahead of the caller, and hands
the results back in submission order: the batches are the same for any number
of workers.

Workers are started with "spawn" (forking a process that runs JAX is unsafe),
so a script that builds a pipeline with workers needs the usual
`if __name__ == "__main__":` guard (train.py has it). Each worker tokenizes
on one core: the pool is the parallelism, so the Rust tokenizer's own thread
pool is turned off in the workers instead of oversubscribing the host's
cores. Workers ignore SIGINT and SIGTERM (a Ctrl-C or a preemption notice
sent to the whole process group is the trainer's to handle: it saves a
checkpoint and closes the pool) and exit as soon as their parent does, even
when the parent is killed (SIGKILL, out of memory), so no orphans hold memory.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from embeddings.data.readers import Example, Layout
from embeddings.data.tokenize import Collator

# Batches in flight per worker: one being collated, one waiting in its queue.
BATCHES_PER_WORKER = 2

_collator: Collator | None = None  # the worker process's own copy


def _start_worker(collator: Collator) -> None:
    global _collator
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _collator = collator
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


def _exit_with(parent_sentinel) -> None:
    """Ends this worker when its parent process ends, however it ended."""
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


def _collate(rows: list[tuple[int, Example]], layout: Layout):
    return _collator(rows, layout)


class CollatorPool:
    """Runs a `Collator` in worker processes.

    Args:
      collator: what each worker runs (pickled once per worker).
      workers: number of processes, >= 1.
    """

    def __init__(self, collator: Collator, workers: int):
        if workers < 1:
            raise ValueError(f"a CollatorPool needs at least one worker, got {workers}.")
        self.workers = workers
        self.depth = BATCHES_PER_WORKER * workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(collator,),
        )

    def submit(self, rows: list[tuple[int, Example]], layout: Layout) -> Future:
        """Starts collating one mixed batch; pass the future to `result`."""
        try:
            return self._executor.submit(_collate, rows, layout)
        except BrokenProcessPool as e:
            raise self._broken() from e

    def result(self, future: Future) -> tuple[dict[str, Any], list[tuple[int, int, int]]]:
        """What `Collator.__call__` returned for a `submit` future (waits; re-raises
        a worker's error)."""
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise self._broken() from e

    def _broken(self) -> RuntimeError:
        return RuntimeError(
            f"an input pipeline worker process (one of config.data.workers={self.workers}) "
            "died while tokenizing a batch, e.g. killed for lack of memory. Lower "
            "config.data.workers or the batch size, or set it to 0 to tokenize in the "
            "trainer's process; the checkpoint resumes with the same batches either way."
        )

    def close(self) -> None:
        """Stops the workers; batches not yet handed out are dropped."""
        self._executor.shutdown(wait=True, cancel_futures=True)
