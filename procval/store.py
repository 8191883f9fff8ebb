"""The run store: one SQLite file that keeps every row of a run, so a run can be resumed.

The parent process is the store's only writer; workers never touch it. Rows arrive through
:class:`StoreSink` (the scheduler's ``Sink``) one shard at a time, and each shard's rows are
committed in one transaction before the scheduler reports them. The file is in WAL mode with
``synchronous=NORMAL``: a committed transaction survives a ``kill -9`` of the parent (it is in
the operating system's hands), and a crash mid-transaction rolls it back, so the store is never
corrupted and loses at most the rows that were still in workers. Other processes may read the
store while a run writes it (``procval report`` during a run).

Tables::

    meta      key, value: format = 'procval-store', version
    configs   name, identity, fingerprint, description (JSON: Config.describe(), env names and
              value hashes only, never env values), created, duration (seconds, all sessions)
    sessions  one per evaluate() call: started, ended, status (running/completed/stopped), pid
    rows      config, example_id (JSON, so 3 and "3" differ), idx, example_hash, example and
              prediction (JSON), score (NULL for NaN), error_type/_message/_traceback,
              attempts, duration, worker_pid, node, fingerprint, session

Examples and predictions are stored as JSON through :func:`procval._convert.to_jsonable`:
plain JSON values as they are; mappings, lists, tuples and sets item by item; dataclasses
field by field; pydantic models by ``model_dump(mode="json")``; objects with ``toDict()`` or
``to_dict()`` (DSPy) through it; other objects by their public ``__dict__``; anything else as its
``repr()``. A row read back from the store holds these JSON values, not the original objects.

One writer at a time: a run holds an exclusive ``flock`` on ``PATH.lock`` (next to the store)
from the moment its sink opens until it closes, and a second run on the same store fails at
once, before any worker starts, with :class:`procval.StoreLockedError` naming the holder's pid
and host. The kernel drops the lock when the holder exits, however it exits (``kill -9``
included), so a lock is never stale; the file itself is removed on a clean close and may be left
behind by a killed run (harmless: the pid in it is only read for the message). The lock covers
the whole store, not a config: a run's session, its configs and ``fresh`` are one unit, SQLite
has one writer at a time anyway, and runs of different configs in parallel belong in one call
(``configs=``, which shares the workers) or in separate stores. Readers (``load``, ``report``,
``export``, ``compare``) never take it.

Resuming: an example whose id already has a row is not run again, provided the stored example
has the same content (a hash of its canonical JSON); a config name stored with a different
:meth:`procval.Config.identity` is refused. ``fresh=True`` discards the stored rows of the configs
being run, and only those.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shlex
import socket
import sqlite3
import sys
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from procval._convert import to_jsonable
from procval.config import Snapshot
from procval.errors import ProgramChangedWarning, StoreError, StoreLockedError, StoreMismatchError
from procval.results import EvaluationResult, Results, Row, RowError, Totals

try:
    import fcntl
except ImportError:  # not POSIX (Windows is not a target): runs go without the writer lock
    fcntl = None  # type: ignore[assignment]

FORMAT = "procval-store"
VERSION = 1

_SCHEMA = """
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

_COLUMNS = (
    "config, example_id, idx, example_hash, example, prediction, score, error_type, "
    "error_message, error_traceback, attempts, duration, worker_pid, node, fingerprint, session"
)
# A second row for an id is a duplicate id in the dataset (resumed ids are skipped before they
# run), so a plain INSERT is how a streamed dataset's duplicates are caught with no memory in
# the parent. With retry_errors, a new row replaces a failed one (and only a failed one).
_INSERT = f"INSERT INTO rows ({_COLUMNS}) VALUES ({', '.join('?' * 16)})"
_REPLACE_FAILED = (
    f"{_INSERT} ON CONFLICT (config, example_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.replace(" ", "").split(",")[2:])
    + " WHERE rows.error_type IS NOT NULL"
)
_SELECT = f"SELECT {_COLUMNS} FROM rows"


class StoreSink:
    """The scheduler's sink for a run with ``store=``: rows go to a SQLite file as they arrive.

    Args:
        path: the store file; created (with its schema) on the first ``begin`` if missing.
        fresh: discard the stored rows of the configs being run instead of resuming them.
        configs: the names of the configs of this run.
        retry_errors: run again the examples whose stored row has an error (their new rows
            replace the old ones); otherwise a failed example counts as done.

    Raises:
        StoreError: ``path`` exists but is not a procval run store, or cannot be opened.
        StoreLockedError: another live process is writing the store (see the module's doc).
    """

    def __init__(
        self, path: str, *, fresh: bool, configs: list[str], retry_errors: bool = False
    ) -> None:
        self._path = path
        self._fresh = fresh
        self._retry_errors = retry_errors
        self._names = list(configs)
        with contextlib.closing(_connect(path, create=True)):
            pass  # fail now, before any worker starts, if the file is not a store ...
        self._lock = _WriterLock(path)  # ... or if another run is writing it
        self._db: sqlite3.Connection | None = None
        self._session = 0
        self._closed = False
        self._done: dict[str, dict[int | str, int]] = {}
        self._prior: dict[str, float] = {}  # duration of earlier sessions, per config
        self._started: dict[str, float] = {}

    # ------------------------------------------------------------------ Sink protocol

    def begin(self, snapshot: Snapshot) -> Totals:
        """Register a config, refusing one stored under the same name with another identity.

        Returns:
            The totals of the rows already stored for the config (none after ``fresh``).

        Raises:
            StoreMismatchError: the store holds a different config of this name.
        """
        db = self._writer()
        name = snapshot.name
        try:
            self._write(db)
            stored = db.execute(
                "SELECT identity, description, duration FROM configs WHERE name = ?", (name,)
            ).fetchone()
            if stored is not None and self._fresh:
                db.execute("DELETE FROM rows WHERE config = ?", (name,))
                stored = (snapshot.identity, None, 0.0)
            if stored is not None and stored[0] != snapshot.identity:
                raise _identity_mismatch(self._path, db, snapshot, stored[1])
            if stored is not None and stored[1]:
                _warn_if_program_changed(self._path, snapshot, json.loads(stored[1]))
            description = json.dumps(dict(snapshot.description), sort_keys=True, default=repr)
            db.execute(
                "INSERT INTO configs (name, identity, fingerprint, description, created, duration)"
                " VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (name) DO UPDATE SET"
                " identity = excluded.identity, fingerprint = excluded.fingerprint,"
                " description = excluded.description, duration = ?",
                (name, snapshot.identity, snapshot.fingerprint, description, time.time(),
                 stored[2] if stored else 0.0),
            )  # fmt: skip
            self._prior[name] = stored[2] if stored else 0.0
            self._started[name] = time.perf_counter()
            only_ok = " AND error_type IS NULL" if self._retry_errors else ""
            self._done[name] = {
                json.loads(eid): digest
                for eid, digest in db.execute(
                    "SELECT example_id, example_hash FROM rows WHERE config = ?" + only_ok,
                    (name,),
                )
            }
            return _totals(db, name, only_ok=bool(only_ok))
        except BaseException:
            self._abort()
            raise

    def is_done(self, config: str, index: int, example_id: int | str, example: Any) -> bool:
        """Whether the example has a stored row; its content must match the stored one.

        Raises:
            StoreMismatchError: the stored example of this id has different content.
        """
        digest = self._done[config].get(example_id)
        if digest is None:
            return False
        if digest != _text_hash(_to_json(example)):
            raise StoreMismatchError(
                f"example {example_id!r} of config {config!r} differs from the one stored under "
                f"that id in {self._path}; resuming would mix results of two datasets. Start over "
                "with fresh=True (procval run --fresh), use a new store path, or give changed "
                "examples new ids"
            )
        return True

    def add(self, config: str, rows: list[Row]) -> None:
        """Write ``rows`` and commit them (one transaction per call) before returning."""
        if not rows:
            return
        db = self._writer()
        records = [_encode(row, config, self._session) for row in rows]
        self._write(db)
        try:
            db.executemany(_REPLACE_FAILED if self._retry_errors else _INSERT, records)
        except sqlite3.IntegrityError:
            raise self._duplicate(db, config, rows) from None
        elapsed = time.perf_counter() - self._started[config]
        db.execute(
            "UPDATE configs SET duration = ? WHERE name = ?",
            (self._prior[config] + elapsed, config),
        )
        self._commit()

    def _duplicate(self, db: sqlite3.Connection, config: str, rows: list[Row]) -> ValueError:
        """The ValueError for the row whose id is stored already (a duplicate id)."""
        for row in rows:
            found = db.execute(
                "SELECT idx FROM rows WHERE config = ? AND example_id = ?",
                (config, json.dumps(row.example_id)),
            ).fetchone()
            if found is not None and found[0] != row.index:
                first, second = sorted((int(found[0]), row.index))
                return ValueError(
                    f"duplicate example id {row.example_id!r} at positions {first} and {second}; "
                    "ids must be unique (drop the 'id' field to number examples by position)"
                )
        return ValueError(f"a row of config {config!r} could not be stored: duplicate id")

    def result(self, config: str, duration: float) -> EvaluationResult:
        """The config's result over all stored rows (all sessions); rows load when first read.

        While the sink is open, ``duration`` (this session's) is stored too. Once it is closed,
        the writer lock is gone and nothing is written: ``add`` stored the duration with each
        shard, so only the last instants of the session are missing from the stored one.
        """
        total = self._prior[config] + duration
        db = self._db
        if db is None:
            with contextlib.closing(_connect(self._path, create=False)) as reader:
                return _result(self._path, reader, config, duration=total)
        self._write(db)
        db.execute("UPDATE configs SET duration = ? WHERE name = ?", (total, config))
        self._commit()
        return _result(self._path, db, config)

    def close(self, *, completed: bool) -> None:
        """Commit, mark the session completed or stopped, close the file, release the store.

        Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        db = self._db
        if db is None:
            self._lock.release()
            return
        try:
            self._write(db)
            db.execute(
                "UPDATE sessions SET ended = ?, status = ? WHERE id = ?",
                (time.time(), "completed" if completed else "stopped", self._session),
            )
            self._commit()
            with contextlib.suppress(sqlite3.OperationalError):  # a reader holds the WAL
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
            self._db = None
            self._lock.release()

    # ------------------------------------------------------------------ connection

    def _writer(self) -> sqlite3.Connection:
        if self._db is None:
            if self._closed:
                raise StoreError(f"the run store {self._path} was closed")
            db = _connect(self._path, create=True)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute("BEGIN IMMEDIATE")
                cursor = db.execute(
                    "INSERT INTO sessions (started, status, pid, node, configs) "
                    "VALUES (?, 'running', ?, ?, ?)",
                    (time.time(), os.getpid(), socket.gethostname(), json.dumps(self._names)),
                )
                self._session = cursor.lastrowid or 0
            except sqlite3.Error as exc:
                db.close()
                raise StoreError(f"cannot write the run store {self._path}: {exc}") from exc
            except BaseException:  # Ctrl-C: roll back (by closing) what this began
                db.close()
                raise
            self._db = db
        return self._db

    def _write(self, db: sqlite3.Connection) -> None:
        """Start a transaction unless one is open (``begin`` leaves its own open until rows come).

        Keeping ``begin``'s writes uncommitted until the first rows arrive means a run that fails
        before producing anything (a mismatch in a later config, a setup error) changes nothing.
        Whether a transaction is open is asked of SQLite, not tracked here: a Ctrl-C raised
        right after a ``BEGIN`` or ``COMMIT`` returned (before a flag could follow) would leave
        a flag wrong, and ``close`` would then fail instead of marking the session stopped.
        """
        if not db.in_transaction:
            db.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        if self._db is not None and self._db.in_transaction:
            self._db.execute("COMMIT")

    def _abort(self) -> None:
        db, self._db = self._db, None
        self._closed = True
        try:
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                db.close()
        finally:
            self._lock.release()


# ---------------------------------------------------------------------- the writer lock


class _WriterLock:
    """An exclusive ``flock`` on ``STORE.lock``: held by the one process writing the store.

    The kernel releases an ``flock`` when the last descriptor of its open file is closed, which
    happens however the process ends, ``kill -9`` included: a lock is never stale, and the pid
    written in the file serves only the message of a run that finds the store busy. The
    descriptor is not inherited by worker processes: Python opens files non-inheritable
    (``O_CLOEXEC``, PEP 446); loky's fork+exec workers and the fork server (a ``subprocess``
    with ``close_fds``) never get it, and the server's forked workers get only the descriptors
    sent to them. So a worker that outlives a killed parent for a moment does not keep the store
    locked. (A child between its fork and its exec shares it for those few milliseconds.)

    Args:
        store: the run store's path; the lock file is ``store + ".lock"``, symbolic links
            resolved (so that two paths to one store share the lock).

    Raises:
        StoreLockedError: another open file description holds the lock (another process, or
            another sink of this process).
        StoreError: the lock file cannot be created.
    """

    def __init__(self, store: str) -> None:
        self.path = os.path.realpath(store) + ".lock"
        fd = _lock(store, self.path)
        # released at the latest when the sink is garbage collected or the interpreter exits
        self._release = (
            weakref.finalize(self, _unlock, fd, self.path, os.getpid()) if fd is not None else None
        )

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._release is not None:
            self._release()


# ---------------------------------------------------------------------- reading


def load(path: str | os.PathLike[str]) -> Results:
    """A finished or partial run from a store, as the mapping ``evaluate`` returns.

    Each config's rows are read from the store when first asked for (``result.rows``); counts,
    the score and errors by type come from the store without reading the rows. Each row's
    ``example`` and ``prediction`` are the stored JSON values.

    Args:
        path: a run store written by ``evaluate(..., store=path)`` or ``procval run``.

    Returns:
        A :class:`procval.Results` mapping config name to :class:`procval.EvaluationResult`,
        in the order the configs were first stored.

    Raises:
        StoreError: there is no store at ``path``, or the file is not a procval run store.
    """
    path = os.fspath(path)
    with contextlib.closing(_connect(path, create=False)) as db:
        names = [name for (name,) in db.execute("SELECT name FROM configs ORDER BY rowid")]
        return Results({name: _result(path, db, name) for name in names})


def iter_rows(
    path: str | os.PathLike[str], configs: Sequence[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Stream the stored rows as flat dicts, config by config in dataset order.

    Memory stays constant however many rows there are (for exports).

    Args:
        path: the run store.
        configs: the configs to read (default: all, in the order they were stored).

    Yields:
        Dicts with keys ``config, index, example_id, example, prediction, score, error_type,
        error_message, error_traceback, attempts, duration, worker_pid, node, fingerprint``;
        ``example`` and ``prediction`` decoded from JSON.

    Raises:
        StoreError: no store at ``path``, not a store, or a config name it does not hold.
    """
    path = os.fspath(path)
    with contextlib.closing(_connect(path, create=False)) as db:
        names = _check_names(path, db, configs)
        for name in names:
            cursor = db.execute(f"{_SELECT} WHERE config = ? ORDER BY idx", (name,))
            for record in cursor:
                row = _decode(record)
                yield {
                    "config": row.config,
                    "index": row.index,
                    "example_id": row.example_id,
                    "example": row.example,
                    "prediction": row.prediction,
                    "score": row.score,
                    "error_type": row.error.type if row.error else None,
                    "error_message": row.error.message if row.error else None,
                    "error_traceback": row.error.traceback if row.error else None,
                    "attempts": row.attempts,
                    "duration": row.duration,
                    "worker_pid": row.worker_pid,
                    "node": row.node,
                    "fingerprint": row.fingerprint,
                }


def count_rows(path: str | os.PathLike[str], configs: Sequence[str] | None = None) -> int:
    """How many rows the store holds (for ``configs`` only, if given); 0 if there is no store."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with contextlib.closing(_connect(path, create=False)) as db:
        if configs is None:
            return int(db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
        return sum(
            int(db.execute("SELECT COUNT(*) FROM rows WHERE config = ?", (n,)).fetchone()[0])
            for n in configs
        )


def sessions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The store's sessions (one per run), oldest first, as dicts.

    Keys: ``started``, ``ended`` (epoch seconds), ``status``, ``pid``.

    ``status`` is ``"completed"``, ``"stopped"`` (interrupted or failed), or ``"running"`` for a
    session that is still running or whose process was killed.
    """
    path = os.fspath(path)
    with contextlib.closing(_connect(path, create=False)) as db:
        cursor = db.execute("SELECT started, ended, status, pid FROM sessions ORDER BY id")
        return [dict(zip(("started", "ended", "status", "pid"), r, strict=True)) for r in cursor]


class _RowLoader:
    """Reads one config's rows from the store when called (picklable, unlike a closure)."""

    def __init__(self, path: str, config: str) -> None:
        self.path = path
        self.config = config

    def __call__(self) -> list[Row]:
        with contextlib.closing(_connect(self.path, create=False)) as db:
            cursor = db.execute(f"{_SELECT} WHERE config = ? ORDER BY idx", (self.config,))
            return [_decode(record) for record in cursor]


def _result(
    path: str, db: sqlite3.Connection, config: str, *, duration: float | None = None
) -> EvaluationResult:
    stored, fingerprint = db.execute(
        "SELECT duration, fingerprint FROM configs WHERE name = ?", (config,)
    ).fetchone()
    error_types = db.execute(
        "SELECT error_type, COUNT(*) FROM rows WHERE config = ? AND error_type IS NOT NULL "
        "GROUP BY error_type",
        (config,),
    ).fetchall()
    return EvaluationResult(
        config,
        _RowLoader(path, config),
        duration=float(stored if duration is None else duration),
        totals=_totals(db, config),
        error_types=dict(error_types),
        fingerprint=fingerprint,
    )


def _totals(db: sqlite3.Connection, config: str, *, only_ok: bool = False) -> Totals:
    n, score_sum, errors, nan = db.execute(
        "SELECT COUNT(*), TOTAL(score), COUNT(error_type), COUNT(*) - COUNT(score) "
        "FROM rows WHERE config = ?" + (" AND error_type IS NULL" if only_ok else ""),
        (config,),
    ).fetchone()
    return Totals(n=n, score_sum=math.nan if nan else float(score_sum), errors=errors)


def _check_names(path: str, db: sqlite3.Connection, wanted: Iterable[str] | None) -> list[str]:
    names = [name for (name,) in db.execute("SELECT name FROM configs ORDER BY rowid")]
    if wanted is None:
        return names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise StoreError(f"the store {path} has no config {unknown[0]!r}; it has {names}")
    return list(wanted)


# ---------------------------------------------------------------------- encoding


def _encode(row: Row, config: str, session: int) -> tuple[Any, ...]:
    example = _to_json(row.example)
    error = row.error
    eid = row.example_id
    return (
        config,
        str(eid) if isinstance(eid, int) else json.dumps(eid),
        row.index,
        _text_hash(example),
        example,
        _to_json(row.prediction),
        None if math.isnan(row.score) else row.score,
        error.type if error else None,
        error.message if error else None,
        error.traceback if error else None,
        row.attempts,
        row.duration,
        row.worker_pid,
        row.node,
        row.fingerprint,
        session,
    )


def _decode(record: Sequence[Any]) -> Row:
    (config, eid, index, _, example, prediction, score, error_type, message, traceback,
     attempts, duration, pid, node, fingerprint, _) = record  # fmt: skip
    return Row(
        index=index,
        example_id=json.loads(eid),
        example=json.loads(example),
        prediction=json.loads(prediction),
        score=math.nan if score is None else score,
        error=None if error_type is None else RowError(error_type, message or "", traceback or ""),
        attempts=attempts,
        duration=duration,
        worker_pid=pid,
        config=config,
        fingerprint=fingerprint,
        node=node,
    )


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def _to_json(value: Any) -> str:
    """Canonical JSON (keys sorted, no spaces) of ``value``, through ``to_jsonable`` if needed."""
    try:
        return _CANONICAL(value)  # the fast path for plain JSON data
    except (TypeError, ValueError, RecursionError):
        return _CANONICAL(to_jsonable(value))


def _text_hash(text: str) -> int:
    """A signed 64-bit hash of an example's canonical JSON (fits a SQLite INTEGER)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


# ---------------------------------------------------------------------- locking


def _lock(store: str, path: str) -> int | None:
    """Lock ``path`` for this process and write who holds it; None where locks are unavailable.

    Raises:
        StoreLockedError: another live process (or another sink of this one) holds it.
        StoreError: the lock file cannot be created.
    """
    if fcntl is None:
        return None
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC: never inherited
        except OSError as exc:
            raise StoreError(
                f"cannot create the lock file {path} of the run store {store}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            holder = _holder(fd) if busy else {}
            os.close(fd)
            if busy:
                raise _locked(store, path, holder) from None
            warnings.warn(  # e.g. ENOLCK: a network file system without locks
                f"the run store {store} cannot be locked ({exc.strerror}); nothing stops a "
                "second run from writing it at the same time",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        # A run that finished removed the file between our open and our flock: what we locked
        # is no longer the lock file, so lock the one at the path now.
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            current = False
        if current:
            _write_holder(fd)
            return fd
        os.close(fd)
    raise StoreError(f"cannot lock the run store {store}: its lock file {path} keeps changing")


def _unlock(fd: int, path: str, owner: int) -> None:
    """Remove the lock file (if it is still the one locked), then release the lock."""
    try:
        # a child forked without exec (never a procval worker) shares the lock: it must not
        # remove the file its parent still holds
        if os.getpid() == owner and os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_holder(fd: int) -> None:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("procval", "__main__.py")):
        argv[0] = "procval"  # python -m procval
    elif argv:
        argv[0] = os.path.basename(argv[0])
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "command": shlex.join(argv)[:200],
    }
    with contextlib.suppress(OSError):  # only for messages: a full disk must not stop the run
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)


def _holder(fd: int) -> dict[str, Any]:
    """Who holds the lock, from the file (its holder may not have written it yet: wait a bit)."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            found = json.loads(os.pread(fd, 4096, 0))
            if isinstance(found, dict):
                return found
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.02)


def _locked(store: str, path: str, holder: Mapping[str, Any]) -> StoreLockedError:
    pid = holder.get("pid") if isinstance(holder.get("pid"), int) else None
    host = str(holder["host"]) if holder.get("host") else None
    here = socket.gethostname()
    if pid == os.getpid() and host == here:
        return StoreLockedError(
            f"the run store {store} is already being written by this process (pid {pid}): an "
            "earlier evaluate() on it has not returned (in another thread?) or was not closed. "
            "Let it finish, or use another store path",
            path=store,
            pid=pid,
            host=host,
        )
    if pid is None:
        who = f"another process (its pid is not in {path} yet)"
        stop = "stop it"
    else:
        who = f"pid {pid}" + (f" on host {host}" if host else "")
        details = [str(holder["command"])] if holder.get("command") else []
        if isinstance(holder.get("started"), int | float):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
            details.append(f"since {when}")
        if details:
            who += f" ({', '.join(details)})"
        stop = f"stop it (kill {pid}" + (f" on {host}" if host and host != here else "") + ")"
    return StoreLockedError(
        f"the run store {store} is being written by another run: {who}; two runs on one store "
        f"would do the same work twice. Wait for it to finish, or {stop}, then run again to "
        "resume; or use another store path",
        path=store,
        pid=pid,
        host=host,
    )


# ---------------------------------------------------------------------- opening


def _connect(path: str, *, create: bool) -> sqlite3.Connection:
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
        _check_format(db, path, create=create)
    except BaseException:
        db.close()
        raise
    return db


def _check_format(db: sqlite3.Connection, path: str, *, create: bool) -> None:
    not_a_store = (
        f"{path} is not a procval run store; pass the path of a store written by procval, "
        "or a new path to start one"
    )
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        if not tables and create:
            db.execute("BEGIN IMMEDIATE")
            if not {n for (n,) in db.execute("SELECT name FROM sqlite_master")}:
                for statement in _SCHEMA.split(";"):
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


def _warn_if_program_changed(path: str, snapshot: Snapshot, stored: Mapping[str, Any]) -> None:
    before, now = stored.get("program"), snapshot.description.get("program")
    if before and now and before != now:
        warnings.warn(
            ProgramChangedWarning(
                f"the program or metric of config {snapshot.name!r} changed since its rows in "
                f"{path} were computed; the results will mix both versions. Pass fresh=True "
                "(procval run --fresh) to recompute them all"
            ),
            stacklevel=5,
        )


def _identity_mismatch(
    path: str, db: sqlite3.Connection, snapshot: Snapshot, stored: str | None
) -> StoreMismatchError:
    rows = db.execute("SELECT COUNT(*) FROM rows WHERE config = ?", (snapshot.name,)).fetchone()[0]
    before: Mapping[str, Any] = json.loads(stored) if stored else {}
    now = json.loads(json.dumps(dict(snapshot.description), sort_keys=True, default=repr))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    what = f" (its {', '.join(changed)} changed)" if changed else ""
    return StoreMismatchError(
        f"config {snapshot.name!r} differs from the config stored under that name in {path}"
        f"{what}; resuming would mix results of two configs. Start over with fresh=True "
        f"(procval run --fresh), which discards its {rows} stored rows, or use another store "
        "path or config name"
    )
