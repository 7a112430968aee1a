"""Two local processes joined with jax.distributed behave like one (as on a TPU pod)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from embeddings.sharding import make_mesh
from tests.test_train_step import _random_setup, _sharded_loss_and_grads

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_pair(command_for, timeout=1500):
    """Starts processes 0 and 1; returns their (returncode, output). Both are
    killed if either outlives `timeout` seconds (a loaded CI machine compiles
    the 8-device programs slowly)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            command_for(i),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


def test_two_processes_give_the_single_device_loss_and_gradients(tmp_path):
    port, out = _free_port(), tmp_path / "result"
    results = _run_pair(
        lambda i: [
            sys.executable,
            str(ROOT / "tests/multiprocess_worker.py"),
            str(i),
            str(port),
            str(out),
        ]
    )
    for code, output in results:
        assert code == 0, output[-3000:]
    model, params, batch = _random_setup(rows=16)
    one = make_mesh(1, 1, jax.devices()[:1])
    plain = _sharded_loss_and_grads(model, params, batch, one)
    dropped = _sharded_loss_and_grads(model, params, batch, one, dropout_rng=jax.random.PRNGKey(7))
    assert abs(dropped[0] - plain[0]) > 1e-3, "dropout must change the loss"
    for name in (0, 8, "dropout"):
        got = np.load(f"{out}.{name}.npz")
        loss, grads = dropped if name == "dropout" else plain
        assert float(got["loss"]) == pytest.approx(loss, rel=1e-6)
        for path, expected in jax.tree_util.tree_leaves_with_path(grads):
            atol = max(1e-5 * float(np.abs(expected).max()), 1e-9)
            np.testing.assert_allclose(
                got[jax.tree_util.keystr(path)], expected, rtol=1e-5, atol=atol
            )


def test_train_py_runs_as_two_processes(tmp_path):
    port, workdir = _free_port(), tmp_path / "run"

    def command(i):
        return [
            sys.executable,
            str(ROOT / "train.py"),
            "--config",
            str(ROOT / "configs/tiny.py"),
            "--workdir",
            str(workdir),
            "--config.total_steps=4",
            "--config.log_every=2",
            "--config.eval.sts_file=",
            "--config.eval.retrieval_file=",
            f"--coordinator_address=localhost:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]

    results = _run_pair(command)
    for code, output in results:
        assert code == 0, output[-3000:]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert (workdir / "checkpoints" / "4").exists()
    # the checkpoint holds both processes' input positions (each reads its own lines)
    data_state = json.loads((workdir / "checkpoints" / "4" / "data" / "metadata").read_text())
    assert len(data_state["processes"]) == 2


def _tiny_run_losses(workdir, devices: int) -> list[float]:
    """Per-step losses of 3 steps of configs/tiny.py (dropout and packing on, its
    defaults) in one process with `devices` fake CPU devices."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/tiny.py"),
        "--workdir",
        str(workdir),
        "--config.total_steps=3",
        "--config.log_every=1",
        "--config.eval.sts_file=",
        "--config.eval.retrieval_file=",
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    return [r["loss"] for r in records]


def test_train_py_on_one_and_eight_devices_gives_the_same_losses(tmp_path):
    """The default config (dropout on, dense layers packed per device) trains the
    same on 1 device and on 8: packing differs, the dropout masks must not."""
    from configs import tiny

    config = tiny.get_config()
    assert config.model.dropout and config.model.pack_levels > 0
    one = _tiny_run_losses(tmp_path / "one", 1)
    eight = _tiny_run_losses(tmp_path / "eight", 8)
    np.testing.assert_allclose(eight, one, rtol=1e-5)
