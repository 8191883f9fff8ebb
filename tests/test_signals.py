"""Ctrl-C and kill -9 of the parent: workers die with it, promptly. Real processes and signals."""

from __future__ import annotations

import signal
import sys
import textwrap
import time

import pytest

from helpers.processes import assert_gone, start, stop, wait_for_workers

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


def start_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = start([sys.executable, str(script)])
    assert proc.stdout.readline().strip() == "started"
    workers = wait_for_workers(proc, 2)
    time.sleep(1.0)  # let them get busy
    return proc, workers


@pytest.mark.slow
def test_ctrl_c_kills_workers_and_exits_promptly(tmp_path):
    proc, workers = start_run(tmp_path)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=20)
    finally:
        stop(proc)
    elapsed = time.monotonic() - sent
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    assert elapsed < 5, f"took {elapsed:.1f}s to exit after SIGINT"
    assert_gone(workers, within=3)


@pytest.mark.slow
def test_kill_9_of_the_parent_leaves_no_orphaned_workers(tmp_path):
    proc, workers = start_run(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert_gone(workers, within=5)
