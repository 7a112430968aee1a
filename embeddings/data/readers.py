"""Readers: one source per format, and the rules that turn a row into an example.

A source yields raw records from any record index on (so a stream can resume
by reopening and skipping) and decodes one record into a row: a JSON list, or a
dict (JSON object, CSV/TSV row by header, Hugging Face or TFDS record). Decoding
is separate from reading so that a process skips the lines of other processes
without parsing them.

The row layout of a dataset (a list of texts, or named fields) is fixed from
its first valid row at start-up; every later row must match it or is counted
as malformed. A list of texts may be a JSON list or an object with a "texts"
list, on any line, as the original training script read them.

A damaged gzip file (not gzip at all, truncated, corrupt) stops the run with
the file and the last line read: the lines after the damage are unknown, so
they cannot be counted as malformed.
"""

from __future__ import annotations

import abc
import contextlib
import csv
import dataclasses
import gzip
import io
import itertools
import json
import math
import os
import re
import zlib
from collections.abc import Iterator
from typing import Any, ClassVar

from embeddings.data.bad_lines import MalformedDataError
from embeddings.data.data_config import (
    KIND_COLUMNS,
    LABELLED_KINDS,
    DataConfigError,
    DatasetEntry,
)

# Field sets recognised in dict rows when an entry gives no "fields", tried in order.
KNOWN_FIELDS = {
    "contrastive": (
        ("query", "pos", "neg"),
        ("query", "pos"),
        ("anchor", "positive", "negative"),
        ("anchor", "positive"),
        ("context", "response"),
        ("sentence1", "sentence2"),
        ("question", "answer"),
    ),
    "margin": (
        ("query", "pos", "neg", "margin"),
        ("anchor", "positive", "negative", "margin"),
    ),
    "scores": (
        ("query", "pos", "neg", "scores"),
        ("anchor", "positive", "negative", "scores"),
    ),
    "embedding": (
        ("english", "non_english", "embedding"),
        ("anchor", "positive", "embedding"),
    ),
}
# How many records a dataset's layout may take to show up before start-up fails.
PEEK_RECORDS = 100
# What gzip raises on a file that is not gzip, is cut short, or has corrupt data.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
# Bytes that are not UTF-8, as read with errors="surrogateescape".
_UNDECODABLE = re.compile("[\udc80-\udcff]")


class BadRecord(Exception):
    """One malformed record; the message is the reason (the caller adds file and line)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """What a batch of this dataset looks like: the loss kind and the number of text columns."""

    kind: str  # "contrastive" (in-batch negatives) or a labelled kind (data_config.LABELLED_KINDS)
    columns: int

    def __str__(self) -> str:
        return f"{self.kind}/{self.columns}"


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """How to read texts out of one row of a dataset.

    Attributes:
      layout: the dataset's Layout.
      fields: None for a list of texts (a JSON list or an object's "texts" list), else the
        dict keys of the texts in column order (then the label key for a labelled kind).
      fixed_at: the line (or record) whose row fixed the layout, for messages.
      label_size: numbers in each row's teacher embedding (kind "embedding", fixed by the first
        row); None otherwise.
      negatives: k > 0: an (anchor, positive, negative) object row's texts are lists to sample
        one positive and k negatives from at every use (`sample_candidates`); 0: a list gives
        its first element.
    """

    layout: Layout
    fields: tuple[str, ...] | None
    fixed_at: int = 1
    label_size: int | None = None
    negatives: int = 0

    @property
    def is_margin(self) -> bool:
        return self.layout.kind == "margin"

    @property
    def is_labelled(self) -> bool:
        return self.layout.kind in LABELLED_KINDS


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: column 0 is the anchor, 1 the positive, 2.. hard negatives."""

    texts: tuple[str, ...]
    margin: float | tuple[float, ...] | None  # kind "margin": one per negative (a float for one)
    line: int  # line (files) or record number (Hugging Face, TFDS), 1-based
    label: tuple[float, ...] | None = None  # kinds "scores" and "embedding": the teacher's numbers
    # Sampled rows (RowSpec.negatives): every positive and every negative of the row.
    candidates: tuple[tuple[str, ...], tuple[str, ...]] | None = None


class Source(abc.ABC):
    """Raw records of one dataset, readable from any record index on."""

    @abc.abstractmethod
    def records(self, start: int) -> Iterator[tuple[int, Any]]:
        """Yields (line or record number, raw record) from record index `start` (0-based) on."""

    @abc.abstractmethod
    def decode(self, raw: Any) -> Any:
        """Turns a raw record into a row (list or dict); raises BadRecord."""

    @abc.abstractmethod
    def where(self, line: int) -> str:
        """Names a record for messages: file:line or dataset record number."""


def _open_binary(path) -> io.BufferedIOBase:
    """Opens a local or gs:// file, transparently un-gzipping `.gz` files."""
    raw = path.open("rb")
    if os.fspath(path).endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


def _damaged(path, line: int, error: Exception) -> MalformedDataError:
    """The error for a gzip file that cannot be read past `line` (lines read so far)."""
    name = os.fspath(path)
    whole = f"Replace it with a whole copy (`gzip -t {name}` tests one)."
    if isinstance(error, gzip.BadGzipFile) and str(error).startswith("Not a gzipped file"):
        return MalformedDataError(
            f"{name}: not a gzip file, although its name ends in .gz ({error}). Rename it "
            "without .gz if it is plain text, or compress it."
        )
    if isinstance(error, EOFError):
        return MalformedDataError(
            f"{name}: the gzip data ends early, after line {line}: the file is truncated "
            f"(an interrupted download or copy?). {whole} The run stops: the lines after the "
            "cut are unknown."
        )
    return MalformedDataError(f"{name}: corrupt gzip data after line {line} ({error}). {whole}")


class JsonlSource(Source):
    """One JSON value per line (plain or gzip)."""

    def __init__(self, path):
        self.path = path

    def records(self, start: int) -> Iterator[tuple[int, bytes]]:
        line = start
        try:
            with _open_binary(self.path) as f:
                for line, raw in enumerate(itertools.islice(f, start, None), start + 1):
                    yield line, raw
        except _GZIP_ERRORS as error:
            raise _damaged(self.path, line, error) from error

    def decode(self, raw: bytes) -> Any:
        if not raw.strip():
            raise BadRecord("empty line")
        try:
            return json.loads(raw)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise BadRecord(f"invalid JSON ({e})") from None

    def where(self, line: int) -> str:
        return f"{os.fspath(self.path)}:{line}"


class DelimitedSource(Source):
    """CSV (RFC 4180 quoting) or TSV (no quoting) with a header row naming the columns."""

    def __init__(self, path, delimiter: str):
        self.path = path
        self.delimiter = delimiter
        # TSV files of sentence pairs (STS benchmark, MS MARCO) contain bare quote characters;
        # quoting rules would merge lines, so TSV fields are taken verbatim.
        self.quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        self.header = self._read_header()

    def _reader(self, f):
        # Bytes that are not UTF-8 pass through as surrogates, so that decode() counts their
        # line as malformed (as in JSONL) instead of the text decoder stopping the file.
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        return csv.reader(text, delimiter=self.delimiter, quoting=self.quoting)

    def _read_header(self) -> tuple[str, ...]:
        try:
            with _open_binary(self.path) as f:
                header = next(self._reader(f), None)
        except _GZIP_ERRORS as error:
            raise _damaged(self.path, 0, error) from error
        if not header:
            raise DataConfigError(f"{os.fspath(self.path)}: the file is empty (no header row).")
        if any(_UNDECODABLE.search(name) for name in header):
            raise DataConfigError(f"{os.fspath(self.path)}:1: the header is not valid UTF-8.")
        return tuple(header)

    def records(self, start: int) -> Iterator[tuple[int, list[str]]]:
        reader = None
        try:
            with _open_binary(self.path) as f:
                reader = self._reader(f)
                next(reader, None)
                for row in itertools.islice(reader, start, None):
                    yield reader.line_num, row
        except _GZIP_ERRORS as error:
            raise _damaged(self.path, reader.line_num if reader else 0, error) from error

    def decode(self, raw: list[str]) -> dict[str, str]:
        if len(raw) != len(self.header):
            raise BadRecord(f"{len(raw)} columns, the header has {len(self.header)}")
        for column, text in enumerate(raw):
            if match := _UNDECODABLE.search(text):
                byte = ord(match.group()) - 0xDC00
                raise BadRecord(
                    f"invalid UTF-8 (byte 0x{byte:02x}) in column {column} "
                    f"({self.header[column]!r})"
                )
        return dict(zip(self.header, raw, strict=True))

    def where(self, line: int) -> str:
        return f"{os.fspath(self.path)}:{line}"


class HfSource(Source):
    """A Hugging Face dataset read with streaming=True: local files/folder or a Hub name."""

    _BUILDERS: ClassVar[dict[str, str]] = {
        ".json": "json",
        ".jsonl": "json",
        ".csv": "csv",
        ".parquet": "parquet",
        ".arrow": "arrow",
        ".txt": "text",
    }

    def __init__(self, entry: DatasetEntry):
        import datasets  # heavy import, only when a Hugging Face dataset is used

        self.label = f"{entry.location}[{entry.split}]"
        if entry.format == "hf_hub":
            self._dataset = datasets.load_dataset(
                entry.name, entry.config, split=entry.split, streaming=True
            )
        elif entry.path.is_dir():
            self._dataset = datasets.load_dataset(
                os.fspath(entry.path), split=entry.split, streaming=True
            )
        else:
            suffix = os.fspath(entry.path).removesuffix(".gz").rsplit(".", 1)[-1]
            builder = self._BUILDERS.get(f".{suffix.lower()}")
            if builder is None:
                raise DataConfigError(
                    f"{entry.label}: cannot read {entry.location} with Hugging Face datasets; "
                    f"use one of {sorted(self._BUILDERS)} or a folder."
                )
            self._dataset = datasets.load_dataset(
                builder, data_files=os.fspath(entry.path), split=entry.split, streaming=True
            )

    def records(self, start: int) -> Iterator[tuple[int, dict]]:
        dataset = self._dataset.skip(start) if start else self._dataset
        yield from enumerate(dataset, start + 1)

    def decode(self, raw: dict) -> dict:
        return raw

    def where(self, line: int) -> str:
        return f"{self.label} record {line}"


class TfdsSource(Source):
    """A TensorFlow Datasets dataset prepared under data_folder (optional extra)."""

    def __init__(self, entry: DatasetEntry, data_folder):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DataConfigError(
                f"{entry.label}: format 'tfds' needs tensorflow-datasets, which is not installed: "
                "pip install -r requirements-tfds.txt"
            ) from e
        self._tfds = tfds
        self._load = dict(
            name=entry.name, split=entry.split, data_dir=os.fspath(data_folder), shuffle_files=False
        )
        self.label = f"tfds:{entry.name}[{entry.split}]"

    def records(self, start: int) -> Iterator[tuple[int, dict]]:
        dataset = self._tfds.load(**self._load)
        yield from enumerate(self._tfds.as_numpy(dataset.skip(start)), start + 1)

    def decode(self, raw: dict) -> dict:
        return {k: _from_numpy(v) for k, v in raw.items()}

    def where(self, line: int) -> str:
        return f"{self.label} record {line}"


def _from_numpy(value: Any) -> Any:
    """TFDS yields bytes and numpy values; texts are UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_from_numpy(v) for v in value]
    return value


@contextlib.contextmanager
def _at_startup(entry: DatasetEntry) -> Iterator[None]:
    """A damaged file found at start-up is a data config error naming the entry."""
    try:
        yield
    except MalformedDataError as error:
        raise DataConfigError(f"{entry.label}: {error}") from error


def make_source(entry: DatasetEntry, data_folder) -> Source:
    """The Source for a data config entry."""
    if entry.format == "jsonl":
        return JsonlSource(entry.path)
    if entry.format in ("tsv", "csv"):
        with _at_startup(entry):
            return DelimitedSource(entry.path, "\t" if entry.format == "tsv" else ",")
    if entry.format in ("hf", "hf_hub"):
        return HfSource(entry)
    return TfdsSource(entry, data_folder)


def infer_row_spec(entry: DatasetEntry, source: Source, *, negatives_per_row: int = 0) -> RowSpec:
    """Fixes a dataset's layout from its first valid row (within PEEK_RECORDS records).

    With `negatives_per_row` k > 0, object rows of (anchor, positive[, negative]) fields get
    one positive and k negatives sampled per use (k negative columns when there is a negative
    field).

    Raises:
      DataConfigError: no valid row among the first records, naming the file and the reasons.
    """
    reasons = []
    records = source.records(0)
    try:
        with _at_startup(entry):
            for line, raw in itertools.islice(records, PEEK_RECORDS):
                try:
                    row = source.decode(raw)
                    spec = _sampled(_spec_from_row(entry, row, line), negatives_per_row)
                    parse_row(row, spec)
                    return spec
                except BadRecord as e:
                    reasons.append(f"{source.where(line)}: {e}")
    finally:
        records.close()
    detail = "; ".join(reasons[:3]) if reasons else "the dataset is empty"
    raise DataConfigError(
        f"{entry.label}: no valid row in the first {PEEK_RECORDS} records of {entry.location} "
        f"({detail}). See data/README.md for the accepted row shapes."
    )


def _spec_from_row(entry: DatasetEntry, row: Any, line: int) -> RowSpec:
    margin = entry.kind in LABELLED_KINDS  # the row ends in a teacher label
    kind = entry.kind if margin else "contrastive"
    if entry.fields is not None:
        fields = entry.fields
        columns = len(fields) - margin
    elif isinstance(row, list):
        fields, columns = None, len(row) - margin
    elif isinstance(row, dict) and "texts" in row:
        if not isinstance(row["texts"], list):
            raise BadRecord('"texts" is not a list')
        fields, columns = None, len(row["texts"]) - margin
    elif isinstance(row, dict):
        fields = next((f for f in KNOWN_FIELDS[kind] if set(f) <= set(row)), None)
        if fields is None:
            known = " or ".join(str(list(f)) for f in KNOWN_FIELDS[kind])
            raise BadRecord(
                f'keys {sorted(row)} are none of {known}: set "fields" in the data config'
            )
        columns = len(fields) - margin
    else:
        raise BadRecord(f"a row must be a JSON list or object, got {type(row).__name__}")
    expected = KIND_COLUMNS.get(entry.kind)
    if expected is not None and columns != expected:
        raise BadRecord(f"{columns} texts, kind {entry.kind!r} needs {expected}")
    if margin and fields is not None:
        # A list of negatives in a labelled row is kept whole: its label scores each of them.
        columns = sum(len(v) if isinstance(v, list) else 1 for v in _text_values(row, fields))
    if columns < 2:
        raise BadRecord(f"{columns} text(s): a row needs an anchor and a positive at least")
    if columns < LABELLED_KINDS.get(kind, 2):
        raise BadRecord(f"{columns} texts: a {kind} row needs at least {LABELLED_KINDS[kind]}")
    label_size = None
    if kind == "embedding":
        if fields is None:
            label = (row["texts"] if isinstance(row, dict) else row)[-1]
        else:
            label = row[fields[-1]]
        label_size = len(label) if isinstance(label, list) else None
    return RowSpec(Layout(kind, columns), fields, line, label_size)


def parse_row(row: Any, spec: RowSpec, line: int = 0) -> Example:
    """Reads the texts (and margin) of a decoded row from record `line`; raises BadRecord."""
    margin = spec.is_labelled
    if spec.fields is None:
        values = _text_list(row, spec)
    else:
        if not isinstance(row, dict):
            raise BadRecord(f"expected an object with keys {list(spec.fields)}{_fixed(spec)}")
        missing = [f for f in spec.fields if f not in row]
        if missing:
            raise BadRecord(f"missing key(s) {missing}{_fixed(spec)}")
        values = [row[f] for f in spec.fields]
        if spec.negatives:
            return _candidates_row(values, spec, line)
        if margin:
            values = _expand_lists(values, spec.layout.columns)
        else:
            # {"query", "pos": [...], "neg": [...]} rows list several candidates: take the first.
            values[: spec.layout.columns] = [_first(v) for v in values[: spec.layout.columns]]
    texts = tuple(values[: spec.layout.columns])
    for column, text in enumerate(texts):
        if not isinstance(text, str):
            hint = ""
            if isinstance(text, int | float) and column == len(texts) - 1 and not margin:
                hint = ' (a row ending in a teacher margin needs "kind": "margin")'
            raise BadRecord(f"column {column} is {type(text).__name__}, not a string{hint}")
        if not text.strip():
            raise BadRecord(f"column {column} is empty")
    if not margin:
        return Example(texts, None, line)
    if spec.is_margin:
        return Example(texts, _margins(values[-1], len(texts) - 2), line)
    return Example(texts, None, line, _label(values[-1], spec))


def _text_list(row: Any, spec: RowSpec) -> list:
    """The texts (and margin) of a row of a list layout: a JSON list or a "texts" list."""
    if isinstance(row, dict) and "texts" in row:
        row = row["texts"]
        if not isinstance(row, list):
            raise BadRecord('"texts" is not a list')
    elif not isinstance(row, list):
        raise BadRecord(
            f'expected a JSON list or an object with a "texts" list, got {type(row).__name__}'
            f"{_fixed(spec)}"
        )
    expected = spec.layout.columns + spec.is_labelled
    if len(row) != expected:
        # A row that would make a layout of its own conflicts with the file's; one with
        # fewer than 2 texts is merely short.
        conflict = len(row) - spec.is_labelled >= 2
        raise BadRecord(
            f"{len(row)} columns, expected {expected}{_fixed(spec) if conflict else ''}"
        )
    return row


def _fixed(spec: RowSpec) -> str:
    """Where a row's layout conflict comes from: the row that fixed the file's layout."""
    return f" (the layout was fixed from line {spec.fixed_at} of this file)"


def _first(value: Any) -> Any:
    if isinstance(value, list | tuple):
        if not value:
            raise BadRecord("an empty list where a text was expected")
        return value[0]
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, str):  # CSV/TSV cells
        try:
            value = float(value)
        except ValueError:
            raise BadRecord(f"{what} {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRecord(f"{what} {value!r} is not a finite number")
    return float(value)


def _text_values(row: dict, fields: tuple[str, ...]) -> list[Any]:
    missing = [f for f in fields if f not in row]
    if missing:
        raise BadRecord(f"missing key(s) {missing}")
    return [row[f] for f in fields[:-1]]


def _expand_lists(values: list[Any], columns: int) -> list[Any]:
    """Texts of a labelled dict row with list fields flattened (the label stays last)."""
    texts = [t for v in values[:-1] for t in (v if isinstance(v, list) else [v])]
    if len(texts) != columns:
        raise BadRecord(f"{len(texts)} texts, the dataset's first row had {columns}")
    return [*texts, values[-1]]


def _numbers(value: Any, what: str) -> tuple[float, ...]:
    values = list(value) if isinstance(value, list | tuple) else [value]
    if not values:
        raise BadRecord(f"the {what} label is an empty list")
    return tuple(_number(v, what) for v in values)


def _margins(value: Any, negatives: int) -> float | tuple[float, ...]:
    """A margin row's label as one margin per negative (a float when there is one negative).

    Accepts a number (one negative), k margins `score(pos) - score(neg_i)`, or the k + 1 teacher
    scores of the positive and each negative (sentence-transformers' two `MarginMSELoss` layouts).
    """
    margins = _numbers(value, "margin")
    if len(margins) == negatives + 1:
        margins = tuple(margins[0] - s for s in margins[1:])
    if len(margins) != negatives:
        raise BadRecord(
            f"{len(margins)} margin value(s) for {negatives} negative(s): give one margin per "
            "negative, or the teacher scores of the positive and of each negative"
        )
    return margins[0] if negatives == 1 else margins


def _label(value: Any, spec: RowSpec) -> tuple[float, ...]:
    """The teacher scores (one per candidate) or teacher embedding of a labelled row."""
    if not isinstance(value, list | tuple):
        raise BadRecord(f"the {spec.layout.kind} label must be a list of numbers, got {value!r}")
    numbers = _numbers(value, spec.layout.kind)
    expected = spec.layout.columns - 1 if spec.layout.kind == "scores" else spec.label_size
    if len(numbers) != expected:
        what = "one per candidate" if spec.layout.kind == "scores" else "the first row's size"
        raise BadRecord(f"{len(numbers)} {spec.layout.kind} numbers, expected {expected} ({what})")
    return numbers


def _sampled(spec: RowSpec, negatives: int) -> RowSpec:
    """The spec with sampling on, for the row layouts it applies to (else unchanged)."""
    sampled = negatives and not spec.is_labelled and spec.fields is not None
    if not sampled or spec.layout.columns > 3:
        return spec
    columns = 2 + negatives if spec.layout.columns == 3 else 2
    return dataclasses.replace(spec, layout=Layout(spec.layout.kind, columns), negatives=negatives)


def _candidate_texts(value: Any, column: int) -> tuple[str, ...]:
    texts = tuple(value) if isinstance(value, list | tuple) else (value,)
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise BadRecord(f"column {column} holds {text!r}, not a non-empty string")
    return texts


def _candidates_row(values: list[Any], spec: RowSpec, line: int) -> Example:
    """An example keeping every positive and negative of a row, for `sample_candidates`."""
    if not isinstance(values[0], str) or not values[0].strip():
        raise BadRecord(f"column 0 holds {values[0]!r}, not a non-empty string")
    query = values[0]
    positives = _candidate_texts(values[1], 1)
    negatives = _candidate_texts(values[2], 2) if len(values) > 2 else ()
    if not positives or (len(values) > 2 and not negatives):
        raise BadRecord("an empty list of positives or negatives")
    example = Example((query,), None, line, candidates=(positives, negatives))
    return sample_candidates(example, spec.negatives, None)


def sample_candidates(example: Example, negatives: int, rng) -> Example:
    """The example with one positive and `negatives` negatives drawn from its lists.

    As Tevatron's train_group_size - 1: negatives without replacement when the row has enough,
    else with replacement. The caller seeds `rng` from (seed, dataset, process, epoch, line), so
    every use draws afresh and a resumed run draws the same. `rng=None` takes the first ones (a
    placeholder until the stream draws).
    """
    positives, pool = example.candidates
    query = example.texts[0]
    if rng is None:
        positive, chosen = (
            positives[0],
            [pool[i % len(pool)] for i in range(negatives)] if pool else [],
        )
    else:
        positive = positives[rng.integers(len(positives))]
        chosen = []
        if pool:
            picks = rng.choice(len(pool), size=negatives, replace=len(pool) < negatives)
            chosen = [pool[i] for i in picks]
    return dataclasses.replace(example, texts=(query, positive, *chosen))
