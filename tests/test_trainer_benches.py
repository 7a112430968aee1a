"""Smoke tests of bench/quality.py and bench/trainer.py: both whole trainers, tiny sizes.

Each script runs as a user runs it (a subprocess with --json) on a tiny random
BERT (tests/hf_tiny.py) and a few steps of the bundled data; its last line must
be one JSON object whose derived numbers agree with the raw ones it reports.
The timings and the quality of such tiny runs are meaningless and not judged.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from tests.hf_tiny import make_tiny_sentence_transformer

pytestmark = pytest.mark.slow  # each script starts 3-6 processes that import torch or JAX

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate (requirements-dev)")
    folder = tmp_path_factory.mktemp("benches")
    model = make_tiny_sentence_transformer("bert", folder)
    config = folder / "tiny_init.py"
    config.write_text(
        "from configs import tiny\n\n\n"
        "def get_config():\n"
        "    config = tiny.get_config()\n"
        f"    config.model.init = {str(model)!r}\n"
        '    config.model.tokenizer = ""\n'
        "    return config\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    common = ["--config", str(config), "--batch_size", "8", "--json"]
    quality = "--seeds 1 --max_seq_length 32 --eval_max_seq_length 32"
    quality += " --eval_queries 20 --sts_pairs 40"
    trainer = ["--steps", "4", "--skip", "1"]
    commands = {
        "quality": [*quality.split(), "--steps", "2"],
        # The reference's limit is configs/tiny.py's document limit (64), or it would cut texts.
        "quality_same": [
            *quality.split(),
            *("--steps", "3", "--same_batches", "--no_dropout", "--max_seq_length", "64"),
        ],
        "trainer": trainer,
        "trainer_triplet": [*trainer, "--workload", "triplet"],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "bench" / f"{name.split('_')[0]}.py"), *common, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for name, args in commands.items()
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def _result(launched, name: str) -> dict:
    out, err = launched[name].communicate(timeout=900)
    assert launched[name].returncode == 0, out[-2000:] + err[-4000:]
    lines = out.strip().splitlines()
    assert any(line.startswith("|---") for line in lines), "a Markdown table is printed"
    return json.loads(lines[-1])


def test_quality_bench(launched):
    r = _result(launched, "quality")
    runs = r["runs"]
    assert sorted((x["trainer"], x["seed"]) for x in runs) == [("ours", 0), ("st", 0)]
    for x in runs:
        assert x["eval_max_seq_length"] == 32  # every model evaluated at the same limit
        assert 0 <= x["debian_mrr@10"] <= 1 and -1 <= x["stsb_spearman"] <= 1
        assert x["wall_seconds"] > 0
    for side in ("ours", "st"):
        values = [x["debian_mrr@10"] for x in runs if x["trainer"] == side]
        summary = r["summary"][side]["debian_mrr@10"]
        assert summary["mean"] == pytest.approx(statistics.fmean(values))
        assert summary["min"] == min(values) and summary["max"] == max(values)
    # The starting model is evaluated too: the untrained tiny model is near chance.
    assert r["start"]["debian_mrr@10"] < 0.2


def test_quality_bench_same_batches_trains_the_reference_on_our_batches(launched):
    # Without dropout, on the same batches, the two trainers make the same updates
    # (tests/test_update_parity.py): the losses of the 3 steps agree, which they
    # could not if the reference drew, shuffled or deduplicated its own batches.
    r = _result(launched, "quality_same")
    assert r["same_batches"] and not r["dropout"]
    ours, theirs = sorted(r["runs"], key=lambda x: x["trainer"])
    assert (ours["trainer"], theirs["trainer"]) == ("ours", "st")
    assert theirs["steps_off_our_tokens"] == 0  # every decoded text tokenized back alike
    assert theirs["final_loss"] == pytest.approx(ours["final_loss"], rel=1e-4)


def test_trainer_bench(launched):
    r = _result(launched, "trainer")
    ours, theirs = r["ours"], r["reference"]
    for side in (ours, theirs):
        assert side["wall_seconds"] > side["first_step_seconds"] > 0
        assert side["peak_rss_mib"] > 100
        assert side["pairs_per_second"] == pytest.approx(8 * side["steps_per_second"])
        assert side["tokens_per_second"] > side["pairs_per_second"]  # >1 real token per pair
        assert side["final_loss"] > 0
    assert r["steady_speedup"] == pytest.approx(
        ours["steps_per_second"] / theirs["steps_per_second"]
    )
    assert r["whole_run_speedup"] == pytest.approx(theirs["wall_seconds"] / ours["wall_seconds"])
    assert r["memory_ratio"] == pytest.approx(ours["peak_rss_mib"] / theirs["peak_rss_mib"])
    for runs in r["runs"].values():
        assert len(runs[0]["step_times"]) == 4  # every step recorded on both sides


def test_trainer_bench_triplet_workload_trains_both_sides_on_hard_negatives(launched):
    r = _result(launched, "trainer_triplet")
    assert r["workload"] == "triplet"
    (ours,), (theirs,) = r["runs"]["ours"], r["runs"]["st"]
    assert ours["layouts"] == ["contrastive/3"]  # (anchor, positive, negative) batches
    assert theirs["columns"] == ["anchor", "positive", "negative"]
    assert ours["final_loss"] > 0 and theirs["final_loss"] > 0


def test_step_shapes_counts_the_shapes_and_tokens_of_the_batches():
    """bench/step_shapes.py against the batches themselves, counted by hand."""
    from bench import step_shapes
    from configs import tiny
    from embeddings.data import build_pipeline
    from embeddings.models.pretrained import load_tokenizer

    config = tiny.get_config()
    config.model.tokenizer = str(REPO / config.model.tokenizer)
    config.model.pack_levels = 4
    steps = 6
    r = step_shapes.count_shapes(config, steps)
    shapes, real, dense = {}, [0, 0], [0, 0]
    with build_pipeline(config, load_tokenizer(config.model.tokenizer)) as pipeline:
        for step in range(steps):
            key = []
            for c, mask in enumerate(next(pipeline)["attention_mask"]):
                real[c] += int(mask.sum())
                unit = mask.size // 4  # one of 4 levels of the padded size
                packed = -(-int(mask.sum()) // unit) * unit
                key.append((mask.shape[1], None if packed == mask.size else packed))
                dense[c] += packed
            shapes.setdefault(tuple(key), step)
    assert [(tuple(map(tuple, s["columns"])), s["first_step"]) for s in r["shapes"]] == list(
        shapes.items()
    )
    assert sum(s["batches"] for s in r["shapes"]) == steps
    for c in (0, 1):
        column = r["per_step"][f"column_{c}"]
        assert column["real"] == pytest.approx(real[c] / steps)
        assert column["dense_rows"] == pytest.approx(dense[c] / steps)
        assert column["real"] <= column["dense_rows"] <= column["bucket_padded"]
        assert column["real"] <= column["longest_padded"] <= column["bucket_padded"]


def test_the_reference_without_dropout_embeds_in_training_mode_as_in_evaluation(tmp_path):
    """bench/quality.py --no_dropout: sentence-transformers' model in training mode
    (dropout active) embeds a batch differently on every call; after
    `turn_off_dropout` it embeds it exactly as in evaluation mode."""
    import torch
    from sentence_transformers import SentenceTransformer

    from bench import _trainers

    model = SentenceTransformer(str(make_tiny_sentence_transformer("bert", tmp_path)), device="cpu")
    features = model.tokenize(["a first sentence to embed", "and another, longer one"])

    def embed():
        with torch.no_grad():
            return model(dict(features))["sentence_embedding"]

    model.eval()
    evaluation = embed()
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(embed(), evaluation)
    _trainers.turn_off_dropout(model)
    assert model.training
    torch.testing.assert_close(embed(), evaluation, rtol=0, atol=0)
