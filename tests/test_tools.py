"""Smoke tests of the tools/ scripts (the GPU lab): each runs end to end on tiny sizes.

As tests/test_bench.py: every script runs as a user would (a subprocess with
--json) and its last line must be one JSON object; the timings are not judged.
"""

import dataclasses
import json
import os
import pathlib
import statistics
import subprocess

import pytest
import script_runs
from script_runs import positive as _positive
from script_runs import result as _result

from embeddings.models.kernels import pallas_attention as attention_kernel

pytestmark = pytest.mark.slow  # worker processes, each importing JAX and compiling

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPTS = {
    "attention": "--json --batch_size 4 --length 16 --heads 2 --head_dim 16 --steps 2 --warmup 1",
    "step_profile": "--model tiny --json --batch_size 8 --max_length 16 --steps 2 --warmup 1 "
    "--trace_steps 2",
    "attention_sweep": "--json --sweep --sweep_max 2 --batch_size 4 --length 16 --heads 2 "
    "--head_dim 16 --steps 2 --warmup 1",
}
SCRIPT_OF = {"attention_sweep": "attention"}  # rows that run another row's script


@pytest.fixture(scope="module")
def launched():
    yield from script_runs.launch(
        {
            name: [f"tools/{SCRIPT_OF.get(name, name)}.py", *args.split()]
            for name, args in SCRIPTS.items()
        }
    )


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
    """tools/gpu_suite.sh's plumbing on the CPU (SUITE_QUICK=1): random weights drawn
    for weightless skeletons, each row's last-line JSON collected, an unknown row named."""
    from hf_tiny import make_tiny_sentence_transformer

    from tools import random_model

    models = tmp_path / "prepared" / "models"
    for model_type, name in (("mpnet", "all-mpnet-base-v2"), ("bert", "all-MiniLM-L6-v2")):
        source = make_tiny_sentence_transformer(model_type, tmp_path)
        random_model.build(source, models / name, weights=False, seed=0)
    out = tmp_path / "out"
    env = {**os.environ, "SUITE_QUICK": "1", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    suite = [str(REPO / "tools" / "gpu_suite.sh"), str(tmp_path / "prepared"), str(out)]
    rows = ("attention", "attention_sweep", "pipeline", "nonsense")
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
    assert [r["row"] for r in rows] == ["attention", "attention_sweep", "pipeline"]
    assert rows[0]["interpreted"] and rows[2]["batch_size"] == 64
    assert len(rows[1]["rows"]) == 4  # two tilings per kernel (SUITE_QUICK)
    assert "unknown row nonsense" in done.stdout
    assert "'best tiling': {'forward_block'" in done.stdout
    assert done.stdout.splitlines()[-1].startswith("pipeline {")
