"""Reading evaluation files (local or gs://, gzipped or not), with errors that name the file."""

import gzip
import json
from collections.abc import Iterator

from etils import epath


def read_text(path, config_key: str) -> str:
    """The whole UTF-8 text of a local or gs:// file, gunzipped when its name ends in .gz.

    Args:
      path: the file.
      config_key: the config field that names the file, for the error message.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (set by {config_key}).")
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8")


def read_jsonl(path, config_key: str) -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line of a JSONL file; `where` is "FILE, line N".

    Raises:
      ValueError: on a line that is not a JSON object, named by file and line number.
    """
    for number, line in enumerate(read_text(path, config_key).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err}).") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
        yield where, row


def text_field(row: dict, key: str, where: str) -> str:
    """row[key], which must be a non-empty string."""
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: key {key!r} is missing or not a non-empty string.")
    return value
