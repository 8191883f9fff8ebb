"""The run store's writer: the scheduler's sink for a run with ``store=``.

The parent process is the store's only writer; workers never touch it. Rows arrive through
:class:`StoreSink` (the scheduler's ``Sink``) one shard at a time, and each shard's rows are
committed in one transaction before the scheduler reports them. The file is in WAL mode with
``synchronous=NORMAL``: a committed transaction survives a ``kill -9`` of the parent (it is in
the operating system's hands), and a crash mid-transaction rolls it back, so the store is never
corrupted and loses at most the rows that were still in workers. Other processes may read the
store while a run writes it (``procval report`` during a run).

The tables are described in :mod:`procval.store.schema`. A store of format 1 (procval 0.1.0)
is migrated to format 2 by the first write transaction of a writer; readers never migrate.

Examples and predictions are stored as JSON through :func:`procval._convert.to_jsonable`:
plain JSON values as they are; mappings, lists, tuples and sets item by item; dataclasses
field by field; pydantic models by ``model_dump(mode="json")``; objects with ``toDict()`` or
``to_dict()`` (DSPy) through it; other objects by their public ``__dict__``; anything else as its
``repr()``. A row read back from the store holds these JSON values, not the original objects.

One writer at a time: the sink holds the store's writer lock (:mod:`procval.store.lock`) from
the moment it opens until it closes; readers never take it.

Resuming: an example whose id already has a row is not run again, provided the stored example
has the same content (a hash of its canonical JSON: every finished example up to the first
10,000 of a session, then a random sample, see :mod:`procval.store.done`, which also finds the
stored rows without holding their ids); the rows are counted from the running totals kept with
them (:mod:`procval.store.tally`); a config name stored with another identity is refused.
``fresh=True`` discards the stored rows of the configs being run, and only those.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import sqlite3
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from procval._version import __version__
from procval.errors import ProgramChangedWarning, StoreError, StoreMismatchError
from procval.results import EvaluationResult, Row, Totals, Usage
from procval.store import tally
from procval.store.codec import DEFAULTS, encode, text_hash, to_json
from procval.store.done import ContentCheck, DoneRows, check_mode
from procval.store.faults import store_errors, translate
from procval.store.lock import WriterLock, writer_is_gone
from procval.store.readers import result_of, usage_of
from procval.store.schema import ADD_LIMITS, ADD_USAGE, LIMIT_COUNTS, connect, insert, migrate
from procval.wire import Snapshot
from procval.wire import WorkItem as Item


class StoreSink:
    """The scheduler's sink for a run with ``store=``: rows go to a SQLite file as they arrive.

    Args:
        path: the store file; created (with its schema) on the first ``begin`` if missing.
        fresh: discard the stored rows of the configs being run instead of resuming them.
        configs: the names of the configs of this run.
        retry_errors: run again the examples whose stored row has an error (their new rows
            replace the old ones); otherwise a failed example counts as done.
        run: what this run was given (``workers``, ``threads``), kept with
            procval's and Python's versions under ``"run"`` in each config's stored description.
        epochs: how many times each example runs (kept in ``configs.epochs``).
        metric: the primary and reducer, kept as JSON in ``configs.metric``; the score names
            (``"scores"``: ``[]`` for one unnamed score) are added from the first scored row.
        sources: for a rescore, each rescored config's source config (stored with
            ``kind = 'rescore'``).

    Raises:
        StoreError: ``path`` exists but is not a procval run store, or cannot be opened.
        StoreLockedError: another live process is writing the store (see the module's doc).
    """

    def __init__(
        self,
        path: str,
        *,
        fresh: bool,
        configs: list[str],
        retry_errors: bool = False,
        run: Mapping[str, Any] | None = None,
        epochs: int = 1,
        metric: Mapping[str, Any] | None = None,
        sources: Mapping[str, str] | None = None,
    ) -> None:
        self._check = check_mode()  # a bad PROCVAL_RESUME_CHECK: refused before any file
        self._path = path
        self._epochs = epochs
        self._metric_of = dict(metric or {})
        self._metric = None if metric is None else json.dumps(dict(metric), sort_keys=True)
        self._sources = dict(sources or {})
        self._named: set[str] = set()  # configs whose score names are in configs.metric
        self._fresh = fresh
        self._retry_errors = retry_errors
        self._names = list(configs)
        self._run = _run_description(run)
        with contextlib.closing(connect(path, create=True)):
            pass  # fail now, before any worker starts, if the file is not a store ...
        self._lock = WriterLock(path)  # ... or if another run is writing it
        self._db: sqlite3.Connection | None = None
        self._session = 0
        self._closed = False
        self._done: dict[str, DoneRows] = {}  # the stored rows that count as done, per config
        self._checks: dict[str, ContentCheck] = {}
        self._prior: dict[str, float] = {}  # duration of earlier sessions, per config
        self._started: dict[str, float] = {}
        self._failure: StoreError | None = None  # raised by result() if close() failed
        self._unsure = False  # rows may be in the open transaction that the tally lacks

    # ------------------------------------------------------------------ Sink protocol

    def begin(self, snapshot: Snapshot) -> Totals:
        """Register a config, refusing one stored under the same name with another identity.

        Returns:
            The totals of the rows already stored for the config (none after ``fresh``).

        Raises:
            StoreMismatchError: the store holds a different config of this name.
        """
        try:
            with store_errors(self._path, "write"):
                return self._begin(snapshot)
        except BaseException:
            self._abort()
            raise

    def _begin(self, snapshot: Snapshot) -> Totals:
        db = self._writer()
        name = snapshot.name
        self._write(db)
        stored = db.execute(
            "SELECT identity, description, duration, metric FROM configs WHERE name = ?", (name,)
        ).fetchone()
        if stored is not None and self._fresh:
            for table in ("rows", "usage", "limits", "totals"):  # spend and counts too
                db.execute(f"DELETE FROM {table} WHERE config = ?", (name,))
            stored = (snapshot.identity, None, 0.0, None)
        # a store written by 0.1.0 holds the identity it gave: accepted, then replaced
        if stored is not None and stored[0] not in (snapshot.identity, snapshot.identity_v1):
            raise _identity_mismatch(self._path, db, snapshot, stored[1])
        if stored is not None and stored[1]:
            _warn_if_program_changed(self._path, snapshot, json.loads(stored[1]))
        description = json.dumps(
            {**snapshot.description, "run": self._run}, sort_keys=True, default=repr
        )
        db.execute(
            "INSERT INTO configs (name, identity, fingerprint, description, created, duration,"
            " epochs, metric) VALUES (?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " identity = excluded.identity, fingerprint = excluded.fingerprint,"
            " description = excluded.description, duration = ?, epochs = excluded.epochs,"
            " metric = excluded.metric",
            (name, snapshot.identity, snapshot.fingerprint, description, time.time(),
             self._epochs, self._metric_json(stored[3] if stored else None),
             stored[2] if stored else 0.0),
        )  # fmt: skip
        if name in self._sources:
            db.execute(
                "UPDATE configs SET kind = 'rescore', source = ? WHERE name = ?",
                (self._sources[name], name),
            )
        self._prior[name] = stored[2] if stored else 0.0
        self._started[name] = time.perf_counter()
        found = tally.of(db, name, only_ok=self._retry_errors, epochs=self._epochs)
        self._done[name] = DoneRows(
            db,
            self._path,
            name,
            stored=found.n,
            epochs=self._epochs,
            session=self._session,
            only_ok=self._retry_errors,
        )
        self._checks[name] = ContentCheck(self._check)
        return found

    def is_done(
        self, config: str, index: int, example_id: int | str, example: Any, epoch: int = 0
    ) -> bool:
        """Whether the example's epoch has a stored row; its content must match the stored one.

        The content is compared for a session's first finished examples, then for a random
        sample of them (:mod:`procval.store.done` says which, and what that misses).

        Raises:
            StoreMismatchError: the stored example of this id has different content.
        """
        digest = self._done[config].find(index, example_id, epoch)
        if digest is None:
            return False
        if self._checks[config].wanted() and digest != text_hash(to_json(example)):
            raise self._changed(config, example_id)
        return True

    def pending(self, config: str, items: Iterable[Item]) -> Iterator[Item]:
        """The items without a stored row, in order, as :meth:`is_done` tells (in one loop).

        Raises:
            StoreMismatchError: a finished example's content differs from the stored one.
        """
        return self._done[config].pending(
            items, self._checks[config], lambda item: self._changed(config, item.example_id)
        )

    def _changed(self, config: str, example_id: int | str) -> StoreMismatchError:
        return StoreMismatchError(
            f"example {example_id!r} of config {config!r} differs from the one stored under "
            f"that id in {self._path}; resuming would mix results of two datasets. Start over "
            "with fresh=True (procval run --fresh), use a new store path, or give changed "
            "examples new ids (PROCVAL_RESUME_CHECK=all checks every finished example)"
        )

    def add(self, config: str, rows: list[Row]) -> None:
        """Write ``rows`` and commit them (one transaction per call) before returning.

        Raises:
            StoreFullError: the disk is full; the rows of earlier calls are stored.
            StoreError: SQLite failed otherwise (see :mod:`procval.store.faults`).
        """
        if not rows:
            return
        with store_errors(self._path, "write"):
            self._add(config, rows)

    def _add(self, config: str, rows: list[Row]) -> None:
        db = self._writer()
        records = [encode(row, config, self._session) for row in rows]
        width = max(map(len, records))  # pad shorter records (see codec.encode)
        records = [
            r if len(r) == width else (*r, *DEFAULTS[len(r) - 16 : width - 16]) for r in records
        ]
        statement = insert(width, replace_failed=self._retry_errors)
        self._write(db)
        self._unsure = True  # until the tally has these rows (else the commit forgets it)
        counted = tally.replacing(db, config, rows) if self._retry_errors else rows
        try:
            db.executemany(statement, records)
        except sqlite3.IntegrityError:  # rows before the duplicate are in, not in the tally
            raise self._duplicate(db, config, rows) from None
        tally.add(db, config, counted)
        self._unsure = False
        spent = [
            (config, *_usage_record(m, u)) for r in rows if r.usage for m, u in r.usage.items()
        ]
        if spent:  # spend is spend: a failed or replaced row's tokens stay counted
            db.executemany(ADD_USAGE, spent)
        if config not in self._named:
            self._name_scores(db, config, rows)
        elapsed = time.perf_counter() - self._started[config]
        db.execute(
            "UPDATE configs SET duration = ? WHERE name = ?",
            (self._prior[config] + elapsed, config),
        )
        self._commit()

    def _metric_json(self, stored: str | None) -> str | None:
        """This run's ``configs.metric``, keeping the stored rows' score names until rows come."""
        names = json.loads(stored).get("scores") if stored else None
        if names is None or self._metric is None:
            return self._metric
        return json.dumps({**self._metric_of, "scores": names}, sort_keys=True)

    def _name_scores(self, db: sqlite3.Connection, config: str, rows: list[Row]) -> None:
        """Add the score names to ``configs.metric`` once a row of this session is scored.

        Every scored row of a config has the names of the first one (else it is an error row),
        so one row tells them: ``procval report`` then lists a config's scores without reading
        its rows. Once per config and session.
        """
        scored = next((row for row in rows if row.error is None), None)
        if scored is None:
            return
        self._named.add(config)
        described = {**self._metric_of, "scores": list(scored.scores or ())}
        db.execute(
            "UPDATE configs SET metric = ? WHERE name = ?",
            (json.dumps(described, sort_keys=True), config),
        )

    def _duplicate(self, db: sqlite3.Connection, config: str, rows: list[Row]) -> ValueError:
        """The ValueError for the row whose id is stored already (a duplicate id)."""
        for row in rows:
            found = db.execute(
                "SELECT idx FROM rows WHERE config = ? AND example_id = ? AND epoch = ?",
                (config, json.dumps(row.example_id), row.epoch),
            ).fetchone()
            if found is not None and found[0] != row.index:
                first, second = sorted((int(found[0]), row.index))
                return ValueError(
                    f"duplicate example id {row.example_id!r} at positions {first} and {second}; "
                    "ids must be unique (drop the 'id' field to number examples by position)"
                )
        return ValueError(f"a row of config {config!r} could not be stored: duplicate id")

    def spent(self, config: str) -> dict[str, Usage]:
        """``{model: Usage}`` the config's stored rows spent (all sessions; after ``begin``)."""
        with store_errors(self._path, "read"):
            return usage_of(self._writer(), config)

    def add_limits(self, config: str, counts: Mapping[str, Mapping[str, float]]) -> None:
        """Add ``{key: counts}`` (``LimitCounts.as_dict``) to the config's stored limit counts.

        Raises:
            StoreError: SQLite failed (see :mod:`procval.store.faults`).
        """
        records = [
            (config, key, *(found.get(name, 0) for name in LIMIT_COUNTS))
            for key, found in counts.items()
        ]
        if not records:
            return
        with store_errors(self._path, "write"):
            db = self._writer()
            self._write(db)
            db.executemany(ADD_LIMITS, records)
            self._commit()

    def result(self, config: str, duration: float) -> EvaluationResult:
        """The config's result over all stored rows (all sessions); rows load when first read.

        While the sink is open, ``duration`` (this session's) is stored too. Once it is closed,
        the writer lock is gone and nothing is written: ``add`` stored the duration with each
        shard, so only the last instants of the session are missing from the stored one.
        """
        if self._failure is not None:  # closing failed after the run completed: say so now
            raise self._failure
        total = self._prior[config] + duration
        db = self._db
        with store_errors(self._path, "write" if db else "read"):
            if db is None:
                with contextlib.closing(connect(self._path, create=False)) as reader:
                    return result_of(self._path, reader, config, duration=total)
            self._write(db)
            db.execute("UPDATE configs SET duration = ? WHERE name = ?", (total, config))
            self._commit()
            return result_of(self._path, db, config)

    def close(self, *, completed: bool) -> None:
        """Commit, mark the session completed or stopped, close the file, release the store.

        Idempotent, and never raises a store error: the scheduler closes the sink on its way
        out, often with an error already in flight (a full disk). If marking the session fails,
        it stays ``running`` (the next writer records it as interrupted); after a completed run
        the error is raised by :meth:`result` instead, which the scheduler calls next.
        """
        if self._closed:
            return
        self._closed = True
        db = self._db
        if db is None:
            self._lock.release()
            return
        try:
            with store_errors(self._path, "write"):
                self._write(db)
                db.execute(
                    "UPDATE sessions SET ended = ?, status = ? WHERE id = ?",
                    (time.time(), "completed" if completed else "stopped", self._session),
                )
                self._commit()
            with contextlib.suppress(sqlite3.Error):  # a reader holds the WAL; a full disk
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except StoreError as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if completed:
                self._failure = exc
        finally:
            db.close()
            self._db = None
            self._lock.release()

    # ------------------------------------------------------------------ connection

    def _writer(self) -> sqlite3.Connection:
        if self._db is None:
            if self._closed:
                raise StoreError(f"the run store {self._path} was closed")
            db = connect(self._path, create=True)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.execute("BEGIN IMMEDIATE")
                migrate(db)  # a format 1 store: in this first transaction, never by a reader
                self._mark_interrupted(db)
                cursor = db.execute(
                    "INSERT INTO sessions (started, status, pid, node, configs) "
                    "VALUES (?, 'running', ?, ?, ?)",
                    (time.time(), os.getpid(), socket.gethostname(), json.dumps(self._names)),
                )
                self._session = cursor.lastrowid or 0
                tally.start(db, self._session)  # a store without a trusted tally: counted now
            except sqlite3.Error as exc:
                db.close()
                raise translate(exc, self._path, "write") from exc
            except BaseException:  # Ctrl-C: roll back (by closing) what this began
                db.close()
                raise
            self._db = db
        return self._db

    def _mark_interrupted(self, db: sqlite3.Connection) -> None:
        """Record as ``interrupted`` the sessions left ``running`` by a killed writer.

        Holding the writer lock proves that every earlier writer is dead (the kernel drops a
        lock with its process). Without locks (no ``flock``), only sessions of this host whose
        process is gone are marked. Committed with this session's first rows.
        """
        running = db.execute("SELECT id, pid, node FROM sessions WHERE status = 'running'")
        dead = [
            (sid,)
            for sid, pid, node in running.fetchall()
            if self._lock.held or writer_is_gone(self._path, pid, node)
        ]
        db.executemany("UPDATE sessions SET status = 'interrupted' WHERE id = ?", dead)

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
            if self._unsure:  # an add failed (or was interrupted) between its rows and tally
                tally.forget(self._db)
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


def _usage_record(model: str, usage: Usage) -> tuple[Any, ...]:
    """``(model, calls, ..., cost)`` for :data:`~procval.store.schema.ADD_USAGE`."""
    return (
        model,
        usage.calls,
        usage.cached_calls,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.cost,
    )


def _run_description(run: Mapping[str, Any] | None) -> dict[str, Any]:
    """How a run ran, for the report: its options, and procval's and Python's versions."""
    return {**(run or {}), "procval": __version__, "python": platform.python_version()}


def _warn_if_program_changed(path: str, snapshot: Snapshot, stored: Mapping[str, Any]) -> None:
    before, now = stored.get("program"), snapshot.description.get("program")
    if before and now and before != now:
        warnings.warn(
            ProgramChangedWarning(
                f"the program or metric of config {snapshot.name!r} changed since its rows in "
                f"{path} were computed; the results will mix both versions. Pass fresh=True "
                "(procval run --fresh) to recompute them all"
            ),
            stacklevel=6,
        )


def _identity_mismatch(
    path: str, db: sqlite3.Connection, snapshot: Snapshot, stored: str | None
) -> StoreMismatchError:
    rows = db.execute("SELECT COUNT(*) FROM rows WHERE config = ?", (snapshot.name,)).fetchone()[0]
    before: Mapping[str, Any] = json.loads(stored) if stored else {}
    now = json.loads(json.dumps(dict(snapshot.description), sort_keys=True, default=repr))
    keys = (set(before) | set(now)) - {"run"}  # how it ran (workers, versions) is no identity
    changed = sorted(k for k in keys if before.get(k) != now.get(k))
    what = f" (its {', '.join(changed)} changed)" if changed else ""
    return StoreMismatchError(
        f"config {snapshot.name!r} differs from the config stored under that name in {path}"
        f"{what}; resuming would mix results of two configs. Start over with fresh=True "
        f"(procval run --fresh), which discards its {rows} stored rows, or use another store "
        "path or config name"
    )
