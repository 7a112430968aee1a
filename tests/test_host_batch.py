"""Host batches to global arrays: agreed shapes, token indices, host-only fields; one
gather of the input position per step."""

import jax
import numpy as np
import pytest

from configs import tiny
from embeddings import host_batch
from embeddings.sharding import make_mesh
from embeddings.trainer import train_and_evaluate


def _mask(lengths, width):
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def test_device_batch_pads_indexes_and_keeps_host_fields_home():
    mesh = make_mesh(devices=jax.devices()[:2])
    masks = (_mask([3, 1, 2, 2], 4), _mask([5, 5, 5, 1], 8))
    local = {
        "input_ids": tuple(m * 7 for m in masks),
        "attention_mask": masks,
        "dataset_index": np.array([0, 0, 1, 1]),
    }
    shapes = host_batch.agree_shapes(local, mesh.size, pack_levels=4)
    # One process: its own lengths; the fullest row group of each column (rows 0-1, 2-3).
    assert shapes.lengths == (4, 8) and shapes.most_real == (4, 10)
    batch = host_batch.device_batch(local, shapes, mesh)
    assert "dataset_index" not in batch
    assert [x.shape for x in batch["attention_mask"]] == [(4, 4), (4, 8)]
    first, second = batch["token_index"]
    # Column 0: 4 real tokens in a group of 2 x 4 slots, rounded to a step of 2 -> 4.
    np.testing.assert_array_equal(np.asarray(first), [[0, 1, 2, 4], [0, 1, 4, 5]])
    # Column 1: 10 real of 16 slots, steps of 4 -> 12; group 1 has 6, padded with 16.
    np.testing.assert_array_equal(np.asarray(second)[1], [0, 1, 2, 3, 4, 8, 16, 16, 16, 16, 16, 16])

    unpacked = host_batch.device_batch(local, host_batch.agree_shapes(local, 2, 0), mesh)
    assert "token_index" not in unpacked


@pytest.mark.slow
def test_input_position_is_gathered_once_per_step(tmp_path, monkeypatch):
    """Evaluation (offered to best/) and a checkpoint at the same step share one gather."""
    calls = []
    gather = host_batch.pipeline_state

    def counted(pipeline):
        calls.append(1)
        return gather(pipeline)

    monkeypatch.setattr(host_batch, "pipeline_state", counted)
    config = tiny.get_config()
    config.total_steps = 2
    config.eval_every = 1
    config.checkpoint_every = 1
    config.eval.sts_file = "data/stsbenchmark.tsv.gz"
    config.eval.retrieval_file = ""
    config.eval.max_queries = 20
    config.best_metric = "eval/sts/spearman_cosine"
    train_and_evaluate(config, str(tmp_path / "run"))
    assert len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "2"]
