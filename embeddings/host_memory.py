"""Handing the XLA compiler's freed memory back to the operating system.

Compiling a step takes XLA hundreds of MiB of host memory (~450 MiB for the
quickstart's step on a CPU). glibc's allocator keeps what the compiler frees
in its per-thread arenas instead of returning it, so the process's resident
memory stays that much higher for the rest of the run, and every step's
temporaries then come on top of it: on the quickstart, 2,170 MiB at each
step's peak instead of ~1,930 (bench/README, "Where the peak memory is").
`malloc_trim(0)` after each compilation returns those pages before the new
executable first runs. It costs a few milliseconds per compilation and
nothing per step. Where the C library has no `malloc_trim` (macOS, musl),
nothing is done.
"""

from __future__ import annotations

import ctypes

from jax import monitoring

# The event JAX records once an XLA compilation has finished, before the executable runs.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_registered = False


def _malloc_trim():
    """glibc's `malloc_trim`, or None where the C library has none.

    Looked up among the symbols the process already has loaded (`CDLL(None)`),
    not with `ctypes.util.find_library`, which runs ldconfig or a compiler.
    """
    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def trim_after_compiles(trim=None) -> bool:
    """Calls `malloc_trim(0)` after every XLA compilation in this process from now on.

    Idempotent. Returns whether trimming is on (False where the C library has no
    `malloc_trim`). `trim` replaces the C function (tests).
    """
    global _registered
    if _registered:
        return True
    trim = trim or _malloc_trim()
    if trim is None:
        return False

    def listener(event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == COMPILE_EVENT:
            trim(0)

    monitoring.register_event_duration_secs_listener(listener)
    _registered = True
    return True
