"""Smoke test of bench/recipes.py: the three settings, one mining pass, tiny sizes.

The script runs as a user runs it (a subprocess with --json) on a tiny random
BERT (tests/hf_tiny.py), 2 steps, 1 seed and 2 Debian sections; its last line
must be one JSON object whose summary agrees with its runs, and the data it
mined must come from the training sections only. The quality of such tiny runs
is meaningless and not judged.
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.hf_tiny import make_tiny_sentence_transformer

pytestmark = pytest.mark.slow  # mining, 3 trainings and 4 evaluations, each a process

REPO = pathlib.Path(__file__).resolve().parents[1]


def _texts(path: pathlib.Path) -> list[list[str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_recipes_bench(tmp_path):
    model = make_tiny_sentence_transformer("bert", tmp_path)
    config = tmp_path / "tiny_init.py"
    config.write_text(
        "from configs import tiny\n\n\n"
        "def get_config():\n"
        "    config = tiny.get_config()\n"
        f"    config.model.init = {str(model)!r}\n"
        '    config.model.tokenizer = ""\n'
        "    return config\n"
    )
    output = tmp_path / "out"
    command = [
        sys.executable, str(REPO / "bench/recipes.py"), "--config", str(config), "--steps", "2",
        "--seeds", "1", "--batch_size", "8", "--sections", "2", "--eval_queries", "20",
        "--sts_pairs", "40", "--eval_max_seq_length", "32", "--output", str(output), "--json",
    ]  # fmt: skip
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])

    assert [(x["setting"], x["seed"]) for x in r["runs"]] == [
        ("in-batch", 0),
        ("mined", 0),
        ("mined+gist", 0),
    ]
    for x in r["runs"]:
        assert 0 <= x["debian_mrr@10"] <= 1 and -1 <= x["stsb_spearman"] <= 1
        assert x["wall_seconds"] > 0 and x["eval_max_seq_length"] == 32
        assert r["summary"][x["setting"]]["debian_mrr@10"]["mean"] == x["debian_mrr@10"]

    # Each setting trained as it says: (b) and (c) on the mined mix, (c) with GIST and the
    # starting model as its guide.
    configs = {
        x["setting"]: json.loads((output / f"{x['setting']}-0/workdir/config.json").read_text())
        for x in r["runs"]
    }
    assert configs["in-batch"]["data_config"].endswith("in-batch/data_config.json")
    for setting in ("mined", "mined+gist"):
        assert configs[setting]["data_config"].endswith("mined/data_config.json")
    assert [configs[s]["loss"]["kind"] for s in ("in-batch", "mined", "mined+gist")] == [
        "mnrl",
        "mnrl",
        "gist",
    ]
    assert configs["mined+gist"]["loss"]["guide"]["init"] == str(model)

    # (b) mixes the same sections, each with its own mined file and weight, and the STS part.
    original = json.loads((REPO / "data_config.json").read_text())
    mined_config = json.loads((output / "data/mined/data_config.json").read_text())
    assert [e["name"] for e in mined_config] == [
        e["name"]
        for e in original[:2] + [e for e in original if not e["name"].startswith("debian/")]
    ]
    assert [e["weight"] for e in mined_config[:2]] == [e["weight"] for e in original[:2]]
    training = {tuple(pair) for e in original[:2] for pair in _texts(REPO / "data" / e["name"])}
    rows = [row for e in mined_config[:2] for row in _texts(output / "data/mined/data" / e["name"])]
    assert len(rows) == r["mined_rows"] > 0
    for query, positive, *negatives in rows:
        assert (query, positive) in training and len(negatives) == 3  # the script's default

    # A later invocation reuses the mined data (--data) for more seeds instead of mining again.
    again = tmp_path / "again"
    command = [
        sys.executable, str(REPO / "bench/recipes.py"), "--config", str(config), "--steps", "2",
        "--seeds", "1", "--first_seed", "1", "--settings", "mined", "--batch_size", "8",
        "--data", str(output / "data"), "--eval_queries", "20", "--sts_pairs", "40",
        "--eval_max_seq_length", "32", "--output", str(again), "--json",
        "--override=--config.data.datasets_per_batch=1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    r2 = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(x["setting"], x["seed"]) for x in r2["runs"]] == [("mined", 1)]
    assert r2["mined_rows"] == r["mined_rows"] and not (again / "data").exists()
    config_1 = json.loads((again / "mined-1/workdir/config.json").read_text())
    assert config_1["data_config"] == str((output / "data/mined/data_config.json").resolve())
    assert config_1["seed"] == 1
    assert configs["mined"]["data"]["datasets_per_batch"] != 1  # --override reached the run
    assert config_1["data"]["datasets_per_batch"] == 1


def test_recipes_bench_refuses_mining_options_with_reused_data(tmp_path):
    command = [
        sys.executable, str(REPO / "bench/recipes.py"), "--data", str(tmp_path),
        "--mine_option=--range_min=10", "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and "--mine_option would be ignored" in result.stderr
    assert not (tmp_path / "out").exists()
