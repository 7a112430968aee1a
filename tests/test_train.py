"""train.py end to end on configs/tiny.py: checkpoints, metrics, exact resume, signals."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embeddings.checkpointing import find_checkpoint, restore_params

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # exercise the sharded path
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _command(workdir, *overrides):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/tiny.py"),
        "--workdir",
        str(workdir),
        "--config.eval.sts_file=",  # evaluation is tested elsewhere; keep these runs short
        "--config.eval.retrieval_file=",
        *overrides,
    ]


def _train(workdir, *overrides, check=True):
    proc = subprocess.run(
        _command(workdir, *overrides), cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    if check and proc.returncode:
        raise AssertionError(f"train.py failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _metrics(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _params(workdir, step=None):
    return restore_params(find_checkpoint(workdir, step=step))


def _assert_same_params(a, b):
    import jax

    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_tiny_run_writes_checkpoints_metrics_and_run_files(tmp_path):
    workdir = tmp_path / "run"
    relative = os.path.relpath(workdir, ROOT)  # as a user types it (Orbax needs absolute paths)
    proc = _train(
        relative,
        "--config.total_steps=6",
        "--config.log_every=2",
        "--config.eval.sts_file=data/stsbenchmark.tsv.gz",
        "--config.eval.max_queries=20",
        "--config.best_metric=eval/sts/spearman_cosine",
    )
    records = [r for r in _metrics(workdir) if "loss" in r]
    evals = [r for r in _metrics(workdir) if "eval/sts/spearman_cosine" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert [r["step"] for r in evals] == [6]
    for key in ("loss", "learning_rate", "grad_norm", "pairs_per_second", "accuracy"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [6]
    config = json.loads((workdir / "config.json").read_text())
    assert config["total_steps"] == 6
    assert json.loads((workdir / "data_config.json").read_text())
    assert (workdir / "model" / "model.json").exists()
    assert list((workdir / "tensorboard").iterdir())
    assert "step 6" in proc.stdout
    assert [int(p.name) for p in (workdir / "best").iterdir()] == [6]


def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL at a random step, restart: same batches (losses) and same final parameters.

    The interrupted run tokenizes in worker processes (config.data.workers), the
    straight one in its prefetch thread: the batches must not depend on it."""
    steps = ["--config.total_steps=12", "--config.log_every=1", "--config.checkpoint_every=3"]
    _train(tmp_path / "straight", *steps)
    steps.append("--config.data.workers=2")

    interrupted = tmp_path / "interrupted"
    kill_after = random.Random(os.getpid()).randint(4, 10)
    proc = subprocess.Popen(
        _command(interrupted, *steps),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    metrics = interrupted / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    _train(interrupted, *steps)

    straight, resumed = _metrics(tmp_path / "straight"), _metrics(interrupted)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    _assert_same_params(_params(interrupted), _params(tmp_path / "straight"))


def test_sigterm_saves_a_checkpoint_and_exits_75(tmp_path):
    """A launcher tells a preemption (75, "stopped early") from a finished run (0)."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _command(
            workdir,
            "--config.total_steps=1000",
            "--config.log_every=1",
            "--config.checkpoint_every=1000",
        ),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 3
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert len(saved) == 1 and 3 <= saved[0] < 1000, saved
    assert "SIGTERM" in out
    assert f"Stopped early at step {saved[0]}" in out and "Trained steps" not in out


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    workdir = tmp_path / "run"
    steps = ["--config.total_steps=8", "--config.checkpoint_every=4", "--config.log_every=1"]
    _train(workdir, *steps)
    reference = _params(workdir, step=8)
    newest = workdir / "checkpoints" / "8" / "state"
    for path in newest.rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"\0" * 16)  # garbage where the arrays were
    proc = _train(workdir, *steps)
    assert "unreadable" in proc.stderr and "checkpoints/8" in proc.stderr
    # it went back to step 4 and trained again to 8, to the same parameters
    assert [r["step"] for r in _metrics(workdir)] == list(range(1, 9))
    _assert_same_params(_params(workdir, step=8), reference)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.totl_steps=5", "totl_steps"),
        ("--config.model.pooling=avg", "config.model.pooling='avg'"),
        ("--config.grad_cache_chunk=7", "grad_cache_chunk=7"),
        ("--config.optimizer.learning_rate=nan", "config.optimizer.learning_rate=nan"),
        ("--config.data.datasets_per_batch=0", "config.data.datasets_per_batch=0 must be > 0"),
        ("--config.batch_size=33", "config.batch_size=33 is not divisible by 2"),
        ("--config.batch_size=33", "each of the 2 devices"),
        ("--config.model.document_init=foo", "document_init"),
        ("--config.model.attention_kernel=cudnn", "config.model.attention_kernel='cudnn'"),
    ],
)
def test_bad_config_fails_with_a_clear_message(tmp_path, override, message):
    proc = _train(tmp_path / "run", override, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]


def _snapshot(folder):
    """Every file under `folder` with its bytes, and every folder (empty ones too)."""
    folder = Path(folder)
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else "folder"
        for p in folder.rglob("*")
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step tiny run (checkpoints 2 and 4), copied by each test that reruns it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    _train(workdir, "--config.total_steps=4", "--config.checkpoint_every=2", "--config.log_every=1")
    return workdir


@pytest.mark.parametrize(
    "override, key",
    [
        ("--config.optimizer.grad_clip_norm=0", "config.optimizer.grad_clip_norm"),
        ("--config.model.hidden_size=64", "config.model.hidden_size"),
    ],
)
def test_rerun_with_another_state_tree_refuses_and_touches_nothing(
    tmp_path, finished_run, override, key
):
    """A readable checkpoint of another config is no corruption: nothing moves or restarts."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    before = _snapshot(workdir)
    proc = _train(
        workdir,
        "--config.total_steps=4",
        "--config.checkpoint_every=2",
        "--config.log_every=1",
        override,
        check=False,
    )
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Refusing to start" in proc.stderr and key in proc.stderr, proc.stderr[-3000:]
    assert str(workdir / "config.json") in proc.stderr
    assert _snapshot(workdir) == before
    assert not (workdir / "corrupt").exists()


def test_refused_data_config_rerun_leaves_the_run_files(tmp_path, finished_run):
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    entries = json.loads((ROOT / "data_config.json").read_text())
    other = tmp_path / "other_data_config.json"
    other.write_text(json.dumps(entries[:3]))
    before = _snapshot(workdir)
    proc = _train(
        workdir,
        "--config.total_steps=6",
        f"--config.data_config={other}",
        check=False,
    )
    assert proc.returncode != 0
    assert "another data config" in proc.stderr, proc.stderr[-3000:]
    assert _snapshot(workdir) == before


@pytest.mark.parametrize(
    "problem",
    ["missing data file", "missing init", "unreadable resume_from"],
)
def test_failed_start_in_a_new_workdir_leaves_no_files(tmp_path, problem):
    overrides = {
        "missing data file": f"--config.data_config={tmp_path / 'data_config.json'}",
        "missing init": f"--config.model.init={tmp_path / 'no-such-model'}",
        "unreadable resume_from": f"--config.resume_from={tmp_path / 'no-such-run/checkpoints/4'}",
    }
    (tmp_path / "data_config.json").write_text(
        json.dumps([{"name": "debian/no-such-file.jsonl.gz", "weight": 1}])
    )
    workdir = tmp_path / "new" / "run"
    proc = _train(workdir, "--config.total_steps=2", overrides[problem], check=False)
    assert proc.returncode != 0
    assert not (tmp_path / "new").exists(), _snapshot(tmp_path / "new")


def test_resume_drops_a_torn_last_metrics_line(tmp_path, finished_run):
    """A crash while appending to metrics.jsonl leaves half a line: the rerun warns and goes on."""
    workdir = tmp_path / "run"
    shutil.copytree(finished_run, workdir)
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 3.1')
    proc = _train(workdir, "--config.total_steps=6", "--config.log_every=1")
    assert "metrics.jsonl: dropped line" in proc.stderr, proc.stderr[-3000:]
    assert [r["step"] for r in _metrics(workdir)] == list(range(1, 7))


def _expected_step_shapes(steps: int, pack_levels: int, devices: int) -> set:
    """The distinct (padded length, packed size) per column of the tiny run's first
    `steps` batches, computed here from the masks by the documented rule: a column's
    packed size is its fullest device group's real tokens rounded up to a multiple of
    group tokens / levels, and it runs unpacked (None) when that reaches the group."""
    from transformers import AutoTokenizer

    from configs import tiny
    from embeddings.data import build_pipeline

    config = tiny.get_config()
    tokenizer = AutoTokenizer.from_pretrained(ROOT / config.model.tokenizer)
    shapes = set()
    with build_pipeline(config, tokenizer) as pipeline:
        for _ in range(steps):
            key = []
            for mask in next(pipeline)["attention_mask"]:
                group = mask.size // devices
                most = int((mask.reshape(devices, -1) != 0).sum(axis=1).max())
                step = -(-group // pack_levels)
                size = min(-(-most // step) * step, group)
                key.append((mask.shape[1], None if size == group else size))
            shapes.add(tuple(key))
    return shapes


@pytest.mark.parametrize("pack_levels", [8, 2])
def test_the_step_compiles_once_per_batch_shape(tmp_path, pack_levels):
    """train.py compiles its step once for each distinct batch shape and no more (no
    per-step recompilation), and fewer packing levels mean fewer shapes."""
    env = dict(_env(), JAX_LOG_COMPILES="1")
    steps = 8
    proc = subprocess.run(
        _command(
            tmp_path / "run",
            f"--config.total_steps={steps}",
            f"--config.model.pack_levels={pack_levels}",
        ),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = proc.stderr.count("Finished XLA compilation of jit(train_step)")
    expected = _expected_step_shapes(steps, pack_levels, devices=2)
    assert compiled == len(expected), (compiled, expected)
    if pack_levels == 2:
        assert len(expected) < len(_expected_step_shapes(steps, 8, devices=2))


def test_compilation_cache_dir_serves_a_rerun_without_compiling(tmp_path):
    """--compilation_cache_dir: the first run writes each compiled step there, and a
    second run of the same config in another workdir loads every one of them."""
    env = dict(_env(), JAX_LOG_COMPILES="1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cache = tmp_path / "cache"

    def run(name):
        command = _command(tmp_path / name, "--config.total_steps=3")
        proc = subprocess.run(
            [*command, f"--compilation_cache_dir={cache}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    first = run("first")
    compiled = first.count("Finished XLA compilation of jit(train_step)")
    assert compiled >= 1
    assert len(list(cache.glob("jit_train_step-*"))) == compiled
    second = run("second")
    assert second.count("Persistent compilation cache hit for 'jit_train_step'") == compiled
