"""Dropout whose mask is a counter-based hash of each element's coordinates.

An element is kept or dropped by a hash of its coordinates in the *global,
padded* view of the data (sequence row of the global batch, token position,
feature; or row, head, query and key for attention probabilities), seeded by
two words drawn from the key. The mask therefore depends only on the key (the
step and the column), the example and the element, never on the layout the
array happens to be computed in: packed tokens (`packing.py`) draw the mask of
their padded positions, and a batch split over 1, 8 or 16 devices, in one
process or several, draws the same mask. A fused kernel that knows an
element's coordinates (`kernels/pallas_attention.py`) draws the same mask from
the same seed words.

Hashing rather than `jax.random.bernoulli`: threefry costs about ten times an
elementwise pass on a CPU and its mask is kept for the backward pass as two
uint32 words per element, whereas the hash is a few integer operations that XLA
recomputes inside the fusions that use it; and a bernoulli mask is a function
of the array's shape, not of each element's coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def keep_at(coordinates: Sequence[jax.Array], seed0, seed1, rate: float) -> jax.Array:
    """True where the element at `coordinates` is kept (probability 1 - rate).

    Args:
        coordinates: The element's integer coordinates, outermost first, as
            arrays that broadcast together (e.g. rows [B, 1, 1], positions
            [1, L, 1], features [H]). Each must be below 2**32.
        seed0, seed1: The seed words (`seed_words`).
        rate: Probability of dropping an element.

    Returns:
        Boolean array of the coordinates' broadcast shape.
    """
    h = seed0
    for c in coordinates:
        h = _mix32(h ^ jnp.asarray(c).astype(jnp.uint32))
    return _mix32(h + seed1) >= jnp.uint32(round(rate * 2**32))


def index_coordinates(shape: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """Each axis's index as an array that broadcasts to `shape`: the coordinates
    of the elements of an array that is its own global, padded view."""
    return tuple(
        jnp.arange(n, dtype=jnp.uint32).reshape((1,) * axis + (n,) + (1,) * (len(shape) - axis - 1))
        for axis, n in enumerate(shape)
    )


def dropout_keep_mask(
    key: jax.Array,
    shape: tuple[int, ...],
    rate: float,
    tokens: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Dropout's keep-mask: each element True with probability 1 - rate, independently.

    Args:
        key: PRNG key (typed or raw uint32).
        shape: Shape of the mask.
        rate: Probability of dropping an element, in [0, 1).
        tokens: None: the coordinates of an element are its indices in `shape`.
            Else (rows, positions) of hidden states [..., H]: each token's row of
            the global batch and position in its padded sequence, arrays that
            broadcast to `shape[:-1]`; the coordinates are (row, position,
            feature).

    Returns:
        Boolean array of `shape`.
    """
    seed = seed_words(key)
    if tokens is None:
        coordinates = index_coordinates(shape)
    else:
        rows, positions = tokens
        features = jnp.arange(shape[-1], dtype=jnp.uint32)
        coordinates = (rows[..., None], positions[..., None], features)
    return jnp.broadcast_to(keep_at(coordinates, seed[0], seed[1], rate), shape)


def dropout(x: jax.Array, rate: float, key: jax.Array, tokens=None) -> jax.Array:
    """Zeroes elements of `x` with probability `rate` and scales the rest by
    1/(1 - rate); `tokens` as in `dropout_keep_mask`."""
    keep = dropout_keep_mask(key, x.shape, rate, tokens)
    return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0)


def padded_tokens(rows: int, length: int) -> tuple[jax.Array, jax.Array]:
    """(rows, positions) of the tokens of a padded [rows, length] batch."""
    return (
        jnp.arange(rows, dtype=jnp.uint32)[:, None],
        jnp.arange(length, dtype=jnp.uint32)[None, :],
    )


class Dropout(nnx.Module):
    """`nnx.Dropout`'s interface with the mask of `dropout_keep_mask`.

    Args:
        rate: Probability of dropping an element.
    """

    def __init__(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}.")
        self.rate = rate

    def __call__(self, x, tokens=None, *, deterministic=True, rngs=None):
        """`tokens`: the (rows, positions) of `x`'s tokens (`dropout_keep_mask`)."""
        if deterministic or self.rate == 0.0:
            return x
        if rngs is None:
            raise ValueError("deterministic=False needs rngs with a 'dropout' stream.")
        return dropout(x, self.rate, rngs.dropout(), tokens)
