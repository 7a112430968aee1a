"""Timing, alternation, peak memory and machine facts shared by the bench scripts.

Every benchmark that compares two things runs each in its own worker process
(`serve`) and drives them alternated (a, b, a, b, ...) after a warm-up
(`alternate_processes`), so that a burst of load from another program on this
shared machine hits both sides alike; it reports medians. Separate processes
also keep the sides from sharing thread pools or allocator state, and give
each its own peak resident memory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# glibc malloc settings for the workers of a comparison that asks for them
# (`tune_malloc`; both sides alike) on a host without an accelerator, unless
# GLIBC_TUNABLES is already set: keep freed memory in the process instead of
# handing it back to the kernel. Both XLA's CPU runtime and
# PyTorch free gigabytes of temporaries every step; with glibc's defaults each
# step then re-faults them page by page, which costs seconds of system time per
# step in a VM (and varies with what the other side freed just before). Glibc
# reads this only at process start. Only for workers that run one shape: with
# many shapes the never-returned heap fragments (a padding-bench worker grew to
# 16 GB). Not used next to a GPU or TPU, whose runtimes' many host threads need
# glibc's per-thread arenas.
MALLOC_TUNABLES = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000:glibc.malloc.arena_max=1"
)


def worker_malloc(tune: bool) -> str | None:
    """GLIBC_TUNABLES of the workers: the user's, else MALLOC_TUNABLES if `tune` on a
    CPU-only host, else None (glibc's defaults)."""
    if "GLIBC_TUNABLES" in os.environ:
        return os.environ["GLIBC_TUNABLES"]
    if not tune:
        return None
    accelerator = glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")
    return None if accelerator else MALLOC_TUNABLES


# Marks the protocol lines of a worker's stdout (libraries may print there too).
_PREFIX = "@bench "


def serve(run: Callable[[], object], info: Callable[[], Mapping]) -> None:
    """The worker side of `alternate_processes`: one unit of work per request.

    Announces readiness, then answers each "run" line on stdin with the unit's
    duration and "stop" with `info()` plus this process's peak memory and each
    unit's user and system CPU seconds and page faults, and returns. Anything
    else the process prints goes to stderr, so that stdout carries the protocol
    alone.

    Args:
      run: does one unit of work and returns when it is finished.
      info: facts to report at the end (device, thread counts, ...).
    """
    protocol, sys.stdout = sys.stdout, sys.stderr

    def reply(message: Mapping) -> None:
        protocol.write(_PREFIX + json.dumps(dict(message), default=float) + "\n")
        protocol.flush()

    units = []  # CPU time and page faults of each unit, for the final report
    reply({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            run()
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            units.append(
                {
                    "user_seconds": after.ru_utime - before.ru_utime,
                    "system_seconds": after.ru_stime - before.ru_stime,
                    "page_faults": after.ru_minflt - before.ru_minflt,
                }
            )
            reply({"seconds": seconds})
        elif command == "stop":
            reply({**info(), "peak_rss_mib": peak_rss_mib(), "units": units})
            return


class _Worker:
    """A child process running `serve`, driven over its stdin and stdout."""

    def __init__(
        self, name: str, args: Sequence[str], env: Mapping[str, str] | None, tune_malloc: bool
    ):
        self.name = name
        tunables = worker_malloc(tune_malloc)
        env = {**({"GLIBC_TUNABLES": tunables} if tunables else {}), **(env or {})}
        self.command = [sys.executable, *args]
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by kill)
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env={**os.environ, **env},
            cwd=REPO,
        )
        self._reply()  # built and ready

    def _reply(self) -> dict:
        for line in self._process.stdout:
            if line.startswith(_PREFIX):
                return json.loads(line[len(_PREFIX) :])
        self._process.wait()
        self._stderr.seek(0)
        tail = self._stderr.read()[-3000:]
        raise RuntimeError(
            f"bench worker {self.name!r} ({' '.join(self.command)}) exited with "
            f"{self._process.returncode} without answering:\n{tail}"
        )

    def _send(self, command: str) -> dict:
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return self._reply()

    def run(self) -> float:
        return self._send("run")["seconds"]

    def stop(self) -> dict:
        info = self._send("stop")
        self._process.wait()
        return info

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._stderr.close()


def alternate_processes(
    workers: Mapping[str, tuple[Sequence[str], Mapping[str, str] | None]],
    *,
    steps: int,
    warmup: int = 1,
    tune_malloc: bool = False,
) -> dict[str, dict]:
    """Times units of work of worker processes, each side in its own, driven in turn.

    Separate processes keep the sides from sharing thread pools, allocator
    state and peak memory; driving them in turn (only one works at a time) keeps
    load from other programs falling on both alike. Workers are started one
    after the other, each built and idle before the next starts.

    Args:
      workers: name -> (python arguments of a script that calls `serve`, extra
        environment variables or None).
      steps: timed units per worker.
      warmup: untimed units first, per worker.
      tune_malloc: start the workers with `MALLOC_TUNABLES` (see there).

    Returns:
      name -> the worker's `info` plus "times" (the `steps` durations, seconds)
      and "peak_rss_mib".
    """
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}.")
    started: dict[str, _Worker] = {}
    try:
        for name, (args, env) in workers.items():
            started[name] = _Worker(name, args, env, tune_malloc)
        runs = {name: worker.run for name, worker in started.items()}
        for _ in range(warmup):
            for run in runs.values():
                run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(steps):
            for name, run in runs.items():
                times[name].append(run())
        return {name: {**worker.stop(), "times": times[name]} for name, worker in started.items()}
    finally:
        for worker in started.values():
            worker.kill()


def worker_args(script: str, args, **overrides) -> list[str]:
    """The arguments that start `script` as a worker with the settings in `args`.

    Args:
      script: path of the bench script.
      args: its parsed arguments (argparse.Namespace); the driver-only --json,
        --steps and --warmup are left out, None and False values too.
      overrides: settings to change or add, e.g. serve="ours".
    """
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "steps", "warmup")}
    settings.update(overrides)
    out = [script]
    for key, value in settings.items():
        if value is None or value is False:
            continue
        out += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """The processor's model name as `lscpu` prints it (platform's guess without lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    """Facts about the host a benchmark ran on: CPU model, usable cores, 1-minute load."""
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "load_1min": os.getloadavg()[0],
    }


def jax_facts() -> dict:
    """The JAX device and version, and XLA's CPU thread pool size (one per usable core)."""
    import jax

    device = jax.devices()[0]
    return {
        "device": f"{device.platform}: {device.device_kind}",
        "devices": jax.device_count(),
        "jax_version": jax.__version__,
        "jax_threads": len(os.sched_getaffinity(0)),
    }


@contextlib.contextmanager
def output_folder(path: str | None, prefix: str):
    """The folder a script writes its traces and dumps to: `path`, created and
    kept, or a temporary one removed afterwards."""
    if path:
        folder = pathlib.Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            yield pathlib.Path(folder)


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Prints a Markdown table; numbers right-aligned."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def print_json(result: Mapping) -> None:
    """The benchmark's one JSON object, on the last line of the output."""
    print(json.dumps(dict(result), default=float), flush=True)
