"""No run waits for ever on a worker, and nothing a worker started outlives the run.

Real processes, real signals, through the CLI, every wait bounded:

- a worker stopped (SIGSTOP) between two examples, while it pickles a 100 MB result, is found
  silent (no heartbeat, no CPU time) after ``PROCVAL_LIVENESS`` seconds, killed and replaced, and
  its examples rerun without an attempt counted, with or without ``--timeout``;
- a program's child (``sleep 300``, holding the worker's stdout) dies with its worker, so
  ``procval run ... | cat`` ends when the run does;
- a folder named ``procval`` next to the task file does not replace the workers' procval (the
  fork server imports the parent's); a worker that still imports another procval (started by
  ``fork+exec``) refuses to start, with one line naming both packages.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pytest

import procval
from helpers.processes import TESTS, assert_gone
from procval.run.scheduler import _setup_failure
from procval.wire import SetupFailed
from procval.worker import runtime

TASK = str(Path(__file__).resolve().parent / "helpers" / "liveness_task.py")
pytestmark = pytest.mark.slow


def cli(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 90):
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "procval", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, **env},
        cwd=cwd,
    )


@pytest.mark.parametrize("timeout", [[], ["--timeout", "30"]], ids=["no-timeout", "timeout"])
def test_a_worker_stopped_between_examples_is_replaced_and_the_run_finishes(tmp_path, timeout):
    store = tmp_path / "run.db"
    out = cli(
        "run", f"{TASK}:freeze", "--store", str(store), "--workers", "1", *timeout,
        env={"LIVENESS_DIR": str(tmp_path), "PROCVAL_LIVENESS": "3"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "stopped").exists()  # the worker was stopped (then killed)
    rows = procval.load(store)["default"].rows
    assert sorted(row.example_id for row in rows) == [0, 1, 2, 3]
    assert all(row.error is None and row.attempts == 1 for row in rows)
    assert len(rows[0].prediction) == 100 * 1024 * 1024


def test_a_programs_child_dies_with_its_worker_and_a_pipe_closes_with_the_run(tmp_path):
    store = tmp_path / "run.db"
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    command = f"{sys.executable} -m procval run {TASK}:spawner --store {store} | cat"
    env = {**os.environ, "PYTHONPATH": path, "LIVENESS_DIR": str(tmp_path)}
    pids: list[int] = []
    try:
        out = subprocess.run(
            command, shell=True, capture_output=True, text=True, timeout=60, env=env
        )
        pids = [int(line) for line in (tmp_path / "pids").read_text().split()]
        assert out.returncode == 0, out.stderr
        assert len(pids) == 2
        assert_gone([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)])
    finally:
        for pid in pids or _pids(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pids(folder: Path) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(line) for line in (folder / "pids").read_text().split()]
    return []


def test_a_procval_folder_next_to_the_task_file_does_not_replace_the_workers_procval(tmp_path):
    project = tmp_path / "project"
    (project / "procval").mkdir(parents=True)
    (project / "procval" / "__init__.py").write_text('VERSION = "not procval"\n')
    (project / "task.py").write_text(
        "import procval\n\n"
        "def program(example):\n    return procval.rng().random()\n\n"
        "def metric(example, prediction):\n    return 1.0\n\n"
        "task = procval.Task(program, [{'id': i} for i in range(50)], metric)\n"
    )
    store = tmp_path / "run.db"
    out = cli("run", str(project / "task.py"), "--store", str(store), env={})
    assert out.returncode == 0, out.stderr
    rows = procval.load(store)["default"].rows
    assert len(rows) == 50 and all(row.error is None for row in rows), rows[0].error


def test_a_worker_importing_another_procval_refuses_with_one_line(monkeypatch, tmp_path):
    fake = types.ModuleType("procval")
    fake.__file__ = str(tmp_path / "procval" / "__init__.py")
    real = os.path.dirname(procval.__file__)
    assert runtime.other_procval(real) == ""
    monkeypatch.setitem(sys.modules, "procval", fake)
    reason = runtime.other_procval(real)
    assert str(tmp_path / "procval") in reason and real in reason and "\n" not in reason
    failure = _setup_failure("c", "pid 7", SetupFailed("", reason))
    assert failure.message.count("\n") == 0 and failure.traceback == ""
    assert "config 'c' (pid 7) refused to start" in failure.message
