"""Store format 2: a format 1 store migrates on its first write only; every new field is kept.

``tests/data/store_v1.db`` was written by procval 0.1.0 (see ``tests/test_legacy_store.py``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import procval
from helpers.rows import make_row
from procval.errors import StoreError
from procval.results import RowError, Usage
from procval.store import readers
from procval.store.schema import VERSION
from procval.store.writer import StoreSink
from procval.wire import Snapshot

HERE = Path(__file__).parent
TASK = str(HERE / "helpers" / "legacy_task.py") + ":task"


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    path = tmp_path / "v1.db"
    shutil.copy(HERE / "data" / "store_v1.db", path)
    return path


def meta_version(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return int(db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()[0])


def rows_of(path: Path) -> dict[str, list[procval.Row]]:
    return {name: list(result.rows) for name, result in procval.load(path).items()}


def test_readers_never_change_a_format_1_store(v1: Path) -> None:
    before, mtime = v1.read_bytes(), os.stat(v1).st_mtime_ns
    runs = procval.load(v1)
    assert [len(r.rows) for r in runs.values()] == [30, 30]
    assert {row.epoch for row in runs["exact"].rows} == {0}
    assert all(row.scores is None and row.usage is None for row in runs["exact"].rows)
    exported = list(procval.store.iter_rows(v1))
    assert exported[0]["epoch"] == 0 and exported[0]["scores"] is None
    procval.store.sessions(v1)
    procval.store.count_rows(v1)
    readers.run_details(v1)
    out = subprocess.run(
        [sys.executable, "-m", "procval", "report", str(v1)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert v1.read_bytes() == before and os.stat(v1).st_mtime_ns == mtime
    assert meta_version(v1) == 1


@pytest.mark.slow
def test_the_first_resume_migrates_a_format_1_store_and_keeps_its_rows(v1: Path) -> None:
    before = rows_of(v1)
    out = subprocess.run(
        [sys.executable, "-m", "procval", "run", TASK, "--store", str(v1)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "LEGACY_STOP_AT": "40"},
    )
    assert out.returncode == 0, out.stderr
    assert meta_version(v1) == VERSION
    after = rows_of(v1)
    for name, rows in before.items():
        kept = {row.example_id: row for row in after[name]}
        assert [kept[row.example_id] for row in rows] == rows  # read the same as before
        assert len(after[name]) == 40
    with contextlib.closing(sqlite3.connect(v1)) as db:
        key = [r[1] for r in db.execute("PRAGMA table_info(rows)") if r[5]]
        assert key == ["config", "example_id", "epoch"]
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone() == (0,)


def snapshot(name: str) -> Snapshot:
    return Snapshot(name, b"", "f" * 16, identity=name, description={})


def test_a_format_2_row_with_every_field_round_trips(tmp_path: Path) -> None:
    path = str(tmp_path / "v2.db")
    usage = {"gpt": Usage(2, 1, 100, 20, 120, 0.25), "small": Usage(calls=1, total_tokens=5)}
    rows = [
        make_row(
            0,
            "q0",
            score=0.5,
            epoch=2,
            scores={"em": 0.5, "f1": 0.75},
            extra={"feedback": "close", "n": [1, 2]},
            usage=usage,
            group="math",
        ),
        make_row(1, "q1", score=0.0, error=RowError("ValueError", "bad", "tb"), epoch=0),
    ]
    sink = StoreSink(path, fresh=False, configs=["a"], epochs=3, metric={"primary": "em"})
    sink.begin(snapshot("a"))
    sink.add("a", rows)
    sink.add("a", [make_row(0, "q0", score=1.0, usage={"gpt": Usage(1, 0, 10, 2, 12, None)})])
    sink.close(completed=True)
    stored = sorted(procval.load(path)["a"].rows, key=lambda r: (r.index, r.epoch))
    assert stored == sorted(
        [*rows, make_row(0, "q0", score=1.0, usage={"gpt": Usage(1, 0, 10, 2, 12, None)})],
        key=lambda r: (r.index, r.epoch),
    )
    with contextlib.closing(sqlite3.connect(path)) as db:
        spent = db.execute("SELECT model, calls, total_tokens, cost FROM usage ORDER BY model")
        assert spent.fetchall() == [("gpt", 3, 132, 0.25), ("small", 1, 5, None)]
        assert db.execute("SELECT epochs, metric FROM configs").fetchone() == (
            3,
            '{"primary": "em", "scores": ["em", "f1"]}',  # names: from the first scored row
        )
    exported = next(r for r in procval.store.iter_rows(path) if r["epoch"] == 2)
    assert exported["scores"] == {"em": 0.5, "f1": 0.75} and exported["group"] == "math"
    assert exported["usage"]["gpt"]["cost"] == 0.25 and exported["extra"]["feedback"] == "close"
    out = subprocess.run(
        [sys.executable, "-m", "procval", "export", path, "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    table = list(csv.DictReader(io.StringIO(out.stdout)))
    header = list(table[0])
    assert header[header.index("score") + 1 : header.index("score") + 3] == ["score.em", "score.f1"]
    assert [(r["epoch"], r["score.f1"], r["group"]) for r in table] == [
        ("0", "", ""),
        ("2", "0.75", "math"),
        ("0", "", ""),
    ]


def test_usage_adds_up() -> None:
    total = Usage(1, 0, 10, 2, 12, None) + Usage(2, 1, 5, 5, 10, 0.5)
    assert total == Usage(3, 1, 15, 7, 22, 0.5)
    assert (Usage() + Usage()).cost is None


def test_a_store_from_a_newer_procval_is_refused_naming_both_versions(v1: Path) -> None:
    with contextlib.closing(sqlite3.connect(v1)) as db:
        db.execute("UPDATE meta SET value = '3' WHERE key = 'version'")
        db.commit()
    with pytest.raises(StoreError, match=r"store format 3; this one reads up to 2"):
        procval.load(v1)
    with pytest.raises(StoreError, match=r"store format 3"):
        StoreSink(str(v1), fresh=False, configs=["exact"])
