"""The conformance suite against the default, local loky backend, with and without its fork server.

The fork server (``procval/backends/_forkserver.py``) must not weaken the invariant: a worker is a
process that got nothing from the parent but its snapshot, serves one config, and dies with the
parent. The tests below attack that directly, with real processes and signals.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from typing import Any

import psutil
import pytest

import procval
from backend_suite import BackendSuite
from helpers import toyframework, toys
from helpers.processes import is_tracker
from procval.backends import _forkserver
from procval.backends.loky import LokyBackend
from procval.run.snapshot import take_snapshot
from procval.wire import Shard, WorkerOptions, WorkerSpec

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the fork server runs on Linux only"
)


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    """Start this process's fork server before the tests, as the first evaluate() would.

    It lives as long as the test process (like loky's resource trackers), so the suite's leak
    checks must find it already there: it is not a worker.
    """
    return _forkserver.get_server({})


class TestLoky(BackendSuite):
    backend = "loky"


class TestLokyForkExec(BackendSuite):
    """The same suite with every worker started as a new interpreter (loky's fork+exec)."""

    @property
    def backend(self):
        return LokyBackend(fork_server=False)


# ---------------------------------------------------------------- probes (run in workers)


def probe(example: Any) -> dict[str, Any]:
    """What a worker holds: its parent, modules, environment, and a framework's global state."""
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "modules": sorted(sys.modules),
        "parent_only": "procval_test_parent_only" in sys.modules,
        "model": toyframework._global["model"],
        "later": os.environ.get("PROCVAL_TEST_LATER"),
        "hashseed": os.environ.get("PYTHONHASHSEED"),
    }


def slow(example: Any) -> int:
    time.sleep(0.2)
    return example


def run(program, dataset, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("workers", 2)
    return procval.evaluate(program, dataset, toys.any_score, **kwargs)


def server_pid() -> int:
    server = _forkserver._server
    assert server is not None and server.alive()
    return server.pid


# ---------------------------------------------------------------- the fork server


@linux_only
def test_workers_are_forked_from_a_clean_server_that_never_saw_the_parents_state(monkeypatch):
    if _forkserver._server is not None:  # a new server, started while the parent is dirty
        _forkserver._server.stop()
        _forkserver._server = None
    toyframework.configure(model="parent's")
    monkeypatch.setitem(sys.modules, "procval_test_parent_only", types.ModuleType("x"))
    try:
        forked = run(probe, list(range(4)))
        execd = run(probe, list(range(4)), backend=LokyBackend(fork_server=False))
    finally:
        toyframework.configure(model=None)
    server = server_pid()
    for row in forked.rows:
        assert row.prediction["ppid"] == server != os.getpid()
        assert row.prediction["model"] is None  # the parent configured "parent's"
        assert not row.prediction["parent_only"]
    assert {r.prediction["ppid"] for r in execd.rows} == {os.getpid()}
    # a forked worker holds no module a new interpreter running the same program would not
    extra = set(forked.rows[0].prediction["modules"]) - set(execd.rows[0].prediction["modules"])
    assert extra <= {"procval.backends._forkserver"}, extra


@linux_only
def test_env_reaches_the_worker_before_the_snapshot_is_unpickled(tmp_path, monkeypatch):
    (tmp_path / "procval_test_env_probe.py").write_text(
        textwrap.dedent("""
            import os
            AT_IMPORT = os.environ.get("PROCVAL_TEST_KEY")  # read once, when imported

            def program(example):
                return AT_IMPORT
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import procval_test_env_probe  # the parent imports it without the variable

    assert procval_test_env_probe.AT_IMPORT is None
    results = run(
        procval_test_env_probe.program,
        list(range(6)),
        configs={
            "a": procval.Config(env={"PROCVAL_TEST_KEY": "key-a"}),
            "b": procval.Config(env={"PROCVAL_TEST_KEY": "key-b"}),
        },
    )
    assert [r.prediction for r in results["a"].rows] == ["key-a"] * 6
    assert [r.prediction for r in results["b"].rows] == ["key-b"] * 6
    assert "PROCVAL_TEST_KEY" not in os.environ
    # the parent's environment as it is at the call, not as it was when the server started
    monkeypatch.setenv("PROCVAL_TEST_LATER", "set after the server started")
    rows = run(probe, list(range(2))).rows
    assert {r.prediction["later"] for r in rows} == {"set after the server started"}
    assert {r.prediction["ppid"] for r in rows} == {server_pid()}


@linux_only
def test_a_variable_read_at_interpreter_start_gets_a_new_interpreter():
    result = run(probe, list(range(3)), config=procval.Config(env={"PYTHONHASHSEED": "7"}))
    assert {r.prediction["ppid"] for r in result.rows} == {os.getpid()}  # fork+exec
    assert {r.prediction["hashseed"] for r in result.rows} == {"7"}
    assert "PYTHONHASHSEED" not in os.environ or os.environ["PYTHONHASHSEED"] != "7"


@pytest.mark.parametrize("fork_server", [True, False], ids=["forked", "fork+exec"])
def test_a_shard_sent_to_a_worker_that_just_died_fails_its_future_not_the_caller(fork_server):
    """The scheduler may send a shard before it has heard that the worker died (CI saw this:
    a segfault between two shards). loky's submit() raises its TerminatedWorkerError then; the
    worker hands it back as a failed future, which the scheduler's recovery handles."""
    backend = LokyBackend(fork_server=fork_server)
    spec = WorkerSpec(take_snapshot(procval.Config(), toys.program, toys.metric), WorkerOptions())
    worker = backend.start_worker(spec)
    drain = pickle.dumps(Shard([], True))
    try:
        worker.submit(drain).result(timeout=60)  # started, snapshot installed
        os.kill(worker.pid, signal.SIGKILL)
        flags = worker._executor._flags  # loky's: set once its thread has seen the death
        deadline = time.monotonic() + 30
        while flags.broken is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert flags.broken is not None, "loky never noticed the death"
        future = worker.submit(drain)  # raised TerminatedWorkerError before
        error = future.exception(timeout=5)
        assert error is not None
        assert worker.death(error) == "the worker process died with exit code SIGKILL(-9)"
    finally:
        worker.kill()
        backend.shutdown()


def test_the_result_pipes_writer_closes_once_when_threads_close_it_at_once():
    """loky's thread closes a shutting-down executor's result queue while the reaper's kill()
    may close its writer: a bare ``Connection`` closed by 4 threads at once was closed twice in
    about 1 try of 3 here (EBADF, or closing a file another thread had just opened)."""
    import multiprocessing

    from procval.backends.loky import _SerialClose

    failures: list[OSError] = []
    for _ in range(200):
        reader, writer = multiprocessing.Pipe(duplex=False)
        connection = _SerialClose(writer)
        barrier = threading.Barrier(4)

        def close() -> None:
            barrier.wait()
            try:
                connection.close()
            except OSError as exc:
                failures.append(exc)

        threads = [threading.Thread(target=close) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert writer.closed
        reader.close()
    assert failures == []


@pytest.mark.parametrize("fork_server", [True, False], ids=["forked", "fork+exec"])
def test_a_started_workers_result_writer_is_the_serial_one_and_a_kill_still_ends_it(fork_server):
    from procval.backends.loky import _SerialClose

    backend = LokyBackend(fork_server=fork_server)
    spec = WorkerSpec(take_snapshot(procval.Config(), toys.program, toys.metric), WorkerOptions())
    worker = backend.start_worker(spec)
    try:
        assert pickle.loads(worker.submit(pickle.dumps(Shard([], True))).result(timeout=60))
        queue = worker._executor._result_queue
        assert isinstance(queue._writer, _SerialClose)  # wrapped once the process has its copy
        worker.kill()  # closes the parent's writer through the wrapper, then SIGKILLs
        assert queue._writer.closed
        deadline = time.monotonic() + 30
        while worker.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not worker.alive()
    finally:
        backend.shutdown()


@linux_only
@pytest.mark.slow
def test_killing_the_fork_server_mid_run_kills_its_workers_and_the_run_goes_on():
    first = server_pid()
    killed = threading.Event()
    orphans: list[psutil.Process] = []

    def kill_server_once_workers_run():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                children = psutil.Process(first).children()
            except psutil.NoSuchProcess:
                return
            if len(children) >= 2:
                # once both have returned results: workers that die before their first result
                # count as failing to start, and three of those stop the run (SetupError)
                time.sleep(1.5)
                orphans.extend(psutil.Process(first).children())
                os.kill(first, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_server_once_workers_run)
    killer.start()
    try:
        result = run(slow, list(range(80)), threads=2)  # 4 s
    finally:
        killer.join(timeout=60)
    assert killed.is_set()
    assert [r.example for r in result.rows] == list(range(80))
    assert result.errors == []  # the examples in flight were rerun, in workers of a new server
    assert server_pid() != first  # (and the dead one is reaped)
    _, alive = psutil.wait_procs(orphans, timeout=5)
    assert orphans and not alive, f"workers outlived their fork server: {alive}"


PARENT = textwrap.dedent("""
    import time
    import procval

    def slow(example):
        time.sleep(3600)

    print("started", flush=True)
    procval.evaluate(slow, range(100), lambda e, p: 1.0, workers=2, progress=False)
""")


@linux_only
@pytest.mark.slow
def test_kill_9_of_the_parent_ends_the_server_and_its_workers(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"started"
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        servers: list[psutil.Process] = []
        workers: list[psutil.Process] = []
        trackers: list[psutil.Process] = []
        while time.monotonic() < deadline and len(workers) < 2:
            servers = [p for p in parent.children() if "_forkserver" in " ".join(p.cmdline())]
            children = servers[0].children() if servers else []
            workers = [p for p in children if not is_tracker(p)]
            trackers = [p for p in children if is_tracker(p)]
            time.sleep(0.05)
        assert len(servers) == 1 and len(workers) == 2, "the workers did not start"
        assert len(trackers) == 2  # loky's and CPython's resource trackers, forked by the server
        time.sleep(0.5)  # the workers have installed their snapshot and watch the server
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # the trackers end too, once no process holds their pipes (they clean up first)
        _, alive = psutil.wait_procs([*servers, *workers, *trackers], timeout=5)
        assert not alive, f"outlived their parent: {alive}"
    finally:
        proc.kill()
        proc.communicate(timeout=10)


LEAKY_PARENT = textwrap.dedent("""
    import os, sys
    from multiprocessing import shared_memory
    from loky.backend import resource_tracker
    import procval

    def leak(example):
        # left behind on purpose: the trackers must clean both up once the run's processes end
        memory = shared_memory.SharedMemory(create=True, size=64, name=sys.argv[1])
        memory.close()  # closed, not unlinked
        folder = os.path.join(sys.argv[2], "leaked")
        os.mkdir(folder)
        resource_tracker.register(folder, "folder")
        return os.getpid()

    result = procval.evaluate(leak, [0], lambda e, p: 1.0, workers=1, progress=False)
    assert not result.rows[0].error, result.rows[0].error
    import psutil  # the trackers: one fork of the server each, not an interpreter each

    def tracker(p):
        try:
            return p.name() == "procval-tracker"
        except psutil.Error:  # a process that has just ended (the worker)
            return False

    me = psutil.Process()
    trackers = [p for p in me.children(recursive=True) if tracker(p)]
    assert len(trackers) == 2 and all(p.ppid() != me.pid for p in trackers), trackers
    assert all("_forkserver" in " ".join(p.cmdline()) for p in trackers)
    print("ran", flush=True)
""")


@linux_only
@pytest.mark.slow
def test_the_forked_resource_trackers_clean_up_what_a_worker_left_behind(tmp_path):
    """loky's and CPython's trackers are forked from the fork server, and still do their job."""
    name = f"procval-test-{os.getpid()}-{time.monotonic_ns()}"
    script = tmp_path / "parent.py"
    script.write_text(LEAKY_PARENT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [sys.executable, str(script), name, str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == b"ran", err.decode()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        os.path.exists(f"/dev/shm/{name}") or (tmp_path / "leaked").exists()
    ):
        time.sleep(0.05)
    assert not os.path.exists(f"/dev/shm/{name}"), "CPython's tracker left the shared memory"
    assert not (tmp_path / "leaked").exists(), "loky's tracker left the folder"
