"""Smoke test of bench/encode.py: both sides run on the real model and the ratio is theirs."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bench_encode_runs_and_reports_its_ratio():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "encode.py"), "--texts", "8", "--batch_size", "4",
         "--max_length", "32", "--steps", "1", "--warmup", "0", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("|---") for line in lines)
    report = json.loads(lines[-1])
    ours, st = report["ours_texts_per_second"], report["st_texts_per_second"]
    assert ours > 0 and st > 0
    assert report["ratio"] == pytest.approx(ours / st)
    for side in ("ours", "sentence_transformers"):
        (seconds,) = report["runs"][side]["times"]
        assert report[f"{'ours' if side == 'ours' else 'st'}_texts_per_second"] == pytest.approx(
            8 / seconds
        )
