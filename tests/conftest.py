"""Shared fixtures: every test's worker processes are checked for leaks."""

from __future__ import annotations

import gc
import os
import sys

import psutil
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` here and in workers
# litellm (under dspy) must not try to fetch its model cost map: the tests run offline
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from helpers.processes import is_tracker  # after the path above


@pytest.fixture
def no_leaked_workers():
    """Fail if a test leaves worker processes behind (after a short grace period).

    Processes that existed before the test (a shared Ray cluster, say) are not its workers.
    """
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield
    gc.collect()  # a warm pool (procval.Workers, kept by a dspy Evaluate) the test dropped ends
    deadline = psutil.time.time() + 10
    while True:
        alive = [
            p for p in me.children(recursive=True) if p.pid not in before and _is_worker(p, me)
        ]
        if not alive or psutil.time.time() > deadline:
            break
        psutil.time.sleep(0.1)
    assert not alive, f"worker processes outlived the run: {[(p.pid, _command(p)) for p in alive]}"


def _is_worker(proc: psutil.Process, me: psutil.Process) -> bool:
    """Not a resource tracker, nor the fork server (one per test process, by design).

    Workers forked by the server carry its command line too, but they are its children.
    """
    try:
        command = " ".join(proc.cmdline())
        if "_forkserver" in command and proc.ppid() == me.pid:
            return False
        return not is_tracker(proc)
    except psutil.Error:
        return False


def _command(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:160]
    except psutil.Error:
        return "?"
