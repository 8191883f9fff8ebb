"""One way to start, watch, signal and reap a run in another process; every wait bounded."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import pytest

TESTS = str(Path(__file__).resolve().parent.parent)


def start(
    command: list[str], *, env: dict[str, str] | None = None, **popen: Any
) -> subprocess.Popen:
    """Start ``command`` with ``tests/`` on its path (``helpers`` importable) and text pipes.

    Args:
        command: the argv; a ``sys.executable`` script or ``-c`` code, or see :func:`start_cli`.
        env: variables added to this process's environment.
        **popen: passed to :class:`subprocess.Popen` (e.g. ``start_new_session=True``, to
            signal its process group as a terminal's Ctrl-C does).
    """
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    options: dict[str, Any] = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(
        command, text=True, env={**os.environ, "PYTHONPATH": path, **(env or {})}, **options
    )


def start_cli(*args: object, env: dict[str, str] | None = None, **popen: Any) -> subprocess.Popen:
    """Start ``python -m procval ARGS`` (see :func:`start`)."""
    return start([sys.executable, "-m", "procval", *map(str, args)], env=env, **popen)


def stored(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(rows, distinct ids) in a store, read with plain sqlite3; (0, 0) while it is not there."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT COUNT(*), COUNT(DISTINCT example_id) FROM rows").fetchone()
    except sqlite3.Error:
        return (0, 0)


def wait_for_rows(
    path: str | os.PathLike[str], n: int, proc: subprocess.Popen, within: float = 60.0
) -> None:
    """Return once ``n`` rows are in the store; fail if ``proc`` ends or ``within`` s pass."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        if stored(path)[0] >= n:
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"fewer than {n} rows reached the store within {within}s")


def is_tracker(proc: psutil.Process) -> bool:
    """Whether ``proc`` is a resource tracker: loky's or CPython's, started or forked by procval.

    A tracker forked from procval's fork server carries the server's command line; its name
    is ``procval-tracker`` (``procval.backends._trackers``).
    """
    try:
        return proc.name() == "procval-tracker" or "resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def wait_for_workers(proc: subprocess.Popen, n: int, within: float = 30.0) -> list[psutil.Process]:
    """The run's worker processes (loky's resource tracker left out), once there are ``n``."""
    parent, deadline = psutil.Process(proc.pid), time.monotonic() + within
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline:
        workers = [child for child in parent.children(recursive=True) if not is_tracker(child)]
        if len(workers) >= n:
            return workers
        time.sleep(0.1)
    pytest.fail(f"{len(workers)} of {n} workers started within {within}s")


def signal_group(proc: subprocess.Popen, signum: int = signal.SIGINT) -> None:
    """Send ``signum`` to the process group ``proc`` leads (``start_new_session=True``)."""
    os.killpg(proc.pid, signum)


def stop(proc: subprocess.Popen, *, group: bool = False) -> None:
    """SIGKILL ``proc`` (its group if ``group``) and reap it, bounded; safe when it has ended."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
        proc.communicate(timeout=10)


def is_alive(process: psutil.Process) -> bool:
    """Running and not a zombie."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # it ended between the two questions
        return False


def assert_gone(processes: Iterable[psutil.Process], within: float = 10.0) -> None:
    """Fail unless every process has exited within ``within`` seconds."""
    deadline = time.monotonic() + within
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if is_alive(p)]
        time.sleep(0.05)
    assert not alive, f"processes outlived their parent: {[p.pid for p in alive]}"
