"""Readers: every accepted row shape and format gives the hand-written texts; bad rows are bad."""

import gzip
import logging
import sys

import pytest
from test_data_support import write_lines

from embeddings.data import DataConfigError, load_data_config
from embeddings.data.readers import BadRecord, Layout, infer_row_spec, make_source, parse_row


def read_all(folder, entry: dict):
    """(layout, [(texts, margin, line)], [bad reasons]) of one data config entry."""
    (e,) = load_data_config([entry], folder)
    source = make_source(e, folder)
    spec = infer_row_spec(e, source)
    good, bad = [], []
    for line, raw in source.records(0):
        try:
            x = parse_row(source.decode(raw), spec, line)
            good.append((x.texts, x.margin, x.line))
        except BadRecord as reason:
            bad.append(f"{source.where(line)}: {reason}")
    return spec.layout, good, bad


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_list_rows_plain_and_gzip(tmp_path, name):
    write_lines(tmp_path / name, [["q1", "p1"], ["q2", "p2"]])
    layout, good, bad = read_all(tmp_path, {"name": name, "weight": 1})
    assert layout == Layout("contrastive", 2)
    assert good == [(("q1", "p1"), None, 1), (("q2", "p2"), None, 2)]
    assert bad == []
    with gzip.open(tmp_path / name) if name.endswith(".gz") else open(tmp_path / name, "rb") as f:
        assert f.read().count(b"\n") == 2


def test_list_rows_with_hard_negatives(tmp_path):
    write_lines(tmp_path / "t.jsonl", [["q", "p", "n1", "n2"]])
    layout, good, _ = read_all(tmp_path, {"name": "t.jsonl", "weight": 1})
    assert layout == Layout("contrastive", 4)
    assert good[0][0] == ("q", "p", "n1", "n2")


@pytest.mark.parametrize(
    "row, texts",
    [
        ({"texts": ["a", "b", "c"]}, ("a", "b", "c")),
        ({"query": "q", "pos": ["p1", "p2"], "neg": ["n1"]}, ("q", "p1", "n1")),
        ({"query": "q", "pos": "p"}, ("q", "p")),
        ({"anchor": "a", "positive": "p", "negative": "n"}, ("a", "p", "n")),
        ({"context": "how are you", "response": "fine", "id": 3}, ("how are you", "fine")),
    ],
)
def test_dict_rows_are_detected(tmp_path, row, texts):
    write_lines(tmp_path / "d.jsonl", [row])
    layout, good, _ = read_all(tmp_path, {"name": "d.jsonl", "weight": 1})
    assert good == [(texts, None, 1)]
    assert layout.columns == len(texts)


def test_dict_rows_with_fields(tmp_path):
    write_lines(tmp_path / "d.jsonl", [{"title": "t", "body": "b", "query": "ignored"}])
    _, good, _ = read_all(tmp_path, {"name": "d.jsonl", "weight": 1, "fields": ["title", "body"]})
    assert good == [(("t", "b"), None, 1)]


def test_unknown_dict_keys_need_fields(tmp_path):
    write_lines(tmp_path / "d.jsonl", [{"title": "t", "body": "b"}])
    with pytest.raises(DataConfigError, match=r'set "fields"') as error:
        read_all(tmp_path, {"name": "d.jsonl", "weight": 1})
    assert "d.jsonl:1" in str(error.value) and "entry 0 ('d.jsonl')" in str(error.value)


def test_margin_rows(tmp_path):
    write_lines(
        tmp_path / "m.jsonl",
        [["q", "p", "n", 1.5], {"texts": ["q2", "p2", "n2", -2]}, ["q3", "p3", "n3", "x"]],
    )
    write_lines(tmp_path / "d.jsonl", [{"query": "q", "pos": "p", "neg": "n", "margin": 0.25}])
    layout, good, bad = read_all(tmp_path, {"name": "m.jsonl", "weight": 1, "kind": "margin"})
    assert layout == Layout("margin", 3)
    assert good[0] == (("q", "p", "n"), 1.5, 1)
    assert len(good) == 1 and "expected an object" not in bad[0]
    assert "m.jsonl:3: margin 'x' is not a number" in bad[1]
    _, good, _ = read_all(tmp_path, {"name": "d.jsonl", "weight": 1, "kind": "margin"})
    assert good == [(("q", "p", "n"), 0.25, 1)]


def test_margin_rows_without_kind_say_what_to_set(tmp_path):
    write_lines(tmp_path / "m.jsonl", [["q", "p", "n", 1.5]])
    with pytest.raises(DataConfigError, match=r'needs "kind": "margin"'):
        read_all(tmp_path, {"name": "m.jsonl", "weight": 1})


def test_tsv_and_csv_with_named_columns(tmp_path):
    # A bare quote in a TSV field is text, not quoting; a CSV field may be quoted.
    (tmp_path / "p.tsv").write_text('id\tq\td\n1\tsay "hi"\tgreeting\n2\tonly two\n')
    (tmp_path / "p.csv").write_text('q,d,n,score\n"a, b",c,e,0.5\nx,"multi\nline",y,1\n')
    layout, good, bad = read_all(tmp_path, {"name": "p.tsv", "weight": 1, "fields": ["q", "d"]})
    assert layout == Layout("contrastive", 2)
    assert good == [(('say "hi"', "greeting"), None, 2)]
    assert bad == [f"{tmp_path / 'p.tsv'}:3: 2 columns, the header has 3"]
    _, good, _ = read_all(tmp_path, {"name": "p.csv", "weight": 1, "fields": ["q", "d"]})
    assert good == [(("a, b", "c"), None, 2), (("x", "multi\nline"), None, 4)]
    margin = {"name": "p.csv", "weight": 1, "fields": ["q", "d", "n", "score"], "kind": "margin"}
    _, good, _ = read_all(tmp_path, margin)
    assert good == [(("a, b", "c", "e"), 0.5, 2), (("x", "multi\nline", "y"), 1.0, 4)]


def test_bad_rows_are_reported(tmp_path):
    write_lines(
        tmp_path / "b.jsonl",
        [
            ["q", "p"],
            "{not json",
            ["q", "p", "n"],
            ["q", 3],
            ["q", "   "],
            "",
            {"texts": ["a", "b"]},
            ["q2", "p2"],
        ],
    )
    _, good, bad = read_all(tmp_path, {"name": "b.jsonl", "weight": 1})
    assert [g[2] for g in good] == [1, 8]
    path = tmp_path / "b.jsonl"
    assert [b.split(": ", 1)[0] for b in bad] == [f"{path}:{i}" for i in (2, 3, 4, 5, 6, 7)]
    assert "invalid JSON" in bad[0]
    assert "3 columns, expected 2" in bad[1]
    assert "column 1 is int" in bad[2]
    assert "column 1 is empty" in bad[3]
    assert "empty line" in bad[4]
    assert "expected a JSON list" in bad[5]


def test_no_valid_row_at_the_top_is_a_startup_error(tmp_path):
    write_lines(tmp_path / "b.jsonl", ["{oops"] * 120 + [["q", "p"]])
    with pytest.raises(DataConfigError, match=r"no valid row in the first 100 records") as error:
        read_all(tmp_path, {"name": "b.jsonl", "weight": 1})
    assert f"{tmp_path / 'b.jsonl'}:1: invalid JSON" in str(error.value)


def test_hugging_face_local_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"anchor": ["a1", "a2", "a3"], "positive": ["p1", "p2", "p3"]}),
        tmp_path / "x.parquet",
    )
    write_lines(tmp_path / "hf" / "part.jsonl", [{"question": "q", "answer": "a"}])
    layout, good, _ = read_all(tmp_path, {"name": "x.parquet", "weight": 1, "format": "hf"})
    assert layout == Layout("contrastive", 2)
    assert good == [(("a1", "p1"), None, 1), (("a2", "p2"), None, 2), (("a3", "p3"), None, 3)]
    (e,) = load_data_config([{"name": "x.parquet", "weight": 1}], tmp_path)
    assert [raw["anchor"] for _, raw in make_source(e, tmp_path).records(2)] == ["a3"]
    _, good, _ = read_all(tmp_path, {"name": "hf", "weight": 1, "format": "hf"})
    assert good == [(("q", "a"), None, 1)]


def test_tfds_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    (e,) = load_data_config([{"name": "my_set", "weight": 1, "format": "tfds"}], tmp_path)
    with pytest.raises(DataConfigError, match=r"requirements-tfds\.txt"):
        make_source(e, tmp_path)


def test_bad_lines_are_logged_with_file_and_line(tmp_path, caplog):
    from embeddings.data.bad_lines import BadLineTracker

    tracker = BadLineTracker("f.jsonl", max_share=0.5, min_lines=1)
    with caplog.at_level(logging.WARNING):
        tracker.add(10, ["f.jsonl:3: invalid JSON", "f.jsonl:7: column 1 is empty"], True)
    assert "f.jsonl:3: invalid JSON" in caplog.text and "2 malformed line(s) of 10" in caplog.text
    assert tracker.samples == ["f.jsonl:3: invalid JSON", "f.jsonl:7: column 1 is empty"]
