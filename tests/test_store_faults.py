"""Store faults on real files: a full disk, a damaged page, a killed writer, a new folder.

A full disk is real where the tests may mount a small tmpfs (root); elsewhere those tests skip,
and one test makes the database full with SQLite's ``max_page_count`` (the same SQLITE_FULL a
full disk gives). Damage is real: bytes of a page that holds rows are overwritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import procval
from procval.store import schema

HELPERS = Path(__file__).resolve().parent / "helpers"
CLI_TASK = str(HELPERS / "cli_task.py")
N = 60


def procval_cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "procval", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_error_line(out, *fragments):
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "sqlite3." not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("procval")]
    assert len(lines) == 1 and lines[0].startswith("procval: error: "), out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_task(folder: Path, size: int = 6_000) -> str:
    """A task file whose predictions are ``size`` characters (to fill a disk quickly)."""
    task = folder / f"task_{uuid.uuid4().hex[:8]}.py"
    task.write_text(
        textwrap.dedent(f"""
            import procval

            def examples():
                return [{{"id": i}} for i in range({N})]

            def program(example):
                return "row-marker-" + str(example["id"]) + "x" * {size}

            def metric(example, prediction):
                return 1.0

            task = procval.Task(program, examples, metric,
                                {{"a": procval.Config(), "b": procval.Config(values={{"v": 1}})}},
                                workers=1)
        """)
    )
    return f"{task}:task"


def rows_in(path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])


# ---------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs at tmp_path/disk (needs root), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        mounted = None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file until fewer than ``leave`` bytes are free."""
    filler = disk / "filler"
    with open(filler, "wb") as out:
        while shutil.disk_usage(disk).free > leave:
            try:
                out.write(b"\0" * min(65536, max(4096, shutil.disk_usage(disk).free - leave)))
                out.flush()
            except OSError:
                break
    return filler


def test_disk_full_mid_run_is_one_line_and_a_resume_completes(small_disk, tmp_path):
    task, store = write_task(tmp_path), small_disk / "run.db"
    filler = fill(small_disk, leave=300_000)  # room for some of the 2 x 60 rows of 6 kB
    out = procval_cli("run", task, "--store", store, "--no-progress", timeout=180)
    assert_one_error_line(
        out,
        "the disk is full",
        f"the run store {store}",
        "the rows stored so far are safe",
        f"run again with the same store to resume: procval run {task} --store {store}",
    )
    before = rows_in(store)
    assert 0 < before < 2 * N  # some rows were written, and they are readable
    filler.unlink()
    resumed = procval_cli("run", task, "--store", store, "--no-progress", timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert rows_in(store) == 2 * N
    assert all(r.error is None for r in procval.load(store)["a"].rows)


def test_disk_full_mid_run_raises_store_full_error_from_the_api(small_disk, tmp_path):
    from procval.task import load_task

    task, store = load_task(write_task(tmp_path)), small_disk / "run.db"
    filler = fill(small_disk, leave=300_000)
    with pytest.raises(procval.StoreFullError) as info:
        task.evaluate(store=store, progress=False)
    message = str(info.value)
    assert isinstance(info.value, procval.StoreError) and info.value.path == str(store)
    assert "the disk is full" in message and "resume" in message and "\n" not in message
    filler.unlink()
    results = task.evaluate(store=store, progress=False)
    assert [len(r.rows) for r in results.values()] == [N, N]


def test_disk_full_before_the_store_exists_says_so_and_leaves_nothing(small_disk, tmp_path):
    fill(small_disk, leave=0)
    store = small_disk / "runs" / "new.db"  # its folder is new too
    out = procval_cli("run", CLI_TASK, "--store", store, "--no-progress", timeout=120)
    assert_one_error_line(out, "the disk is full", str(store))
    assert "not a procval run store" not in out.stderr
    with pytest.raises(procval.StoreFullError, match="the disk is full"):
        procval.evaluate(lambda x: x, [1, 2], lambda x, y: 1.0, store=small_disk / "api.db")
    assert sorted(os.listdir(small_disk)) == ["filler"]  # no store, journal, lock or folder


def test_a_database_full_by_max_page_count_is_a_store_full_error(tmp_path, monkeypatch):
    """Runs without root: SQLite's page limit gives the SQLITE_FULL of a full disk."""
    real = sqlite3.connect

    def limited(*args, **kwargs):
        db = real(*args, **kwargs)
        db.execute("PRAGMA max_page_count = 60")  # 60 pages of 4 kB: a few rows of 20 kB
        return db

    monkeypatch.setattr(schema.sqlite3, "connect", limited)
    store = tmp_path / "run.db"
    data = [{"id": i} for i in range(N)]
    with pytest.raises(procval.StoreFullError, match="the disk is full") as info:
        procval.evaluate(lambda e: "x" * 20_000, data, lambda e, p: 1.0, store=store, workers=1)
    assert "\n" not in str(info.value)
    assert 0 < rows_in(store) < N
    monkeypatch.undo()
    result = procval.evaluate(lambda e: "x" * 20_000, data, lambda e, p: 1.0, store=store)
    assert len(result.rows) == N and rows_in(store) == N


# ---------------------------------------------------------------- a damaged page


def damage_a_rows_page(store: Path, name: str = "rows") -> None:
    """Overwrite the header of one leaf page of the table or index ``name``, mid file."""
    with contextlib.closing(sqlite3.connect(store)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        leaves = [
            p
            for (p,) in db.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf' ORDER BY pageno",
                (name,),
            )
        ]
    page = leaves[len(leaves) // 2]
    with open(store, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(b"\xff" * 64)  # the page's header and cell pointers


@pytest.fixture(scope="module")
def damaged(whole, tmp_path_factory):
    """A store of 2 x 60 rows with one leaf page of the rows table (mid file) overwritten."""
    task, original = whole
    store = tmp_path_factory.mktemp("damaged") / "run.db"
    shutil.copy(original, store)
    damage_a_rows_page(store)
    return task, store


def test_a_damaged_store_is_a_store_corrupt_error_from_the_api(damaged, tmp_path):
    from procval.task import load_task

    task, store = damaged
    with pytest.raises(procval.StoreCorruptError) as info:
        results = procval.load(store)
        for result in results.values():
            assert result.rows is not None  # rows are read when first asked for
    message = str(info.value)
    assert isinstance(info.value, procval.StoreError) and info.value.path == str(store)
    assert f"the run store {store} is damaged" in message and "procval repair" in message
    assert "\n" not in message
    with pytest.raises(procval.StoreCorruptError, match="is damaged"):
        load_task(task).evaluate(store=store, progress=False)
    with pytest.raises(procval.StoreCorruptError):
        list(procval.store.iter_rows(store))


def test_a_damaged_store_is_one_line_and_exit_2_on_every_command(damaged, tmp_path):
    task, store = damaged
    fix = f"procval repair {store} {str(store)[:-3]}-repaired.db"
    for args in (
        ("run", task, "--store", store, "--no-progress"),
        ("report", store),
        ("compare", store, "a", "b"),
    ):
        assert_one_error_line(procval_cli(*args), f"the run store {store} is damaged", fix)
    output = tmp_path / "rows.jsonl"
    out = procval_cli("export", store, "--output", output)
    assert_one_error_line(out, "is damaged", f"nothing was written to {output}")
    assert os.listdir(tmp_path) == []  # no partial file, silent or not
    out = procval_cli("export", store)
    assert_one_error_line(out, "is damaged", "the output is INCOMPLETE: only its first")
    written = int(out.stderr.split("only its first ")[1].split()[0])
    assert written == len(out.stdout.splitlines())


def test_the_advised_repair_gives_a_store_that_resumes(damaged, tmp_path):
    task, store = damaged
    before = store.read_bytes()
    fixed = tmp_path / "fixed.db"
    out = procval_cli("repair", store, fixed, timeout=60)  # the command the error advises
    assert out.returncode == 0, out.stderr
    kept = rows_in(fixed)
    assert 0 < kept < 2 * N
    assert f"{kept} rows of 2 configs; {2 * N - kept} rows could not be read" in out.stdout
    assert store.read_bytes() == before  # the damaged store is only read
    assert procval_cli("repair", store, fixed).returncode == 2  # never over an existing file
    out = procval_cli("run", task, "--store", fixed, "--no-progress", timeout=180)
    assert out.returncode == 0, out.stderr
    assert rows_in(fixed) == 2 * N
    assert all(r.error is None for result in procval.load(fixed).values() for r in result.rows)


def test_a_repaired_store_keeps_spend_limit_counts_and_epochs(tmp_path):
    """The usage and limits tables and every configs column survive a repair."""
    from procval.store.repair import repair

    store, fixed = tmp_path / "run.db", tmp_path / "fixed.db"
    data = [{"id": i} for i in range(N)]
    procval.evaluate(lambda e: "x" * 3000, data, lambda e, p: 1.0, store=store, workers=1,
                     epochs=2, progress=False)  # fmt: skip
    with contextlib.closing(sqlite3.connect(store)) as db, db:
        db.execute("INSERT INTO usage VALUES ('default', 'gpt-x', 120, 3, 1000, 200, 1200, 0.25)")
        db.execute(schema.ADD_LIMITS, ("default", "gpt-x", 125, 5, 9, 1.5, 1400.0))
    before = procval.load(store)["default"]
    usage, limits = before.usage, before.limits
    assert usage and limits["gpt-x"]["rate_limited"] == 5
    damage_a_rows_page(store)
    saved = repair(store, fixed)
    assert (saved.configs, saved.usage, saved.limits) == (1, 1, 1) and saved.lost > 0
    after = procval.load(fixed)["default"]
    assert after.usage == usage and after.limits == limits  # spend and limit counts kept
    assert after.epochs == 2


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """A task and its whole store of 2 x 60 rows (copy it before damaging it)."""
    folder = tmp_path_factory.mktemp("whole")
    task = write_task(folder, size=3000)
    store = folder / "run.db"
    out = procval_cli("run", task, "--store", store, "--no-progress", timeout=180)
    assert out.returncode == 0, out.stderr
    return task, store


@pytest.mark.parametrize("index", ["rows_order", "sqlite_autoindex_rows_1"])
def test_a_damaged_index_of_the_rows_loses_no_row(whole, tmp_path, index):
    """The table's own b-tree still gives every rowid: repair reads past the index."""
    _, original = whole
    store, fixed = tmp_path / "run.db", tmp_path / "fixed.db"
    shutil.copy(original, store)
    damage_a_rows_page(store, index)
    out = procval_cli("repair", store, fixed, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"{2 * N} rows of 2 configs"), out.stdout
    assert {name: len(r.rows) for name, r in procval.load(fixed).items()} == {"a": N, "b": N}


def test_a_damaged_configs_table_keeps_the_rows_and_a_run_brings_them_back(whole, tmp_path):
    task, original = whole
    store, fixed = tmp_path / "run.db", tmp_path / "fixed.db"
    shutil.copy(original, store)
    damage_a_rows_page(store, "configs")
    out = procval_cli("repair", store, fixed, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{2 * N} rows of 0 configs" in out.stdout
    assert "the records of configs 'a', 'b' could not be read" in out.stdout
    out = procval_cli("run", task, "--store", fixed, "--no-progress", timeout=180)
    assert out.returncode == 0, out.stderr
    results = procval.load(fixed)
    assert {name: len(r.rows) for name, r in results.items()} == {"a": N, "b": N}
    with contextlib.closing(sqlite3.connect(fixed)) as db:  # kept, not run again
        assert db.execute("SELECT DISTINCT session FROM rows").fetchall() == [(1,)]


# ---------------------------------------------------------------- a killed writer


def statuses(path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [s for (s,) in db.execute("SELECT status FROM sessions ORDER BY id")]


@pytest.mark.slow
def test_a_killed_session_is_reported_interrupted_and_marked_by_the_next_writer(tmp_path):
    store = tmp_path / "run.db"
    env = {"CLI_TASK_N": "2000", "CLI_TASK_SLEEP": "0.01"}
    args = ("run", f"{CLI_TASK}:single", "--store", store, "--workers", "1", "--no-progress")
    proc = subprocess.Popen(
        [sys.executable, "-m", "procval", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    try:
        deadline = time.monotonic() + 60
        while not (store.exists() and _rows_or_zero(store) >= 10):
            assert proc.poll() is None and time.monotonic() < deadline, "no rows within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert statuses(store) == ["running"]
    report = procval_cli("report", store, timeout=60)
    assert report.returncode == 0, report.stderr
    assert "1 session(s), the last one interrupted" in report.stdout
    assert [s["status"] for s in procval.store.sessions(store)] == ["interrupted"]
    assert statuses(store) == ["running"]  # readers never rewrite the session
    resumed = procval_cli(*args, env={**env, "CLI_TASK_SLEEP": "0"}, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert statuses(store) == ["interrupted", "completed"]


def _rows_or_zero(path) -> int:
    try:
        return rows_in(path)
    except sqlite3.Error:
        return 0


# ---------------------------------------------------------------- a new folder


def test_a_new_store_gets_its_folders_and_reading_creates_none(tmp_path):
    store = tmp_path / "runs" / "deep" / "quick.db"
    result = procval.evaluate(lambda x: x, [1, 2, 3], lambda x, y: 1.0, store=store, workers=1)
    assert len(result.rows) == 3 and rows_in(store) == 3
    with pytest.raises(procval.StoreError, match="no run store at"):
        procval.load(tmp_path / "other" / "x.db")
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------- readers


def test_readers_never_change_the_store_file_with_or_without_a_leftover_wal(tmp_path):
    store = tmp_path / "run.db"
    procval.evaluate(lambda x: x, [1, 2, 3], lambda x, y: 1.0, store=store, workers=1)
    clean = store.read_bytes()
    assert len(procval.load(store)["default"].rows) == 3
    assert procval_cli("report", store).returncode == 0
    assert store.read_bytes() == clean
    # a writer killed after a commit: the commit is only in the WAL, which a read-write
    # connection closing last would fold into the main file
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import os, sqlite3
            db = sqlite3.connect({str(store)!r}, isolation_level=None)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("UPDATE rows SET score = 0.5 WHERE example_id = '1'")
            os._exit(0)  # no close, no checkpoint: as kill -9
        """)],
        capture_output=True, timeout=60,
    )  # fmt: skip
    assert killed.returncode == 0, killed.stderr
    assert (tmp_path / "run.db-wal").stat().st_size > 0
    before = store.read_bytes()
    assert before == clean
    scores = sorted(r.score for r in procval.load(store)["default"].rows)
    assert scores == [0.5, 1.0, 1.0]  # the reader sees the committed change ...
    assert [r["score"] for r in procval.store.iter_rows(store)].count(0.5) == 1
    assert procval_cli("report", store).returncode == 0
    assert procval_cli("export", store).returncode == 0
    assert procval.store.sessions(store)
    assert store.read_bytes() == before  # ... and the file is as the killed writer left it
    assert (tmp_path / "run.db-wal").stat().st_size > 0
