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
    # A "texts" row in a file of list rows is read too (issue 17.13).
    assert good[1] == (("q2", "p2", "n2"), -2.0, 2) and len(good) == 2
    assert len(bad) == 1 and "m.jsonl:3: margin 'x' is not a number" in bad[0]
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
    # Line 7, a "texts" row among list rows, is good (issue 17.13).
    assert [g[2] for g in good] == [1, 7, 8]
    path = tmp_path / "b.jsonl"
    assert [b.split(": ", 1)[0] for b in bad] == [f"{path}:{i}" for i in (2, 3, 4, 5, 6)]
    assert "invalid JSON" in bad[0]
    assert "3 columns, expected 2" in bad[1]
    assert "column 1 is int" in bad[2]
    assert "column 1 is empty" in bad[3]
    assert "empty line" in bad[4]


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


def test_a_gz_name_on_a_plain_file_names_the_file_and_the_entry(tmp_path):
    (tmp_path / "plain.jsonl.gz").write_text('["q", "p"]\n')
    (tmp_path / "plain.tsv.gz").write_text("q\tp\nq1\tp1\n")
    with pytest.raises(DataConfigError) as error:
        read_all(tmp_path, {"name": "plain.jsonl.gz", "weight": 1})
    message = str(error.value)
    assert str(tmp_path / "plain.jsonl.gz") in message and "not a gzip file" in message
    assert "entry 0 ('plain.jsonl.gz')" in message
    with pytest.raises(DataConfigError) as error:  # TSV reads its header when the source opens
        read_all(tmp_path, {"name": "plain.tsv.gz", "weight": 1, "fields": ["q", "p"]})
    assert str(tmp_path / "plain.tsv.gz") in str(error.value)
    assert "entry 0 ('plain.tsv.gz')" in str(error.value)


def complete_lines_of_truncated_gzip(data: bytes) -> int:
    """Lines that a reader can recover from a cut gzip stream (zlib, independent of the code)."""
    import zlib

    return zlib.decompressobj(wbits=31).decompress(data).count(b"\n")


@pytest.mark.parametrize("name, fields", [("cut.jsonl.gz", None), ("cut.tsv.gz", ["q", "p"])])
def test_a_truncated_gzip_file_stops_with_the_file_and_the_line_reached(tmp_path, name, fields):
    from embeddings.data import MalformedDataError

    path = tmp_path / name
    if name.endswith(".tsv.gz"):
        with gzip.open(path, "wt") as f:
            f.write("q\tp\n" + "".join(f"query {i} {i * i}\tpassage {i}\n" for i in range(5000)))
    else:
        write_lines(path, [[f"query {i} {i * i}", f"passage {i}"] for i in range(5000)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    complete = complete_lines_of_truncated_gzip(data[: len(data) // 2])
    assert 100 < complete < 5000
    entry = {"name": name, "weight": 1} | ({"fields": fields} if fields else {})
    with pytest.raises(MalformedDataError) as error:
        read_all(tmp_path, entry)  # start-up sees the good top; reading on finds the cut
    message = str(error.value)
    assert str(path) in message and "truncated" in message
    assert f"after line {complete}" in message  # physical lines, the header included


@pytest.mark.parametrize("name, delimiter", [("u.tsv", "\t"), ("u.csv", ",")])
def test_invalid_utf8_in_tsv_and_csv_is_a_bad_line(tmp_path, name, delimiter):
    lines = [b"q", b"d"], [b"one", b"first"], [b"bad \xff byte", b"x"], [b"two", b"caf\xc3\xa9"]
    (tmp_path / name).write_bytes(b"".join(delimiter.encode().join(x) + b"\n" for x in lines))
    _, good, bad = read_all(tmp_path, {"name": name, "weight": 1, "fields": ["q", "d"]})
    assert good == [(("one", "first"), None, 2), (("two", "café"), None, 4)]
    assert len(bad) == 1 and bad[0].startswith(f"{tmp_path / name}:3: ")
    assert "invalid UTF-8" in bad[0] and "column 0" in bad[0]


def test_list_rows_and_texts_rows_mix_in_one_file(tmp_path):
    # The original training script read either shape on any line of a file.
    write_lines(tmp_path / "m.jsonl", [["q1", "p1"], {"texts": ["q2", "p2"]}, ["q3", "p3"]])
    write_lines(tmp_path / "t.jsonl", [{"texts": ["q1", "p1"]}, ["q2", "p2"]])
    expected = {
        "m.jsonl": [("q1", "p1"), ("q2", "p2"), ("q3", "p3")],
        "t.jsonl": [("q1", "p1"), ("q2", "p2")],
    }
    for name, texts in expected.items():
        layout, good, bad = read_all(tmp_path, {"name": name, "weight": 1})
        assert layout == Layout("contrastive", 2) and bad == []
        assert [t for t, _, _ in good] == texts


def test_a_conflicting_layout_says_which_line_fixed_it(tmp_path):
    write_lines(
        tmp_path / "c.jsonl",
        ["{broken", ["q", "p"], {"texts": ["a", "b", "c"]}, {"query": "q", "pos": "p"}],
    )
    write_lines(tmp_path / "n.jsonl", [{"query": "q", "pos": "p"}, ["q", "p"]])
    _, good, bad = read_all(tmp_path, {"name": "c.jsonl", "weight": 1})
    assert [line for _, _, line in good] == [2]
    assert len(bad) == 3
    for reason in bad[1:]:
        assert "fixed from line 2 of this file" in reason  # line 1 is not a valid row
    assert "3 columns, expected 2" in bad[1]
    _, good, bad = read_all(tmp_path, {"name": "n.jsonl", "weight": 1})
    assert len(good) == 1 and len(bad) == 1
    assert "fixed from line 1 of this file" in bad[0] and "['query', 'pos']" in bad[0]


def test_corrupt_gzip_data_names_the_file_and_the_line_reached(tmp_path):
    from embeddings.data import MalformedDataError

    path = write_lines(
        tmp_path / "bad.jsonl.gz", [[f"query {i} {i * i}", f"passage {i}"] for i in range(5000)]
    )
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # zeros over a stretch of deflate data
    path.write_bytes(bytes(data))
    with pytest.raises(MalformedDataError) as error:
        read_all(tmp_path, {"name": "bad.jsonl.gz", "weight": 1})
    message = str(error.value)
    # zlib may decode the damaged stretch into garbage; gzip's CRC then fails at the end.
    assert str(path) in message and "corrupt gzip data after line" in message
    line = int(message.split("after line ")[1].split()[0])
    assert 100 < line <= 5000  # the good top of the file was read
