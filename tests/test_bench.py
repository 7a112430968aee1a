"""Smoke tests of the bench/ scripts: each runs end to end on a tiny model and tiny sizes.

Every script runs as a user would (a subprocess with --json) and its last line
must be one JSON object with the keys bench/README.md documents; the derived
ratios are recomputed here from the raw numbers the script also reports. The
timings themselves are meaningless at these sizes and are not judged.
"""

import os
import pathlib
import statistics

import pytest
import script_runs

pytestmark = pytest.mark.slow  # ~9 worker processes, each importing JAX and compiling a step

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny", "--json"]

SCRIPTS = {
    "step": "--batch_size 8 --max_length 16 --steps 2 --warmup 1",
    "padding": "--batch_size 8 --num_batches 2 --max_length 32 --buckets 16,32 --steps 1",
    "pipeline_vs_step": "--batch_size 8 --num_batches 2 --pipeline_batches 4 --max_length 32 "
    "--buckets 16,32 --steps 1 --warmup 0",
    "grad_cache": "--batch_size 32 --chunk 8 --plain_batch_size 8 --time_batch_size 16 "
    "--max_length 16 --steps 1 --warmup 0",
    "sharding": "--batch_size 8 --max_length 16 --steps 1 --warmup 0",
}


@pytest.fixture(scope="module")
def launched():
    yield from script_runs.launch(
        {name: [f"bench/{name}.py", *TINY, *args.split()] for name, args in SCRIPTS.items()}
    )


_result = script_runs.result
_positive = script_runs.positive


def test_step(launched):
    r = _result(launched, "step")
    assert {"dtype", "batch_size", "max_length", "device"} <= r.keys()
    assert (r["dtype"], r["batch_size"], r["max_length"]) == ("float32", 8, 16)
    # The default row pads as sentence-transformers' trainer does; its label says so.
    assert r["padding"] == "longest" and "longest text" in r["padding_label"]
    assert r["device"].startswith("cpu")
    _positive(r["pairs_per_second"], r["reference_pairs_per_second"], r["speedup"])
    assert len(r["step_times"]) == len(r["reference_step_times"]) == 2
    ours, theirs = statistics.median(r["step_times"]), statistics.median(r["reference_step_times"])
    assert r["pairs_per_second"] == pytest.approx(8 / ours)
    assert r["speedup"] == pytest.approx(theirs / ours)
    assert r["torch_threads"] == r["jax_threads"] == len(os.sched_getaffinity(0))


def test_padding(launched):
    r = _result(launched, "padding")
    buckets, padded = r["results"]["buckets"], r["results"]["max_length"]
    assert buckets["real_tokens"] == padded["real_tokens"] > 0  # the same examples
    assert buckets["padded_tokens"] <= padded["padded_tokens"] == 2 * 2 * 8 * 32
    assert padded["padded_lengths"] == {"anchor": {"32": 2}, "document": {"32": 2}}
    _positive(r["buckets_real_tokens_per_second"], r["max_length_real_tokens_per_second"])
    assert r["speedup"] == pytest.approx(padded["pass_seconds"] / buckets["pass_seconds"], rel=1e-9)


def test_pipeline_vs_step(launched):
    r = _result(launched, "pipeline_vs_step")
    _positive(r["pipeline_pairs_per_second"], r["step_pairs_per_second"])
    assert r["ratio"] == pytest.approx(r["pipeline_pairs_per_second"] / r["step_pairs_per_second"])
    assert r["step_pairs_per_second"] == pytest.approx(2 * 8 / r["step_pass_times"][0])


def test_grad_cache(launched):
    r = _result(launched, "grad_cache")
    _positive(r["peak_rss_mib"], r["plain_peak_rss_mib"], r["seconds_per_pair"])
    assert r["memory_ratio"] == pytest.approx(r["peak_rss_mib"] / r["plain_peak_rss_mib"])
    assert r["time_ratio"] == pytest.approx(r["seconds_per_pair"] / r["plain_seconds_per_pair"])
    assert r["time_runs"]["plain"]["seconds_per_pair"] == pytest.approx(
        r["time_runs"]["plain"]["times"][0] / 16
    )


def test_sharding(launched):
    r = _result(launched, "sharding")
    assert r["devices"] == 8
    _positive(r["step_seconds"], r["single_device_step_seconds"])
    assert r["ratio"] == pytest.approx(r["step_seconds"] / r["single_device_step_seconds"])


def test_the_pad_to_max_length_row_says_the_reference_would_not_pad_so():
    from bench.step import padding_label

    assert padding_label("max_length", 128) == (
        "reference pads to 128, which its trainer never does"
    )
