"""A worker process holds only procval's worker side; it picks its run mode once, at start.

A worker imports what it needs to install a snapshot and run shards, nothing of the parent's run,
store or report (sqlite3 and friends cost every worker's start-up). The modules are read from real
workers, started by ``procval.evaluate`` in a fresh interpreter (with the fork server, and by
``fork+exec``); the run mode from ``initialize`` itself, in a subprocess of its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from procval.worker.runtime import RunMode, select_mode

# The program runs in the worker and reports its procval modules; one evaluate() per run mode.
SCRIPT = textwrap.dedent("""
    import asyncio, json, os, sys
    import procval

    def modules(example):
        return sorted(m for m in sys.modules if m.startswith("procval"))

    async def modules_async(example):
        await asyncio.sleep(0)
        return modules(example)

    report = {}
    for name, program, threads in [
        ("inline", modules, 1), ("threads", modules, 2), ("async", modules_async, 2),
    ]:
        result = procval.evaluate(
            program, [0, 1], lambda e, p: 1.0, workers=1, threads=threads, progress=False
        )
        row = result.rows[0]
        assert row.error is None, row.error
        assert row.worker_pid != os.getpid()
        report[name] = row.prediction
    print(json.dumps(report))
""")

PARENT_SIDE = ("procval.report", "procval.store", "procval.run", "procval.results", "procval.cli")
PARENT_SIDE += ("procval.task",)
WORKER_SIDE = (
    "procval",
    "procval.worker",
    "procval.wire",
    "procval.config",
    "procval.errors",
    "procval._pickling",
    "procval._convert",
    "procval._identity",
    "procval.backends",
)


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _worker_modules(tmp_path, fork_server: bool) -> dict[str, list[str]]:
    script = tmp_path / "modules.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env["PROCVAL_FORK_SERVER"] = "1" if fork_server else "0"
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "fork-exec"])
def test_a_worker_imports_no_parent_side_module(tmp_path, fork_server):
    report = _worker_modules(tmp_path, fork_server)
    assert set(report) == {"inline", "threads", "async"}
    for mode, modules in report.items():
        assert "procval.worker.runtime" in modules, mode  # the list is a real worker's
        parent_side = [m for m in modules if _within(m, PARENT_SIDE)]
        assert parent_side == [], f"a {mode} worker imported {parent_side}"
        unexpected = [m for m in modules if not _within(m, WORKER_SIDE)]
        assert unexpected == [], f"a {mode} worker imported {unexpected}: parent or worker side?"


@pytest.mark.parametrize(
    ("installed", "is_async", "threads", "mode"),
    [
        (True, False, 1, RunMode.INLINE),
        (True, False, 0, RunMode.INLINE),
        (True, False, 4, RunMode.THREADS),
        (True, True, 1, RunMode.ASYNC),
        (True, True, 4, RunMode.ASYNC),
        (False, False, 1, RunMode.FAILED),
        (False, False, 4, RunMode.FAILED),
        (False, True, 4, RunMode.FAILED),
    ],
)
def test_select_mode(installed, is_async, threads, mode):
    assert select_mode(installed=installed, is_async=is_async, threads=threads) is mode


# initialize() in a fresh interpreter (it ignores SIGINT and keeps the process's state), then a
# drain shard of three examples; prints the mode and what the shard call answered.
INITIALIZE = textwrap.dedent("""
    import asyncio, json, os, sys
    from procval import _pickling
    from procval.config import Config
    from procval.wire import SetupFailed, Shard, WorkItem, WorkerOptions
    from procval.worker import runtime
    from procval.worker.slots import SlotTable

    def program(example):
        return example * 2

    async def program_async(example):
        await asyncio.sleep(0)
        return example * 2

    def broken_setup():
        raise RuntimeError("no model configured")

    case, threads = sys.argv[1], int(sys.argv[2])
    chosen = {"async": program_async}.get(case, program)
    config = Config(case, setup=broken_setup if case == "broken-setup" else None)
    snapshot = _pickling.dumps((config, chosen, lambda e, p: 1.0), what="snapshot")
    if case == "unreadable":
        snapshot = b"not a pickle"
    table = SlotTable(sys.argv[3], max(1, threads), create=True)  # as the parent does
    runtime.initialize(snapshot, WorkerOptions(threads=threads), sys.argv[3])
    assert table.pid() == os.getpid()  # ready, whatever the mode
    items = [WorkItem(seq, seq, seq) for seq in range(3)]
    done = _pickling.loads(runtime.run_shard(_pickling.dumps(Shard(items, True), what="shard")))
    if isinstance(done, SetupFailed):
        answer = done.traceback.strip().splitlines()[-1]
    else:
        answer = sorted((r.seq, r.prediction) for r in done.results)
    print(json.dumps([runtime._state.mode.name, answer]))
""")


@pytest.mark.parametrize(
    ("case", "threads", "mode"),
    [
        ("sync", 1, RunMode.INLINE),
        ("sync", 3, RunMode.THREADS),
        ("async", 1, RunMode.ASYNC),
        ("async", 3, RunMode.ASYNC),
        ("broken-setup", 3, RunMode.FAILED),
        ("unreadable", 1, RunMode.FAILED),
    ],
)
def test_initialize_picks_the_run_mode_and_run_shard_follows_it(tmp_path, case, threads, mode):
    script = tmp_path / "initialize.py"
    script.write_text(INITIALIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, str(script), case, str(threads), str(tmp_path / "slots")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    name, answer = json.loads(out.stdout)
    assert name == mode.name
    if mode is RunMode.FAILED:
        setup_error = "RuntimeError: no model configured"
        assert (setup_error if case == "broken-setup" else "UnpicklingError") in answer
    else:
        assert answer == [[0, 0], [1, 2], [2, 4]]
