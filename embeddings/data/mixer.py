"""The weighted mixer: which dataset feeds each group, and filling groups with distinct texts.

Every process derives the same plan for a step from (seed, step) alone: first a
column layout, with probability proportional to the total weight of the
datasets that have it, then `groups_per_batch` datasets of that layout drawn
with replacement in proportion to their weights. A dataset's chance to feed a
group is therefore (W_layout / W) * (w / W_layout) = w / W: its weight share.

Each process then fills its rows of every group from its own lines of the
planned dataset, skipping an example whose text is already in the (local)
batch. A dataset with fewer distinct texts than a group needs cannot fill it:
once every one of its examples was considered in this group, the group is
topped up from other datasets of the same layout, in a weighted order that is
again a function of (seed, step, group).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np

from embeddings.data.readers import Example, Layout
from embeddings.data.shuffle import ShuffledStream

# Streams of the random generators.
_PLAN, _TOP_UP = 0, 1


class MixerError(RuntimeError):
    """The mixture cannot produce a batch (too few distinct texts for a group)."""


@dataclasses.dataclass
class MixedBatch:
    """The examples of one process-local batch, group after group.

    Attributes:
      rows: (dataset index, example) per row.
      layout: the column layout shared by every row.
      planned: the dataset drawn for each group.
      duplicates: examples skipped because a text was already in the batch, per dataset.
      topped_up: groups that needed other datasets to be filled.
    """

    rows: list[tuple[int, Example]]
    layout: Layout
    planned: list[int]
    duplicates: collections.Counter
    topped_up: int


class Mixer:
    """Draws and fills the groups of each batch.

    Args:
      layouts: the column layout of each dataset.
      weights: the weight of each dataset.
      streams: each dataset's shuffled examples for this process.
      names: dataset names, for messages.
      seed: the run's seed.
      groups_per_batch: config.data.datasets_per_batch.
      rows_per_group: rows this process fills in each group.
      skip_duplicates: skip an example whose text is already in the batch.
    """

    def __init__(
        self,
        layouts: Sequence[Layout],
        weights: Sequence[float],
        streams: Sequence[ShuffledStream],
        *,
        names: Sequence[str],
        seed: int,
        groups_per_batch: int,
        rows_per_group: int,
        skip_duplicates: bool,
    ):
        self._layouts = list(dict.fromkeys(layouts))  # first-appearance order: stable
        self._dataset_layouts = list(layouts)
        self._weights = np.asarray(weights, dtype=np.float64)
        self._streams = streams
        self._names = names
        self._seed = seed
        self._groups_per_batch = groups_per_batch
        self._rows_per_group = rows_per_group
        self._skip_duplicates = skip_duplicates
        self._members = [
            np.array([i for i, x in enumerate(layouts) if x == layout]) for layout in self._layouts
        ]
        layout_weights = np.array([self._weights[m].sum() for m in self._members])
        self._layout_p = layout_weights / layout_weights.sum()
        self._member_p = [self._weights[m] / self._weights[m].sum() for m in self._members]

    @property
    def layouts(self) -> list[Layout]:
        return self._layouts

    def plan(self, step: int) -> tuple[Layout, list[int]]:
        """The layout and the dataset of each group at `step` (the same on every process)."""
        rng = np.random.default_rng([self._seed, step, _PLAN])
        which = rng.choice(len(self._layouts), p=self._layout_p)
        groups = rng.choice(
            self._members[which], size=self._groups_per_batch, p=self._member_p[which]
        )
        return self._layouts[which], [int(d) for d in groups]

    def next_batch(self, step: int) -> MixedBatch:
        """This process's examples of the batch at `step`."""
        layout, planned = self.plan(step)
        batch = MixedBatch([], layout, planned, collections.Counter(), 0)
        seen: set[str] = set()
        exhausted: set[int] = set()  # datasets whose every text is already in this batch
        for group, dataset in enumerate(planned):
            fallbacks = None
            current, taken = dataset, 0
            considered: set[int] = set()  # lines of `current` looked at for this group
            while taken < self._rows_per_group:
                if current in exhausted:
                    if fallbacks is None:
                        fallbacks = iter(self._top_up_order(step, group, dataset))
                        batch.topped_up += 1
                    current = next((d for d in fallbacks if d not in exhausted), None)
                    if current is None:
                        raise self._too_few_texts(layout, step)
                    considered = set()
                    continue
                stream = self._streams[current]
                example = stream.next()
                if self._skip_duplicates:
                    considered.add(example.line)
                    if stream.epoch_size is not None and len(considered) >= stream.epoch_size:
                        exhausted.add(current)
                    if not seen.isdisjoint(example.texts) or len(set(example.texts)) < len(
                        example.texts
                    ):
                        batch.duplicates[current] += 1
                        continue
                    seen.update(example.texts)
                batch.rows.append((current, example))
                taken += 1
        return batch

    def _top_up_order(self, step: int, group: int, dataset: int) -> list[int]:
        """Other datasets of the same layout in a weighted random order."""
        layout = self._dataset_layouts[dataset]
        others = [i for i, x in enumerate(self._dataset_layouts) if x == layout and i != dataset]
        if not others:
            return []
        p = self._weights[others] / self._weights[others].sum()
        rng = np.random.default_rng([self._seed, step, group, _TOP_UP])
        return [int(d) for d in rng.choice(others, size=len(others), replace=False, p=p)]

    def _too_few_texts(self, layout: Layout, step: int) -> MixerError:
        names = [n for n, x in zip(self._names, self._dataset_layouts, strict=True) if x == layout]
        return MixerError(
            f"step {step}: the datasets of layout {layout} ({', '.join(names)}) together hold "
            f"fewer distinct texts than a batch needs ({self._rows_per_group} rows per group and "
            "process). Lower batch_size, add data, or set data.skip_duplicates=False."
        )
