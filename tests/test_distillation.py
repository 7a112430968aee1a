"""Distillation rows (teacher margins, scores, embeddings) from file to loss; train.py on each
loss kind, GIST with a guide included.

The losses themselves are tested against sentence-transformers in test_losses.py; here the rows
of data/README.md's "Teacher labels" are read into the batch arrays those losses take, checked
against hand-written values, and each `config.loss.kind` trains a few steps end to end.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from embeddings.data.data_config import DataConfigError, load_data_config
from embeddings.data.readers import BadRecord, Layout, infer_row_spec, make_source, parse_row
from embeddings.data.tokenize import LABEL_KEYS

ROOT = Path(__file__).resolve().parent.parent


def write_lines(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_all(folder, entry: dict):
    """(layout, [Example], [bad reasons]) of one data config entry."""
    (e,) = load_data_config([entry], folder)
    source = make_source(e, folder)
    spec = infer_row_spec(e, source)
    good, bad = [], []
    for line, raw in source.records(0):
        try:
            good.append(parse_row(source.decode(raw), spec, line))
        except BadRecord as reason:
            bad.append(f"{source.where(line)}: {reason}")
    return spec.layout, good, bad


def test_margin_rows_with_several_negatives_as_margins_or_scores(tmp_path):
    write_lines(
        tmp_path / "m.jsonl",
        [
            ["q", "p", "n1", "n2", [1.0, 2.0]],  # margins
            ["q2", "p2", "m1", "m2", [5.0, 4.0, 1.0]],  # scores: 5-4, 5-1
            ["q3", "p3", "x1", "x2", [1.0]],  # one margin for two negatives
            ["q4", "p4", "y1", "y2", 1.0],
        ],
    )
    layout, good, bad = read_all(tmp_path, {"name": "m.jsonl", "weight": 1, "kind": "margin"})
    assert layout == Layout("margin", 4)
    assert [(x.texts, x.margin) for x in good] == [
        (("q", "p", "n1", "n2"), (1.0, 2.0)),
        (("q2", "p2", "m1", "m2"), (1.0, 4.0)),
    ]
    assert "1 margin value(s) for 2 negative(s)" in bad[0]
    assert "m.jsonl:4" in bad[1]


def test_margin_row_with_one_negative_keeps_a_float_margin(tmp_path):
    write_lines(tmp_path / "m.jsonl", [["q", "p", "n", [3.0, 1.0]], ["q2", "p2", "n2", 0.5]])
    layout, good, _ = read_all(tmp_path, {"name": "m.jsonl", "weight": 1, "kind": "margin"})
    assert layout == Layout("margin", 3)
    assert [x.margin for x in good] == [2.0, 0.5]


def test_scores_rows_keep_every_listed_negative_with_its_score(tmp_path):
    write_lines(
        tmp_path / "s.jsonl",
        [
            {"query": "q", "pos": "p", "neg": ["n1", "n2"], "scores": [9, 3, 1.5]},
            {"query": "q2", "pos": ["p2"], "neg": ["m1", "m2"], "scores": [1, 2, 3]},
            {"query": "q3", "pos": "p3", "neg": ["x1"], "scores": [1, 2]},  # one text short
            {"query": "q4", "pos": "p4", "neg": ["y1", "y2"], "scores": [1, 2]},
            {"query": "q5", "pos": "p5", "neg": ["z1", "z2"], "scores": [1, "a", 3]},
        ],
    )
    layout, good, bad = read_all(tmp_path, {"name": "s.jsonl", "weight": 1, "kind": "scores"})
    assert layout == Layout("scores", 4)
    assert [(x.texts, x.label, x.margin) for x in good] == [
        (("q", "p", "n1", "n2"), (9.0, 3.0, 1.5), None),
        (("q2", "p2", "m1", "m2"), (1.0, 2.0, 3.0), None),
    ]
    assert "3 texts, the dataset's first row had 4" in bad[0]
    assert "2 scores numbers, expected 3 (one per candidate)" in bad[1]
    assert "scores 'a' is not a number" in bad[2]


def test_embedding_rows_fix_the_size_from_the_first_row(tmp_path):
    write_lines(
        tmp_path / "e.jsonl",
        [
            {"english": "Hello", "non_english": "Hallo", "embedding": [0.5, -1, 2]},
            ["Tree", "Baum", [1, 2, 3]],  # a list row in an object dataset: malformed
            {"english": "Yes", "non_english": "Ja", "embedding": [1, 2]},
        ],
    )
    layout, good, bad = read_all(tmp_path, {"name": "e.jsonl", "weight": 1, "kind": "embedding"})
    assert layout == Layout("embedding", 2)
    assert [(x.texts, x.label) for x in good] == [(("Hello", "Hallo"), (0.5, -1.0, 2.0))]
    assert "e.jsonl:3: 2 embedding numbers, expected 3" in bad[1]


def test_labelled_kinds_need_their_label_field(tmp_path):
    entry = {"name": "a.jsonl", "weight": 1, "kind": "scores", "fields": ["q", "p", "n"]}
    write_lines(tmp_path / "a.jsonl", [["q", "p", "n"]])
    with pytest.raises(DataConfigError, match="at least 3 text fields and then the scores field"):
        load_data_config([entry], tmp_path)
    write_lines(tmp_path / "b.jsonl", [["q", "p", "n", 1.0]] * 3)
    with pytest.raises(DataConfigError, match="must be a list of numbers"):
        read_all(tmp_path, {"name": "b.jsonl", "weight": 1, "kind": "scores"})


# ---- train.py end to end, one kind each ----

WORDS = ("apt", "kernel", "python", "audio", "video", "mail", "shell", "font", "game", "editor")


def _distillation_rows(kind: str, rows: int = 48, dim: int = 32):
    rng = np.random.default_rng(0)
    out = []
    for i in range(rows):
        w = [WORDS[(i + k) % len(WORDS)] for k in range(4)]
        query, pos = f"{w[0]} {w[1]} tool {i}", f"a {w[0]} program for {w[1]} number {i}"
        negs = [f"{w[2]} helper {i}", f"{w[3]} library {i}"]
        if kind == "embedding":
            out.append([query, pos, rng.normal(size=dim).round(4).tolist()])
        else:
            scores = [float(x) for x in np.round(rng.normal(size=3) + np.array([3, 0, 0]), 3)]
            out.append({"query": query, "pos": pos, "neg": negs, kind: scores})
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss_kind", "data_kind"),
    [("distill_kl", "scores"), ("margin_mse", "margin"), ("embedding_mse", "embedding")],
)
def test_train_py_runs_each_distillation_kind(tmp_path, loss_kind, data_kind):
    write_lines(tmp_path / "rows.jsonl", _distillation_rows(data_kind))
    (tmp_path / "mix.json").write_text(
        json.dumps([{"name": "rows.jsonl", "weight": 1, "kind": data_kind}])
    )
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/tiny.py"),
        "--workdir",
        str(tmp_path / "run"),
        "--config.eval.sts_file=",
        "--config.eval.retrieval_file=",
        f"--config.data_folder={tmp_path}",
        f"--config.data_config={tmp_path / 'mix.json'}",
        "--config.batch_size=8",
        "--config.total_steps=2",
        "--config.log_every=1",
        "--config.checkpoint_every=2",
        f"--config.loss.kind={loss_kind}",
        "--config.loss.similarity=dot",
        "--config.loss.scale=1.0",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0


def test_label_keys_name_the_batch_arrays_the_losses_read():
    assert LABEL_KEYS == {"scores": "scores", "embedding": "teacher_embedding"}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(kind="gist"), "needs config.loss.guide.init"),
        (dict(guide=dict(init="some/guide")), "used only by --config.loss.kind=gist"),
        (dict(kind="gist", guide=dict(init="g", margin_strategy="ratio")), "margin_strategy"),
        (dict(kind="gist", guide=dict(init="g", margin=-0.1)), "guide.margin=-0.1 must be >= 0"),
        (dict(kind="distill_kl", temperature=0.0), "loss.temperature=0.0 must be a positive"),
        (dict(kind="embedding_mse", matryoshka_dims=(16,)), "only supported with loss.kind='mnrl'"),
    ],
)
def test_recipe_settings_are_validated(overrides, message):
    from configs import tiny
    from embeddings.config_validation import ConfigError, validate

    config = tiny.get_config()
    config.loss.update(overrides)
    with pytest.raises(ConfigError, match=message):
        validate(config)


@pytest.mark.slow
def test_train_py_runs_gist_with_a_guide(tmp_path):
    from tests.hf_tiny import make_tiny_hf_model

    guide = make_tiny_hf_model("bert", tmp_path, seed=1)  # the tiny config's tokenizer
    rows = [[f"{w} tool {i}", f"a program for {w} number {i}"] for i, w in enumerate(WORDS * 5)]
    write_lines(tmp_path / "rows.jsonl", rows)
    (tmp_path / "mix.json").write_text(json.dumps([{"name": "rows.jsonl", "weight": 1}]))
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/tiny.py"),
        "--workdir",
        str(tmp_path / "run"),
        "--config.eval.sts_file=",
        "--config.eval.retrieval_file=",
        f"--config.data_folder={tmp_path}",
        f"--config.data_config={tmp_path / 'mix.json'}",
        "--config.batch_size=8",
        "--config.total_steps=2",
        "--config.log_every=1",
        "--config.checkpoint_every=2",
        "--config.grad_cache_chunk=4",
        "--config.loss.kind=gist",
        f"--config.loss.guide.init={guide}",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [np.isfinite(r["loss"]) for r in records if "loss" in r] == [True, True]
    assert all(0.0 <= r["masked"] <= 1.0 for r in records if "loss" in r)
