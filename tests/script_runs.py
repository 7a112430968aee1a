"""Runs benchmark-style scripts as a user would, for the smoke tests of bench/ and tools/.

Each script is a subprocess started with its command-line flags; all of a test
module's scripts start at once (their compilations are single-threaded, so two
cores finish them in about half the time of one after the other), and each
test reads its script's result: the last line of its output, one JSON object.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def launch(scripts: dict[str, list[str]]):
    """Starts `{name: [script path relative to the repository, *flags]}` at once.

    Yields `{name: Popen}` (use as a fixture body) and kills what is still
    running afterwards. Optimisation level 0 compiles the tiny steps faster: the
    timings are not judged by these tests.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / path), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for name, (path, *flags) in scripts.items()
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


def result(launched, name: str) -> dict:
    """The JSON result of script `name`, after checking it printed a Markdown table."""
    out, err = launched[name].communicate(timeout=600)
    assert launched[name].returncode == 0, out[-2000:] + err[-3000:]
    lines = out.strip().splitlines()
    assert lines[0].strip(), "the table's title line comes first"
    assert any(line.startswith("|---") for line in lines), "a Markdown table is printed"
    return json.loads(lines[-1])


def positive(*values):
    """Each value is a finite positive number."""
    for value in values:
        assert isinstance(value, int | float) and value > 0 and math.isfinite(value), value
