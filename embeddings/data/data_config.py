"""Parse and validate data_config.json: the weighted list of datasets to mix.

The original project's file is a list of `{"name", "lines", "weight"}` and is
accepted unchanged. Optional keys say what the original could not (format,
which fields hold the texts, a dataset kind, per-dataset max lengths, a split).
Every problem is reported at start-up with the entry's index and name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
from collections.abc import Sequence
from typing import Any

from etils import epath

from embeddings.prompts import check_prompts

FILE_FORMATS = ("jsonl", "tsv", "csv", "hf")
FORMATS = (*FILE_FORMATS, "hf_hub", "tfds")
KINDS = ("pairs", "triplets", "margin", "scores", "embedding")
# Texts per row for the kinds that fix it.
KIND_COLUMNS = {"pairs": 2, "triplets": 3}
# Kinds whose rows end in a teacher label (data/README.md, "Teacher labels"), with the fewest
# texts such a row holds: margin and scores rows a query, a positive and >= 1 negative.
LABELLED_KINDS = {"margin": 3, "scores": 3, "embedding": 2}

_KEYS = (
    "name",
    "lines",
    "weight",
    "format",
    "kind",
    "fields",
    "max_length_anchor",
    "max_length_document",
    "split",
    "config",
    "prompts",
)
# File name endings and the format they imply when "format" is not given.
_SUFFIX_FORMATS = (
    (".jsonl", "jsonl"),
    (".json", "jsonl"),
    (".tsv", "tsv"),
    (".csv", "csv"),
    (".parquet", "hf"),
    (".arrow", "hf"),
)


class DataConfigError(ValueError):
    """A data config (or a file it names) is invalid; the message says where and what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """One validated data_config entry.

    Attributes:
      index: position in the data config (the batch's `dataset_index`).
      name: path relative to data_folder, a Hub dataset id ("hf_hub") or a TFDS name ("tfds").
      weight: relative share of groups drawn from this dataset.
      lines: line count as written in the config (informational, may be None).
      format: one of FORMATS.
      kind: one of KINDS, or None to infer the column count from the data.
      fields: keys (or CSV/TSV columns) holding the texts, in column order; for the kinds
        "margin", "scores" and "embedding" the last field holds the teacher label. None: detect
        from the first row.
      max_length_anchor: token limit for column 0, or None for the pipeline default.
      max_length_document: token limit for the other columns, or None for the default.
      split: split of a Hugging Face or TFDS dataset.
      config: Hugging Face Hub dataset configuration name.
      prompts: role ("query" | "document") -> prompt prepended to that role's texts of this
        dataset, over config.data.prompts (embeddings/prompts.py); None = the config's.
      path: resolved file or folder for the file formats and local "hf"; None otherwise.
      source: the data config file (or "<list>") for messages.
    """

    index: int
    name: str
    weight: float
    lines: int | None = None
    format: str = "jsonl"
    kind: str | None = None
    fields: tuple[str, ...] | None = None
    max_length_anchor: int | None = None
    max_length_document: int | None = None
    split: str | None = None
    config: str | None = None
    prompts: dict[str, str] | None = None
    path: epath.Path | None = None
    source: str = "<list>"

    @property
    def label(self) -> str:
        """How messages name this entry: the config file, the index and the name."""
        return f"{self.source}: entry {self.index} ({self.name!r})"

    @property
    def location(self) -> str:
        """The file, Hub dataset or TFDS dataset this entry reads, for messages."""
        if self.path is not None:
            return os.fspath(self.path)
        return f"{self.format}:{self.name}"


def load_data_config(
    data_config: str | os.PathLike | Sequence[dict[str, Any]], data_folder: str | os.PathLike
) -> list[DatasetEntry]:
    """Reads and validates a data config.

    Args:
      data_config: path of a JSON file (local or gs://), or the already-parsed list.
      data_folder: folder (local or gs://) that the entries' names are relative to.

    Returns:
      One DatasetEntry per config entry, in order.

    Raises:
      DataConfigError: naming the file, the entry (index and name) and what is wrong.
    """
    if isinstance(data_config, str | os.PathLike):
        source = os.fspath(data_config)
        path = epath.Path(data_config)
        if not path.exists():
            raise DataConfigError(
                f"data_config {source} not found: pass the path of a data_config.json "
                "(see data/README.md)."
            )
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataConfigError(f"data_config {source} is not valid JSON: {e}") from e
    else:
        source, raw = "<list>", data_config
    return parse_entries(raw, data_folder, source)


def parse_entries(raw: Any, data_folder: str | os.PathLike, source: str) -> list[DatasetEntry]:
    """Validates the parsed JSON of a data config; see load_data_config."""
    if not isinstance(raw, list) or not raw:
        raise DataConfigError(
            f"{source}: a data config is a non-empty JSON list of "
            '{"name": ..., "lines": ..., "weight": ...} objects.'
        )
    folder = epath.Path(data_folder)
    if not folder.exists():
        raise DataConfigError(f"{source}: data_folder {os.fspath(folder)} does not exist.")
    return [_parse_entry(i, item, folder, source) for i, item in enumerate(raw)]


def _parse_entry(index: int, item: Any, folder: epath.Path, source: str) -> DatasetEntry:
    where = f"{source}: entry {index}"
    if not isinstance(item, dict):
        raise DataConfigError(f"{where} is {type(item).__name__}, expected a JSON object.")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise DataConfigError(f'{where}: "name" must be a non-empty string, got {name!r}.')
    where = f"{where} ({name!r})"

    def fail(message: str) -> DataConfigError:
        return DataConfigError(f"{where}: {message}")

    unknown = sorted(set(item) - set(_KEYS))
    if unknown:
        raise fail(f"unknown key(s) {unknown}; allowed keys are {list(_KEYS)}.")

    weight = item.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        raise fail(f'"weight" must be a positive number, got {weight!r}.')
    if not math.isfinite(weight) or weight <= 0:
        raise fail(f'"weight" must be positive and finite, got {weight!r}.')

    lines = item.get("lines")
    if lines is not None and (isinstance(lines, bool) or not isinstance(lines, int) or lines < 0):
        raise fail(f'"lines" must be a non-negative integer, got {lines!r}.')

    fmt = item.get("format") or _format_from_name(name)
    if fmt is None:
        raise fail(f'cannot tell the format from the file name: set "format" to one of {FORMATS}.')
    if fmt not in FORMATS:
        raise fail(f'"format" must be one of {FORMATS}, got {fmt!r}.')

    kind = item.get("kind")
    if kind is not None and kind not in KINDS:
        raise fail(f'"kind" must be one of {KINDS}, got {kind!r}.')

    fields = item.get("fields")
    if fields is not None:
        fields = _parse_fields(fields, kind, fail)

    max_lengths = {}
    for key in ("max_length_anchor", "max_length_document"):
        value = item.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 2
        ):
            raise fail(f'"{key}" must be an integer >= 2 (for the special tokens), got {value!r}.')
        max_lengths[key] = value

    split, config = item.get("split"), item.get("config")
    if split is not None and fmt not in ("hf", "hf_hub", "tfds"):
        raise fail(f'"split" applies to formats hf, hf_hub and tfds only, not {fmt!r}.')
    if split is not None and (not isinstance(split, str) or not split):
        raise fail(f'"split" must be a non-empty string, got {split!r}.')
    if config is not None and fmt != "hf_hub":
        raise fail(f'"config" (a Hub dataset configuration) applies to hf_hub only, not {fmt!r}.')
    if config is not None and (not isinstance(config, str) or not config):
        raise fail(f'"config" must be a non-empty string, got {config!r}.')
    if fmt in ("hf", "hf_hub", "tfds") and split is None:
        split = "train"

    prompts = item.get("prompts")
    if prompts is not None:
        try:
            prompts = check_prompts(prompts, where)
        except ValueError as error:
            raise DataConfigError(str(error)) from None

    path = _resolve_path(name, folder, fail) if fmt in FILE_FORMATS else None
    return DatasetEntry(
        index=index,
        name=name,
        weight=float(weight),
        lines=lines,
        format=fmt,
        kind=kind,
        fields=fields,
        split=split,
        config=config,
        prompts=prompts,
        path=path,
        source=source,
        **max_lengths,
    )


def _format_from_name(name: str) -> str | None:
    lower = name.lower().removesuffix(".gz")
    for suffix, fmt in _SUFFIX_FORMATS:
        if lower.endswith(suffix):
            return fmt
    return None


def _parse_fields(fields: Any, kind: str | None, fail) -> tuple[str, ...]:
    if (
        not isinstance(fields, list)
        or not fields
        or not all(isinstance(f, str) and f for f in fields)
    ):
        raise fail(f'"fields" must be a list of non-empty strings, got {fields!r}.')
    if len(set(fields)) != len(fields):
        raise fail(f'"fields" names a field twice: {fields!r}.')
    if kind in LABELLED_KINDS and len(fields) < LABELLED_KINDS[kind] + 1:
        raise fail(
            f"kind {kind!r} needs at least {LABELLED_KINDS[kind]} text fields and then the {kind} "
            f'field in "fields", got {fields!r}.'
        )
    expected = KIND_COLUMNS.get(kind)
    if expected is not None and len(fields) != expected:
        raise fail(f'kind {kind!r} needs {expected} in "fields", got {fields!r}.')
    if expected is None and len(fields) < 2:
        raise fail(f'"fields" needs at least 2 fields (anchor, positive), got {fields!r}.')
    return tuple(fields)


def _resolve_path(name: str, folder: epath.Path, fail) -> epath.Path:
    if "://" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise fail("the name must be a path relative to data_folder, not an absolute path or URL.")
    normalized = posixpath.normpath(name.replace("\\", "/"))
    if normalized == ".." or normalized.startswith("../"):
        raise fail(f"the path escapes data_folder ({os.fspath(folder)}): keep data under it.")
    path = folder / normalized
    if not path.exists():
        raise fail(f"file not found: {os.fspath(path)} (names are relative to data_folder).")
    return path
