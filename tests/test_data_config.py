"""data_config.json parsing: the original format unchanged, optional keys, start-up errors."""

import json

import pytest
from test_data_support import REPO, synthetic_rows, write_lines

from embeddings.data import DataConfigError, load_data_config


@pytest.fixture
def folder(tmp_path):
    write_lines(tmp_path / "data" / "a.jsonl.gz", synthetic_rows(0, 3))
    write_lines(tmp_path / "data" / "sub" / "b.jsonl", synthetic_rows(1, 3))
    (tmp_path / "data" / "c.tsv").write_text("q\td\nx\ty\n")
    (tmp_path / "outside.jsonl").write_text('["a", "b"]\n')
    return tmp_path / "data"


def test_original_format_is_accepted_unchanged(folder, tmp_path):
    config = tmp_path / "data_config.json"
    original = [
        {"name": "a.jsonl.gz", "lines": 3, "weight": 1},
        {"name": "sub/b.jsonl", "lines": 3, "weight": 2.5},
    ]
    config.write_text(json.dumps(original))
    entries = load_data_config(str(config), str(folder))
    assert [(e.index, e.name, e.lines, e.weight, e.format) for e in entries] == [
        (0, "a.jsonl.gz", 3, 1.0, "jsonl"),
        (1, "sub/b.jsonl", 3, 2.5, "jsonl"),
    ]
    assert str(entries[1].path) == str(folder / "sub" / "b.jsonl")
    assert entries[0].kind is None and entries[0].fields is None


def test_optional_keys(folder):
    entries = load_data_config(
        [
            {
                "name": "c.tsv",
                "weight": 1,
                "fields": ["q", "d"],
                "kind": "pairs",
                "max_length_anchor": 32,
                "max_length_document": 256,
            },
            {"name": "org/set", "weight": 1, "format": "hf_hub", "config": "triplet"},
        ],
        folder,
    )
    tsv, hub = entries
    assert (tsv.format, tsv.fields, tsv.kind) == ("tsv", ("q", "d"), "pairs")
    assert (tsv.max_length_anchor, tsv.max_length_document) == (32, 256)
    assert (hub.format, hub.split, hub.config, hub.path) == ("hf_hub", "train", "triplet", None)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"name": "a.jsonl.gz", "weight": 1, "colour": 2}, "unknown key(s) ['colour']"),
        ({"name": "a.jsonl.gz", "weight": 0}, '"weight" must be positive'),
        ({"name": "a.jsonl.gz", "weight": -3}, '"weight" must be positive'),
        ({"name": "a.jsonl.gz", "weight": "1"}, '"weight" must be a positive number'),
        ({"name": "a.jsonl.gz"}, '"weight" must be a positive number'),
        ({"name": "missing.jsonl.gz", "weight": 1}, "file not found"),
        ({"name": "../outside.jsonl", "weight": 1}, "escapes data_folder"),
        ({"name": "sub/../../outside.jsonl", "weight": 1}, "escapes data_folder"),
        ({"name": "/etc/passwd.jsonl", "weight": 1}, "relative to data_folder"),
        ({"name": "gs://bucket/x.jsonl", "weight": 1}, "relative to data_folder"),
        ({"name": "a.bin", "weight": 1}, 'set "format"'),
        ({"name": "a.jsonl.gz", "weight": 1, "format": "xml"}, '"format" must be one of'),
        ({"name": "a.jsonl.gz", "weight": 1, "kind": "quads"}, '"kind" must be one of'),
        ({"name": "a.jsonl.gz", "weight": 1, "split": "dev"}, '"split" applies to'),
        ({"name": "a.jsonl.gz", "weight": 1, "kind": "pairs", "fields": ["a"]}, "needs 2"),
        (
            {"name": "a.jsonl.gz", "weight": 1, "kind": "margin", "fields": ["q", "p", "n"]},
            "margin",
        ),
        ({"name": "a.jsonl.gz", "weight": 1, "max_length_anchor": 1}, "integer >= 2"),
        ({"name": "a.jsonl.gz", "weight": 1, "lines": -1}, '"lines" must be'),
    ],
)
def test_bad_entries_name_the_entry(folder, entry, message):
    good = {"name": "sub/b.jsonl", "weight": 1}
    with pytest.raises(DataConfigError) as error:
        load_data_config([good, entry], folder)
    text = str(error.value)
    assert message in text
    assert f"entry 1 ({entry['name']!r})" in text
    if message == "file not found":
        assert str(folder / "missing.jsonl.gz") in text


def test_file_level_errors(folder, tmp_path):
    with pytest.raises(DataConfigError, match="not found"):
        load_data_config(str(tmp_path / "nope.json"), folder)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"name": "a.jsonl.gz", "weight": 1},]')
    with pytest.raises(DataConfigError, match=r"broken.json is not valid JSON"):
        load_data_config(str(broken), folder)
    with pytest.raises(DataConfigError, match="non-empty JSON list"):
        load_data_config([], folder)
    with pytest.raises(DataConfigError, match="entry 0 is str"):
        load_data_config(["a.jsonl.gz"], folder)
    with pytest.raises(DataConfigError, match=r"data_folder .* does not exist"):
        load_data_config([{"name": "a.jsonl.gz", "weight": 1}], tmp_path / "nowhere")


def test_project_data_config_covers_the_bundled_data():
    """The shipped mixture: the 58 Debian sections (weight = lines, floor 200) and STS pairs."""
    entries = load_data_config(str(REPO / "data_config.json"), str(REPO / "data"))
    sections = json.loads((REPO / "data" / "debian" / "sections.json").read_text())
    by_name = {e.name: e for e in entries}
    assert len(entries) == len(sections) + 1 == 59
    for section in sections:
        entry = by_name[section["name"]]
        assert entry.lines == section["lines"]
        assert entry.weight == max(section["lines"], 200)
    sts = by_name["sts/stsb_train_score4.jsonl.gz"]
    assert sts.weight == sts.lines > 1000
