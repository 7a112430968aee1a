"""From each process's numpy batch to global arrays on the mesh: the host side of a step.

Each step, every process holds its own rows (numpy, from the input pipeline)
and together they make one global batch:

1. `agree_shapes`: the processes agree on one padded length per column and, for
   packing, on each column's packed capacity. This is the step's one
   cross-host exchange, an all-gather of 2 x columns integers (nothing on one
   process).
2. `device_batch`: pads to the agreed lengths, builds the token index of the
   packed layout (`batch_token_index`, numpy), leaves out the fields only the
   host uses (`HOST_ONLY_KEYS`) and assembles global arrays (`global_batch`).

`pipeline_state` gathers every process's input position for a checkpoint.

The token index: the rows of a column are split into G equal groups, one per
device of the mesh; group g's index lists the flat positions of its real
tokens (`embeddings.models.packing.Packer` gathers them into the packed
[G, T, H] layout on the device). T, the capacity of a group, is a static shape:
the largest group's real-token count, rounded up to one of `levels` steps of
the group's padded size, so at most `levels` shapes compile per padded shape.
"""

import dataclasses
import json
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from embeddings.sharding import batch_sharding

HOST_ONLY_KEYS = ("dataset_index",)  # batch fields used for statistics, never sent to devices


# ---- The packed layout's token index (numpy) ----


def token_capacity(max_real: int, group_tokens: int, levels: int) -> int:
    """The packed capacity T of a group: `max_real` rounded up to a multiple of
    `group_tokens / levels` (never below one step, never above `group_tokens`)."""
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}.")
    step = -(-group_tokens // levels)
    return min(max(-(-max_real // step), 1) * step, group_tokens)


def group_real_counts(mask: np.ndarray, groups: int) -> np.ndarray:
    """Real tokens of each of `groups` equal row groups of a [rows, L] mask."""
    rows = mask.shape[0]
    if rows % groups:
        raise ValueError(f"{rows} rows cannot be split into {groups} equal groups.")
    return (np.asarray(mask) != 0).reshape(groups, -1).sum(axis=1)


def token_index(mask: np.ndarray, groups: int, capacity: int) -> np.ndarray:
    """The packed layout of a [rows, L] attention mask, for `Encoder(token_index=...)`.

    Args:
      mask: [rows, L] attention mask, nonzero at real tokens.
      groups: G, the number of equal row groups (devices the rows are split over).
      capacity: T, at least the real-token count of every group.

    Returns:
      [G, T] int32: entry (g, j) is the flat position (row_in_group * L + column)
      of group g's j-th real token, in row-major order; unused slots hold
      rows_per_group * L, one past the group's end.
    """
    real = np.asarray(mask).reshape(groups, -1) != 0
    group_tokens = real.shape[1]
    counts = real.sum(axis=1)
    if counts.max(initial=0) > capacity:
        raise ValueError(f"a group has {counts.max()} real tokens, over the capacity {capacity}.")
    index = np.full((groups, capacity), group_tokens, np.int32)
    for g in range(groups):
        positions = np.flatnonzero(real[g])
        index[g, : positions.size] = positions
    return index


def batch_token_index(
    masks, groups: int, levels: int, most_real=None
) -> tuple[np.ndarray | None, ...]:
    """`token_index` of every column of a batch, each at its own rounded capacity.

    A column whose capacity would be its whole padded size gets None instead
    (nothing to skip: it runs padded, without the gathers).

    Args:
      masks: one [rows, L] attention mask per column.
      groups: G, row groups (devices) the rows are split over.
      levels: capacity steps per padded size (`config.model.pack_levels`).
      most_real: per column, the real-token count the capacity must hold;
        default the fullest group's of this batch (processes of a multi-host run
        pass the maximum over all processes, so their shapes agree).
    """
    if most_real is None:
        most_real = [int(group_real_counts(m, groups).max()) for m in masks]
    out = []
    for mask, real in zip(masks, most_real, strict=True):
        capacity = token_capacity(int(real), mask.size // groups, levels)
        out.append(token_index(mask, groups, capacity) if capacity < mask.size // groups else None)
    return tuple(out)


# ---- One global batch from every process's rows ----


@dataclasses.dataclass(frozen=True)
class BatchShapes:
    """What every process pads its share of one batch to.

    Attributes:
      groups: devices the global batch is split over (row groups of the index).
      lengths: per column, the padded length.
      most_real: per column, the most real tokens of any device's row group;
        None without packing.
      pack_levels: `config.model.pack_levels` (0: no token index).
    """

    groups: int
    lengths: tuple[int, ...]
    most_real: tuple[int, ...] | None
    pack_levels: int


def agree_shapes(local: Mapping, groups: int, pack_levels: int) -> BatchShapes:
    """The shapes of this step's global batch: the one all-gather across processes.

    Processes pick their padded lengths from their own rows; global arrays need
    one shape, so each column takes the longest length any process chose and,
    with packing, a capacity that holds the fullest row group of any process.

    Args:
      local: this process's rows (numpy): `attention_mask`, one per column.
      groups: devices the global batch is split over (this process holds
        groups / process_count of them).
      pack_levels: `config.model.pack_levels`; 0 adds no token index.
    """
    masks = local["attention_mask"]
    local_groups = groups // jax.process_count()
    most_real = [int(group_real_counts(m, local_groups).max()) if pack_levels else 0 for m in masks]
    shape = np.array([m.shape[1] for m in masks] + most_real, np.int32)
    if jax.process_count() > 1:
        shape = np.max(multihost_utils.process_allgather(shape), axis=0)
    lengths, most_real = shape[: len(masks)], shape[len(masks) :]
    return BatchShapes(
        groups=groups,
        lengths=tuple(int(n) for n in lengths),
        most_real=tuple(int(n) for n in most_real) if pack_levels else None,
        pack_levels=pack_levels,
    )


def device_batch(local: Mapping, shapes: BatchShapes, mesh: Mesh) -> dict:
    """This process's rows at the agreed shapes, with token indices, as global arrays."""
    pad = lambda x, n: np.pad(x, ((0, 0), (0, n - x.shape[1])))
    batch = {k: v for k, v in local.items() if k not in HOST_ONLY_KEYS}
    batch["input_ids"] = tuple(
        pad(x, n) for x, n in zip(batch["input_ids"], shapes.lengths, strict=True)
    )
    batch["attention_mask"] = tuple(
        pad(x, n) for x, n in zip(batch["attention_mask"], shapes.lengths, strict=True)
    )
    if shapes.pack_levels:
        batch["token_index"] = batch_token_index(
            batch["attention_mask"],
            shapes.groups // jax.process_count(),
            shapes.pack_levels,
            shapes.most_real,
        )
    return global_batch(batch, mesh)


def global_batch(local_batch: Mapping, mesh: Mesh) -> dict:
    """Assembles each process's share of a batch into global arrays on the mesh.

    Every process passes its own rows (numpy); the result is one array per leaf
    whose first dimension is the global batch, split over the mesh.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


# ---- The input position of every process ----


def pipeline_state(pipeline) -> dict:
    """The input position of every process, for the checkpoint.

    Each process reads its own lines, so its position differs; the checkpoint
    (written by process 0) holds all of them and each process restores its own.
    With several processes this is an all-gather: every process must call it
    at the same step.
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
