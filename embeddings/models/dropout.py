"""Dropout whose mask is a counter-based hash of each element's index.

The bits are a hash of each element's flat index, seeded by two words drawn
from the key, rather than `jax.random.bernoulli`: threefry costs about ten times
an elementwise pass on a CPU and its mask is kept for the backward pass as two
uint32 words per element, whereas the hash is as cheap as a copy and XLA
recomputes it inside the fusions that use it. A fused kernel that knows an
element's flat index (`attention_kernel.py`) draws the same mask from the same
seed words.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _mix32(x: jax.Array) -> jax.Array:
    """lowbias32 (C. Wellons): a bijection of uint32 with full avalanche, in five ops."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def seed_words(key: jax.Array) -> jax.Array:
    """The two uint32 seed words of a mask, drawn from `key`."""
    return jax.random.bits(key, (2,), jnp.uint32)


def keep_from_counter(counter: jax.Array, seed0, seed1, rate: float) -> jax.Array:
    """True where the element whose flat index is `counter` (uint32) is kept."""
    bits = _mix32(_mix32(counter ^ seed0) + seed1)
    return bits >= jnp.uint32(round(rate * 2**32))


def hashable(shape: tuple[int, ...]) -> bool:
    """Whether every element of `shape` has its own 32-bit counter."""
    return math.prod(shape) < 2**32


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Dropout's keep-mask: each element True with probability 1 - rate, independently.

    Like threefry's, the mask depends only on the key and the global shape, not
    on how the array is sharded.

    Args:
        key: PRNG key (typed or raw uint32).
        shape: Shape of the mask.
        rate: Probability of dropping an element, in [0, 1).

    Returns:
        Boolean array of `shape`.
    """
    if not hashable(shape):
        return jax.random.bernoulli(key, 1.0 - rate, shape)
    seed = seed_words(key)
    counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    return keep_from_counter(counter, seed[0], seed[1], rate)


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Zeroes elements of `x` with probability `rate` and scales the rest by 1/(1 - rate)."""
    keep = dropout_keep_mask(key, x.shape, rate)
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0)


class Dropout(nnx.Module):
    """`nnx.Dropout`'s interface with the mask of `dropout_keep_mask`.

    Args:
        rate: Probability of dropping an element.
    """

    def __init__(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
        self.rate = rate

    def __call__(self, x, *, deterministic=True, rngs=None):
        if deterministic or self.rate == 0.0:
            return x
        if rngs is None:
            raise ValueError("deterministic=False needs rngs with a 'dropout' stream.")
        return dropout(x, self.rate, rngs.dropout())
