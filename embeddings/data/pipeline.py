"""The input pipeline: data config -> readers -> shuffled streams -> mixer -> arrays, prefetched.

Grain's thread prefetch runs the batch iterator in a background thread, keeps
the iterator state that belongs to every prepared batch, and re-raises a
failure of the thread in the caller. The state handed out is the one of the
last batch the caller received, not of what the thread prepared ahead. With
`workers`, the thread only mixes, and worker processes tokenize and pad
(`workers.py`).
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import os
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
from grain.experimental import ThreadPrefetchDatasetIterator

from configs import default as default_config
from embeddings.data.bad_lines import BadLineTracker
from embeddings.data.data_config import DatasetEntry, load_data_config
from embeddings.data.mixer import Mixer
from embeddings.data.readers import Layout, infer_row_spec, make_source
from embeddings.data.shuffle import ShuffledStream
from embeddings.data.tokenize import BatchTokenizer, Collator
from embeddings.data.workers import CollatorPool
from embeddings.prompts import ROLES, check_prompts, prompt_length

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# Lines of a dataset judged before its malformed share is enforced (or its first pass, if shorter).
MIN_LINES_FOR_BAD_SHARE = 1000
# The settings' defaults are the training config's: configs/default.py defines (and comments)
# them once.
_DEFAULT = default_config.get_config()


class _Batches:
    """The checkpointable iterator that the prefetch thread runs: mix, tokenize, count.

    With a `CollatorPool`, mixing runs `pool.depth` batches ahead of what was
    handed out, so the streams' states are kept with every batch in flight and
    `get_state()` reports those of the last batch handed out.
    """

    def __init__(
        self,
        mixer: Mixer,
        collator: Collator,
        streams: Sequence[ShuffledStream],
        names: Sequence[str],
        settings: dict[str, Any],
        pool: CollatorPool | None = None,
    ):
        self._mixer = mixer
        self._collator = collator
        self._streams = streams
        self._names = list(names)
        self._settings = settings
        self._pool = pool
        self._pending: collections.deque = collections.deque()  # (future, mixed, stream states)
        self._mix_error: Exception | None = None  # raised after the batches in flight
        self._stream_states: list[dict[str, Any]] | None = None  # None: the live streams'
        self._step = 0
        self._counters = self._zero_counters()

    def _zero_counters(self) -> dict[str, Any]:
        n = len(self._names)
        return {
            "examples": [0] * n,
            "groups": [0] * n,
            "duplicates": [0] * n,
            "topped_up_groups": 0,
            "tokens": {},  # padded length -> [real tokens, all tokens]
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        if self._pool is None:
            mixed = self._mixer.next_batch(self._step)
            batch, tokens = self._collator(mixed.rows, mixed.layout)
        else:
            self._fill()
            if not self._pending:  # mixing failed at this batch
                error, self._mix_error = self._mix_error, None
                raise error
            future, mixed, states = self._pending.popleft()
            batch, tokens = self._pool.result(future)
            self._stream_states = states
        counters = self._counters
        for dataset, _ in mixed.rows:
            counters["examples"][dataset] += 1
        for dataset in mixed.planned:
            counters["groups"][dataset] += 1
        for dataset, count in mixed.duplicates.items():
            counters["duplicates"][dataset] += count
        counters["topped_up_groups"] += mixed.topped_up
        for width, real, total in tokens:
            entry = counters["tokens"].setdefault(str(width), [0, 0])
            entry[0] += real
            entry[1] += total
        self._step += 1
        return batch

    def _fill(self) -> None:
        """Mixes and submits batches until `pool.depth` are in flight. A mixing error
        stops the mixing and is raised once the batches before it came out."""
        while self._mix_error is None and len(self._pending) < self._pool.depth:
            try:
                mixed = self._mixer.next_batch(self._step + len(self._pending))
            except Exception as error:  # raised when its turn comes
                self._mix_error = error
                return
            states = [stream.get_state() for stream in self._streams]
            self._pending.append((self._pool.submit(mixed.rows, mixed.layout), mixed, states))

    def _drop_pending(self) -> None:
        for future, _, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._mix_error = None

    def get_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "settings": dict(self._settings),
            "datasets": [
                {"name": name, **state}
                for name, state in zip(self._names, self._current_stream_states(), strict=True)
            ],
            "counters": copy.deepcopy(self._counters),
        }

    def _current_stream_states(self) -> list[dict[str, Any]]:
        if self._stream_states is not None:
            return self._stream_states  # get_state() copies each into a new dict
        return [stream.get_state() for stream in self._streams]

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not an input pipeline state of version {STATE_VERSION}: {str(state)[:200]!r}"
            )
        saved = state["settings"]
        changed = {k: (saved.get(k), v) for k, v in self._settings.items() if saved.get(k) != v}
        if "process_index" in changed and "process_count" not in changed:
            raise ValueError(
                f"this input pipeline state belongs to process {saved['process_index']}, not "
                f"{self._settings['process_index']}: a multi-host checkpoint must keep every "
                'process\'s state, e.g. {"processes": [state of process 0, ...]}.'
            )
        if changed:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(
                f"the input pipeline state was saved with other settings ({detail}); resume "
                "with the settings of the saved run."
            )
        names = [d["name"] for d in state["datasets"]]
        if names != self._names:
            raise ValueError(
                "the input pipeline state was saved with another data config "
                f"({len(names)} datasets, first difference at "
                f"{_first_difference(names, self._names)}); resume with the same data_config."
            )
        self._drop_pending()
        for stream, saved_stream in zip(self._streams, state["datasets"], strict=True):
            stream.set_state(saved_stream)
        self._stream_states = None
        self._step = int(state["step"])
        self._counters = copy.deepcopy(state["counters"])

    def close(self) -> None:
        self._drop_pending()
        if self._pool is not None:
            self._pool.close()
        for stream in self._streams:
            stream.close()


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"entry {i}: saved {x!r}, now {y!r}"
    return f"entry {min(len(a), len(b))} (saved {len(a)} entries, now {len(b)})"


class InputPipeline:
    """Endless, weighted, deduplicated, resumable batches for one process.

    Each item is this process's share of one global batch: batch_size // process_count
    rows, `datasets_per_batch` groups of rows in order, each group planned from one
    dataset. See data/README.md for the semantics. The settings default to those of
    configs/default.py (`config.data`, `config.seed`).

    Args:
      data_config: path of data_config.json (local or gs://) or the parsed list of entries.
      data_folder: folder that the entries' names are relative to (local or gs://).
      tokenizer: a transformers fast tokenizer (or a `tokenizers.Tokenizer`).
      batch_size: GLOBAL batch size in rows, over all processes.
      datasets_per_batch: groups per global batch, each from one dataset.
      max_length_anchor: token limit for column 0 (entries may override).
      max_length_document: token limit for the other columns (entries may override).
      buckets: padded lengths; () pads every column to its token limit.
      shuffle_buffer: lines of one dataset held in memory for shuffling.
      skip_duplicates: skip an example whose text is already in the (local) batch.
      max_bad_line_share: stop when a dataset's malformed-line share passes this.
      prefetch: batches prepared ahead in a background thread; 0 = none.
      prompts: role ("query" | "document") -> prompt prepended to that role's texts of
        every dataset without its own (data_config "prompts", which win key by key);
        None = no prompts. See embeddings/prompts.py.
      include_prompt: False = batches carry `prompt_length` (one [rows] array per column),
        the prompt tokens that pooling leaves out (`Pooling(include_prompt=False)`).
      negatives_per_row: 0 = the first element of a list of candidates in a
        {"query", "pos": [...], "neg": [...]} row; k > 0 = one positive and k
        negatives sampled from the lists at every use (readers.sample_candidates).
      workers: processes that tokenize and pad, each on one core, while the
        background thread (or, with prefetch 0, the caller) only mixes; 0 = none,
        the thread does it all (with the tokenizer's own threads). Any value
        gives the same batches and states.
      seed: seeds the dataset choice and every shuffle.
      process_index: this process (jax.process_index()).
      process_count: number of processes (jax.process_count()).
      min_lines_for_bad_share: lines judged before max_bad_line_share is enforced.

    Raises:
      DataConfigError: the data config or a file it names is invalid.
      ValueError: a setting is invalid.
    """

    def __init__(
        self,
        *,
        data_config: str | os.PathLike | Sequence[dict[str, Any]],
        data_folder: str | os.PathLike,
        tokenizer,
        batch_size: int,
        datasets_per_batch: int = _DEFAULT.data.datasets_per_batch,
        max_length_anchor: int = _DEFAULT.data.max_length_anchor,
        max_length_document: int = _DEFAULT.data.max_length_document,
        buckets: Sequence[int] = _DEFAULT.data.buckets,
        shuffle_buffer: int = _DEFAULT.data.shuffle_buffer,
        skip_duplicates: bool = _DEFAULT.data.skip_duplicates,
        max_bad_line_share: float = _DEFAULT.data.max_bad_line_share,
        prefetch: int = _DEFAULT.data.prefetch,
        workers: int = _DEFAULT.data.workers,
        negatives_per_row: int = _DEFAULT.data.negatives_per_row,
        prompts: Mapping[str, str] | None = types.MappingProxyType(_DEFAULT.data.prompts.to_dict()),
        include_prompt: bool = _DEFAULT.model.include_prompt,
        seed: int = _DEFAULT.seed,
        process_index: int = 0,
        process_count: int = 1,
        min_lines_for_bad_share: int = MIN_LINES_FOR_BAD_SHARE,
    ):
        _check_settings(
            batch_size=batch_size,
            datasets_per_batch=datasets_per_batch,
            max_length_anchor=max_length_anchor,
            max_length_document=max_length_document,
            buckets=buckets,
            shuffle_buffer=shuffle_buffer,
            max_bad_line_share=max_bad_line_share,
            prefetch=prefetch,
            workers=workers,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
        self.entries: list[DatasetEntry] = load_data_config(data_config, data_folder)
        self.process_index, self.process_count = process_index, process_count
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        rows_per_group = self.local_batch_size // datasets_per_batch

        sources = [make_source(e, data_folder) for e in self.entries]
        specs = [
            infer_row_spec(e, s, negatives_per_row=negatives_per_row)
            for e, s in zip(self.entries, sources, strict=True)
        ]
        self.layouts: list[Layout] = [spec.layout for spec in specs]
        limits = [
            (e.max_length_anchor or max_length_anchor, e.max_length_document or max_length_document)
            for e in self.entries
        ]
        _check_buckets(buckets, limits)
        self._trackers = [
            BadLineTracker(e.location, max_bad_line_share, min_lines_for_bad_share)
            for e in self.entries
        ]
        self._streams = [
            ShuffledStream(
                source,
                spec,
                chunk_size=shuffle_buffer,
                seed=seed,
                dataset_index=e.index,
                process_index=process_index,
                process_count=process_count,
                tracker=tracker,
            )
            for e, source, spec, tracker in zip(
                self.entries, sources, specs, self._trackers, strict=True
            )
        ]
        names = [e.name for e in self.entries]
        mixer = Mixer(
            self.layouts,
            [e.weight for e in self.entries],
            self._streams,
            names=names,
            seed=seed,
            groups_per_batch=datasets_per_batch,
            rows_per_group=rows_per_group,
            skip_duplicates=skip_duplicates,
        )
        collator = Collator(
            BatchTokenizer(tokenizer),
            limits,
            buckets,
            **_prompt_settings(self.entries, prompts, include_prompt, tokenizer, limits),
        )
        settings = dict(
            seed=seed,
            batch_size=batch_size,
            datasets_per_batch=datasets_per_batch,
            shuffle_buffer=shuffle_buffer,
            skip_duplicates=skip_duplicates,
            process_index=process_index,
            process_count=process_count,
        )
        pool = CollatorPool(collator, workers) if workers else None
        self._batches = _Batches(mixer, collator, self._streams, names, settings, pool)
        self._iterator = ThreadPrefetchDatasetIterator(self._batches, prefetch)
        self._closed = False
        self._log_mixture(mixer)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._closed:
            raise RuntimeError("the input pipeline is closed.")
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """Position right after the last batch handed out (JSON-serialisable).

        The state is this process's own: processes skip different duplicates, so their
        positions differ. A multi-host checkpoint stores every process's state, e.g. as
        {"processes": [state of process 0, state of process 1, ...]}, which set_state
        accepts on every process.
        """
        return copy.deepcopy(self._iterator.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues exactly after the batch that `state` was taken after.

        Args:
          state: a get_state() result of this process, or {"processes": [...]} holding
            one per process, in process order.

        Raises:
          ValueError: the state belongs to another process, other settings or another
            data config.
        """
        if self._closed:
            raise RuntimeError("the input pipeline is closed.")
        if isinstance(state, dict) and "processes" in state:
            states = state["processes"]
            if not isinstance(states, list) or len(states) != self.process_count:
                raise ValueError(
                    f"the saved input pipeline state holds {len(states)} process state(s); "
                    f"this run has {self.process_count} processes. Resume with the same "
                    "number of processes."
                )
            state = states[self.process_index]
        self._iterator.set_state(copy.deepcopy(state))

    def stats(self) -> dict[str, Any]:
        """Counters up to the last batch handed out.

        Returns:
          step, per-dataset rows ("datasets": name, weight, expected_share, layout,
          examples, groups, duplicates_skipped, bad_lines, lines_checked,
          bad_line_samples), totals (examples, groups, duplicates_skipped,
          topped_up_groups, bad_lines), real_tokens, padding_tokens, padding_share and
          padding_share_by_length (padded length -> share of padding tokens).
        """
        state = self._iterator.get_state()
        counters = state["counters"]
        total_weight = sum(e.weight for e in self.entries)
        datasets = [
            {
                "name": e.name,
                "weight": e.weight,
                "expected_share": e.weight / total_weight,
                "layout": str(self.layouts[i]),
                "examples": counters["examples"][i],
                "groups": counters["groups"][i],
                "duplicates_skipped": counters["duplicates"][i],
                "bad_lines": state["datasets"][i]["bad"],
                "lines_checked": state["datasets"][i]["checked"],
                "bad_line_samples": list(self._trackers[i].samples),
            }
            for i, e in enumerate(self.entries)
        ]
        tokens = counters["tokens"]
        real = sum(r for r, _ in tokens.values())
        total = sum(t for _, t in tokens.values())
        return {
            "step": state["step"],
            "datasets": datasets,
            "examples": sum(counters["examples"]),
            "groups": sum(counters["groups"]),
            "duplicates_skipped": sum(counters["duplicates"]),
            "topped_up_groups": counters["topped_up_groups"],
            "bad_lines": sum(d["bad_lines"] for d in datasets),
            "real_tokens": real,
            "padding_tokens": total - real,
            "padding_share": (total - real) / total if total else 0.0,
            "padding_share_by_length": {
                int(width): (t - r) / t for width, (r, t) in sorted(tokens.items(), key=_width)
            },
        }

    def close(self) -> None:
        """Stops the prefetch thread and closes the files; get_state() and stats() still work."""
        if not self._closed:
            self._closed = True
            self._iterator.close()
            self._batches.close()

    def __enter__(self) -> InputPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _log_mixture(self, mixer: Mixer) -> None:
        total = sum(e.weight for e in self.entries)
        for layout in mixer.layouts:
            members = [e for e, x in zip(self.entries, self.layouts, strict=True) if x == layout]
            logger.info(
                "Input pipeline: layout %s, %d dataset(s), %.1f%% of the weight.",
                layout,
                len(members),
                100 * sum(e.weight for e in members) / total,
            )


def _prompt_settings(
    entries: Sequence[DatasetEntry],
    prompts: Mapping[str, str] | None,
    include_prompt: bool,
    tokenizer,
    limits: Sequence[tuple[int, int]],
) -> dict[str, Any]:
    """The Collator's `prompts` and `prompt_lengths` (None where no dataset has a prompt)."""
    default = check_prompts(prompts or {}, "config.data.prompts")
    pairs = []
    for entry in entries:
        merged = {**default, **(entry.prompts or {})}
        pairs.append(tuple(merged.get(role, "") for role in ROLES))
    if not any(any(pair) for pair in pairs):
        return {"prompts": None, "prompt_lengths": None}
    lengths = None
    if not include_prompt:
        lengths = [
            tuple(
                prompt_length(tokenizer, p, limit)
                for p, limit in zip(pair, limit_pair, strict=True)
            )
            for pair, limit_pair in zip(pairs, limits, strict=True)
        ]
    return {"prompts": pairs, "prompt_lengths": lengths}


def _width(item: tuple[str, Any]) -> int:
    return int(item[0])


def _check_settings(**s) -> None:
    """Fails at start-up on settings the pipeline cannot honour, saying what to change."""
    for key in ("batch_size", "datasets_per_batch", "max_length_anchor", "max_length_document"):
        value = s[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}.")
    for key in ("max_length_anchor", "max_length_document"):
        if s[key] < 2:
            raise ValueError(f"{key} must be >= 2 (room for the special tokens), got {s[key]}.")
    lows = {"shuffle_buffer": 1, "prefetch": 0, "workers": 0, "seed": 0, "process_count": 1}
    for key, low in lows.items():
        value = s[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}.")
    if not 0 <= s["process_index"] < s["process_count"]:
        raise ValueError(
            f"process_index {s['process_index']} is not in [0, process_count={s['process_count']})."
        )
    share = s["max_bad_line_share"]
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise ValueError(f"max_bad_line_share must be in [0, 1], got {share!r}.")
    problem = batch_split_problem(
        s["batch_size"],
        datasets_per_batch=s["datasets_per_batch"],
        process_count=s["process_count"],
    )
    if problem:
        raise ValueError(problem)
    buckets = s["buckets"]
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in buckets) or list(
        buckets
    ) != sorted(set(buckets)):
        raise ValueError(f"buckets must be increasing positive integers, got {buckets!r}.")


def batch_split_problem(
    batch_size: int, *, datasets_per_batch: int, process_count: int, device_count: int | None = None
) -> str | None:
    """Why a global batch cannot be split as a run needs, or None if it can.

    Every process fills an equal share of each of the `datasets_per_batch` groups, and
    (when `device_count` is given) every device takes an equal share of the rows, so the
    batch must be a multiple of both. The one check of this, for the pipeline and the
    start-up config validation alike.
    """
    groups = datasets_per_batch * process_count
    unit = groups if device_count is None else math.lcm(groups, device_count)
    if batch_size % unit == 0:
        return None
    devices = (
        ""
        if device_count is None
        else f", and each of the {device_count} devices an equal share of the rows"
    )
    return (
        f"config.batch_size={batch_size} is not divisible by {unit}: each of the "
        f"{process_count} processes fills an equal share of each of the "
        f"config.data.datasets_per_batch={datasets_per_batch} groups{devices}. Use a "
        f"multiple of {unit}, e.g. {max(unit, batch_size // unit * unit)}."
    )


def _check_buckets(buckets: Sequence[int], limits: Sequence[tuple[int, int]]) -> None:
    longest = max(max(pair) for pair in limits)
    if buckets and buckets[-1] > longest:
        raise ValueError(
            f"bucket {buckets[-1]} is longer than every token limit (largest {longest}): no text "
            "can need it. Drop it from data.buckets or raise the max lengths."
        )


_CONFIG_KEYS = (
    "datasets_per_batch",
    "max_length_anchor",
    "max_length_document",
    "buckets",
    "shuffle_buffer",
    "skip_duplicates",
    "max_bad_line_share",
    "prefetch",
    "workers",
    "negatives_per_row",
)


def build_pipeline(
    config: ml_collections.ConfigDict, tokenizer, *, process_index: int = 0, process_count: int = 1
) -> InputPipeline:
    """The InputPipeline that a training config describes.

    Reads config.data_folder, config.data_config, config.batch_size (global), config.seed
    and config.data.{datasets_per_batch, max_length_anchor, max_length_document, buckets,
    shuffle_buffer, skip_duplicates, max_bad_line_share, prefetch, workers, negatives_per_row},
    and, when present, config.data.prompts and config.model.include_prompt.
    """
    missing = [k for k in ("data_folder", "data_config", "batch_size", "seed") if k not in config]
    if "data" not in config:
        missing.append("data")
    else:
        missing += [f"data.{k}" for k in _CONFIG_KEYS if k not in config.data]
    if missing:
        raise ValueError(
            f"the config lacks {missing}: start from configs/default.py, which sets them all."
        )
    data = config.data
    return InputPipeline(
        data_config=config.data_config,
        data_folder=config.data_folder,
        tokenizer=tokenizer,
        batch_size=config.batch_size,
        seed=config.seed,
        process_index=process_index,
        process_count=process_count,
        prompts=dict(data.get("prompts") or {}),
        include_prompt=config.get("model", {}).get("include_prompt", True),
        **{k: tuple(data[k]) if k == "buckets" else data[k] for k in _CONFIG_KEYS},
    )
