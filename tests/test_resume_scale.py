"""Resuming a big run: stored rows found a window at a time, content checked first then sampled."""

from __future__ import annotations

import contextlib
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import procval
from helpers import toys
from helpers.rows import make_row as row
from procval.config import Config
from procval.run.snapshot import take_snapshot
from procval.store import done
from procval.store.done import FULL, SAMPLE, ContentCheck, DoneRows
from procval.store.writer import StoreSink
from procval.wire import WorkItem


def streamed(n: int, *, change: frozenset[int] | set[int] = frozenset()) -> Iterator[Any]:
    """``n`` examples from a generator (read once, never all in memory), ``change`` edited."""
    for i in range(n):
        yield {"id": f"ex{i}", "q": i, **({"edited": True} if i in change else {})}


def sessions_of(store: Path) -> dict[int, list[int]]:
    with sqlite3.connect(store) as db:
        found: dict[int, list[int]] = {}
        for session, idx in db.execute("SELECT session, idx FROM rows ORDER BY idx"):
            found.setdefault(session, []).append(idx)
    return found


def write(path: Path, rows: list[Any], *, config: str = "a") -> None:
    sink = StoreSink(str(path), fresh=False, configs=[config])
    sink.begin(take_snapshot(Config(name=config)))
    sink.add(config, rows)
    sink.close(completed=False)


def opened(path: Path, *, retry_errors: bool = False) -> StoreSink:
    sink = StoreSink(str(path), fresh=False, configs=["a"], retry_errors=retry_errors)
    sink.begin(take_snapshot(Config(name="a")))
    return sink


# ---------------------------------------------------------------- through evaluate


def test_a_big_streamed_run_resumes_only_its_missing_examples(tmp_path: Path) -> None:
    store = tmp_path / "run.db"
    run = dict(store=store, workers=2, progress=False)
    first = procval.evaluate(toys.program, streamed(40_000), toys.metric, **run)
    assert (first.found, first.added) == (0, 40_000)
    again = procval.evaluate(toys.program, streamed(50_000), toys.metric, **run)
    assert (again.found, again.added) == (40_000, 10_000) and len(again) == 50_000
    by_session = sessions_of(store)
    assert sorted(by_session) == [1, 2]
    assert by_session[2] == list(range(40_000, 50_000))  # the stored 40,000 did not run again


def test_a_reordered_dataset_still_resumes_by_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(done, "WINDOW", 64)  # many windows, and ids far from theirs
    store = tmp_path / "run.db"
    run = dict(store=store, workers=1, progress=False)
    procval.evaluate(toys.program, toys.dataset(600), toys.metric, **run)
    shuffled = toys.dataset(800)
    random.Random(3).shuffle(shuffled)
    again = procval.evaluate(toys.program, shuffled, toys.metric, **run)
    assert (again.found, again.added) == (600, 200)
    assert sorted(r.example_id for r in again.rows) == sorted(f"ex{i}" for i in range(800))


def test_every_example_changed_is_caught_at_once_past_the_first_full(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(done, "FULL", 10)
    store = tmp_path / "run.db"
    run = dict(store=store, workers=1, progress=False)
    procval.evaluate(toys.program, streamed(300), toys.metric, **run)
    with pytest.raises(procval.StoreMismatchError, match="example 'ex0' of config 'default'"):
        procval.evaluate(toys.program, streamed(300, change=set(range(300))), toys.metric, **run)


def test_one_changed_example_is_caught_within_the_first_full(tmp_path: Path) -> None:
    store = tmp_path / "run.db"
    run = dict(store=store, workers=1, progress=False)
    procval.evaluate(toys.program, streamed(500), toys.metric, **run)
    with pytest.raises(procval.StoreMismatchError, match=r"example 'ex417'.*fresh=True"):
        procval.evaluate(toys.program, streamed(600, change={417}), toys.metric, **run)


def test_check_all_catches_one_changed_example_anywhere(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(done, "FULL", 10)
    monkeypatch.setattr(done, "SAMPLE", 10**9)  # sampled: as good as never
    store = tmp_path / "run.db"
    run = dict(store=store, workers=1, progress=False)
    procval.evaluate(toys.program, streamed(300), toys.metric, **run)
    changed = streamed(300, change={250})
    monkeypatch.setenv("PROCVAL_RESUME_CHECK", "all")
    with pytest.raises(procval.StoreMismatchError, match="example 'ex250'"):
        procval.evaluate(toys.program, changed, toys.metric, **run)


def test_a_bad_resume_check_setting_is_refused_before_any_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PROCVAL_RESUME_CHECK", "some")
    store = tmp_path / "run.db"
    with pytest.raises(ValueError, match="PROCVAL_RESUME_CHECK must be 'sample' or 'all'"):
        procval.evaluate(toys.program, toys.dataset(3), toys.metric, store=store)
    assert not store.exists()


# ---------------------------------------------------------------- the window


def test_rows_in_dataset_order_are_found_in_windows_without_lookups(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(done, "WINDOW", 100)
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(1_000)])
    sink = opened(path)
    rows = sink._done["a"]
    for i in range(1_000):
        assert sink.is_done("a", i, i, {"id": i, "x": i})
        assert len(rows._window) <= 100  # one window held, never the whole store
    assert (rows.lookups, rows.unfound) == (0, 0)
    assert not any(sink.is_done("a", i, i, {"id": i, "x": i}) for i in range(1_000, 1_300))
    assert rows.lookups == 0  # every stored row found: new examples cost no query
    sink.close(completed=False)


def test_rows_out_of_place_are_looked_up_by_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(done, "WINDOW", 10)
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(50)])
    sink = opened(path)
    order = list(range(60))
    random.Random(5).shuffle(order)
    found = [
        i for position, i in enumerate(order) if sink.is_done("a", position, i, {"id": i, "x": i})
    ]
    assert sorted(found) == list(range(50))
    assert sink._done["a"].lookups > 0
    sink.close(completed=False)


def test_ids_of_every_form_are_told_apart(tmp_path: Path) -> None:
    ids: list[int | str] = ["plain", 'a "quoted" one', "back\\slash", "é", "🙂", "", "3", 3, -7,
                            10**20, 10**20 + 1, 2**63 - 1, "x" * 30]  # fmt: skip
    path = tmp_path / "run.db"
    write(path, [row(i, eid) for i, eid in enumerate(ids)])
    sink = opened(path)
    assert all(sink.is_done("a", i, eid, {"id": eid, "x": i}) for i, eid in enumerate(ids))
    assert sink._done["a"].unfound == 0
    for other in ["4", 4, 10**20 + 2, "É", 2**63]:
        assert not sink.is_done("a", 0, other, {"id": other, "x": 0})
    sink.close(completed=False)


def test_this_sessions_rows_and_failed_ones_with_retry_errors_are_not_done(tmp_path: Path):
    path = tmp_path / "run.db"
    failed = procval.RowError("ValueError", "no", "")
    write(path, [row(0), row(1, error=failed, score=0.0)])
    sink = opened(path, retry_errors=True)
    assert sink.is_done("a", 0, 0, {"id": 0, "x": 0})
    assert not sink.is_done("a", 1, 1, {"id": 1, "x": 1})  # failed: run again
    sink.add("a", [row(2)])
    assert not sink.is_done("a", 2, 2, {"id": 2, "x": 2})  # written now, not before the run
    sink.close(completed=False)


def test_a_changed_example_is_refused_through_pending_too(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(5)])
    sink = opened(path)
    items = [WorkItem(i, i, {"id": i, "x": i if i != 3 else 30}, 0) for i in range(8)]
    pending = sink.pending("a", items)
    with pytest.raises(procval.StoreMismatchError, match="example 3 of config 'a'"):
        list(pending)
    assert [item.seq for item in sink.pending("a", items[5:])] == [5, 6, 7]
    sink.close(completed=False)


def test_done_rows_of_later_epochs_do_not_count(tmp_path: Path) -> None:
    path = tmp_path / "run.db"
    write(path, [row(i, epoch=e) for i in range(4) for e in range(3)])
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = DoneRows(db, str(path), "a", stored=8, epochs=2, session=99)
        assert [rows.find(i, i, e) is not None for i in range(4) for e in range(3)] == [
            True, True, False] * 4  # fmt: skip
        assert rows.unfound == 0


def items_of(ids: list[Any], *, change: frozenset[int] | set[int] = frozenset()):
    """Work items of one epoch for these ids, the examples of ``change`` edited."""
    return [
        WorkItem(i, eid, {"id": eid, "x": i, **({"e": 1} if i in change else {})}, 0)
        for i, eid in enumerate(ids)
    ]


def test_windows_of_stored_ids_of_both_types_are_found_without_lookups(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(done, "WINDOW", 50)
    path = tmp_path / "run.db"
    ids: list[Any] = [f"ex{i}" for i in range(100)] + list(range(100, 200))
    write(path, [row(i, eid) for i, eid in enumerate(ids)])
    sink = opened(path)
    rows = sink._done["a"]
    new = [*ids, "n1", 201, "n3"]
    assert [item.seq for item in sink.pending("a", items_of(new))] == [200, 201, 202]
    assert (rows.lookups, rows.unfound) == (0, 0)
    assert sink._checks["a"].checked == 200  # each finished one, under FULL
    sink.close(completed=False)


def test_a_changed_example_in_a_later_window_is_caught(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(done, "WINDOW", 50)
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(100)])
    sink = opened(path)
    with pytest.raises(procval.StoreMismatchError, match="example 73 of config 'a'"):
        list(sink.pending("a", items_of(list(range(120)), change={73, 90})))
    sink.close(completed=False)


def test_windows_with_mixed_ids_swaps_and_insertions_find_every_row(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(done, "WINDOW", 10)
    path = tmp_path / "run.db"
    ids: list[Any] = [0, "1", 2, 'q"é', "back\\slash", 5, 6, 7, 8, 9, *range(10, 30)]
    write(path, [row(i, eid) for i, eid in enumerate(ids)])
    sink = opened(path)
    order = [*ids[:10], 11, 10, *ids[12:20], *range(20, 25), "new", *range(25, 30)]
    items = [  # each example as stored: x is its stored position
        WorkItem(i, eid, {"id": eid, "x": ids.index(eid) if eid in ids else i}, 0)
        for i, eid in enumerate(order)
    ]
    new = [item.example_id for item in sink.pending("a", items)]
    assert new == ["new"]
    rows = sink._done["a"]
    assert rows.unfound == 0  # mixed types, swapped, an insertion
    sink.close(completed=False)


def test_items_before_a_failing_read_go_first(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(done, "WINDOW", 10)
    path = tmp_path / "run.db"
    write(path, [row(i) for i in range(4)])
    sink = opened(path)

    def failing() -> Iterator[WorkItem]:
        yield from items_of(list(range(7)))
        raise ValueError("line 8: not valid JSON")

    pending = sink.pending("a", failing())
    assert [next(pending).seq for _ in range(3)] == [4, 5, 6]
    with pytest.raises(ValueError, match="line 8"):
        next(pending)
    sink.close(completed=False)


def test_epochs_are_found_in_their_windows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(done, "WINDOW", 10)
    path = tmp_path / "run.db"
    sink = StoreSink(str(path), fresh=False, configs=["a"], epochs=2)
    sink.begin(take_snapshot(Config(name="a")))
    sink.add("a", [row(i, epoch=e) for i in range(40) for e in range(2)])
    sink.close(completed=False)
    sink = StoreSink(str(path), fresh=False, configs=["a"], epochs=2)
    sink.begin(take_snapshot(Config(name="a")))
    items = [WorkItem(i * 2 + e, i, {"id": i, "x": i}, e) for i in range(45) for e in range(2)]
    assert [item.seq for item in sink.pending("a", items)] == list(range(80, 90))
    assert sink._done["a"].lookups == 0  # a row's position is its item's seq // epochs
    sink.close(completed=False)


# ---------------------------------------------------------------- the sample


def test_the_first_full_are_all_checked_then_one_in_sample() -> None:
    check = ContentCheck()
    assert all(check.wanted() for _ in range(FULL))
    rest = 200_000
    picked = sum(check.wanted() for _ in range(rest))
    expected, spread = rest / SAMPLE, (rest / SAMPLE) ** 0.5
    assert abs(picked - expected) < 6 * spread  # a random sample of the expected size
    assert check.checked == FULL + picked
    every = ContentCheck("all")
    assert all(every.wanted() for _ in range(FULL + 1_000))


def test_each_session_draws_its_own_sample() -> None:
    def sample() -> list[int]:
        check = ContentCheck()
        return [n for n in range(FULL + 5_000) if check.wanted() and n >= FULL]

    assert sample() != sample()
