"""The assembled pipeline: tokenization, buckets, hashes, resume, prefetch, stats, config."""

import json
import os
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest
from test_data_support import (
    REPO,
    bert_tokenizer,
    decode_rows,
    make_pipeline,
    origin,
    synthetic_rows,
    write_lines,
)

from embeddings.data import InputPipeline, MalformedDataError, build_pipeline, text_hash
from embeddings.data.tokenize import BatchTokenizer, Collator


def varied_rows(dataset: int, lines: int) -> list[list[str]]:
    """Rows whose texts range from a few tokens to far beyond every limit."""
    rng = np.random.default_rng(dataset)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [
        [
            f"d{dataset} l{line} c{column} " + " ".join(rng.choice(words, rng.integers(0, 40)))
            for column in range(3)
        ]
        for line in range(1, lines + 1)
    ]


def check_against_transformers(batch, rows_by_line, limits, buckets):
    """Each column equals transformers' own truncation, padded to the expected bucket."""
    tokenizer = bert_tokenizer()
    lines = [origin(t) for t in decode_rows(batch, tokenizer, 0)]
    for column, (ids, mask) in enumerate(
        zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ):
        assert ids.dtype == mask.dtype == np.int32
        references = []
        for dataset, line, _ in lines:
            limit = limits[dataset][0 if column == 0 else 1]
            text = rows_by_line[dataset][line - 1][column]
            references.append(tokenizer(text, truncation=True, max_length=limit)["input_ids"])
        longest = max(map(len, references))
        expected_width = next(
            (b for b in buckets if b >= longest),
            max(limits[d][0 if column == 0 else 1] for d, _, _ in lines),
        )
        assert ids.shape == (len(lines), expected_width)
        for row, reference in enumerate(references):
            assert ids[row, : len(reference)].tolist() == reference
            assert (ids[row, len(reference) :] == tokenizer.pad_token_id).all()
            assert mask[row].tolist() == [1] * len(reference) + [0] * (
                expected_width - len(reference)
            )


@pytest.mark.parametrize("buckets", [(8, 16), ()])
def test_tokenization_matches_transformers(tmp_path, buckets):
    rows = varied_rows(0, 60)
    limits = {0: (12, 20)}
    with make_pipeline(
        tmp_path,
        [(rows, 1, {})],
        batch_size=6,
        max_length_anchor=12,
        max_length_document=20,
        buckets=buckets,
    ) as pipeline:
        for _ in range(12):
            check_against_transformers(next(pipeline), {0: rows}, limits, buckets)


def test_per_dataset_max_lengths(tmp_path):
    rows = {0: varied_rows(0, 40), 1: varied_rows(1, 40)}
    limits = {0: (10, 24), 1: (16, 12)}
    datasets = [
        (rows[0], 1, {"max_length_anchor": 10, "max_length_document": 24}),
        (rows[1], 1, {"max_length_anchor": 16, "max_length_document": 12}),
    ]
    with make_pipeline(tmp_path, datasets, batch_size=8, buckets=(8, 12)) as pipeline:
        for _ in range(15):
            check_against_transformers(next(pipeline), rows, limits, (8, 12))


def long_texts(seed: int, count: int) -> list[str]:
    """Long random texts mixing scripts, punctuation, control characters and odd whitespace."""
    rng = np.random.default_rng(seed)
    pieces = ["alpha", "Beta", "ünïcödé", "日本語のテキスト", "!!?", "x" * 30, "\x00\x00", "a\x1cb"]
    pieces += ["naïve", "3.14", "don't", "e-mail", "\u200b", "Ωmega"]
    separators = [" ", "  ", "\n", "\t", " \r\n ", "\u3000", "\xa0"]
    texts = [
        "".join(rng.choice(pieces) + rng.choice(separators) for _ in range(rng.integers(1, 400)))
        for _ in range(count)
    ]
    # Words that normalise to nothing first: the cut text is short and must be redone whole.
    texts.append("\x00 " * 300 + "the words that count come last " * 20)
    return texts


@pytest.mark.parametrize("limit", [8, 40])
def test_long_texts_are_cut_exactly(limit):
    tokenizer = bert_tokenizer()
    texts = long_texts(limit, 60)
    expected = [tokenizer(t, truncation=True, max_length=limit)["input_ids"] for t in texts]
    assert BatchTokenizer(tokenizer).encode(texts, limit) == expected


def test_long_texts_are_cut_exactly_with_byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(long_texts(0, 40), trainer)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 1))
    texts = long_texts(1, 60)
    bpe.enable_truncation(24)
    expected = [bpe.encode(t).ids for t in texts]
    assert BatchTokenizer(bpe).encode(texts, 24) == expected


class _Recording:
    """Stands in for BatchTokenizer's Rust tokenizer and records what it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def encode_batch_fast(self, texts):
        self.lengths += [len(t) for t in texts]
        return self.tokenizer.encode_batch_fast(texts)


def texts_without_whitespace(size: int) -> list[str]:
    """Texts of about `size` characters with no ASCII whitespace, and two ordinary texts."""
    rng = np.random.default_rng(size)
    cjk = "".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, size))  # one char, one token
    blob = "".join(rng.choice(list("abcdef0123456789+/"), size))  # base64-like: one word
    dotted = ".".join(["x" * 50] * (size // 51))  # words split by punctuation only
    return [cjk, blob, dotted, "a short text", "words " * 2000]


@pytest.mark.parametrize("limit", [8, 128])
def test_a_huge_text_without_whitespace_is_cut_by_characters(limit):
    tokenizer = bert_tokenizer()
    batch_tokenizer = BatchTokenizer(tokenizer)
    batch_tokenizer.encode(["warm up"], limit)
    recording = _Recording(batch_tokenizer._by_limit[limit])
    batch_tokenizer._by_limit[limit] = recording
    batch_tokenizer.encode(texts_without_whitespace(10_000_000), limit)  # 10 MB texts
    assert max(recording.lengths) <= 64 * limit  # bounded, whatever the text's size
    # The tokens are those of the whole text: the reference tokenizes it whole (on
    # 200 kB texts, which the cut handles the same way as 10 MB ones).
    texts = texts_without_whitespace(200_000)
    expected = [tokenizer(t, truncation=True, max_length=limit)["input_ids"] for t in texts]
    assert batch_tokenizer.encode(texts, limit) == expected


def test_text_hash_is_stable_across_processes(tmp_path):
    texts = ["A plane is taking off.", "ünïcödé", "d0 l1 c0"]
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); "
        "from embeddings.data.tokenize import text_hash; "
        f"print(json.dumps([text_hash(t) for t in {texts!r}]))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code, str(REPO)], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [text_hash(t) for t in texts]
    assert len({text_hash(t) for t in texts}) == 3
    assert all(0 <= text_hash(t) < 2**32 for t in texts)

    rows = synthetic_rows(0, 20)
    with make_pipeline(tmp_path, [(rows, 1, {})]) as pipeline:
        batch = next(pipeline)
    assert batch["text_hash"].dtype == np.uint32
    for row, anchor in enumerate(decode_rows(batch, bert_tokenizer(), 0)):
        texts = rows[origin(anchor)[1] - 1]
        assert batch["text_hash"][row].tolist() == [text_hash(t) for t in texts]


def assert_same_batches(a, b):
    assert a.keys() == b.keys()
    for key in a:
        left, right = (a[key], b[key]) if isinstance(a[key], tuple) else ((a[key],), (b[key],))
        assert len(left) == len(right)
        for x, y in zip(left, right, strict=True):
            np.testing.assert_array_equal(x, y)


def test_resume_gives_the_identical_continuation(tmp_path):
    # 13 lines fit one chunk (full reshuffle each epoch); 37 lines are read in chunks of 16.
    datasets = [(synthetic_rows(0, 13), 1, {}), (synthetic_rows(1, 37), 2, {})]
    settings = dict(batch_size=8, shuffle_buffer=16, prefetch=3)
    with make_pipeline(tmp_path, datasets, **settings) as pipeline:
        reference = [next(pipeline) for _ in range(40)]  # ~6 epochs of both files
        examples = [d["examples"] for d in pipeline.stats()["datasets"]]
    assert examples[0] > 3 * 13 and examples[1] > 3 * 37  # several epochs of each file
    for cut in (0, 3, 17, 29):
        with make_pipeline(tmp_path, datasets, **settings) as first:
            for k in range(cut):
                assert_same_batches(next(first), reference[k])
            time.sleep(0.05)  # let the prefetch thread run ahead
            state = json.loads(json.dumps(first.get_state()))
            assert state["step"] == cut
            # The same pipeline jumps back to the state; a fresh one starts from it.
            next(first)
            first.set_state(state)
            with make_pipeline(tmp_path, datasets, **settings) as second:
                second.set_state(state)
                for k in range(cut, 40):
                    expected = reference[k]
                    assert_same_batches(next(first), expected)
                    assert_same_batches(next(second), expected)


def test_worker_processes_give_the_same_batches_states_and_resumes(tmp_path):
    datasets = [(synthetic_rows(0, 13), 1, {}), (varied_rows(1, 37), 2, {})]
    settings = dict(batch_size=8, shuffle_buffer=16, prefetch=2)
    cuts = (0, 7, 23)
    with make_pipeline(tmp_path, datasets, **settings) as pipeline:
        reference, states = [], {}
        for k in range(30):
            if k in cuts:
                states[k] = pipeline.get_state()
            reference.append(next(pipeline))
        stats = pipeline.stats()
    with make_pipeline(tmp_path, datasets, workers=2, **settings) as pooled:
        for k in range(30):
            if k in cuts:
                time.sleep(0.05)  # let the thread and the workers run ahead
                assert pooled.get_state() == states[k]
            assert_same_batches(next(pooled), reference[k])
        assert pooled.stats() == stats
        pooled.set_state(states[7])  # back, with batches in flight
        for k in range(7, 12):
            assert_same_batches(next(pooled), reference[k])
    settings["prefetch"] = 0
    with make_pipeline(tmp_path, datasets, workers=3, **settings) as resumed:
        resumed.set_state(json.loads(json.dumps(states[23])))
        for k in range(23, 30):
            assert_same_batches(next(resumed), reference[k])


def test_worker_errors_reach_the_caller_in_order(tmp_path):
    import multiprocessing

    rows = synthetic_rows(0, 40)
    rows[25] = "{broken json"
    settings = dict(max_bad_line_share=0.0, min_lines_for_bad_share=1, shuffle_buffer=8)
    delivered = {}
    for workers in (0, 2):
        with make_pipeline(tmp_path, [(rows, 1, {})], workers=workers, **settings) as pipeline:
            delivered[workers] = 0
            with pytest.raises(MalformedDataError, match=r"d0.jsonl:26: invalid JSON"):
                for _ in range(10):
                    next(pipeline)
                    delivered[workers] += 1
    assert delivered[2] == delivered[0] > 0  # the lookahead does not raise early

    with make_pipeline(tmp_path, [(synthetic_rows(0, 40), 1, {})], workers=2) as pipeline:
        next(pipeline)
        for child in multiprocessing.active_children():
            child.kill()
        with pytest.raises(RuntimeError, match=r"worker process .*config.data.workers=2.* died"):
            for _ in range(10):
                next(pipeline)


_ORPHAN_SCRIPT = """
import multiprocessing, pathlib, sys, time
sys.path[:0] = [{tests!r}, {repo!r}]
from test_data_support import make_pipeline, synthetic_rows

if __name__ == "__main__":
    rows = synthetic_rows(0, 40)
    pipeline = make_pipeline(pathlib.Path({folder!r}), [(rows, 1, {{}})], workers=2)
    next(pipeline)
    print(*[child.pid for child in multiprocessing.active_children()], flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is gone, unreaped
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_workers_exit_when_the_trainer_is_killed(tmp_path):
    script = tmp_path / "owner.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(_ORPHAN_SCRIPT.format(tests=tests, repo=str(REPO), folder=str(tmp_path)))
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        children = [int(pid) for pid in owner.stdout.readline().split()]
    finally:
        owner.kill()
        owner.wait()
    assert len(children) >= 2  # the two workers (and the resource tracker, if listed)
    deadline = time.time() + 20
    while any(map(_alive, children)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, children)), "worker processes outlived the killed pipeline"


def test_multi_host_resume_from_the_states_of_all_processes(tmp_path):
    datasets = [(synthetic_rows(0, 21), 1, {}), (synthetic_rows(1, 33), 1, {})]
    settings = dict(batch_size=8, shuffle_buffer=8, process_count=2)

    def pipelines():
        return [make_pipeline(tmp_path, datasets, process_index=p, **settings) for p in (0, 1)]

    first = pipelines()
    reference = [[next(p) for p in first] for _ in range(12)]
    for p in first:
        p.close()
    first = pipelines()
    for _ in range(5):
        for p in first:
            next(p)
    saved = json.loads(json.dumps({"processes": [p.get_state() for p in first]}))
    with pytest.raises(ValueError, match=r"belongs to process 0, not 1"):
        first[1].set_state(saved["processes"][0])
    for p in first:
        p.close()
    resumed = pipelines()
    for p in resumed:
        p.set_state(saved)
    for step in range(5, 12):
        for p, expected in zip(resumed, reference[step], strict=True):
            assert_same_batches(next(p), expected)
    for p in resumed:
        p.close()


def test_state_is_small_and_checked(tmp_path):
    datasets = [(synthetic_rows(0, 30), 1, {}), (synthetic_rows(1, 30), 1, {})]
    with make_pipeline(tmp_path, datasets) as pipeline:
        next(pipeline)
        state = pipeline.get_state()
    assert len(json.dumps(state)) < 2000
    with (
        make_pipeline(tmp_path, datasets, seed=1) as other,
        pytest.raises(ValueError, match=r"seed: saved 0, now 1"),
    ):
        other.set_state(state)
    with (
        make_pipeline(tmp_path, datasets[:1]) as other,
        pytest.raises(ValueError, match=r"another data config"),
    ):
        other.set_state(state)


def test_batches_are_prepared_in_a_background_thread(tmp_path, monkeypatch):
    threads = []
    original = Collator.__call__

    def recording(self, *args):
        threads.append(threading.get_ident())
        return original(self, *args)

    monkeypatch.setattr(Collator, "__call__", recording)
    with make_pipeline(tmp_path, [(synthetic_rows(0, 50), 1, {})], prefetch=3) as pipeline:
        next(pipeline)
        deadline = time.time() + 10
        while len(threads) < 4 and time.time() < deadline:
            time.sleep(0.01)
        assert pipeline.get_state()["step"] == 1  # the state is the consumer's, not the thread's
    assert len(threads) >= 4  # the thread prepared batches ahead of the consumer
    assert threading.get_ident() not in threads


def test_a_failure_in_the_thread_reaches_the_caller(tmp_path):
    rows = synthetic_rows(0, 40)
    rows[25] = "{broken json"
    path = write_lines(tmp_path / "d0.jsonl", rows)
    settings = dict(max_bad_line_share=0.0, min_lines_for_bad_share=1, prefetch=2)
    with (
        make_pipeline(tmp_path, [(rows, 1, {})], **settings) as pipeline,
        pytest.raises(MalformedDataError) as error,
    ):
        for _ in range(10):
            next(pipeline)
    assert f"{path}:26: invalid JSON" in str(error.value)
    assert "max_bad_line_share=0.0" in str(error.value)


def test_a_truncated_gzip_file_stops_the_run_naming_it(tmp_path):
    import gzip

    path = write_lines(tmp_path / "cut.jsonl.gz", synthetic_rows(0, 1000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    config = [{"name": "cut.jsonl.gz", "weight": 1}]
    with (
        InputPipeline(
            data_config=config,
            data_folder=tmp_path,
            tokenizer=bert_tokenizer(),
            batch_size=8,
            buckets=(),
            max_length_anchor=16,
            max_length_document=16,
            shuffle_buffer=100,
        ) as pipeline,
        pytest.raises(MalformedDataError) as error,
    ):
        for _ in range(1000):
            next(pipeline)
    with gzip.open(path) as f, pytest.raises(EOFError):
        f.read()  # the file really is cut
    assert f"{path}: the gzip data ends early, after line" in str(error.value)


def test_invalid_utf8_in_a_tsv_counts_as_a_bad_line(tmp_path):
    rows = [f"q{i} text\tpassage {i}".encode() for i in range(200)]
    rows[50] = b"q50 caf\xe9\tlatin-1, not UTF-8"
    (tmp_path / "p.tsv").write_bytes(b"q\tp\n" + b"\n".join(rows) + b"\n")
    config = [{"name": "p.tsv", "weight": 1, "fields": ["q", "p"]}]
    with InputPipeline(
        data_config=config,
        data_folder=tmp_path,
        tokenizer=bert_tokenizer(),
        batch_size=8,
        buckets=(),
        max_length_anchor=16,
        max_length_document=16,
        shuffle_buffer=1000,
    ) as pipeline:
        for _ in range(30):
            next(pipeline)
        (stats,) = pipeline.stats()["datasets"]
    assert stats["bad_lines"] == 1 and stats["lines_checked"] == 200
    assert stats["bad_line_samples"] == [
        f"{tmp_path / 'p.tsv'}:52: invalid UTF-8 (byte 0xe9) in column 0 ('q')"
    ]


def test_stats(tmp_path):
    rows = synthetic_rows(0, 30)
    rows[4] = ["missing positive"]
    datasets = [(rows, 1, {}), (synthetic_rows(1, 30), 3, {})]
    padding = total = 0
    with make_pipeline(tmp_path, datasets, batch_size=4, max_bad_line_share=0.1) as pipeline:
        counts = [0, 0]
        for _ in range(30):
            batch = next(pipeline)
            for mask in batch["attention_mask"]:
                padding += int((mask == 0).sum())
                total += mask.size
            for d in batch["dataset_index"]:
                counts[d] += 1
        summary = pipeline.stats()
    assert summary["step"] == 30 and summary["examples"] == 120 and summary["groups"] == 60
    assert [d["examples"] for d in summary["datasets"]] == counts
    assert summary["padding_share"] == pytest.approx(padding / total)
    assert summary["padding_tokens"] == padding and summary["real_tokens"] == total - padding
    first = summary["datasets"][0]
    assert (first["bad_lines"], first["lines_checked"]) == (1, 30)
    assert first["bad_line_samples"] == [f"{tmp_path / 'd0.jsonl'}:5: 1 columns, expected 2"]
    assert summary["bad_lines"] == 1


def tiny_config(**data) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data_folder = str(REPO / "data")
    config.data_config = str(REPO / "data_config.json")
    config.batch_size = 32
    config.seed = 0
    config.data = ml_collections.ConfigDict(
        dict(
            datasets_per_batch=2,
            max_length_anchor=32,
            max_length_document=64,
            buckets=(16, 32, 64),
            shuffle_buffer=1_000,
            skip_duplicates=True,
            max_bad_line_share=0.01,
            prefetch=2,
            workers=0,
            negatives_per_row=0,
        )
        | data
    )
    return config


def test_build_pipeline_on_the_bundled_data():
    config = tiny_config()
    pipelines = [
        build_pipeline(config, bert_tokenizer(), process_index=p, process_count=2) for p in range(2)
    ]
    try:
        for _ in range(5):
            batches = [next(p) for p in pipelines]
            for batch in batches:
                assert len(batch["dataset_index"]) == 16
                assert batch["input_ids"][0].shape[1] in (16, 32)
                assert batch["input_ids"][1].shape[1] in (16, 32, 64)
            plans = [b["dataset_index"][[0, 8]].tolist() for b in batches]
            assert plans[0] == plans[1]  # same datasets per group on both processes
        assert all(p.stats()["bad_lines"] == 0 for p in pipelines)
    finally:
        for p in pipelines:
            p.close()


def test_build_pipeline_names_missing_keys():
    config = tiny_config()
    del config.data["prefetch"]
    with pytest.raises(ValueError, match=r"lacks \['data.prefetch'\]"):
        build_pipeline(config, bert_tokenizer())


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(buckets=(64, 32)), "increasing"),
        (dict(buckets=(16, 128)), "bucket 128 is longer than every token limit"),
        (dict(max_length_anchor=1), ">= 2"),
        (dict(shuffle_buffer=0), "shuffle_buffer must be"),
        (dict(max_bad_line_share=2), "max_bad_line_share"),
        (dict(process_index=2, process_count=2), "process_index 2"),
    ],
)
def test_bad_settings_fail_at_start_up(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        make_pipeline(tmp_path, [(synthetic_rows(0, 10), 1, {})], **setting)


@pytest.mark.parametrize("skip_duplicates", [True, False])
def test_skipping_duplicates_leaves_the_false_negative_mask_nothing_to_remove(skip_duplicates):
    """Issue 24's masking ablation, by construction: on the quickstart's own stream (its config,
    data and tokenizer, all 250 batches), the mixer's duplicate skipping means the loss's
    false-negative mask keeps every logit, so `loss.mask_false_negatives` cannot change a
    one-process run. Without skipping, the same stream repeats texts and the mask has work."""
    from transformers import AutoTokenizer

    from configs import quickstart
    from embeddings.losses import _false_negative_keep_masks

    config = quickstart.get_config()
    config.data_folder = str(REPO / "data")
    config.data.skip_duplicates = skip_duplicates
    pipeline = build_pipeline(config, AutoTokenizer.from_pretrained(config.model.init))
    removed = 0
    try:
        for _ in range(config.total_steps):
            hashes = next(pipeline)["text_hash"]
            keep_forward, keep_backward = _false_negative_keep_masks(hashes[:, 0], hashes[:, 1:])
            removed += int((~np.asarray(keep_forward)).sum() + (~np.asarray(keep_backward)).sum())
    finally:
        pipeline.close()
    assert (removed == 0) == skip_duplicates, removed
