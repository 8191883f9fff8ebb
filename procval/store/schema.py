"""The run store's file format: its tables, its version, and opening a file as a store.

Tables::

    meta      key, value: format = 'procval-store', version
    configs   name, identity, fingerprint, description (JSON: Config.describe(), env names and
              value hashes only, never env values), created, duration (seconds, all sessions)
    sessions  one per evaluate() call: started, ended, status (running/completed/stopped), pid
    rows      config, example_id (JSON, so 3 and "3" differ), idx, example_hash, example and
              prediction (JSON), score (NULL for NaN), error_type/_message/_traceback,
              attempts, duration, worker_pid, node, fingerprint, session
"""

from __future__ import annotations

import os
import sqlite3

from procval.errors import StoreError

FORMAT = "procval-store"
VERSION = 1

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE configs (
    name TEXT PRIMARY KEY, identity TEXT NOT NULL, fingerprint TEXT NOT NULL,
    description TEXT NOT NULL, created REAL NOT NULL, duration REAL NOT NULL DEFAULT 0
);
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY, started REAL NOT NULL, ended REAL, status TEXT NOT NULL,
    pid INTEGER NOT NULL, node TEXT NOT NULL, configs TEXT NOT NULL
);
CREATE TABLE rows (
    config TEXT NOT NULL, example_id TEXT NOT NULL, idx INTEGER NOT NULL,
    example_hash INTEGER NOT NULL, example TEXT NOT NULL, prediction TEXT NOT NULL,
    score REAL, error_type TEXT, error_message TEXT, error_traceback TEXT,
    attempts INTEGER NOT NULL, duration REAL NOT NULL, worker_pid INTEGER NOT NULL,
    node TEXT NOT NULL, fingerprint TEXT NOT NULL, session INTEGER NOT NULL,
    PRIMARY KEY (config, example_id)
);
CREATE INDEX rows_order ON rows (config, idx);
"""

COLUMNS = (
    "config, example_id, idx, example_hash, example, prediction, score, error_type, "
    "error_message, error_traceback, attempts, duration, worker_pid, node, fingerprint, session"
)
# A second row for an id is a duplicate id in the dataset (resumed ids are skipped before they
# run), so a plain INSERT is how a streamed dataset's duplicates are caught with no memory in
# the parent. With retry_errors, a new row replaces a failed one (and only a failed one).
INSERT = f"INSERT INTO rows ({COLUMNS}) VALUES ({', '.join('?' * 16)})"
REPLACE_FAILED = (
    f"{INSERT} ON CONFLICT (config, example_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS.replace(" ", "").split(",")[2:])
    + " WHERE rows.error_type IS NOT NULL"
)
SELECT = f"SELECT {COLUMNS} FROM rows"


def connect(path: str, *, create: bool) -> sqlite3.Connection:
    """Open ``path`` as a run store, creating the schema if ``create`` and the file is new.

    Raises:
        StoreError: a missing store (when not creating), or a file of another format.
    """
    if not create and not os.path.exists(path):
        raise StoreError(
            f"no run store at {path}; check the path (a store is made by "
            "procval.evaluate(..., store=PATH) or procval run TASK --store PATH)"
        )
    if os.path.isdir(path):
        raise StoreError(f"the run store path {path} is a directory; pass a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise StoreError(f"cannot create the run store {path}: directory {folder} does not exist")
    try:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the run store {path}: {exc}") from exc
    try:
        check_format(db, path, create=create)
    except BaseException:
        db.close()
        raise
    return db


def check_format(db: sqlite3.Connection, path: str, *, create: bool) -> None:
    """Create the schema in a new file, or check that ``path`` is a store this version reads."""
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
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{not_a_store} ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise StoreError(not_a_store + " (it is a SQLite database of another kind)")
    version = int(meta.get("version", "0"))
    if version > VERSION:
        raise StoreError(
            f"{path} was written by a newer procval (store format {version}; this one reads up "
            f"to {VERSION}); upgrade procval to read it"
        )
