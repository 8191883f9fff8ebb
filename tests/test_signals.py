"""Ctrl-C and kill -9 of the parent: workers die with it, promptly. Real processes and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

SCRIPT = textwrap.dedent("""
    import sys, time
    import procval

    def slow(example):
        time.sleep(0.2 if example % 7 else 3600)  # some examples never return
        return example

    print("started", flush=True)
    procval.evaluate(slow, range(10_000), lambda e, p: 1.0, workers=2, threads=4,
                     progress=False)
""")


def start(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "started"
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + 30
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline:
        workers = [
            p
            for p in parent.children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())
        ]
        if len(workers) >= 2:
            break
        time.sleep(0.1)
    assert len(workers) >= 2, "workers did not start"
    time.sleep(1.0)  # let them get busy
    return proc, workers


def assert_all_gone(processes, within: float) -> None:
    deadline = time.monotonic() + within
    alive = processes
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    assert not alive, f"processes outlived their parent: {[p.pid for p in alive]}"


@pytest.mark.slow
def test_ctrl_c_kills_workers_and_exits_promptly(tmp_path):
    proc, workers = start(tmp_path)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    elapsed = time.monotonic() - sent
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert elapsed < 5, f"took {elapsed:.1f}s to exit after SIGINT"
    assert_all_gone(workers, within=3)


@pytest.mark.slow
def test_kill_9_of_the_parent_leaves_no_orphaned_workers(tmp_path):
    proc, workers = start(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert_all_gone(workers, within=5)
