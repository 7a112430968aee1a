"""scripts/tpu_vm.sh against a fake `gcloud` that records every call.

The fake is a small script on PATH ahead of any real gcloud. In "worker" mode it
also plays the TPU workers: each `tpu-vm ssh --command` runs through bash with
HOME set to one fake worker's home and a `hostname` that names it, so the run,
status, logs and stop scripts really execute, and a fake trainer records the
arguments, folder and session it got.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tpu_vm.sh"
BASH = shutil.which("bash")

FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys

args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *args]) + "\\n")

if args[:2] == ["auth", "list"]:
    account = os.environ.get("FAKE_GCLOUD_ACCOUNT", "")
    if not account:
        print("No credentialed accounts.", file=sys.stderr)
    elif "--format=value(account)" in args:
        print(account)
    else:
        print("Credentialed Accounts\\nACTIVE  ACCOUNT\\n*       " + account)
    sys.exit(0)

if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    if os.environ.get("FAKE_NO_VM"):
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    accelerator = os.environ.get("FAKE_ACCELERATOR_TYPE", "v3-8")
    if "--format=value(acceleratorType)" in args:
        print(accelerator)
    else:
        print(f"acceleratorType: {{accelerator}}\\nstate: READY")
    sys.exit(0)

workers = os.environ.get("FAKE_WORKERS")
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and workers:
    command = next(a.split("=", 1)[1] for a in args if a.startswith("--command="))
    status = 0
    for home in sorted(os.listdir(workers)):
        env = dict(os.environ, HOME=os.path.join(workers, home))
        env["PATH"] = os.path.join(env["HOME"], "bin") + os.pathsep + env["PATH"]
        status |= subprocess.run(["bash", "-c", command], env=env).returncode
    sys.exit(status)

if args[:4] == ["compute", "tpus", "tpu-vm", "scp"] and os.environ.get("FAKE_SCP_DIR"):
    shutil.copy(args[4], os.environ["FAKE_SCP_DIR"])
"""

# Stands in for the venv's python on a worker: records how train.py was started,
# then trains until SIGTERM (as the real trainer checkpoints and exits then).
FAKE_TRAINER = """#!{python}
import json, os, signal, sys, time

home = os.environ["HOME"]

def on_sigterm(signum, frame):
    open(os.path.join(home, "trainer-got-sigterm"), "w").close()
    sys.exit(0)

signal.signal(signal.SIGTERM, on_sigterm)
record = {{
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "session_leader": os.getsid(0) == os.getpid(),
    "stdin_is_tty": sys.stdin.isatty(),
}}
with open(os.path.join(home, "trainer.json.tmp"), "w") as f:
    json.dump(record, f)
os.replace(os.path.join(home, "trainer.json.tmp"), os.path.join(home, "trainer.json"))  # whole
print("fake trainer started", flush=True)
time.sleep(60)
"""


class FakeCloud:
    """A fake gcloud/gsutil on PATH, its call log, and optionally fake workers."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.log = tmp_path / "gcloud-calls.jsonl"
        for name in ("gcloud", "gsutil"):
            _write_executable(self.bin / name, FAKE_GCLOUD.format(python=sys.executable))
        settings = {"TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "REPO"}
        self.env = {k: v for k, v in os.environ.items() if k not in settings | {"WORKDIR"}}
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            TMPDIR=str(tmp_path),
            FAKE_GCLOUD_LOG=str(self.log),
            FAKE_GCLOUD_ACCOUNT="me@example.com",
            TPU_NAME="my-tpu",
            ZONE="europe-west4-a",
            PROJECT="my-project",
        )
        self.workers: list[Path] = []

    def add_workers(self, count: int) -> None:
        """Makes `count` fake workers, as after `setup`: project folder and venv python."""
        root = self.tmp_path / "workers"
        for i in range(count):
            home = root / f"worker-{i}"
            (home / "embeddings").mkdir(parents=True)
            _write_executable(home / "bin" / "hostname", f"#!/bin/sh\necho worker-{i}\n")
            _write_executable(
                home / "embeddings-venv" / "bin" / "python",
                FAKE_TRAINER.format(python=sys.executable),
            )
            self.workers.append(home)
        self.env["FAKE_WORKERS"] = str(root)

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BASH, str(SCRIPT), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def calls(self) -> list[list[str]]:
        """Every recorded call except the authentication check."""
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [c for c in calls if c[1:3] != ["auth", "list"]]

    def stop_leftover_trainers(self) -> None:
        for home in self.workers:
            record = home / "embeddings-logs" / "train.pid"
            if record.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(record.read_text()), signal.SIGKILL)


def _write_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _flag(call: list[str], name: str) -> str | None:
    """The value of --name=VALUE in a recorded call."""
    values = [a.split("=", 1)[1] for a in call if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def _remote_command(call: list[str]) -> str:
    return _flag(call, "command")


def _wait_for(path: Path, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture
def cloud(tmp_path):
    fake = FakeCloud(tmp_path)
    yield fake
    fake.stop_leftover_trainers()


def test_create_uses_zone_project_accelerator_and_documented_runtime(cloud):
    result = cloud.run("create")
    assert result.returncode == 0, result.stderr
    (call,) = cloud.calls()
    assert call[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    assert _flag(call, "zone") == "europe-west4-a"
    assert _flag(call, "project") == "my-project"
    assert _flag(call, "accelerator-type") == "v3-8"
    # Google's documented runtime for v4 and older TPUs.
    assert _flag(call, "version") == "tpu-ubuntu2204-base"
    assert "--spot" not in call and "--preemptible" not in call
    assert "+ gcloud compute tpus tpu-vm create my-tpu" in result.stderr


@pytest.mark.parametrize(
    "accelerator, runtime",
    [("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
     ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")],
)  # fmt: skip
def test_runtime_version_follows_accelerator_type(cloud, accelerator, runtime):
    assert cloud.run("create", "--accelerator-type", accelerator).returncode == 0
    (call,) = cloud.calls()
    assert (_flag(call, "accelerator-type"), _flag(call, "version")) == (accelerator, runtime)


def test_flags_override_environment(cloud):
    result = cloud.run(
        "create", "--zone=us-central2-b", "--project", "other", "--name", "tpu-2",
        "--version", "my-runtime", ACCELERATOR_TYPE="v4-8", RUNTIME_VERSION="env-runtime",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (call,) = cloud.calls()
    assert call[5] == "tpu-2"
    assert _flag(call, "zone") == "us-central2-b"
    assert _flag(call, "project") == "other"
    assert _flag(call, "accelerator-type") == "v4-8"
    assert _flag(call, "version") == "my-runtime"


@pytest.mark.parametrize("flag", ["--spot", "--preemptible"])
def test_create_spot_or_preemptible(cloud, flag):
    assert cloud.run("create", flag).returncode == 0
    (call,) = cloud.calls()
    assert flag in call


def test_spot_and_preemptible_together_are_refused(cloud):
    result = cloud.run("create", "--spot", "--preemptible")
    assert result.returncode != 0
    assert "--spot and --preemptible" in result.stderr
    assert cloud.calls() == []


def test_queued_resource_create_status_delete(cloud):
    assert cloud.run("create", "--queued", "--spot", "--accelerator-type=v4-32").returncode == 0
    assert cloud.run("status", "--queued").returncode == 0
    assert cloud.run("delete", "--queued").returncode == 0
    create, describe_queued, describe_vm, status_ssh, delete = cloud.calls()
    assert create[1:6] == ["compute", "tpus", "queued-resources", "create", "my-tpu"]
    assert _flag(create, "node-id") == "my-tpu"
    assert _flag(create, "runtime-version") == "tpu-ubuntu2204-base"
    assert _flag(create, "accelerator-type") == "v4-32"
    assert _flag(create, "zone") == "europe-west4-a"
    assert "--spot" in create
    assert describe_queued[1:6] == ["compute", "tpus", "queued-resources", "describe", "my-tpu"]
    assert describe_vm[1:6] == ["compute", "tpus", "tpu-vm", "describe", "my-tpu"]
    assert status_ssh[1:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in status_ssh
    assert delete[1:6] == ["compute", "tpus", "queued-resources", "delete", "my-tpu"]
    assert "--force" in delete


def test_status_of_a_queued_resource_before_its_vm_exists(cloud):
    result = cloud.run("status", "--queued", FAKE_NO_VM="1")
    assert result.returncode == 0, result.stderr
    assert "has not provisioned it" in result.stderr
    calls = [c[3:5] for c in cloud.calls()]
    assert calls == [["queued-resources", "describe"], ["tpu-vm", "describe"]]


def test_run_without_a_vm_says_to_create_it(cloud):
    result = cloud.run("run", "--", "--config", "c.py", "--workdir", "gs://b/w", FAKE_NO_VM="1")
    assert result.returncode != 0
    assert "create it first" in result.stderr
    assert not any(c[4] == "ssh" for c in cloud.calls())


def test_queued_resource_refuses_preemptible(cloud):
    result = cloud.run("create", "--queued", "--preemptible")
    assert result.returncode != 0
    assert "use --spot" in result.stderr
    assert cloud.calls() == []


def _jax_pin() -> str:
    """The jax version requirements.txt pins, read independently of the script."""
    (version,) = re.findall(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)
    return version


def test_setup_copies_the_tree_and_installs_on_every_worker(cloud, tmp_path):
    scp_dir = tmp_path / "scp"
    scp_dir.mkdir()
    result = cloud.run("setup", FAKE_SCP_DIR=str(scp_dir))
    assert result.returncode == 0, result.stderr
    scp, ssh = cloud.calls()
    assert scp[1:5] == ["compute", "tpus", "tpu-vm", "scp"]
    assert scp[6] == "my-tpu:embeddings-src.tar.gz"
    assert ssh[1:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    for call in (scp, ssh):
        assert "--worker=all" in call
        assert (_flag(call, "zone"), _flag(call, "project")) == ("europe-west4-a", "my-project")
    script = _remote_command(ssh)
    assert f"'jax[tpu]=={_jax_pin()}'" in script
    assert "-r $HOME/embeddings/requirements.txt" in script
    assert "tar -xzf $HOME/embeddings-src.tar.gz" in script

    with tarfile.open(scp_dir / "embeddings-src.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"requirements.txt", "scripts/tpu_vm.sh", "pyproject.toml"} <= names
    assert not any(n == ".git" or n.startswith(".git/") for n in names)
    # The temporary archive is removed afterwards.
    assert not list(tmp_path.glob("tmp.*"))


def test_setup_clones_a_git_repo(cloud):
    url = "https://github.com/example/embeddings.git"
    assert cloud.run("setup", REPO=url).returncode == 0
    (ssh,) = cloud.calls()
    assert "--worker=all" in ssh
    assert f"git clone {url} $HOME/embeddings" in _remote_command(ssh)


# Arguments a shell would mangle if they were not quoted on the way to the workers.
TRAIN_ARGS = [
    "--config", "configs/tiny.py",
    "--config.model.init=it's a $HOME path; with * and |",
    "--config.total_steps=7",
    "--workdir", "gs://bucket/runs/tiny",
]  # fmt: skip


def test_run_starts_detached_trainers_with_identical_arguments(cloud):
    cloud.add_workers(2)
    started = time.monotonic()
    result = cloud.run("run", "--", *TRAIN_ARGS)
    assert result.returncode == 0, result.stderr
    # The fake trainer sleeps 60 s: returning before then means it was detached.
    assert time.monotonic() - started < 30

    calls = cloud.calls()
    # The VM's own accelerator type decides whether a local workdir is allowed.
    assert [c[4] for c in calls] == ["describe", "ssh"]
    assert "--worker=all" in calls[-1]
    for i, home in enumerate(cloud.workers):
        _wait_for(home / "trainer.json")
        record = json.loads((home / "trainer.json").read_text())
        assert record["argv"] == ["train.py", *TRAIN_ARGS]
        assert record["cwd"] == str(home / "embeddings")
        assert record["session_leader"], "train.py must run in its own session (setsid)"
        assert not record["stdin_is_tty"]
        log = home / "embeddings-logs" / f"train-worker-{i}.log"
        _wait_for(log)

    status = cloud.run("status")
    assert status.returncode == 0, status.stderr
    for i in range(2):
        assert f"worker-{i}: train.py running" in status.stdout

    logs = cloud.run("logs")
    assert logs.returncode == 0, logs.stderr
    for i in range(2):
        assert f"[worker-{i}] fake trainer started" in logs.stdout

    # A second run while one is going would race on the same workdir.
    again = cloud.run("run", "--", *TRAIN_ARGS)
    assert again.returncode != 0
    assert "already running" in again.stderr

    stop = cloud.run("stop")
    assert stop.returncode == 0, stop.stderr
    assert "--worker=all" in cloud.calls()[-1]
    for i, home in enumerate(cloud.workers):
        assert (home / "trainer-got-sigterm").exists()
        assert f"worker-{i}: stopped" in stop.stdout
    status = cloud.run("status")
    assert "worker-0: train.py not running" in status.stdout


def test_run_appends_workdir_from_environment(cloud):
    cloud.add_workers(1)
    args = ["--config", "configs/tiny.py"]
    result = cloud.run("run", "--", *args, WORKDIR="gs://bucket/w")
    assert result.returncode == 0, result.stderr
    _wait_for(cloud.workers[0] / "trainer.json")
    record = json.loads((cloud.workers[0] / "trainer.json").read_text())
    assert record["argv"] == ["train.py", *args, "--workdir", "gs://bucket/w"]


def test_run_refuses_conflicting_or_missing_workdir(cloud):
    conflict = cloud.run("run", "--", "--config", "c.py", "--workdir=gs://a/1", WORKDIR="gs://a/2")
    assert conflict.returncode != 0
    assert "two workdirs" in conflict.stderr
    missing = cloud.run("run", "--", "--config", "c.py")
    assert missing.returncode != 0
    assert "WORKDIR" in missing.stderr
    assert cloud.calls() == []


def test_run_refuses_a_local_workdir_on_a_multihost_slice(cloud):
    result = cloud.run(
        "run", "--", "--config", "c.py", "--workdir", "runs/x", FAKE_ACCELERATOR_TYPE="v4-32"
    )
    assert result.returncode != 0
    assert "gs://" in result.stderr and "v4-32" in result.stderr
    assert not any(c[4] == "ssh" for c in cloud.calls())


def test_run_allows_a_local_workdir_on_one_host(cloud):
    result = cloud.run("run", "--", "--config", "c.py", "--workdir", "runs/x")
    assert result.returncode == 0, result.stderr
    assert "lost with the VM" in result.stderr
    assert cloud.calls()[-1][4] == "ssh"


def test_ssh_logs_delete_and_copy_data(cloud, tmp_path):
    data_file = tmp_path / "one.jsonl.gz"
    data_file.write_bytes(b"")
    commands = [
        ("ssh", "--worker", "1", "--", "-L", "6006:localhost:6006"),
        ("logs", "--follow", "--worker=0"),
        ("delete",),
        ("copy-data", str(tmp_path), "gs://bucket/data"),
        ("copy-data", str(data_file), "gs://bucket/data/"),
    ]
    for args in commands:
        result = cloud.run(*args)
        assert result.returncode == 0, (args, result.stderr)
    ssh, logs, delete, rsync, cp = cloud.calls()
    assert _flag(ssh, "worker") == "1"
    assert ssh[ssh.index("--") :] == ["--", "-L", "6006:localhost:6006"]
    assert _flag(logs, "worker") == "0"
    assert "tail -n 50 -F" in _remote_command(logs)
    assert delete[1:6] == ["compute", "tpus", "tpu-vm", "delete", "my-tpu"]
    assert rsync == ["gcloud", "storage", "rsync", "--recursive", str(tmp_path), "gs://bucket/data"]
    assert cp == ["gcloud", "storage", "cp", str(data_file), "gs://bucket/data/"]


def test_copy_data_needs_a_bucket_destination(cloud, tmp_path):
    result = cloud.run("copy-data", str(tmp_path), str(tmp_path / "elsewhere"))
    assert result.returncode != 0
    assert "gs://BUCKET/PATH" in result.stderr


@pytest.mark.parametrize(
    "verb",
    [["create"], ["setup"], ["run", "--", "--config", "c.py", "--workdir", "gs://b/w"], ["logs"],
     ["status"], ["ssh"], ["stop"], ["delete"], ["copy-data", "data", "gs://b/d"]],
)  # fmt: skip
def test_dry_run_prints_and_runs_nothing(cloud, verb):
    result = cloud.run("--dry-run", *verb)
    assert result.returncode == 0, result.stderr
    assert "+ gcloud " in result.stderr
    assert not cloud.log.exists(), "a dry run must not call gcloud, not even to check the login"


def test_worker_scripts_are_valid_shell(cloud):
    for verb in (["setup"], ["run", "--", *TRAIN_ARGS], ["logs"], ["status"], ["stop"]):
        assert cloud.run(*verb).returncode == 0
    scripts = [_remote_command(c) for c in cloud.calls() if c[4] == "ssh"]
    assert len(scripts) == 5
    for script in scripts:
        for shell in ("bash", "sh"):
            check = subprocess.run([shell, "-n", "-c", script], capture_output=True, text=True)
            assert check.returncode == 0, (shell, script, check.stderr)


def test_missing_gcloud_is_reported(cloud, tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    result = cloud.run("create", PATH=str(empty))
    assert result.returncode != 0
    assert "gcloud not found" in result.stderr
    assert "https://cloud.google.com/sdk/docs/install" in result.stderr


def test_no_active_account_is_reported(cloud):
    result = cloud.run("create", FAKE_GCLOUD_ACCOUNT="")
    assert result.returncode != 0
    assert "no active account" in result.stderr
    assert "gcloud auth login" in result.stderr
    assert cloud.calls() == []


@pytest.mark.parametrize(
    "variable, flag", [("TPU_NAME", "--name"), ("ZONE", "--zone"), ("PROJECT", "--project")]
)
def test_missing_setting_names_the_variable_and_flag(cloud, variable, flag):
    del cloud.env[variable]
    result = cloud.run("status")
    assert result.returncode != 0
    assert f"{variable} is not set" in result.stderr
    assert flag in result.stderr
    assert not cloud.log.exists()


def test_bad_verb_and_flag_are_reported(cloud):
    verb = cloud.run("launch")
    assert verb.returncode != 0 and "unknown verb 'launch'" in verb.stderr
    flag = cloud.run("create", "--zoen", "x")
    assert flag.returncode != 0 and "unknown flag --zoen" in flag.stderr


def test_help_mentions_every_verb_and_resuming(cloud):
    result = cloud.run("help")
    assert result.returncode == 0
    for verb in ("create", "setup", "run", "logs", "status", "ssh", "stop", "delete", "copy-data"):
        assert re.search(rf"^  {verb}\b", result.stdout, re.M), verb
    assert "resumes" in result.stdout and "same workdir" in result.stdout


def test_shellcheck_passes():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
