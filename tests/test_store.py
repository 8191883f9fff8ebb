"""The run store: rows in SQLite, resume, refusal of mismatches, secrets, other files."""

from __future__ import annotations

import gc
import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import procval
from helpers import store_programs
from helpers.processes import assert_gone, start, stop, wait_for_rows
from helpers.rows import make_row as row
from procval.config import Config
from procval.results import RowError
from procval.run.snapshot import take_snapshot
from procval.store.readers import count_rows, iter_rows, sessions
from procval.store.writer import StoreSink

SECRET = "sk-live-0123456789-do-not-store"


def snapshot(name: str = "a", **values):
    return take_snapshot(Config(name=name, values=values))


def write(path, rows, *, config="a", values=None, fresh=False, duration=1.0):
    sink = StoreSink(str(path), fresh=fresh, configs=[config])
    sink.begin(snapshot(config, **(values or {})))
    sink.add(config, rows)
    result = sink.result(config, duration)
    sink.close(completed=True)
    return result


def store_bytes(path: Path) -> bytes:
    return b"".join(
        Path(f"{path}{suffix}").read_bytes()
        for suffix in ("", "-wal", "-shm")
        if Path(f"{path}{suffix}").exists()
    )


# ---------------------------------------------------------------- rows in, rows out


def test_rows_round_trip_through_load(tmp_path):
    path = tmp_path / "run.db"
    error = RowError("KeyError", "'thirteen'", "Traceback ...\nKeyError: 'thirteen'")
    rows = [
        row(0, 3, prediction=store_programs.Answer(6)),
        row(1, "3", prediction={"b": 1, "a": [1, 2]}),
        row(2, "x", prediction=None, error=error, score=0.0),
        row(3, "nan", prediction=float("nan"), score=math.nan),
    ]
    result = write(path, rows, duration=2.5)
    assert (result.totals.n, result.totals.errors) == (4, 1)
    assert result.error_types == {"KeyError": 1}

    loaded = procval.load(path)
    assert list(loaded) == ["a"]
    back = loaded["a"]
    assert back.duration == 2.5
    assert [r.example_id for r in back.rows] == [3, "3", "x", "nan"]  # 3 and "3" differ
    assert back.rows[0].prediction == {"value": 6, "note": "dataclass"}
    assert back.rows[1].prediction == {"a": [1, 2], "b": 1}
    assert back.rows[0].example == {"id": 3, "x": 0}
    assert back.rows[2].error == error
    assert back.rows[3].prediction == "nan" and math.isnan(back.rows[3].score)
    assert (back.rows[0].worker_pid, back.rows[0].node, back.rows[0].attempts) == (4242, "here", 1)
    assert [r["example_id"] for r in iter_rows(path)] == [3, "3", "x", "nan"]
    assert count_rows(path) == 4 and count_rows(path, ["other"]) == 0


def test_scores_come_from_the_store_without_reading_rows(tmp_path, monkeypatch):
    path = tmp_path / "run.db"
    write(path, [row(i, score=i % 2) for i in range(10)])

    def no_rows(self):
        raise AssertionError("rows were read")

    monkeypatch.setattr("procval.store.readers.RowLoader.__call__", no_rows)
    result = procval.load(path)["a"]
    assert (len(result), result.score, result.totals.errors) == (10, 0.5, 0)
    assert "score 0.5000 over 10 examples" in result.summary()


def test_resume_skips_stored_examples_and_sums_durations(tmp_path):
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(5)], duration=1.0)
    sink = StoreSink(str(path), fresh=False, configs=["a"])
    prior = sink.begin(snapshot("a"))
    assert (prior.n, prior.score_sum) == (5, 5.0)
    assert sink.is_done("a", 0, 0, {"id": 0, "x": 0})
    assert not sink.is_done("a", 7, 7, {"id": 7, "x": 7})
    assert not sink.is_done("a", 0, "0", {"id": "0", "x": 0})  # a str id is another id
    sink.add("a", [row(7)])
    result = sink.result("a", 2.0)
    sink.close(completed=True)
    sink.close(completed=True)  # idempotent
    assert (len(result), result.duration) == (6, 3.0)
    assert [s["status"] for s in sessions(path)] == ["completed", "completed"]


def test_changed_example_under_a_stored_id_is_refused(tmp_path):
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(3)])
    sink = StoreSink(str(path), fresh=False, configs=["a"])
    sink.begin(snapshot("a"))
    assert sink.is_done("a", 1, 1, {"x": 1, "id": 1})  # key order does not matter
    with pytest.raises(procval.StoreMismatchError, match=r"example 1 of config 'a'.*fresh=True"):
        sink.is_done("a", 1, 1, {"id": 1, "x": 100})
    sink.close(completed=False)


def test_other_config_under_the_same_name_is_refused_and_fresh_starts_over(tmp_path):
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(3)], values={"model": "small"})
    write(path, [row(i, config="b") for i in range(2)], config="b")
    sink = StoreSink(str(path), fresh=False, configs=["a"])
    with pytest.raises(procval.StoreMismatchError) as info:
        sink.begin(snapshot("a", model="large"))
    message = str(info.value)
    assert "config 'a'" in message and "values changed" in message
    assert "fresh=True" in message and "--fresh" in message and "3 stored rows" in message
    assert count_rows(path) == 5  # nothing was changed

    result = write(path, [row(9)], values={"model": "large"}, fresh=True)
    assert [r.example_id for r in result.rows] == [9]
    assert count_rows(path, ["b"]) == 2  # fresh only discards the configs being run


def test_a_failing_begin_changes_nothing(tmp_path):
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(3)], config="a")
    write(path, [row(i, config="b") for i in range(3)], config="b", values={"v": 1})
    sink = StoreSink(str(path), fresh=False, configs=["a", "b"])
    sink.begin(snapshot("a"))
    with pytest.raises(procval.StoreMismatchError, match="config 'b'"):
        sink.begin(snapshot("b", v=2))
    sink.close(completed=False)
    assert len(sessions(path)) == 2 and count_rows(path) == 6
    write(path, [row(5)], config="a")  # the failed begin released the store at once
    assert count_rows(path, ["a"]) == 4


def test_env_values_never_reach_the_store_file(tmp_path):
    path = tmp_path / "run.db"
    config = Config(name="a", env={"STORE_TEST_SECRET": SECRET})
    sink = StoreSink(str(path), fresh=False, configs=["a"])
    sink.begin(take_snapshot(config, store_programs.has_secret, store_programs.metric))
    sink.add("a", [row(i) for i in range(50)])
    assert Path(f"{path}-wal").exists()  # committed rows are in the WAL before close
    assert SECRET.encode() not in store_bytes(path)
    sink.close(completed=True)
    data = store_bytes(path)
    assert SECRET.encode() not in data
    assert b"STORE_TEST_SECRET" in data  # the name is kept, with a hash of the value


# ---------------------------------------------------------------- files that are not stores


def test_files_that_are_not_stores_are_refused_untouched(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE things (x)")
    db.close()
    before = other.read_bytes()
    for path, reason in ((text, "not a database"), (other, "SQLite database of another kind")):
        with pytest.raises(procval.StoreError, match=reason) as info:
            StoreSink(str(path), fresh=False, configs=["a"])
        assert "not a procval run store" in str(info.value) and "\n" not in str(info.value)
        with pytest.raises(procval.StoreError, match="not a procval run store"):
            procval.load(path)
    assert other.read_bytes() == before and text.read_text() == "hello\n"
    assert not Path(f"{other}-wal").exists()


def test_missing_store_and_missing_folder(tmp_path):
    missing = tmp_path / "missing.db"
    with pytest.raises(procval.StoreError, match=f"no run store at {missing}"):
        procval.load(missing)
    assert not missing.exists()  # reading never creates a file
    write(tmp_path / "no" / "run.db", [row(0)])  # a new store's folders are made for it
    assert len(procval.load(tmp_path / "no" / "run.db")["a"].rows) == 1
    with pytest.raises(procval.StoreError, match="has no config 'zz'"):
        write(tmp_path / "run.db", [row(0)])
        list(iter_rows(tmp_path / "run.db", ["zz"]))


# ---------------------------------------------------------------- through evaluate


@pytest.mark.slow
def test_resume_runs_only_the_rest(tmp_path, monkeypatch, no_leaked_workers):
    log, path = tmp_path / "calls.log", tmp_path / "run.db"
    monkeypatch.setenv(store_programs.LOG_VARIABLE, str(log))

    def dataset(n):
        return ({"id": f"ex{i}", "x": i} for i in range(n))  # a generator: read lazily

    run = dict(store=path, workers=2, progress=False)
    first = procval.evaluate(store_programs.logged, dataset(12), store_programs.metric, **run)
    assert len(first) == 12 and sorted(store_programs.calls(log)) == sorted(
        f"ex{i}" for i in range(12)
    )
    result = procval.evaluate(store_programs.logged, dataset(30), store_programs.metric, **run)
    calls = store_programs.calls(log)
    assert len(calls) == 30 and len(set(calls)) == 30  # the 12 stored examples did not run again
    assert len(result) == 30 and len(result.rows) == 30
    assert result.error_types == {"KeyError": 1}
    assert result.rows[1].prediction == {"value": 2, "note": "dataclass"}
    assert procval.load(path)["default"].score == result.score == 29 / 30

    changed = [{"id": "ex0", "x": 1000}]
    with pytest.raises(procval.StoreMismatchError, match="example 'ex0'"):
        procval.evaluate(store_programs.logged, iter(changed), store_programs.metric, **run)
    other = Config(values={"prompt": "v2"})
    with pytest.raises(procval.StoreMismatchError, match="config 'default'"):
        procval.evaluate(store_programs.logged, changed, store_programs.metric, config=other, **run)
    again = procval.evaluate(
        store_programs.logged, changed, store_programs.metric, config=other, fresh=True, **run
    )
    assert [r.prediction["value"] for r in again.rows] == [2000]


def test_secret_in_config_env_is_not_in_the_store(tmp_path, no_leaked_workers):
    path = tmp_path / "run.db"
    config = Config(env={"STORE_TEST_SECRET": SECRET})
    result = procval.evaluate(
        store_programs.has_secret,
        [{"id": i} for i in range(20)],
        lambda example, prediction: prediction,
        config=config,
        store=path,
        workers=1,
        progress=False,
    )
    assert result.score == 1.0  # the workers saw the secret ...
    assert SECRET.encode() not in store_bytes(path)  # ... the store never did


RESUME_A_FINISHED_RUN = """
import sys, procval
for _ in range(2):
    result = procval.evaluate(abs, list(range(10)), lambda e, p: 1.0, workers=1,
                              store=sys.argv[1], progress=False)
print(len(result))
"""


@pytest.mark.slow
def test_resuming_a_finished_run_of_a_list_returns(tmp_path):
    # In a subprocess: a regression (the scheduler waiting forever for work) must not hang pytest.
    out = subprocess.run(
        [sys.executable, "-c", RESUME_A_FINISHED_RUN, str(tmp_path / "run.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "10", out.stderr


# ---------------------------------------------------------------- one writer at a time


def test_one_writer_at_a_time_and_readers_never_need_the_lock(tmp_path):
    path, lock = tmp_path / "run.db", Path(f"{tmp_path / 'run.db'}.lock")
    write(path, [row(i) for i in range(3)])
    assert not lock.exists()  # a closed run leaves no lock file behind
    first = StoreSink(str(path), fresh=False, configs=["a"])
    first.begin(snapshot("a"))
    first.add("a", [row(3)])
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    with pytest.raises(procval.StoreLockedError) as info:
        StoreSink(str(path), fresh=False, configs=["b"])  # even for another config
    message = str(info.value)
    assert f"the run store {path} is already being written by this process" in message
    assert (info.value.path, info.value.pid) == (str(path), os.getpid()) and "\n" not in message
    assert isinstance(info.value, procval.StoreError)
    # readers neither wait for the writer nor take its lock
    assert len(procval.load(path)["a"].rows) == 4 and count_rows(path) == 4
    assert len(list(iter_rows(path))) == 4 and sessions(path)[-1]["status"] == "running"
    (tmp_path / "link.db").symlink_to(path)  # another path to the same store, the same lock
    with pytest.raises(procval.StoreLockedError):
        StoreSink(str(tmp_path / "link.db"), fresh=False, configs=["a"])
    first.close(completed=True)
    assert not lock.exists()
    write(path, [row(5)])  # free again at once

    forgotten = StoreSink(str(path), fresh=False, configs=["a"])  # never closed ...
    del forgotten
    gc.collect()
    write(path, [row(6)])  # ... released when collected
    assert count_rows(path) == 6


def test_a_lock_file_left_by_a_killed_run_is_not_a_lock(tmp_path):
    path, lock = tmp_path / "run.db", Path(f"{tmp_path / 'run.db'}.lock")
    write(path, [row(0)])
    lock.write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "started": 0}))
    result = write(path, [row(1)])  # the kernel holds no lock: the file's content is not one
    assert len(result) == 2 and not lock.exists()


def test_a_store_that_refuses_to_resume_is_released(tmp_path):
    path = tmp_path / "run.db"
    write(path, [row(0)], values={"model": "small"})
    for _ in range(2):  # the refused call released the store: the same refusal, not a lock
        with pytest.raises(procval.StoreMismatchError):
            procval.evaluate(abs, [0], lambda e, p: 1.0, config=Config(name="a"), store=path)
    assert not Path(f"{path}.lock").exists()


def test_a_run_failing_before_its_workers_start_releases_the_store(tmp_path, monkeypatch):
    import procval.run.api

    def unavailable(backend):
        raise RuntimeError("no cluster at that address")

    path = tmp_path / "run.db"
    monkeypatch.setattr(procval.run.api, "_backend", unavailable)
    with pytest.raises(RuntimeError, match="no cluster") as info:
        procval.evaluate(abs, [0, 1], lambda e, p: 1.0, store=path, progress=False)
    monkeypatch.undo()
    # the traceback is still alive (as in a notebook, which keeps the last one): it must not
    # be what holds the store
    assert info.tb is not None
    assert not Path(f"{path}.lock").exists()
    result = procval.evaluate(abs, [0, 1], lambda e, p: 1.0, store=path, progress=False)
    assert result.score == 1.0


HOLD_A_RUN = """
import sys, time
import procval
from helpers import store_programs
from helpers.processes import assert_gone, start, stop, wait_for_rows
from helpers.rows import make_row as row

PAUSE = float(sys.argv[2])

def program(example):
    time.sleep(PAUSE)
    return store_programs.logged(example)

examples = ({"id": f"ex{i}", "x": i} for i in range(int(sys.argv[3])))
result = procval.evaluate(program, examples, store_programs.metric, store=sys.argv[1],
                          workers=1, progress=False)
print(len(result))
"""


def run_script(path, pause, n, log):
    command = [sys.executable, "-c", HOLD_A_RUN, str(path), str(pause), str(n)]
    return start(command, env={store_programs.LOG_VARIABLE: str(log)})


def open_paths(process: psutil.Process) -> set[str]:
    try:
        return {f.path for f in process.open_files()}
    except psutil.NoSuchProcess:
        return set()


@pytest.mark.slow
def test_a_live_run_holds_the_store_and_its_kill_9_frees_it_at_once(tmp_path):
    path, log = tmp_path / "run.db", tmp_path / "calls.log"
    lock = f"{path}.lock"
    holder = run_script(path, 0.01, 3000, log)
    try:
        wait_for_rows(path, 20, holder)
        workers = psutil.Process(holder.pid).children(recursive=True)
        assert workers, "the run has no worker processes"
        # The lock is the holder's alone: no worker (nor loky's resource tracker) inherited it,
        # so none can keep the store locked once the holder is gone.
        assert lock in open_paths(psutil.Process(holder.pid))
        assert not [w.pid for w in workers if lock in open_paths(w)]

        mine = {p.pid for p in psutil.Process().children(recursive=True)}
        started = time.monotonic()
        with pytest.raises(procval.StoreLockedError) as info:
            procval.evaluate(
                store_programs.logged,
                [{"id": "second", "x": 1}],
                store_programs.metric,
                store=path,
                workers=1,
                progress=False,
            )
        elapsed = time.monotonic() - started
        assert {p.pid for p in psutil.Process().children(recursive=True)} <= mine  # no worker
        assert "second" not in store_programs.calls(log)
        assert elapsed < 5, f"{elapsed:.1f}s to refuse a busy store"
        message = str(info.value)
        host = socket.gethostname()
        assert message.startswith(
            f"the run store {path} is being written by another run: pid {holder.pid} on host "
            f"{host} (-c {path} 0.01 3000, since "
        ), message
        assert f"Wait for it to finish, or stop it (kill {holder.pid}), then run again" in message
        assert message.endswith("; or use another store path")
        assert (info.value.pid, info.value.host) == (holder.pid, host)

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        # at once, whether or not the workers have finished dying: no retry, no wait
        StoreSink(str(path), fresh=False, configs=["default"]).close(completed=False)
    finally:
        stop(holder)
    assert_gone(workers)
    at_kill = count_rows(path)
    assert 20 <= at_kill < 3000

    resumed = run_script(path, 0, 3000, log)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and out.strip() == "3000", err
    calls = store_programs.calls(log)
    assert len(set(calls)) == 3000 and count_rows(path) == 3000
    assert len(calls) - 3000 <= 200, f"{len(calls) - 3000} examples ran twice"  # in flight only
    assert not Path(lock).exists()


class InterruptAfter:
    """A connection that raises KeyboardInterrupt right after ``statement`` ran, once.

    That is where a Ctrl-C lands when SIGINT arrives during the statement: Python runs the signal
    handler as soon as the C call returns, before the next line of the caller.
    """

    def __init__(self, db, statement):
        self._db, self._statement, self.fired = db, statement, False

    def execute(self, sql, *args):
        out = self._db.execute(sql, *args)
        if sql == self._statement and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return out

    def __getattr__(self, name):
        return getattr(self._db, name)


@pytest.mark.parametrize("statement", ["COMMIT", "BEGIN IMMEDIATE"])
def test_ctrl_c_right_after_begin_or_commit_keeps_the_store_consistent(tmp_path, statement):
    path = tmp_path / "run.db"
    sink = StoreSink(str(path), fresh=False, configs=["a"])
    sink.begin(snapshot("a"))
    sink.add("a", [row(0), row(1)])  # committed: the next add begins a new transaction
    sink._db = interrupted = InterruptAfter(sink._db, statement)
    with pytest.raises(KeyboardInterrupt):
        sink.add("a", [row(2)])
    assert interrupted.fired
    sink.close(completed=False)  # as the scheduler does on the way out: must not fail
    assert count_rows(path) == (3 if statement == "COMMIT" else 2)
    assert [s["status"] for s in sessions(path)] == ["stopped"]
    write(path, [row(5)])  # the store is released and writable
