"""scripts/download_data.py with the Hub replaced by a local folder.

huggingface_hub's download function and file-list call are substituted by ones
that copy from / describe a folder of files, so the checks are against those
files' own bytes and sizes.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub.hf_api import RepoFile

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "download_data.py"

_spec = importlib.util.spec_from_file_location("download_data", SCRIPT)
download_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(download_data)

FILES = {
    "AllNLI.jsonl.gz": os.urandom(3000),
    "stackexchange/title_body.jsonl.gz": os.urandom(5000),
    "unused.jsonl.gz": os.urandom(10),
}


class Interrupted(Exception):
    """Stands for a download cut off half-way (Ctrl-C, a dropped connection)."""


class FakeHub:
    """A dataset repo in a local folder, standing in for the Hugging Face Hub."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.downloads: list[dict] = []
        self.interrupt = False
        for name, data in FILES.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)

    def get_paths_info(self, repo_id, paths, *, repo_type=None, revision=None, **_):
        assert repo_type == "dataset"
        return [
            RepoFile(path=p, size=(self.folder / p).stat().st_size, oid="0", type="file")
            for p in paths
            if (self.folder / p).is_file()
        ]

    def hf_hub_download(self, repo_id, filename, *, repo_type, revision, local_dir, **kwargs):
        self.downloads.append(dict(repo_id=repo_id, filename=filename, repo_type=repo_type))
        data = (self.folder / filename).read_bytes()
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.interrupt:
            target.write_bytes(data[: len(data) // 2])
            raise Interrupted(filename)
        target.write_bytes(data)
        return str(target)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    fake = FakeHub(folder)
    monkeypatch.setattr(download_data, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(download_data.HfApi, "get_paths_info", fake.get_paths_info)
    return fake


@pytest.fixture
def data_config(tmp_path):
    path = tmp_path / "data_config.json"
    entries = [
        {"name": "AllNLI.jsonl.gz", "lines": 277230, "weight": 10},
        {"name": "stackexchange/title_body.jsonl.gz", "lines": 250460, "weight": 3},
    ]
    path.write_text(json.dumps(entries, indent=1))
    return path


def _run(data_config, output, *extra):
    return download_data.main(["--data_config", str(data_config), "--output", str(output), *extra])


def test_downloads_every_file_of_the_data_config(hub, data_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(data_config, out) == 0
    for name in ("AllNLI.jsonl.gz", "stackexchange/title_body.jsonl.gz"):
        assert (out / name).read_bytes() == FILES[name]
    assert not (out / "unused.jsonl.gz").exists()
    assert [d["filename"] for d in hub.downloads] == [
        "AllNLI.jsonl.gz",
        "stackexchange/title_body.jsonl.gz",
    ]
    assert {d["repo_id"] for d in hub.downloads} == {
        "sentence-transformers/embedding-training-data"
    }
    # Nothing but the data files is left behind.
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "AllNLI.jsonl.gz",
        "stackexchange/title_body.jsonl.gz",
    ]
    assert "2 downloaded, 0 already complete" in capsys.readouterr().out


def test_only_and_repo_id(hub, data_config, tmp_path):
    out = tmp_path / "out"
    assert _run(data_config, out, "--only", "AllNLI.jsonl.gz", "--repo_id", "me/my-pairs") == 0
    assert [d["filename"] for d in hub.downloads] == ["AllNLI.jsonl.gz"]
    assert hub.downloads[0]["repo_id"] == "me/my-pairs"
    assert not (out / "stackexchange").exists()


def test_subfolder_maps_names_to_another_repo_layout(hub, tmp_path):
    # The data_config keeps a folder per source; that source's repo is flat.
    config = tmp_path / "data_config.json"
    names = ["se/AllNLI.jsonl.gz", "se/unused.jsonl.gz", "AllNLI.jsonl.gz"]
    config.write_text(json.dumps([{"name": n, "lines": 1, "weight": 1} for n in names]))
    out = tmp_path / "out"
    assert _run(config, out, "--subfolder", "se", "--repo_id", "org/se-files") == 0
    assert [d["filename"] for d in hub.downloads] == ["AllNLI.jsonl.gz", "unused.jsonl.gz"]
    assert {d["repo_id"] for d in hub.downloads} == {"org/se-files"}
    assert (out / "se" / "AllNLI.jsonl.gz").read_bytes() == FILES["AllNLI.jsonl.gz"]
    assert (out / "se" / "unused.jsonl.gz").read_bytes() == FILES["unused.jsonl.gz"]
    assert not (out / "AllNLI.jsonl.gz").exists()


def test_complete_files_are_skipped(hub, data_config, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(data_config, out) == 0
    assert _run(data_config, out) == 0
    assert len(hub.downloads) == 2, "the second run must not download again"
    assert "0 downloaded, 2 already complete" in capsys.readouterr().out


def test_force_downloads_again(hub, data_config, tmp_path):
    out = tmp_path / "out"
    assert _run(data_config, out) == 0
    # Same size, other bytes: only a real download restores the Hub's content.
    (out / "AllNLI.jsonl.gz").write_bytes(bytes(len(FILES["AllNLI.jsonl.gz"])))
    assert _run(data_config, out, "--force") == 0
    assert len(hub.downloads) == 4
    assert (out / "AllNLI.jsonl.gz").read_bytes() == FILES["AllNLI.jsonl.gz"]


def test_a_partial_file_is_not_taken_as_complete(hub, data_config, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "AllNLI.jsonl.gz").write_bytes(FILES["AllNLI.jsonl.gz"][:100])
    assert _run(data_config, out, "--only", "AllNLI.jsonl.gz") == 0
    assert len(hub.downloads) == 1
    assert (out / "AllNLI.jsonl.gz").read_bytes() == FILES["AllNLI.jsonl.gz"]


def test_an_interrupted_download_never_looks_complete(hub, data_config, tmp_path):
    out = tmp_path / "out"
    hub.interrupt = True
    with pytest.raises(Interrupted):
        _run(data_config, out)
    assert not (out / "AllNLI.jsonl.gz").exists()
    hub.interrupt = False
    assert _run(data_config, out) == 0
    assert (out / "AllNLI.jsonl.gz").read_bytes() == FILES["AllNLI.jsonl.gz"]


def test_a_short_download_is_refused(hub, data_config, tmp_path, monkeypatch, capsys):
    real_download = hub.hf_hub_download

    def short_download(*args, **kwargs):
        path = Path(real_download(*args, **kwargs))
        path.write_bytes(path.read_bytes()[:-1])
        return str(path)

    monkeypatch.setattr(download_data, "hf_hub_download", short_download)
    out = tmp_path / "out"
    assert _run(data_config, out) == 1
    assert "downloaded 2999 bytes but the Hub lists 3000" in capsys.readouterr().err
    assert not (out / "AllNLI.jsonl.gz").exists()


def test_copy_to_bucket_writes_a_temporary_name_then_renames(tmp_path, monkeypatch):
    source = tmp_path / "source.jsonl.gz"
    source.write_bytes(os.urandom(20_000))
    seen_while_copying = []
    monkeypatch.setattr(download_data, "_COPY_CHUNK_BYTES", 4096)
    real_update = download_data.tqdm.update

    def update(self, n=1):
        seen_while_copying.append(sorted(p.name for p in (tmp_path / "bucket").iterdir()))
        return real_update(self, n)

    monkeypatch.setattr(download_data.tqdm, "update", update)
    dest = download_data.epath.Path(tmp_path / "bucket" / "data.jsonl.gz")
    download_data.copy_to_bucket(source, dest)
    assert Path(dest).read_bytes() == source.read_bytes()
    assert sorted(p.name for p in (tmp_path / "bucket").iterdir()) == ["data.jsonl.gz"]
    assert len(seen_while_copying) == 5
    assert all(names == ["data.jsonl.gz.partial"] for names in seen_while_copying)


def test_names_missing_from_the_repo_are_reported(hub, tmp_path, capsys):
    config = tmp_path / "data_config.json"
    config.write_text(json.dumps([{"name": "AllNLI.jsonl.gz"}, {"name": "nope.jsonl.gz"}]))
    assert _run(config, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "1 file(s) not in dataset repo" in err and "nope.jsonl.gz" in err and "--only" in err
    assert hub.downloads == []


def test_skip_missing_downloads_what_the_repo_holds(hub, tmp_path, capsys):
    config = tmp_path / "data_config.json"
    config.write_text(json.dumps([{"name": "nope.jsonl.gz"}, {"name": "AllNLI.jsonl.gz"}]))
    out = tmp_path / "out"
    assert _run(config, out, "--skip_missing") == 0
    assert [d["filename"] for d in hub.downloads] == ["AllNLI.jsonl.gz"]
    assert (out / "AllNLI.jsonl.gz").read_bytes() == FILES["AllNLI.jsonl.gz"]
    captured = capsys.readouterr()
    assert "left for another run: nope.jsonl.gz" in captured.err + captured.out
    assert "1 downloaded, 0 already complete, 1 not in" in captured.out


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"name": "a.jsonl.gz"},\n {"name": }]', "line 2: invalid JSON"),
        ('{"name": "a.jsonl.gz"}', "expected a list"),
        ('[{"name": "a.jsonl.gz"}, {"lines": 3}]', 'entry 1: needs a "name"'),
        ('[{"name": "../secrets.jsonl.gz"}]', 'entry 0: "name" must be a relative path'),
        ('[{"name": "/etc/passwd"}]', 'entry 0: "name" must be a relative path'),
    ],
)
def test_bad_data_config_is_reported_with_its_place(hub, tmp_path, capsys, text, message):
    config = tmp_path / "data_config.json"
    config.write_text(text)
    assert _run(config, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert str(config) in err and message in err


def test_unknown_only_name_is_reported(hub, data_config, tmp_path, capsys):
    assert _run(data_config, tmp_path / "out", "--only", "AllNLl.jsonl.gz") == 1
    err = capsys.readouterr().err
    assert "--only AllNLl.jsonl.gz: not in" in err and "AllNLI.jsonl.gz" in err


def test_offline_mode_fails_clearly(data_config, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data_config", str(data_config), "--output", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach the Hugging Face Hub: " in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_hub_fails_clearly(data_config, tmp_path):
    # Port 9 (discard) on this machine refuses connections at once, network or not.
    env = dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data_config", str(data_config), "--output", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot reach the Hugging Face Hub: " in result.stderr
    assert "Traceback" not in result.stderr
