"""Smoke tests of the bench/ scripts: each runs end to end on a tiny model and tiny sizes.

Every script runs as a user would (a subprocess with --json) and its last line
must be one JSON object with the keys bench/README.md documents; the derived
ratios are recomputed here from the raw numbers the script also reports. The
timings themselves are meaningless at these sizes and are not judged.
"""

import dataclasses
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from embeddings.models.kernels import pallas_attention as attention_kernel

pytestmark = pytest.mark.slow  # ~11 worker processes, each importing JAX and compiling a step

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
    "attention": "--batch_size 4 --length 16 --heads 2 --head_dim 16 --steps 2 --warmup 1",
    "step_profile": "--batch_size 8 --max_length 16 --steps 2 --warmup 1 --trace_steps 2",
    "attention_sweep": "--sweep --sweep_max 2 --batch_size 4 --length 16 --heads 2 "
    "--head_dim 16 --steps 2 --warmup 1",
}
SCRIPT_OF = {"attention_sweep": "attention"}  # rows that run another row's script
MODEL_FREE = {"attention", "attention_sweep"}  # scripts without a --model


@pytest.fixture(scope="module")
def launched():
    """Starts every script at once: their compilations are single-threaded, so two
    cores finish them in about half the time of one after the other."""
    env = dict(os.environ)
    # The scripts choose their device counts; optimization level 0 compiles the
    # tiny steps faster (the timings are not judged here).
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    processes = {
        script: subprocess.Popen(
            [
                sys.executable,
                str(REPO / "bench" / f"{SCRIPT_OF.get(script, script)}.py"),
                *(["--json"] if script in MODEL_FREE else TINY),
                *args.split(),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for script, args in SCRIPTS.items()
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def _result(launched, script: str) -> dict:
    out, err = launched[script].communicate(timeout=600)
    assert launched[script].returncode == 0, out[-2000:] + err[-3000:]
    lines = out.strip().splitlines()
    assert lines[0].strip(), "the table's title line comes first"
    assert any(line.startswith("|---") for line in lines), "a Markdown table is printed"
    return json.loads(lines[-1])


def _positive(*values):
    for value in values:
        assert isinstance(value, int | float) and value > 0 and math.isfinite(value), value


def test_step(launched):
    r = _result(launched, "step")
    assert {"dtype", "batch_size", "max_length", "device"} <= r.keys()
    assert (r["dtype"], r["batch_size"], r["max_length"]) == ("float32", 8, 16)
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


def test_attention(launched):
    r = _result(launched, "attention")
    assert (r["batch_size"], r["length"], r["heads"], r["head_dim"]) == (4, 16, 2, 16)
    assert r["interpreted"]  # the Pallas kernels off a GPU
    _positive(r["xla_forward_ms"], r["pallas_forward_ms"], r["xla_train_ms"], r["pallas_train_ms"])
    assert r["train_speedup"] == pytest.approx(r["xla_train_ms"] / r["pallas_train_ms"])
    assert r["gradient_difference"] < 2e-2  # bfloat16 inputs, same dropout masks


def test_attention_sweep(launched):
    """Two tilings per kernel, the default first; the fastest of each side is `best`."""
    r = _result(launched, "attention_sweep")
    rows = r["rows"]
    assert [row["kernel"] for row in rows] == ["forward", "forward", "backward", "backward"]
    defaults = dataclasses.asdict(attention_kernel.Tiling())
    for side, timed in (("forward", "forward"), ("backward", "train")):
        mine = [row for row in rows if row["kernel"] == side]
        _positive(*(row["ms"] for row in mine))
        assert all(defaults[k] == v for k, v in mine[0].items() if k not in ("kernel", "ms"))
        assert r[f"default_{timed}_ms"] == mine[0]["ms"]
        fastest = min(mine, key=lambda row: row["ms"])
        assert r[f"best_{timed}_ms"] == fastest["ms"]
        assert all(r["best"][k] == v for k, v in fastest.items() if k not in ("kernel", "ms"))
    attention_kernel.Tiling(**r["best"])  # a tiling the kernels take


def test_step_profile(launched):
    r = _result(launched, "step_profile")
    assert (r["batch_size"], r["max_length"], r["trace_steps"]) == (8, 16, 2)
    assert r["step_seconds"] == pytest.approx(statistics.median(r["step_times"]))
    assert r["pairs_per_second"] == pytest.approx(8 / r["step_seconds"])
    by_kind = r["by_kind"]
    assert sum(sum(p.values()) for p in by_kind.values()) == pytest.approx(r["traced_ms_per_step"])
    # The dense layers and attention matmuls, forward and backward; no Pallas kernel on a CPU.
    assert by_kind["matmul"]["forward"] > 0 and by_kind["matmul"]["backward"] > 0
    assert by_kind["fused kernel"] == {"forward": 0, "backward": 0, "update": 0}
    assert by_kind["elementwise"]["update"] > 0  # clipping and AdamW
    sources = " ".join(s["source"] for s in r["by_source"])
    assert "(layers.py:" in sources and "(step_profile.py:" not in sources
    assert r["top_ops"][0]["ms_per_step"] >= r["top_ops"][-1]["ms_per_step"] > 0
    assert all(line.startswith("/host:CPU / ") for line in r["trace_lines"])


def test_gpu_suite_runs_its_rows_and_collects_their_json(tmp_path):
    """bench/gpu_suite.sh's plumbing on the CPU (SUITE_QUICK=1): random weights drawn
    for weightless skeletons, each row's last-line JSON collected, an unknown row named."""
    from hf_tiny import make_tiny_sentence_transformer

    from bench import random_model

    models = tmp_path / "prepared" / "models"
    for model_type, name in (("mpnet", "all-mpnet-base-v2"), ("bert", "all-MiniLM-L6-v2")):
        source = make_tiny_sentence_transformer(model_type, tmp_path)
        random_model.build(source, models / name, weights=False, seed=0)
    out = tmp_path / "out"
    env = {**os.environ, "SUITE_QUICK": "1", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    suite = [str(REPO / "bench" / "gpu_suite.sh"), str(tmp_path / "prepared"), str(out)]
    rows = ("mpnet_norm", "attention", "attention_sweep", "mpnet_tiled", "pipeline", "nonsense")
    done = subprocess.run(
        ["bash", *suite, *rows],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    log = (out / "suite.log").read_text()
    assert done.returncode == 0, done.stdout + log[-3000:]
    assert (models / "all-mpnet-base-v2" / "model.safetensors").is_file()
    assert (models / "all-MiniLM-L6-v2" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    norm = rows.pop(0)  # the MPNet profile with the fused LayerNorm kernels
    assert norm["row"] == "mpnet_norm" and norm["norm_kernel"] == "pallas"
    assert "'norm_kernel': 'pallas'" in done.stdout
    # mpnet_tiled profiles MPNet with the sweep's fastest tiling, unless that is the
    # default (the quick sweep's timings are noise: either may happen).
    best = attention_kernel.format_tiling(attention_kernel.Tiling(**rows[1]["best"]))
    if best:
        assert [r["row"] for r in rows] == [
            "attention",
            "attention_sweep",
            "mpnet_tiled",
            "pipeline",
        ]
        assert rows[2]["attention_tiling"] == best
        rows.pop(2)
    else:
        assert "mpnet_tiled: skipped" in done.stdout
    assert [r["row"] for r in rows] == ["attention", "attention_sweep", "pipeline"]
    assert rows[0]["interpreted"] and rows[2]["batch_size"] == 64
    assert len(rows[1]["rows"]) == 4  # two tilings per kernel (SUITE_QUICK)
    assert "unknown row nonsense" in done.stdout
    assert "'best tiling': {'forward_block'" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("pipeline {")
