"""Rows with lists of positives and negatives: one positive and k negatives drawn per use.

Checked as properties: the draw is a function of (seed, epoch, line) only (same seed, same
draws; a resumed stream draws what the uninterrupted one did; another epoch draws afresh), and
over many uses every positive and every negative appears at its expected rate.
"""

import json

import numpy as np
import pytest

from embeddings.data.bad_lines import BadLineTracker
from embeddings.data.data_config import load_data_config
from embeddings.data.readers import Layout, infer_row_spec, make_source
from embeddings.data.shuffle import ShuffledStream


def write_rows(folder, rows, name="rows.jsonl"):
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return name


def stream(folder, name, negatives, *, seed=0, chunk=1000):
    (entry,) = load_data_config([{"name": name, "weight": 1}], folder)
    source = make_source(entry, folder)
    spec = infer_row_spec(entry, source, negatives_per_row=negatives)
    tracker = BadLineTracker(entry.location, 0.9, 1000)
    return spec, ShuffledStream(
        source,
        spec,
        chunk_size=chunk,
        seed=seed,
        dataset_index=0,
        process_index=0,
        process_count=1,
        tracker=tracker,
    )


def query_rows(n=20, positives=3, negatives=5):
    return [
        {
            "query": f"q{i}",
            "pos": [f"p{i}-{j}" for j in range(positives)],
            "neg": [f"n{i}-{j}" for j in range(negatives)],
        }
        for i in range(n)
    ]


def test_layout_has_k_negative_columns_and_zero_keeps_the_first(tmp_path):
    name = write_rows(tmp_path, query_rows())
    spec, s = stream(tmp_path, name, 3)
    assert spec.layout == Layout("contrastive", 5)
    texts = s.next().texts
    i = texts[0][1:]
    assert texts[1] in {f"p{i}-{j}" for j in range(3)}
    assert len(set(texts[2:])) == 3 and set(texts[2:]) <= {f"n{i}-{j}" for j in range(5)}
    spec, s = stream(tmp_path, name, 0)
    assert spec.layout == Layout("contrastive", 3)
    texts = s.next().texts
    assert texts[1:] == (f"p{texts[0][1:]}-0", f"n{texts[0][1:]}-0")


def test_pairs_rows_sample_the_positive_only(tmp_path):
    rows = [{"query": f"q{i}", "pos": [f"p{i}-0", f"p{i}-1"]} for i in range(10)]
    spec, s = stream(tmp_path, write_rows(tmp_path, rows), 4)
    assert spec.layout == Layout("contrastive", 2)
    seen = {s.next().texts[1][-1] for _ in range(200)}
    assert seen == {"0", "1"}


def test_draws_depend_on_seed_epoch_and_line_only(tmp_path):
    name = write_rows(tmp_path, query_rows())
    first = [stream(tmp_path, name, 2, seed=s)[1] for s in (0, 0, 1)]
    runs = [[x.next().texts for _ in range(60)] for x in first]  # three epochs of 20 rows
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    by_epoch = [{t[0]: t[1:] for t in runs[0][e * 20 : (e + 1) * 20]} for e in range(3)]
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]  # each use draws afresh

    # A stream restored mid-epoch (another chunk size would not matter: the rows fit) draws
    # exactly what the uninterrupted one drew.
    _, a = stream(tmp_path, name, 2)
    head = [a.next().texts for _ in range(27)]
    state = a.get_state()
    _, b = stream(tmp_path, name, 2)
    b.set_state(state)
    assert head == runs[0][:27]
    assert [b.next().texts for _ in range(33)] == runs[0][27:]


def test_draws_are_uniform_over_the_lists(tmp_path):
    rows = query_rows(n=1, positives=3, negatives=5)
    _, s = stream(tmp_path, write_rows(tmp_path, rows), 2)
    uses = 3000
    draws = [s.next().texts for _ in range(uses)]
    positives = np.array([[t[1] == f"p0-{j}" for j in range(3)] for t in draws]).mean(0)
    negatives = np.array([[f"n0-{j}" in t[2:] for j in range(5)] for t in draws]).mean(0)
    # Expected 1/3 and 2/5; 5 standard errors of a binomial share over 3000 uses.
    np.testing.assert_allclose(positives, 1 / 3, atol=5 * np.sqrt(2 / 9 / uses))
    np.testing.assert_allclose(negatives, 2 / 5, atol=5 * np.sqrt(0.24 / uses))
    assert all(len(set(t[2:])) == 2 for t in draws)  # without replacement: enough negatives


def test_short_negative_lists_repeat_and_bad_candidates_are_malformed(tmp_path):
    rows = [
        {"query": "q0", "pos": ["p0"], "neg": ["n0"]},
        {"query": "q1", "pos": [], "neg": ["n1"]},
        {"query": "q2", "pos": ["p2"], "neg": ["n2", 3]},
    ]
    (entry,) = load_data_config([{"name": write_rows(tmp_path, rows), "weight": 1}], tmp_path)
    source = make_source(entry, tmp_path)
    spec = infer_row_spec(entry, source, negatives_per_row=2)
    from embeddings.data.readers import BadRecord, parse_row

    records = list(source.records(0))
    assert parse_row(source.decode(records[0][1]), spec, 1).candidates == (("p0",), ("n0",))
    for line, raw in records[1:]:
        with pytest.raises(BadRecord):
            parse_row(source.decode(raw), spec, line)
    _, s = stream(tmp_path, "rows.jsonl", 2)
    assert s.next().texts == ("q0", "p0", "n0", "n0")  # with replacement (Tevatron)
