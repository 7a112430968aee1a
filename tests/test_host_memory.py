"""The XLA compiler's freed memory is handed back after each compilation."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embeddings import host_memory


def test_trim_runs_once_after_each_compilation_and_not_per_call(monkeypatch):
    monkeypatch.setattr(host_memory, "_registered", False)
    calls = []
    assert host_memory.trim_after_compiles(calls.append)
    assert host_memory.trim_after_compiles(calls.append)  # idempotent: one listener

    @jax.jit
    def f(x):
        return jnp.tanh(x) * 3.0

    f(np.ones(5, np.float32)).block_until_ready()
    assert calls == [0]  # malloc_trim(0), once, for the one compilation
    f(np.ones(5, np.float32)).block_until_ready()  # cached: no compilation, no trim
    assert calls == [0]
    f(np.ones(7, np.float32)).block_until_ready()  # a new shape compiles again
    assert calls == [0, 0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_c_library_trims_here():
    trim = host_memory._malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was released, 0: there was none to release
