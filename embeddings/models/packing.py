"""Running the dense layers on real tokens only ("unpadding").

A padded batch [B, L] of short texts is mostly padding (two thirds of the
tokens of a typical (title, description) batch at L = 128), and the encoder's
projections, feed-forward and LayerNorms cost the same for a padding token as
for a real one. With a *token index* the encoder gathers the real tokens into
a packed [G, T, H] array for those layers, and scatters them back into the
padded [B, L, H] layout only around attention (whose cost per token is small:
4*L*H FLOPs against 24*H*H for the rest of the layer). The result equals the
padded computation at every real token; padding positions come back as zeros.

The rows are split into G equal groups, one per device of the mesh: group g
holds the real tokens of rows [g*B/G, (g+1)*B/G), so every device packs and
unpacks its own rows without communication. T, the capacity of a group, is a
static shape: the host computes it (the largest group's real-token count,
rounded up to one of `levels` steps of the group's padded size, so at most
`levels` shapes compile per padded shape) and builds the index with numpy
(`embeddings.host_batch.batch_token_index`).

Both directions are gathers; each one's gradient is the other one (see
`_permute`), so no scatter appears in the backward pass either.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x[g, index[g, j]] for every g, j; zero where the index is out of range."""
    gather = lambda rows, idx: jnp.take(rows, idx, axis=0, mode="fill", fill_value=0)
    return jax.vmap(gather)(x, index)


@jax.custom_vjp
def _permute(x, index, inverse):
    """`_take(x, index)`, whose transpose is `_take(., inverse)`.

    Holds when `index` and `inverse` are partial inverses that send unused
    positions out of range (as a token index and its slots are): the gradient
    of a gather is then another gather, not a scatter-add.
    """
    return _take(x, index)


def _permute_fwd(x, index, inverse):
    return _take(x, index), inverse


def _permute_bwd(inverse, g):
    return _take(g, inverse), None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("index", "slots"), meta_fields=("shape",)
)
@dataclasses.dataclass(frozen=True)
class Packer:
    """Moves [B, L, ...] padded arrays to the packed [G, T, ...] layout and back.

    A pytree (it crosses `jax.checkpoint`); build it with `Packer.create`.

    Attributes:
      index: [G, T] token index (see `embeddings.host_batch.token_index`).
      slots: [G, B/G*L] packed position of each padded position, T at padding.
      shape: (B, L).
    """

    index: jax.Array
    slots: jax.Array
    shape: tuple[int, int]

    @classmethod
    def create(cls, index: jax.Array, mask: jax.Array) -> Packer:
        """The packer of a [G, T] token index and the [B, L] attention mask it was built from."""
        groups, capacity = index.shape
        real = (mask != 0).reshape(groups, -1)
        slots = jnp.where(real, jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1, capacity)
        return cls(index=index, slots=slots, shape=tuple(mask.shape))

    def _grouped(self, x):
        return x.reshape(self.index.shape[0], -1, *x.shape[2:])

    def pack(self, x: jax.Array) -> jax.Array:
        """[B, L, ...] -> [G, T, ...]; unused slots are zero."""
        return _permute(self._grouped(x), self.index, self.slots)

    def unpack(self, x: jax.Array) -> jax.Array:
        """[G, T, ...] -> [B, L, ...]; padding positions are zero."""
        return _permute(x, self.slots, self.index).reshape(*self.shape, *x.shape[2:])

    def tokens(self) -> tuple[jax.Array, jax.Array]:
        """(rows, positions), each [G, T] uint32: the row of the global batch and the
        position in its padded sequence of each packed slot (what dropout hashes, so
        a packed token draws the mask of its padded position)."""
        groups = self.index.shape[0]
        length = self.shape[1]
        group_rows = self.shape[0] // groups
        index = self.index.astype(jnp.uint32)
        first_row = jnp.arange(groups, dtype=jnp.uint32)[:, None] * group_rows
        return first_row + index // length, index % length

    def pack_ids(self, ids: jax.Array) -> jax.Array:
        """Integer [B, L] ids -> [G, T] (no gradient; unused slots are 0)."""
        return _take(self._grouped(ids), self.index)
