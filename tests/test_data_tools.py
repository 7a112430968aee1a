"""The data tools: inspect_data.py preview, make_sts_pairs.py, bench/input_pipeline.py."""

import gzip
import importlib.util
import json
import subprocess
import sys

import ml_collections
import pytest
from test_data_support import REPO, write_lines


def load_script(relative: str):
    """Imports a script of the repository (scripts/ and bench/ are not packages)."""
    spec = importlib.util.spec_from_file_location(relative.replace("/", "_"), REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_inspect_data_on_the_bundled_data():
    out = run_script(
        "scripts/inspect_data.py",
        "--data_config=data_config.json",
        "--data_folder=data",
        "--num_batches=100",
        "--batch_size=32",
        "--datasets_per_batch=2",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    assert "| debian/python.jsonl.gz |" in out.stdout  # the human-readable table
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    datasets = summary["datasets"]
    assert len(datasets) == 59
    for key in ("expected_share", "example_share", "group_share"):
        assert sum(d[key] for d in datasets) == pytest.approx(1.0)
    total_weight = sum(d["weight"] for d in datasets)
    for d in datasets:
        assert d["expected_share"] == pytest.approx(d["weight"] / total_weight)
    # 200 independent group draws: the ten heaviest sections' share is within 5 sigma.
    top = sorted(datasets, key=lambda d: -d["weight"])[:10]
    expected = sum(d["expected_share"] for d in top)
    sigma = (expected * (1 - expected) / 200) ** 0.5
    assert abs(sum(d["group_share"] for d in top) - expected) < 5 * sigma
    assert summary["bad_lines"] == 0
    assert isinstance(summary["duplicates_skipped"], int)
    assert 0 < summary["padding_share"] < 1


def test_inspect_data_and_the_pipeline_default_to_the_training_config(monkeypatch):
    import inspect

    from configs import default
    from embeddings.data import InputPipeline

    config = default.get_config()
    config.data.datasets_per_batch = 5  # a changed default reaches both
    config.data.buckets = (16, 48)
    config.seed = 7
    monkeypatch.setattr(default, "get_config", lambda: config)
    args = load_script("scripts/inspect_data.py").parse_args(
        ["--data_config=x", "--data_folder=y", "--num_batches=1", "--batch_size=8"]
    )
    assert (args.datasets_per_batch, args.buckets, args.seed) == (5, "16,48", 7)
    for key in ("max_length_anchor", "max_length_document", "shuffle_buffer"):
        assert getattr(args, key) == config.data[key]
    assert args.max_bad_line_share == config.data.max_bad_line_share
    # The library's defaults are read once, at import, from the unchanged file.
    parameters = inspect.signature(InputPipeline).parameters
    monkeypatch.undo()
    shipped = default.get_config()
    for key, value in shipped.data.items():
        if isinstance(value, ml_collections.ConfigDict):  # e.g. prompts: a mapping
            value = value.to_dict()
        assert parameters[key].default == value, key
    assert parameters["seed"].default == shipped.seed


def test_inspect_data_reports_bad_lines_and_config_errors(tmp_path, capsys):
    inspect_data = load_script("scripts/inspect_data.py")
    rows = [[f"q{i}", f"p{i}"] for i in range(30)]
    rows[3] = "{oops"
    write_lines(tmp_path / "a.jsonl", rows)
    config = tmp_path / "config.json"
    config.write_text(json.dumps([{"name": "a.jsonl", "lines": 30, "weight": 1}]))
    common = ["--data_config", str(config), "--data_folder", str(tmp_path), "--num_batches=3"]
    assert inspect_data.main([*common, "--batch_size=4", "--max_bad_line_share=0.5", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["bad_lines"] == 1
    assert f"{tmp_path / 'a.jsonl'}:4: invalid JSON" in out
    config.write_text(json.dumps([{"name": "a.jsonl", "weight": 0}]))
    assert inspect_data.main([*common, "--batch_size=4"]) == 2
    assert "entry 0 ('a.jsonl'): \"weight\" must be positive" in capsys.readouterr().err


def test_make_sts_pairs_keeps_train_pairs_with_score_4_or_more(tmp_path):
    make_sts_pairs = load_script("scripts/make_sts_pairs.py")
    header = "split\tgenre\tdataset\tyear\tsid\tscore\tsentence1\tsentence2\n"
    rows = [
        'train\tg\td\ty\t1\t4.000\tA "quoted" cat.\tA cat, quoted.\n',
        "train\tg\td\ty\t2\t3.999\tNot close.\tEnough.\n",
        "train\tg\td\ty\t3\t5.000\tSame.\tSame.\n",
        "dev\tg\td\ty\t4\t4.800\tDev one.\tDev two.\n",
        "train\tg\td\ty\t5\t4.600\tLast one.\tFinal one.\n",
    ]
    source = tmp_path / "sts.tsv.gz"
    with gzip.open(source, "wt", encoding="utf-8") as f:
        f.write(header + "".join(rows))
    pairs = make_sts_pairs.paraphrase_pairs(str(source), "train", 4.0)
    assert pairs == [['A "quoted" cat.', "A cat, quoted."], ["Last one.", "Final one."]]
    out = tmp_path / "out" / "pairs.jsonl.gz"
    make_sts_pairs.write_jsonl_gz(pairs, str(out))
    first = out.read_bytes()
    make_sts_pairs.write_jsonl_gz(pairs, str(out))
    assert out.read_bytes() == first  # reproducible bytes
    with gzip.open(out, "rt", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == pairs


def test_the_bundled_sts_pairs_are_the_benchmark_train_rows_scored_4_or_more():
    with gzip.open(REPO / "data" / "stsbenchmark.tsv.gz", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()[1:]
    expected = []
    for line in lines:
        split, _, _, _, _, score, first, second = line.split("\t")
        if split == "train" and float(score) >= 4 and first.strip() != second.strip():
            expected.append([first, second])
    with gzip.open(REPO / "data" / "sts" / "stsb_train_score4.jsonl.gz", "rt") as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == expected
    assert len(shipped) > 1000


def test_bench_prints_a_table_and_json():
    out = run_script(
        "bench/input_pipeline.py", "--num_batches=2", "--batch_size=64", "--workers=0,1", "--json"
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("| buckets (32, 64, 128) | 1 |") for line in lines)
    result = json.loads(lines[-1])
    assert [r["buckets"] for r in result["results"]] == [[32, 64, 128], [32, 64, 128], []]
    assert [r["workers"] for r in result["results"]] == [0, 1, 0]
    for r in result["results"]:
        assert r["pairs_per_second"] > 0 and r["tokens_per_second"] > 0
    assert result["padding_share_buckets"] < result["padding_share_max_length"]
