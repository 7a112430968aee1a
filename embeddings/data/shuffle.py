"""One dataset's examples for one process: shuffled with bounded memory, repeated forever.

A chunk shuffle. The process's lines (global line i with i % process_count ==
process_index) are read in chunks of `chunk_size` consecutive lines; each chunk
is parsed and permuted in memory, then handed out. A file whose share fits in
one chunk is parsed once, kept, and fully reshuffled every epoch. In a larger
file the first chunk of every epoch after the first has a random length, so the
chunk boundaries (and with them every line's neighbours) move from epoch to
epoch. Memory stays at one chunk whatever the file size.

The position is (epoch, chunk start, position in the chunk): restoring it
reopens the file, skips to the chunk start without parsing, and re-parses that
one chunk, so a restore costs at most part of one pass over one file.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from embeddings.data.bad_lines import BadLineTracker, MalformedDataError
from embeddings.data.readers import (
    BadRecord,
    Example,
    RowSpec,
    Source,
    parse_row,
    sample_candidates,
)

# Streams of the random generators, so that permutations and chunk offsets never share draws.
_PERMUTATION, _OFFSET = 0, 1


class ShuffledStream:
    """Endless, shuffled, resumable examples of one dataset on one process.

    Args:
      source: where the raw records come from.
      spec: how to read a row (fixed at start-up).
      chunk_size: lines held in memory (config.data.shuffle_buffer).
      seed: the run's seed.
      dataset_index: the dataset's index in the data config (seeds its shuffles).
      process_index: this process; it reads global lines i with i % process_count == index.
      process_count: number of processes sharing the dataset.
      tracker: malformed-line accounting for this dataset.
    """

    def __init__(
        self,
        source: Source,
        spec: RowSpec,
        *,
        chunk_size: int,
        seed: int,
        dataset_index: int,
        process_index: int,
        process_count: int,
        tracker: BadLineTracker,
    ):
        self._source = source
        self._spec = spec
        self._chunk_size = chunk_size
        self._seed = (seed, dataset_index, process_index)
        self._process_index = process_index
        self._process_count = process_count
        self._tracker = tracker
        # Position (the iterator state).
        self._epoch = 0
        self._start = 0  # first local line of the current chunk
        self._pos = 0  # examples of the current chunk already handed out
        self._fits = False  # the process's whole share fits in one chunk (kept in memory)
        self._good_before = 0  # valid examples in earlier chunks of this epoch
        self.epoch_size: int | None = None  # valid examples per epoch, known after one pass
        # Loaded data, rebuilt from the position when needed.
        self._chunk: list[Example] | None = None
        self._order: np.ndarray | None = None
        self._chunk_lines = 0
        self._eof = False
        self._cache: list[Example] | None = None
        self._generator = None
        self._lines = None
        self._lines_at = 0
        self.records_scanned = 0  # raw records read or skipped (restore-cost checks)

    def next(self) -> Example:
        """The next example, in this epoch's shuffled order."""
        while True:
            if self._chunk is None:
                self._load()
            if self._pos < len(self._chunk):
                example = self._chunk[self._order[self._pos]]
                if example.candidates is not None:  # a fresh draw per use, from (epoch, line)
                    rng = np.random.default_rng([*self._seed, self._epoch, example.line, 1])
                    example = sample_candidates(example, self._spec.negatives, rng)
                self._pos += 1
                if self._pos == len(self._chunk):
                    self._advance()
                return example
            self._advance()  # a chunk of malformed lines only

    def get_state(self) -> dict[str, Any]:
        """The position right after the last example handed out (JSON-serialisable)."""
        return {
            "epoch": self._epoch,
            "start": self._start,
            "pos": self._pos,
            "fits": self._fits,
            "good_before": self._good_before,
            "epoch_size": self.epoch_size,
            "checked": self._tracker.checked,
            "bad": self._tracker.bad,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from a get_state() position; the data is re-read lazily."""
        self._epoch = int(state["epoch"])
        self._start = int(state["start"])
        self._pos = int(state["pos"])
        self._fits = bool(state["fits"])
        self._good_before = int(state["good_before"])
        self.epoch_size = state["epoch_size"]
        self._tracker.checked = int(state["checked"])
        self._tracker.bad = int(state["bad"])
        self._chunk = None
        if not self._fits:
            self._cache = None

    def close(self) -> None:
        """Closes the open file, if any."""
        if self._generator is not None:
            self._generator.close()
        self._generator = self._lines = None

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng([*self._seed, self._epoch, self._start, *stream])

    def _chunk_length(self) -> int:
        if self._fits or self._epoch == 0 or self._start > 0:
            return self._chunk_size
        return int(self._rng(_OFFSET).integers(1, self._chunk_size + 1))

    def _load(self) -> None:
        if self._fits and self._cache is not None:
            self._chunk, self._eof = self._cache, True
        else:
            length = self._chunk_length()
            lines = self._read(self._start, length)
            self._eof = len(lines) < length
            examples, bad = [], []
            for line, raw in lines:
                try:
                    examples.append(parse_row(self._source.decode(raw), self._spec, line))
                except BadRecord as e:
                    bad.append(f"{self._source.where(line)}: {e}")
            # Lines are judged on their first pass only; a chunk re-read after a restore
            # was judged before the state was saved.
            if self._epoch == 0 and self._start >= self._tracker.checked:
                self._tracker.add(len(lines), bad, pass_complete=self._eof)
            if self._fits or (self._epoch == 0 and self._start == 0 and self._eof):
                self._fits, self._cache, self.epoch_size = True, examples, len(examples)
                self.close()
            self._chunk, self._chunk_lines = examples, len(lines)
        self._order = self._rng(_PERMUTATION).permutation(len(self._chunk))
        if self._pos > len(self._chunk):
            raise ValueError(
                f"{self._tracker.location}: the restored position ({self._pos}) is past the end "
                "of its chunk: the file changed since the state was saved."
            )

    def _advance(self) -> None:
        self._good_before += len(self._chunk)
        if self._eof:
            if self._good_before == 0:
                raise MalformedDataError(
                    f"{self._tracker.location}: no valid example in a whole pass for process "
                    f"{self._process_index} of {self._process_count} (it reads lines i with "
                    f"i % {self._process_count} == {self._process_index}). Drop the dataset "
                    "or give it more valid lines."
                )
            self.epoch_size = self._good_before
            self._epoch, self._start, self._good_before = self._epoch + 1, 0, 0
        else:
            self._start += self._chunk_lines
        self._pos = 0
        self._chunk = None

    def _read(self, start: int, length: int) -> list[tuple[int, Any]]:
        """This process's local lines [start, start + length), reusing the open file if there."""
        if self._lines is None or self._lines_at != start:
            self.close()
            first = start * self._process_count + self._process_index
            self._generator = self._source.records(first)
            self._lines = itertools.islice(self._generator, 0, None, self._process_count)
            self._lines_at = start
            self.records_scanned += first
        lines = list(itertools.islice(self._lines, length))
        self._lines_at += len(lines)
        self.records_scanned += len(lines) * self._process_count
        return lines
