"""The run store's file format: its tables, its version, and opening a file as a store.

Tables (format 2)::

    meta      key, value: format = 'procval-store', version
    configs   name, identity, fingerprint, description (JSON: Config.describe(), env names and
              value hashes only, never env values), created, duration (seconds, all sessions),
              kind ('run' | 'rescore'), source (rescore: the config scored), metric (JSON: score
              names, primary, reducer), epochs
    sessions  one per evaluate() call: started, ended, status (running/completed/stopped/
              interrupted), pid
    rows      config, example_id (JSON, so 3 and "3" differ), idx, example_hash, example and
              prediction (JSON), score (NULL for NaN), error_type/_message/_traceback,
              attempts, duration, worker_pid, node, fingerprint, session, epoch, scores (JSON
              {name: value}, NULL when only ``score``), extra (JSON), usage (JSON {model:
              {calls, ...}}), group_key, prediction_type; keyed by (config, example_id, epoch);
              indexed by (config, idx, epoch) with what a resume reads of each row
              (:data:`ORDER`); a store made before keeps the index without those (slower)
    usage     config, model, calls, cached_calls, prompt_tokens, completion_tokens,
              total_tokens, cost: a config's spend, added to in the transaction of its rows
    limits    config, key, calls, rate_limited, waits, wait_seconds, tokens: what a config's
              rate-limited calls met under each key (docs/rate-limits.md), added to by each
              session; a format 2 store written before it gets it from its next writer
    totals    config, epoch, failed, rows, score, nulls: each config's running totals, kept by
              the writer with its rows (:mod:`procval.store.tally`); a store without it (or
              whose ``meta.totals`` is not its last session) is recounted by its next writer

Format 1 (procval 0.1.0) has no ``usage`` table and none of the row columns after ``session``,
and keys rows by (config, example_id). Readers read both (:func:`select`: the missing columns
read as their defaults) and never write; a writer migrates a format 1 store in its first write
transaction (:func:`migrate`), and adds the ``limits`` and ``totals`` tables to a format 2 store
without them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sqlite3
import urllib.request

from procval.errors import StoreError
from procval.store.faults import (
    SQLITE_CANTOPEN,
    SQLITE_NOTADB,
    SQLITE_READONLY,
    full,
    primary_code,
    store_errors,
    translate,
)

FORMAT = "procval-store"
VERSION = 2

ROWS = """CREATE TABLE rows (
    config TEXT NOT NULL, example_id TEXT NOT NULL, idx INTEGER NOT NULL,
    example_hash INTEGER NOT NULL, example TEXT NOT NULL, prediction TEXT NOT NULL,
    score REAL, error_type TEXT, error_message TEXT, error_traceback TEXT,
    attempts INTEGER NOT NULL, duration REAL NOT NULL, worker_pid INTEGER NOT NULL,
    node TEXT NOT NULL, fingerprint TEXT NOT NULL, session INTEGER NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0, scores TEXT, extra TEXT, usage TEXT, group_key TEXT,
    prediction_type TEXT,
    PRIMARY KEY (config, example_id, epoch)
)"""
USAGE = """CREATE TABLE usage (
    config TEXT NOT NULL, model TEXT NOT NULL, calls INTEGER NOT NULL DEFAULT 0,
    cached_calls INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0, total_tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL, PRIMARY KEY (config, model)
)"""
LIMITS = """CREATE TABLE IF NOT EXISTS limits (
    config TEXT NOT NULL, key TEXT NOT NULL, calls INTEGER NOT NULL DEFAULT 0,
    rate_limited INTEGER NOT NULL DEFAULT 0, waits INTEGER NOT NULL DEFAULT 0,
    wait_seconds REAL NOT NULL DEFAULT 0, tokens REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (config, key)
)"""
TOTALS = """CREATE TABLE IF NOT EXISTS totals (
    config TEXT NOT NULL, epoch INTEGER NOT NULL, failed INTEGER NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0, score REAL NOT NULL DEFAULT 0,
    nulls INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (config, epoch, failed)
)"""
LIMIT_COUNTS = ("calls", "rate_limited", "waits", "wait_seconds", "tokens")
ADD_LIMITS = (
    f"INSERT INTO limits (config, key, {', '.join(LIMIT_COUNTS)}) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (config, key) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in LIMIT_COUNTS)
)
ORDER = (
    "CREATE INDEX rows_order ON rows (config, idx, epoch, session, example_id, example_hash, "
    "error_type)"
)
"""Rows in dataset order; the columns after ``epoch`` make a resume's reads of the stored rows a
window at a time (:mod:`procval.store.done`) index-only: the rows themselves are not read."""
SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE configs (
    name TEXT PRIMARY KEY, identity TEXT NOT NULL, fingerprint TEXT NOT NULL,
    description TEXT NOT NULL, created REAL NOT NULL, duration REAL NOT NULL DEFAULT 0,
    kind TEXT NOT NULL DEFAULT 'run', source TEXT, metric TEXT,
    epochs INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY, started REAL NOT NULL, ended REAL, status TEXT NOT NULL,
    pid INTEGER NOT NULL, node TEXT NOT NULL, configs TEXT NOT NULL
);
{ROWS};
{ORDER};
{USAGE};
{LIMITS};
{TOTALS};
"""

COLUMNS_V1 = (
    "config, example_id, idx, example_hash, example, prediction, score, error_type, "
    "error_message, error_traceback, attempts, duration, worker_pid, node, fingerprint, session"
)
COLUMNS = f"{COLUMNS_V1}, epoch, scores, extra, usage, group_key, prediction_type"
_NAMES = COLUMNS.replace(" ", "").split(",")


@functools.cache
def insert(width: int, *, replace_failed: bool) -> str:
    """The INSERT of a record of the first ``width`` columns (the others take their defaults).

    A second row for an (id, epoch) is a duplicate id in the dataset (resumed ones are skipped
    before they run), so a plain INSERT is how a streamed dataset's duplicates are caught with no
    memory in the parent. With ``replace_failed`` (``retry_errors``), a new row replaces a failed
    one, and only a failed one, every column included.
    """
    names = _NAMES[:width]
    statement = f"INSERT INTO rows ({', '.join(names)}) VALUES ({', '.join('?' * width)})"
    if not replace_failed:
        return statement
    return (
        f"{statement} ON CONFLICT (config, example_id, epoch) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in _NAMES[2:])
        + " WHERE rows.error_type IS NOT NULL"
    )


SELECT = f"SELECT {COLUMNS} FROM rows"
SELECT_V1 = f"SELECT {COLUMNS_V1}, 0 AS epoch, NULL, NULL, NULL, NULL, NULL FROM rows"
"""A format 1 store read as format 2: the columns it lacks read as their defaults."""
ADD_USAGE = (
    "INSERT INTO usage (config, model, calls, cached_calls, prompt_tokens, completion_tokens, "
    "total_tokens, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (config, model) DO UPDATE "
    "SET calls = calls + excluded.calls, cached_calls = cached_calls + excluded.cached_calls, "
    "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens, "
    "total_tokens = total_tokens + excluded.total_tokens, "
    "cost = CASE WHEN cost IS NULL AND excluded.cost IS NULL THEN NULL "
    "ELSE COALESCE(cost, 0) + COALESCE(excluded.cost, 0) END"
)


def version(db: sqlite3.Connection) -> int:
    """The store's format version, as its meta table says (0 if it says none)."""
    found = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
    return int(found[0]) if found else 0


def select(db: sqlite3.Connection) -> str:
    """The ``SELECT`` of every row column for this store's format (:data:`SELECT` or v1's)."""
    return SELECT if version(db) >= 2 else SELECT_V1


def migrate(db: sqlite3.Connection) -> bool:
    """Bring a format 1 store to format 2, inside the caller's open write transaction.

    New columns are added to ``configs``; ``rows`` is rebuilt (its key gains ``epoch``, which
    SQLite cannot change in place) and its index recreated; the ``usage`` table is created
    empty; the meta version becomes 2. A rollback of the caller's transaction undoes it all.

    A format 2 store written before the ``limits`` or ``totals`` table existed gets it (empty;
    :func:`procval.store.tally.start` then counts the totals).

    Returns:
        Whether the store was migrated (False: it was format 2 already).
    """
    db.execute(LIMITS)  # IF NOT EXISTS: an older format 2 store gets the tables
    db.execute(TOTALS)
    if version(db) >= VERSION:
        return False
    for column in (
        "kind TEXT NOT NULL DEFAULT 'run'",
        "source TEXT",
        "metric TEXT",
        "epochs INTEGER NOT NULL DEFAULT 1",
    ):
        db.execute(f"ALTER TABLE configs ADD COLUMN {column}")
    db.execute(ROWS.replace("CREATE TABLE rows (", "CREATE TABLE rows_v2 (", 1))
    db.execute(f"INSERT INTO rows_v2 ({COLUMNS_V1}) SELECT {COLUMNS_V1} FROM rows")
    db.execute("DROP TABLE rows")
    db.execute("ALTER TABLE rows_v2 RENAME TO rows")
    db.execute(ORDER)
    db.execute(USAGE)
    db.execute("UPDATE meta SET value = ? WHERE key = 'version'", (str(VERSION),))
    return True


def connect(path: str, *, create: bool) -> sqlite3.Connection:
    """Open ``path`` as a run store, creating the schema if ``create`` and the file is new.

    A new store's missing parent directories are created too. If creating the store fails (a
    full disk, say), what this call created (the file, its journal, the directories) is removed.

    Raises:
        StoreError: a missing store (when not creating), a file of another format, or a store
            that cannot be created or read (:class:`~procval.StoreFullError` for a full disk,
            :class:`~procval.StoreCorruptError` for a damaged file).
    """
    if not create and not os.path.exists(path):
        raise StoreError(
            f"no run store at {path}; check the path (a store is made by "
            "procval.evaluate(..., store=PATH) or procval run TASK --store PATH)"
        )
    if os.path.isdir(path):
        raise StoreError(f"the run store path {path} is a directory; pass a file path")
    if not create:
        return _reader(path)
    new = not os.path.exists(path)
    made = _make_parents(path) if new else []
    try:
        with store_errors(path, "create" if new else "open"):
            db = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            check_format(db, path, create=create)
        except BaseException:
            db.close()
            raise
    except BaseException:
        if new:
            _remove_created(path, made)
        raise
    return db


def _reader(path: str) -> sqlite3.Connection:
    """A read-only connection: a reader never changes the file.

    A read-write connection that is the last one to close a WAL store folds the WAL into the
    main file (a killed writer's leftover WAL, say). ``mode=ro`` reads the WAL without that, and
    sees a live run's commits. Where SQLite cannot open the WAL's index read-only (no ``-shm``
    file in a folder it may not write), ``immutable=1`` reads the main file as it is: no writer
    can be writing there either.
    """
    uri = "file:" + urllib.request.pathname2url(os.path.abspath(path))
    for mode in ("?mode=ro", "?mode=ro&immutable=1"):
        with store_errors(path, "open"):
            db = sqlite3.connect(uri + mode, uri=True, timeout=30, isolation_level=None)
        try:
            check_format(db, path, create=False)
            return db
        except BaseException as exc:
            db.close()
            cause = exc.__cause__ if isinstance(exc, StoreError) else None
            code = primary_code(cause) if isinstance(cause, sqlite3.Error) else None
            if "immutable" in mode or code not in (SQLITE_CANTOPEN, SQLITE_READONLY):
                raise
    raise AssertionError("unreachable: the last mode raises")


def _make_parents(path: str) -> list[str]:
    """Create the missing directories above ``path``; the ones made, deepest first."""
    made: list[str] = []
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(made):
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        except OSError as exc:
            _remove_created(path, made)
            if exc.errno == errno.ENOSPC:
                raise full(path, exc.strerror or str(exc)) from exc
            raise StoreError(
                f"cannot create the run store {path}: cannot create its directory {folder} "
                f"({exc.strerror or exc})"
            ) from exc
    return made


def _remove_created(path: str, made: list[str]) -> None:
    """Remove a store file that failed to be created, its side files, and ``made`` (if empty)."""
    for name in (path, f"{path}-journal", f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError, OSError):
            os.unlink(name)
    for folder in made:  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def check_format(db: sqlite3.Connection, path: str, *, create: bool) -> None:
    """Create the schema in a new file, or check that ``path`` is a store this version reads.

    Raises:
        StoreError: the file is of another format or version, or SQLite fails (translated).
    """
    not_a_store = (
        f"{path} is not a procval run store; pass the path of a store written by procval, "
        "or a new path to start one"
    )
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        if not tables and create:
            db.execute("BEGIN IMMEDIATE")
            if not {n for (n,) in db.execute("SELECT name FROM sqlite_master")}:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("format", FORMAT), ("version", str(VERSION))],
                )
            db.execute("COMMIT")
            return
        if "meta" not in tables:
            raise StoreError(not_a_store + " (it is a SQLite database of another kind)")
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        if primary_code(exc) == SQLITE_NOTADB:  # not SQLite at all
            raise StoreError(f"{not_a_store} ({exc})") from exc
        raise translate(exc, path, "create" if create else "open") from exc
    if meta.get("format") != FORMAT:
        raise StoreError(not_a_store + " (it is a SQLite database of another kind)")
    version = int(meta.get("version", "0"))
    if version > VERSION:
        raise StoreError(
            f"{path} was written by a newer procval (store format {version}; this one reads up "
            f"to {VERSION}); upgrade procval to read it"
        )
