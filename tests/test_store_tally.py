"""The store's running totals (procval/store/tally.py) always equal a fresh count of the rows."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

import procval
from helpers.processes import start, stop, wait_for_rows
from helpers.rows import make_row as row
from procval.config import Config
from procval.results import RowError
from procval.run.snapshot import take_snapshot
from procval.store import tally
from procval.store.readers import totals
from procval.store.repair import repair
from procval.store.writer import StoreSink
from procval.wire import WorkItem

HERE = Path(__file__).parent
FAILED = RowError("ValueError", "bad")


def resumed_sink(path: Path) -> tuple[StoreSink, int]:
    """Config ``a``'s store opened by a resuming writer, and the rows its resume counted."""
    sink = StoreSink(str(path), fresh=False, configs=["a"])
    return sink, sink.begin(take_snapshot(Config(name="a"))).n


def sink_of(path: Path, names: tuple[str, ...] = ("a",), **options) -> StoreSink:
    sink = StoreSink(str(path), configs=list(names), **{"fresh": False, **options})
    for name in names:
        sink.begin(take_snapshot(Config(name=name)))
    return sink


def counted(path: Path) -> set[tuple]:
    """The totals table, and the same grouping counted afresh from the rows (read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        kept = set(db.execute("SELECT * FROM totals WHERE rows != 0"))
        fresh = set(db.execute(f"{tally._COUNT}{tally._GROUPS}"))
    assert kept == fresh
    return kept


def trusted(path: Path) -> bool:
    """Whether the next writer would use the totals as they are (meta names the last session)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        kept = db.execute("SELECT value FROM meta WHERE key = 'totals'").fetchone()
        (last,) = db.execute("SELECT MAX(id) FROM sessions").fetchone()
    return kept is not None and kept[0] == str(last)


def assert_totals_match(path: Path, config: str = "a", epochs: int = 1) -> None:
    counted(path)
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        for only_ok in (False, True):
            kept = tally.of(db, config, only_ok=only_ok, epochs=epochs)
            fresh = totals(db, config, only_ok=only_ok, epochs=epochs)
            assert (kept.n, kept.errors) == (fresh.n, fresh.errors)
            assert kept.score_sum == pytest.approx(fresh.score_sum, nan_ok=True)


def mixed_rows(start_at: int, n: int, *, epoch: int = 0) -> list:
    """Rows with scores 0.5, failures (score 0) and NaN scores, over ``n`` positions."""
    rows = []
    for i in range(start_at, start_at + n):
        if i % 7 == 3:
            rows.append(row(i, score=0.0, error=FAILED, epoch=epoch))
        else:
            rows.append(row(i, score=math.nan if i % 11 == 5 else 0.5, epoch=epoch))
    return rows


def test_totals_equal_a_fresh_count_after_writes_of_every_kind(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    sink = sink_of(path, ("a", "b"), epochs=2)
    sink.add("a", mixed_rows(0, 40))
    sink.add("a", mixed_rows(0, 40, epoch=1))
    sink.add("b", mixed_rows(0, 25))
    sink.close(completed=True)
    kept = counted(path)
    assert {(config, epoch) for config, epoch, *_ in kept} == {("a", 0), ("a", 1), ("b", 0)}
    for config in ("a", "b"):
        for epochs in (1, 2):
            assert_totals_match(path, config, epochs)
    assert trusted(path)


def test_a_resume_counts_its_rows_from_the_totals_without_a_scan(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    sink = sink_of(path)
    sink.add("a", mixed_rows(0, 30))
    sink.close(completed=False)
    resumed = StoreSink(str(path), fresh=False, configs=["a"])
    statements: list[str] = []
    db = resumed._writer()
    db.set_trace_callback(statements.append)
    found = resumed.begin(take_snapshot(Config(name="a")))
    assert (found.n, found.errors) == (30, 4) and math.isnan(found.score_sum)
    assert not [s for s in statements if "COUNT(" in s or "TOTAL(" in s]
    resumed.add("a", mixed_rows(30, 10))
    resumed.close(completed=True)
    assert_totals_match(path)
    assert procval.load(path)["a"].totals.n == 40


def test_retry_errors_replaces_failed_rows_in_the_totals(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    sink = sink_of(path)
    sink.add("a", mixed_rows(0, 30))
    sink.close(completed=True)
    retried = sink_of(path, retry_errors=True)
    assert retried.begin(take_snapshot(Config(name="a"))).n == 26  # the successful rows
    fixed = [row(i, score=1.0) for i in range(30) if i % 7 == 3]
    retried.add("a", [*fixed, row(30, score=0.25), row(0, score=1.0)])  # 0 stays: it succeeded
    retried.close(completed=True)
    assert_totals_match(path)
    assert procval.load(path)["a"].totals.errors == 0


def test_fresh_starts_the_totals_over(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    sink = sink_of(path, ("a", "b"))
    sink.add("a", mixed_rows(0, 30))
    sink.add("b", mixed_rows(0, 5))
    sink.close(completed=True)
    again = sink_of(path, fresh=True)
    again.add("a", mixed_rows(0, 3))
    again.close(completed=True)
    assert_totals_match(path, "a")
    assert_totals_match(path, "b")
    assert procval.load(path)["a"].totals.n == 3


def test_a_duplicate_id_leaves_totals_the_next_writer_recounts(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    sink = sink_of(path)
    sink.add("a", mixed_rows(0, 10))
    with pytest.raises(ValueError, match="duplicate example id"):
        sink.add("a", [row(10), row(11), row(12, 3)])
    sink.close(completed=False)  # commits the rows stored before the duplicate
    assert not trusted(path)
    resumed, found = resumed_sink(path)
    assert found == 12
    resumed.close(completed=False)
    assert_totals_match(path)
    assert trusted(path)


def test_a_session_of_a_writer_without_totals_is_recounted(tmp_path: Path) -> None:
    """An older procval writing the store adds rows and a session, and no totals."""
    path = tmp_path / "run.db"
    sink = sink_of(path)
    sink.add("a", mixed_rows(0, 10))
    sink.close(completed=True)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO rows SELECT config, '\"x' || example_id || '\"', idx + 100, "
            "example_hash, example, prediction, score, error_type, error_message, "
            "error_traceback, attempts, duration, worker_pid, node, fingerprint, session, "
            "epoch, scores, extra, usage, group_key, prediction_type FROM rows"
        )
        db.execute(
            "INSERT INTO sessions (started, status, pid, node, configs) "
            "VALUES (0, 'completed', 1, 'old', '[\"a\"]')"
        )
    assert not trusted(path)
    resumed, found = resumed_sink(path)
    assert found == 20
    resumed.close(completed=True)
    assert_totals_match(path)
    assert trusted(path)


def test_an_old_format_2_store_without_totals_is_read_then_counted_by_its_writer(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.db"
    sink = sink_of(path)
    sink.add("a", mixed_rows(0, 20))
    sink.close(completed=True)
    with contextlib.closing(sqlite3.connect(path)) as db, db:  # as main before the table
        db.execute("DROP TABLE totals")
        db.execute("DELETE FROM meta WHERE key = 'totals'")
    before = path.read_bytes()
    assert procval.load(path)["a"].totals.n == 20  # a reader never needs (nor adds) the table
    assert path.read_bytes() == before
    resumed, found = resumed_sink(path)
    assert found == 20
    resumed.add("a", mixed_rows(20, 5))
    resumed.close(completed=True)
    assert_totals_match(path)
    assert trusted(path)


def test_a_format_1_store_gets_its_totals_with_its_migration(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    shutil.copy(HERE / "data" / "store_v1.db", path)
    configs = [name for name in procval.load(path)]
    sink = StoreSink(str(path), fresh=False, configs=configs)
    db = sink._writer()  # migrates, then counts the totals, in its first transaction
    for name in configs:
        assert tally.of(db, name, only_ok=False, epochs=1).n == 30
    sink.close(completed=False)
    for name in configs:
        assert_totals_match(path, name)


def test_a_repaired_store_is_recounted_by_its_first_writer(tmp_path: Path) -> None:
    path, fixed = tmp_path / "run.db", tmp_path / "fixed.db"
    sink = sink_of(path)
    sink.add("a", mixed_rows(0, 20))
    sink.close(completed=True)
    repair(path, fixed)
    resumed, found = resumed_sink(fixed)
    assert found == 20
    resumed.close(completed=True)
    assert_totals_match(fixed)
    assert trusted(fixed)


HOLD_A_RUN = """
import sys, time
import procval

def program(example):
    time.sleep(0.002)
    return example["x"] * 2

def metric(example, prediction):
    if example["x"] % 9 == 4:
        raise ValueError("a failed example")
    return 0.5

examples = ({"id": i, "x": i} for i in range(int(sys.argv[2])))
procval.evaluate(program, examples, metric, store=sys.argv[1], workers=2, progress=False)
"""


@pytest.mark.slow
def test_totals_equal_the_rows_after_a_kill_9_mid_run_and_its_resume(tmp_path: Path) -> None:
    path, n = tmp_path / "run.db", 4000
    holder = start([sys.executable, "-c", HOLD_A_RUN, str(path), str(n)])
    try:
        wait_for_rows(path, 200, holder)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        stop(holder)
    kept = counted(path)  # committed with the rows: equal at any instant
    assert 200 <= sum(rows for _, _, _, rows, _, _ in kept) < n
    assert trusted(path)  # the killed session kept them: the resume uses them as they are
    resumed = start([sys.executable, "-c", HOLD_A_RUN, str(path), str(n)])
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    assert_totals_match(path)
    assert procval.load(path)["default"].totals.n == n


@pytest.mark.parametrize("retry_errors", [False, True])
def test_a_resume_reads_its_windows_from_the_index_alone(tmp_path: Path, retry_errors) -> None:
    path = tmp_path / "run.db"
    sink = sink_of(path, epochs=2)
    sink.add("a", [*mixed_rows(0, 50), *mixed_rows(0, 50, epoch=1)])
    sink.close(completed=False)
    resumed = sink_of(path, epochs=2, retry_errors=retry_errors)
    statements: list[str] = []
    resumed._db.set_trace_callback(statements.append)  # as run: parameters filled in
    items = [WorkItem(2 * i + e, i, {"id": i, "x": i}, e) for i in range(60) for e in (0, 1)]
    left = [item.seq for item in resumed.pending("a", items)]
    resumed._db.set_trace_callback(None)
    assert len(left) == (20 + 2 * 7 if retry_errors else 20)  # the new ones (and the failed)
    windows = [s for s in statements if "idx >=" in s]
    assert len(windows) == 2  # epoch 0, then the later epochs, of one window
    for statement in windows:
        plan = " ".join(str(r[3]) for r in resumed._db.execute(f"EXPLAIN QUERY PLAN {statement}"))
        assert "COVERING INDEX rows_order" in plan, plan
    resumed.close(completed=False)
