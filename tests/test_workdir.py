"""The workdir's files: metrics.jsonl cut short by a crash, atomic rewrites, config differences."""

import json

import pytest
from absl import logging as absl_logging
from etils import epath

from configs import tiny
from embeddings import workdir
from embeddings.metrics_writer import MetricWriter

RECORDS = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}, {"step": 2, "eval/sts/x": 0.5}]
TORN = '{"step": 3, "loss": 2.1'  # what a crash or a full disk leaves while appending


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@pytest.fixture
def warnings(monkeypatch):
    said = []
    monkeypatch.setattr(absl_logging, "warning", lambda msg, *args: said.append(msg % args))
    return said


def test_a_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, warnings):
    _write(tmp_path / "metrics.jsonl", RECORDS, tail=TORN)
    assert workdir.read_metrics(tmp_path) == RECORDS
    assert len(warnings) == 1 and str(tmp_path / "metrics.jsonl") in warnings[0]
    assert "line 4" in warnings[0]


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    _write(tmp_path / "metrics.jsonl", RECORDS[:1], tail=TORN + "\n" + json.dumps(RECORDS[1]))
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        workdir.read_metrics(tmp_path)


def test_metric_writer_resumes_after_a_torn_line(tmp_path, warnings):
    path = tmp_path / "metrics.jsonl"
    _write(path, [*RECORDS, {"step": 3, "loss": 2.0}], tail=TORN)
    writer = MetricWriter(tmp_path, resume_step=2)
    writer.write(3, {"loss": 1.75})
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        *RECORDS,
        {"step": 3, "loss": 1.75},
    ]
    assert warnings and str(path) in warnings[0]


def test_metric_writer_rewrite_is_atomic(tmp_path, monkeypatch):
    """A failure while the resumed file is rewritten leaves the old file whole."""
    path = tmp_path / "metrics.jsonl"
    _write(path, [*RECORDS, {"step": 3, "loss": 2.0}])
    before = path.read_bytes()
    real_write_text = type(epath.Path(path)).write_text

    def write_half_then_fail(self, text, *args, **kwargs):
        real_write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(type(epath.Path(path)), "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        MetricWriter(tmp_path, resume_step=2)
    assert path.read_bytes() == before


def test_config_differences_name_each_changed_setting(tmp_path):
    config = tiny.get_config()
    workdir.write_run_files(tmp_path, config)
    assert workdir.config_differences(tmp_path, config) == []
    config.optimizer.grad_clip_norm = 0.0
    config.model.hidden_size = 64
    assert workdir.config_differences(tmp_path, config) == [
        "config.model.hidden_size: saved 32, now 64",
        "config.optimizer.grad_clip_norm: saved 1.0, now 0.0",
    ]
