"""Salvaging a damaged run store: every row SQLite can still read goes into a new store.

``procval repair BAD NEW`` (and :func:`repair`) needs no ``sqlite3`` shell (whose ``.recover``
is missing or broken in some builds). It reads the damaged file read-only and copies, table by
table, what can be read; a damaged page costs only the rows stored on it:

1. the rowids of the rows table, from a scan of the table and of each of its two indexes (each
   its own b-tree: a damaged table page leaves the indexes whole, and the other way round), as
   far as each scan gets;
2. the rows themselves by rowid, in batches, and one by one in a batch that fails;
3. the configs, sessions, usage (spend) and limits (rate limit counts), small tables, the same
   way: every column both stores have (a damaged store of an older format lacks some).

A run on the new store resumes: the lost rows run again. The damaged file is never changed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from procval.errors import StoreError
from procval.store.faults import store_errors, translate
from procval.store.schema import COLUMNS, connect

BATCH = 256

_TABLES = ("configs", "sessions", "usage", "limits")


@dataclass(frozen=True)
class Repaired:
    """What :func:`repair` saved.

    Attributes:
        rows: rows copied to the new store.
        lost: rows known to exist (their rowid was read) that could not be read.
        configs: configs copied.
        sessions: sessions copied.
        usage: usage records (a config's calls, tokens and cost per model) copied.
        limits: rate limit count records (a config's per key) copied.
        unlisted: configs whose rows were copied but whose record (a damaged configs table)
            was not: their rows show again once a run of their config on the new store writes
            the record (it keeps the rows, and runs only the missing ones).
    """

    rows: int
    lost: int
    configs: int
    sessions: int
    usage: int = 0
    limits: int = 0
    unlisted: tuple[str, ...] = ()


def repair(damaged: str | os.PathLike[str], new: str | os.PathLike[str]) -> Repaired:
    """Copy every readable row, config and session of the store ``damaged`` into a new store.

    Args:
        damaged: a run store with damaged pages (it is only read).
        new: the path of the new store; it must not exist.

    Returns:
        What was copied, and how many rows were lost.

    Raises:
        StoreError: ``new`` exists, ``damaged`` is missing or not a run store at all, or the new
            store cannot be written.
    """
    source, target = os.fspath(damaged), os.fspath(new)
    if not os.path.exists(source):
        raise StoreError(f"no run store at {source}; check the path")
    if os.path.exists(target):
        raise StoreError(
            f"{target} exists; repair writes a new store: pass a path that does not exist"
        )
    try:
        old = sqlite3.connect(f"file:{source}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise translate(exc, source) from exc
    with contextlib.closing(old):
        rowids = _rowids(old)
        db = connect(target, create=True)
        try:
            with store_errors(target, "write"):
                db.execute("BEGIN IMMEDIATE")
                counts = {}
                for table in _TABLES:
                    columns = _shared_columns(old, db, table)
                    records = _read_all(old, table, columns) if columns else []
                    counts[table] = _copy(db, table, columns, records)
                copied = _copy(db, "rows", COLUMNS, _read_rows(old, rowids))
                unlisted = tuple(
                    name
                    for (name,) in db.execute(
                        "SELECT DISTINCT config FROM rows WHERE config NOT IN "
                        "(SELECT name FROM configs) ORDER BY config"
                    )
                )
                db.execute("COMMIT")
        except BaseException:
            db.close()
            for name in (target, f"{target}-journal", f"{target}-wal", f"{target}-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(name)
            raise
        db.close()
    if not copied and not counts["configs"]:
        os.unlink(target)
        raise StoreError(
            f"nothing of the run store {source} could be read (it is damaged beyond repair, or "
            "not a procval run store); run again into a new store"
        )
    return Repaired(
        copied,
        len(rowids) - copied,
        counts["configs"],
        counts["sessions"],
        counts["usage"],
        counts["limits"],
        unlisted,
    )


def _shared_columns(old: sqlite3.Connection, new: sqlite3.Connection, table: str) -> str:
    """The columns of ``table`` in both stores, in the new store's order ("" if none)."""
    try:
        have = {row[1] for row in old.execute(f"PRAGMA table_info({table})")}
    except sqlite3.Error:
        return ""
    wanted = [row[1] for row in new.execute(f"PRAGMA table_info({table})")]
    return ", ".join(name for name in wanted if name in have)


def _rowids(db: sqlite3.Connection) -> list[int]:
    """Every rowid of the rows table that one of its b-trees still gives."""
    found: set[int] = set()
    for source in ("NOT INDEXED", "INDEXED BY rows_order", "INDEXED BY sqlite_autoindex_rows_1"):
        with contextlib.suppress(sqlite3.Error):  # a damaged b-tree: keep what was read
            for (rowid,) in db.execute(f"SELECT rowid FROM rows {source}"):
                found.add(int(rowid))
    return sorted(found)


def _read_rows(db: sqlite3.Connection, rowids: list[int]) -> Iterator[tuple[object, ...]]:
    for start in range(0, len(rowids), BATCH):
        batch = rowids[start : start + BATCH]
        yield from _by_rowid(db, "rows", COLUMNS, batch)


def _by_rowid(
    db: sqlite3.Connection, table: str, columns: str, rowids: list[int]
) -> Iterator[tuple[object, ...]]:
    """The records of ``rowids``: in one query, or one by one if that fails (skipping those)."""
    marks = ", ".join("?" * len(rowids))
    try:
        records = db.execute(
            f"SELECT {columns} FROM {table} WHERE rowid IN ({marks})", rowids
        ).fetchall()
    except sqlite3.Error:
        if len(rowids) == 1:
            return
        for rowid in rowids:
            yield from _by_rowid(db, table, columns, [rowid])
        return
    yield from records


def _read_all(db: sqlite3.Connection, table: str, columns: str) -> list[tuple[object, ...]]:
    """A small table's records: all at once, or by rowid past its damaged pages."""
    try:
        return db.execute(f"SELECT {columns} FROM {table}").fetchall()
    except sqlite3.Error:
        pass
    found: set[int] = set()
    with contextlib.suppress(sqlite3.Error):
        for (rowid,) in db.execute(f"SELECT rowid FROM {table}"):
            found.add(int(rowid))
    with contextlib.suppress(sqlite3.Error):  # configs' primary key index
        index = f"sqlite_autoindex_{table}_1"
        for (rowid,) in db.execute(f"SELECT rowid FROM {table} INDEXED BY {index}"):
            found.add(int(rowid))
    return list(_by_rowid(db, table, columns, sorted(found))) if found else []


def _copy(
    db: sqlite3.Connection,
    table: str,
    columns: str,
    records: Iterable[tuple[object, ...]],
) -> int:
    if not columns:
        return 0
    marks = ", ".join("?" * len(columns.split(",")))
    statement = f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({marks})"
    before = db.total_changes
    db.executemany(statement, records)
    return db.total_changes - before
