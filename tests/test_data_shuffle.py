"""Shuffled streams: a permutation every epoch, bounded memory, disjoint process shares, resume."""

import json

import pytest
from test_data_support import origin, synthetic_rows, write_lines

from embeddings.data import MalformedDataError, load_data_config
from embeddings.data.bad_lines import BadLineTracker
from embeddings.data.readers import infer_row_spec, make_source
from embeddings.data.shuffle import ShuffledStream


def make_stream(path, *, chunk, seed=0, process=0, processes=1, max_share=1.0, min_lines=1):
    (entry,) = load_data_config([{"name": path.name, "weight": 1}], path.parent)
    source = make_source(entry, path.parent)
    return ShuffledStream(
        source,
        infer_row_spec(entry, source),
        chunk_size=chunk,
        seed=seed,
        dataset_index=0,
        process_index=process,
        process_count=processes,
        tracker=BadLineTracker(entry.location, max_share, min_lines),
    )


def lines_of(stream, n):
    return [origin(stream.next().texts[0])[1] for _ in range(n)]


@pytest.fixture
def file50(tmp_path):
    return write_lines(tmp_path / "d.jsonl.gz", synthetic_rows(0, 50))


@pytest.mark.parametrize("chunk", [7, 50, 1000])
def test_every_epoch_is_a_new_permutation(file50, chunk):
    stream = make_stream(file50, chunk=chunk)
    epochs = [lines_of(stream, 50) for _ in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(1, 51))
    assert epochs[0] != list(range(1, 51))
    assert len({tuple(order) for order in epochs}) == 4


def test_memory_is_one_chunk(file50):
    stream = make_stream(file50, chunk=7)
    held = []
    for _ in range(200):
        stream.next()
        held.append(len(stream._chunk or ()))
    assert max(held) <= 7
    assert stream._cache is None  # a file larger than a chunk is never kept whole


def test_chunk_boundaries_move_between_epochs(file50):
    """Each epoch's first chunk has a random length, so neighbours change from epoch to epoch."""
    stream = make_stream(file50, chunk=10)
    epochs = [lines_of(stream, 50) for _ in range(6)]
    assert set(epochs[0][:10]) == set(range(1, 11))  # epoch 0: chunks of 10 lines from the top

    def first_block(order):  # the shortest prefix that is lines 1..m: the first chunk's end
        return next(m for m in range(1, 51) if set(order[:m]) == set(range(1, m + 1)))

    assert len({first_block(order) for order in epochs[1:]}) > 1


def test_deterministic_from_the_seed(file50):
    assert lines_of(make_stream(file50, chunk=7), 120) == lines_of(
        make_stream(file50, chunk=7), 120
    )
    assert lines_of(make_stream(file50, chunk=7), 120) != lines_of(
        make_stream(file50, chunk=7, seed=1), 120
    )


@pytest.mark.parametrize("chunk", [4, 1000])
def test_processes_read_disjoint_lines(file50, chunk):
    processes = 3
    seen = []
    for p in range(processes):
        stream = make_stream(file50, chunk=chunk, process=p, processes=processes)
        share = len(range(p, 50, processes))
        lines = lines_of(stream, 2 * share)  # two epochs
        assert sorted(lines[:share]) == sorted(lines[share:])
        assert all((line - 1) % processes == p for line in lines)
        seen += lines[:share]
    assert sorted(seen) == list(range(1, 51))


@pytest.mark.parametrize("chunk", [6, 1000])
def test_resume_continues_exactly(file50, chunk):
    reference = lines_of(make_stream(file50, chunk=chunk), 400)
    for cut in (0, 1, 6, 49, 50, 51, 173, 299):
        stream = make_stream(file50, chunk=chunk)
        assert lines_of(stream, cut) == reference[:cut]
        state = json.loads(json.dumps(stream.get_state()))
        restored = make_stream(file50, chunk=chunk)
        restored.set_state(state)
        assert lines_of(restored, 400 - cut) == reference[cut:], cut


def test_restore_reads_at_most_one_pass_of_the_file(tmp_path):
    path = write_lines(tmp_path / "big.jsonl.gz", synthetic_rows(0, 1000))
    stream = make_stream(path, chunk=100)
    lines_of(stream, 5 * 1000 + 950)  # late in the sixth epoch
    restored = make_stream(path, chunk=100)
    restored.set_state(stream.get_state())
    assert lines_of(restored, 1) == lines_of(stream, 1)
    assert restored.records_scanned <= 1000


def test_bad_lines_are_counted_once_and_enforced(tmp_path):
    rows = synthetic_rows(0, 40)
    rows[9] = "{broken"
    rows[19] = ["only one column"]
    path = write_lines(tmp_path / "b.jsonl", rows)
    stream = make_stream(path, chunk=8, max_share=0.1)
    assert len(lines_of(stream, 38 * 3)) == 114  # three epochs of the 38 good lines
    state = stream.get_state()
    assert (state["checked"], state["bad"]) == (40, 2)
    assert stream._tracker.samples == [
        f"{path}:10: invalid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
        f"{path}:20: 1 columns, expected 2",
    ]
    strict = make_stream(path, chunk=8, max_share=0.01, min_lines=16)
    with pytest.raises(MalformedDataError, match=r"b.jsonl: 1 of 16 lines read are malformed"):
        lines_of(strict, 38)


def test_a_process_without_valid_lines_fails_clearly(tmp_path):
    path = write_lines(tmp_path / "one.jsonl", synthetic_rows(0, 1))
    assert lines_of(make_stream(path, chunk=8, process=0, processes=2), 3) == [1, 1, 1]
    with pytest.raises(MalformedDataError, match=r"one.jsonl: no valid example .* process 1 of 2"):
        make_stream(path, chunk=8, process=1, processes=2).next()
