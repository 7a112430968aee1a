"""Shared helpers of the input-pipeline tests (tests/test_data_*.py); it holds no tests.

Synthetic datasets use texts that name their dataset, line and column
("d1 l17 c0"), so every test can tell where a row came from without trusting the
pipeline's own bookkeeping.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "data" / "tokenizers" / "bert-uncased"

_TEXT = re.compile(r"^d(\d+) l(\d+) c(\d+)")


@functools.cache
def bert_tokenizer():
    """The bundled BERT uncased fast tokenizer (loaded once per test process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def synthetic_rows(dataset: int, lines: int, columns: int = 2) -> list[list[str]]:
    """`lines` list rows of unique texts "d{dataset} l{line} c{column} ..." (lines 1-based)."""
    return [
        [
            f"d{dataset} l{line} c{column} {'word ' * (line % 7)}".strip()
            for column in range(columns)
        ]
        for line in range(1, lines + 1)
    ]


def origin(text: str) -> tuple[int, int, int]:
    """(dataset, line, column) encoded in a synthetic text."""
    match = _TEXT.match(text)
    assert match, text
    return tuple(int(x) for x in match.groups())


def write_lines(path: Path, lines: list) -> Path:
    """Writes one JSON value per line (strings are written verbatim); gzip if path ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(body)
    else:
        path.write_text(body, encoding="utf-8")
    return path


def decode_rows(batch: dict, tokenizer, column: int = 0) -> list[str]:
    """The texts of one column of a batch, decoded back from the token ids."""
    ids, mask = batch["input_ids"][column], batch["attention_mask"][column]
    return [
        tokenizer.decode(row[m.astype(bool)], skip_special_tokens=True)
        for row, m in zip(ids, mask, strict=True)
    ]


def row_origins(batch: dict, tokenizer) -> list[tuple[int, int]]:
    """(dataset, line) of every row, read from the decoded anchor text."""
    return [origin(text)[:2] for text in decode_rows(batch, tokenizer, 0)]


def make_pipeline(folder: Path, datasets: list[tuple[list, float, dict]], **settings):
    """An InputPipeline over synthetic files d0.jsonl, d1.jsonl, ... written to `folder`.

    Args:
      folder: the data folder.
      datasets: (rows, weight, extra data-config keys) per dataset.
      **settings: InputPipeline arguments overriding small test defaults.
    """
    from embeddings.data import InputPipeline

    config = []
    for i, (rows, weight, extra) in enumerate(datasets):
        write_lines(folder / f"d{i}.jsonl", rows)
        config.append({"name": f"d{i}.jsonl", "weight": weight, **extra})
    arguments = dict(
        data_config=config,
        data_folder=folder,
        tokenizer=bert_tokenizer(),
        batch_size=8,
        datasets_per_batch=2,
        max_length_anchor=32,
        max_length_document=32,
        buckets=(8, 16, 32),
        shuffle_buffer=1000,
        prefetch=2,
    )
    return InputPipeline(**(arguments | settings))
