"""The mixer: weighted shares, one dataset per group, one layout per batch, no duplicate text,
multi-host slices that together make the global batch."""

import numpy as np
import pytest
from scipy import stats
from test_data_support import (
    bert_tokenizer,
    decode_rows,
    make_pipeline,
    row_origins,
    synthetic_rows,
)

from embeddings.data import MixerError


def groups_of(batch, groups):
    """Row slices of the local batch, one per group."""
    rows = len(batch["dataset_index"])
    size = rows // groups
    return [slice(j * size, (j + 1) * size) for j in range(groups)]


def test_group_shares_follow_weights(tmp_path):
    weights = [1, 2, 5]
    datasets = [(synthetic_rows(i, 300), w, {}) for i, w in enumerate(weights)]
    with make_pipeline(tmp_path, datasets, batch_size=4, prefetch=4) as pipeline:
        counts = np.zeros(3)
        for _ in range(1500):
            batch = next(pipeline)
            for rows in groups_of(batch, 2):
                counts[batch["dataset_index"][rows][0]] += 1
        summary = pipeline.stats()
    expected = np.array(weights) / sum(weights) * counts.sum()
    assert stats.chisquare(counts, expected).pvalue > 0.001
    assert [d["groups"] for d in summary["datasets"]] == counts.tolist()
    assert [d["expected_share"] for d in summary["datasets"]] == pytest.approx(
        [1 / 8, 2 / 8, 5 / 8]
    )
    # Every dataset can fill its groups, so example shares equal group shares.
    assert [d["examples"] for d in summary["datasets"]] == (2 * counts).tolist()


def test_one_layout_per_batch_and_shares_across_layouts(tmp_path):
    datasets = [
        (synthetic_rows(0, 200), 1, {}),
        (synthetic_rows(1, 200), 3, {}),
        (synthetic_rows(2, 200, columns=3), 4, {}),
    ]
    with make_pipeline(tmp_path, datasets, batch_size=4) as pipeline:
        layouts, pair_groups = [], np.zeros(2)
        for _ in range(600):
            batch = next(pipeline)
            columns = len(batch["input_ids"])
            sources = set(batch["dataset_index"].tolist())
            assert sources <= ({0, 1} if columns == 2 else {2})
            assert batch["text_hash"].shape == (4, columns)
            layouts.append(columns)
            if columns == 2:
                for rows in groups_of(batch, 2):
                    pair_groups[batch["dataset_index"][rows][0]] += 1
    triplet_batches = layouts.count(3)
    assert stats.binomtest(triplet_batches, len(layouts), 4 / 8).pvalue > 0.001
    assert stats.chisquare(pair_groups, pair_groups.sum() * np.array([1, 3]) / 4).pvalue > 0.001


def test_groups_come_from_one_dataset_without_duplicate_texts(tmp_path):
    tokenizer = bert_tokenizer()
    first = synthetic_rows(0, 40)
    second = synthetic_rows(1, 40)
    # Shared texts across datasets and repeated texts within one: all must be skipped.
    for i in range(0, 40, 3):
        second[i][1] = first[(i * 7) % 40][0]
        first[i][1] = first[(i + 1) % 40][1]
    datasets = [(first, 1, {}), (second, 1, {})]
    with make_pipeline(tmp_path, datasets, batch_size=16, datasets_per_batch=2) as pipeline:
        for _ in range(40):
            batch = next(pipeline)
            texts = decode_rows(batch, tokenizer, 0) + decode_rows(batch, tokenizer, 1)
            assert len(set(texts)) == len(texts)
            origins = row_origins(batch, tokenizer)
            for rows in groups_of(batch, 2):
                group = origins[rows]
                assert len({d for d, _ in group}) == 1
                assert list(batch["dataset_index"][rows]) == [d for d, _ in group]
        assert pipeline.stats()["duplicates_skipped"] > 0


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_together_make_the_global_batch(tmp_path, processes):
    tokenizer = bert_tokenizer()
    datasets = [(synthetic_rows(i, 150), w, {}) for i, w in enumerate([1, 1, 2])]
    pipelines = [
        make_pipeline(tmp_path, datasets, batch_size=16, process_index=p, process_count=processes)
        for p in range(processes)
    ]
    try:
        for _ in range(25):
            local = [next(p) for p in pipelines]
            assert all(len(b["dataset_index"]) == 16 // processes for b in local)
            global_rows = []
            for j in range(2):
                group = []
                for p, batch in enumerate(local):
                    rows = row_origins(batch, tokenizer)[groups_of(batch, 2)[j]]
                    assert all((line - 1) % processes == p for _, line in rows)
                    group += rows
                assert len(group) == 8 and len({d for d, _ in group}) == 1
                global_rows += group
            assert len(set(global_rows)) == 16
            merged = {k: np.concatenate([b[k] for b in local]) for k in ("dataset_index",)}
            assert len(merged["dataset_index"]) == 16
    finally:
        for p in pipelines:
            p.close()


def test_batch_size_must_split_into_groups_and_processes(tmp_path):
    datasets = [(synthetic_rows(0, 10), 1, {})]
    with pytest.raises(ValueError, match=r"config\.batch_size=12 is not divisible by 8"):
        make_pipeline(tmp_path, datasets, batch_size=12, process_index=1, process_count=4)


def test_a_small_dataset_fills_what_it_can_and_the_group_is_topped_up(tmp_path):
    tokenizer = bert_tokenizer()
    datasets = [(synthetic_rows(0, 3), 5, {}), (synthetic_rows(1, 100), 1, {})]
    with make_pipeline(tmp_path, datasets, batch_size=16, datasets_per_batch=2) as pipeline:
        for _ in range(20):
            batch = next(pipeline)
            origins = row_origins(batch, tokenizer)
            assert len(set(origins)) == 16
            small = [o for o in origins if o[0] == 0]
            assert sorted(small) == ([(0, 1), (0, 2), (0, 3)] if small else [])
        summary = pipeline.stats()
    assert summary["topped_up_groups"] > 0
    assert summary["datasets"][0]["examples"] < summary["datasets"][0]["groups"] * 8


def test_too_few_distinct_texts_in_a_layout_is_an_error(tmp_path):
    datasets = [(synthetic_rows(0, 3), 1, {}), (synthetic_rows(1, 3, columns=3), 1, {})]
    with (
        make_pipeline(tmp_path, datasets, batch_size=8, prefetch=0) as pipeline,
        pytest.raises(MixerError, match=r"layout contrastive/\d \(d\d.jsonl\) .* fewer distinct"),
    ):
        next(pipeline)


def test_margin_batches_carry_the_rows_margins(tmp_path):
    tokenizer = bert_tokenizer()
    margin_rows = [[*texts, round(0.1 * i, 1)] for i, texts in enumerate(synthetic_rows(0, 30, 3))]
    datasets = [
        (margin_rows, 1, {"kind": "margin"}),
        (synthetic_rows(1, 30, columns=3), 1, {}),
    ]
    seen_margin = False
    with make_pipeline(tmp_path, datasets, batch_size=8) as pipeline:
        for _ in range(20):
            batch = next(pipeline)
            origins = row_origins(batch, tokenizer)
            if "margin" not in batch:
                assert {d for d, _ in origins} == {1}
                continue
            seen_margin = True
            assert {d for d, _ in origins} == {0}
            assert batch["margin"].dtype == np.float32
            expected = [margin_rows[line - 1][3] for _, line in origins]
            np.testing.assert_allclose(batch["margin"], expected, rtol=1e-6)
    assert seen_margin


def test_skip_duplicates_off_keeps_repeated_texts(tmp_path):
    rows = [["same anchor", f"d0 l{i} c1"] for i in range(1, 21)]
    with make_pipeline(tmp_path, [(rows, 1, {})], skip_duplicates=False) as pipeline:
        texts = decode_rows(next(pipeline), bert_tokenizer(), 0)
    assert texts == ["same anchor"] * 8
    assert pipeline.stats()["duplicates_skipped"] == 0
