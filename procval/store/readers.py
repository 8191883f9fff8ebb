"""Reading a run store: whole runs (``load``), streamed rows (``iter_rows``), counts, sessions.

Readers take no lock and may read while a run writes (the file is in WAL mode).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from procval.errors import StoreError
from procval.results import EvaluationResult, Results, Row, RowError, Totals, Usage
from procval.store.codec import decode
from procval.store.faults import store_errors
from procval.store.lock import writer_is_gone
from procval.store.schema import LIMIT_COUNTS, connect, select, version


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
    with store_errors(path), contextlib.closing(connect(path, create=False)) as db:
        names = [name for (name,) in db.execute("SELECT name FROM configs ORDER BY rowid")]
        return Results({name: result_of(path, db, name) for name in names})


def iter_rows(
    path: str | os.PathLike[str], configs: Sequence[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Stream the stored rows as flat dicts, config by config in dataset order.

    Memory stays constant however many rows there are (for exports).

    Args:
        path: the run store.
        configs: the configs to read (default: all, in the order they were stored).

    Yields:
        Dicts with keys ``config, index, example_id, epoch, example, prediction, score,
        scores, extra, usage, group, error_type, error_message, error_traceback, attempts,
        duration, worker_pid, node, fingerprint``; ``example``, ``prediction``, ``scores``
        (``{name: value}`` or None) and ``extra`` decoded from JSON, ``usage`` as ``{model:
        {calls, cached_calls, prompt_tokens, completion_tokens, total_tokens, cost}}`` or None.

    Raises:
        StoreError: no store at ``path``, not a store, or a config name it does not hold.
    """
    path = os.fspath(path)
    with store_errors(path), contextlib.closing(connect(path, create=False)) as db:
        names = check_names(path, db, configs)
        for name in names:
            where, params = rows_of(db, name)
            cursor = db.execute(f"{select(db)} WHERE {where} ORDER BY idx, epoch", params)
            for record in cursor:
                row = decode(record)
                yield {
                    "config": row.config,
                    "index": row.index,
                    "example_id": row.example_id,
                    "epoch": row.epoch,
                    "example": row.example,
                    "prediction": row.prediction,
                    "score": row.score,
                    "scores": None if row.scores is None else dict(row.scores),
                    "extra": row.extra,
                    "usage": None
                    if row.usage is None
                    else {m: u.to_dict() for m, u in row.usage.items()},
                    "group": row.group,
                    "error_type": row.error.type if row.error else None,
                    "error_message": row.error.message if row.error else None,
                    "error_traceback": row.error.traceback if row.error else None,
                    "attempts": row.attempts,
                    "duration": row.duration,
                    "worker_pid": row.worker_pid,
                    "node": row.node,
                    "fingerprint": row.fingerprint,
                }


def score_names(path: str | os.PathLike[str], configs: Sequence[str] | None = None) -> list[str]:
    """The names of the named scores the store's rows hold (``[]`` when each has one score).

    Every scored row of a config has the same names (a row with others is an error row), so
    one row per config tells them; the names of all configs, in first-seen order. A store
    written since they are kept has them in ``configs.metric`` (no row is read).
    """
    path = os.fspath(path)
    names: dict[str, None] = {}
    with store_errors(path), contextlib.closing(connect(path, create=False)) as db:
        if version(db) < 2:
            return []
        for name in check_names(path, db, configs):
            (metric,) = db.execute("SELECT metric FROM configs WHERE name = ?", (name,)).fetchone()
            kept = json.loads(metric).get("scores") if metric else None
            if kept is not None:
                names.update(dict.fromkeys(kept))
                continue
            where, params = rows_of(db, name)
            found = db.execute(
                f"SELECT scores FROM rows WHERE {where} AND scores IS NOT NULL LIMIT 1", params
            ).fetchone()
            if found is not None:
                names.update(dict.fromkeys(json.loads(found[0])))
    return list(names)


def count_rows(path: str | os.PathLike[str], configs: Sequence[str] | None = None) -> int:
    """How many rows the store holds (for ``configs`` only, if given); 0 if there is no store."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with store_errors(path), contextlib.closing(connect(path, create=False)) as db:
        if configs is None:
            return int(db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
        return sum(
            int(db.execute("SELECT COUNT(*) FROM rows WHERE config = ?", (n,)).fetchone()[0])
            for n in configs
        )


def sessions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The store's sessions (one per run), oldest first, as dicts.

    Keys: ``started``, ``ended`` (epoch seconds), ``status``, ``pid``.

    ``status`` is ``"completed"``, ``"stopped"`` (Ctrl-C, or failed), ``"interrupted"`` (its
    process was killed: no run holds the store's writer lock, or the session's process is gone
    from this host), or ``"running"`` for a session that is still running (or one on another
    host whose end cannot be told). The next run on the store records the interrupted status;
    this function only reads.
    """
    path = os.fspath(path)
    with store_errors(path), contextlib.closing(connect(path, create=False)) as db:
        cursor = db.execute("SELECT started, ended, status, pid, node FROM sessions ORDER BY id")
        records = cursor.fetchall()
    found = []
    for *fields, node in records:
        session = dict(zip(("started", "ended", "status", "pid"), fields, strict=True))
        if session["status"] == "running" and writer_is_gone(path, session["pid"], node):
            session["status"] = "interrupted"  # reported so; only a writer rewrites the store
        found.append(session)
    return found


class RowLoader:
    """Reads one config's rows from the store when called (picklable, unlike a closure)."""

    def __init__(self, path: str, config: str) -> None:
        self.path = path
        self.config = config

    def error_samples(self) -> dict[str, tuple[int | str, str]]:
        """The config's first failed example of each error type: ``{type: (example_id, message)}``.

        One grouped query (not a read of every row), in dataset order of the first failures.
        """
        with contextlib.closing(connect(self.path, create=False)) as db:
            return error_samples(db, self.config)

    def __call__(self) -> list[Row]:
        """The config's rows, in dataset order."""
        with store_errors(self.path), contextlib.closing(connect(self.path, create=False)) as db:
            where, params = rows_of(db, self.config)
            cursor = db.execute(f"{select(db)} WHERE {where} ORDER BY idx, epoch", params)
            return [decode(record) for record in cursor]

    def score_names(self) -> list[str]:
        """The config's score names (``[]`` for one unnamed score), from one row."""
        return score_names(self.path, [self.config])

    def score_means(self) -> dict[str, float]:
        """``{name: mean}`` of the config's named scores (``{}`` for one unnamed score).

        One query over the score columns; a failed row counts with its ``failure_score``.
        """
        names = self.score_names()
        if not names:
            return {}
        means = ", ".join(
            "AVG(CASE WHEN scores IS NULL THEN score ELSE json_extract(scores, ?) END)"
            for _ in names
        )
        paths = [f"$.{json.dumps(name)}" for name in names]
        with store_errors(self.path), contextlib.closing(connect(self.path, create=False)) as db:
            where, params = rows_of(db, self.config)
            found = db.execute(f"SELECT {means} FROM rows WHERE {where}", (*paths, *params))
            found = found.fetchone()
        return {n: math.nan if v is None else float(v) for n, v in zip(names, found, strict=True)}

    def group_names(self) -> list[str]:
        """The config's row groups, sorted (``[]`` without groups), from ``group_key``."""
        with store_errors(self.path), contextlib.closing(connect(self.path, create=False)) as db:
            if version(db) < 2:
                return []
            where, params = rows_of(db, self.config)
            cursor = db.execute(
                f"SELECT DISTINCT group_key FROM rows WHERE {where} AND group_key IS NOT NULL",
                params,
            )
            return sorted(name for (name,) in cursor)

    def first_error(self) -> RowError | None:
        """The error of the config's first failed row (by dataset order), or None."""
        with contextlib.closing(connect(self.path, create=False)) as db:
            where, params = rows_of(db, self.config)
            found = db.execute(
                f"SELECT error_type, error_message FROM rows WHERE {where} AND error_type IS "
                "NOT NULL ORDER BY idx LIMIT 1",
                params,
            ).fetchone()
        return None if found is None else RowError(found[0], found[1] or "")


def result_of(
    path: str, db: sqlite3.Connection, config: str, *, duration: float | None = None
) -> EvaluationResult:
    """The result of ``config`` over its stored rows (read when first asked for)."""
    stored, fingerprint = db.execute(
        "SELECT duration, fingerprint FROM configs WHERE name = ?", (config,)
    ).fetchone()
    scoring: dict[str, Any] = {}
    if version(db) >= 2:
        epochs, metric = db.execute(
            "SELECT epochs, metric FROM configs WHERE name = ?", (config,)
        ).fetchone()
        described = json.loads(metric) if metric else {}
        scoring = {
            "epochs": int(epochs),
            "reducer": described.get("reducer") or "mean",
            "primary": described.get("primary"),
        }
    where, params = rows_of(db, config)
    error_types = db.execute(
        f"SELECT error_type, COUNT(*) FROM rows WHERE {where} AND error_type IS NOT NULL "
        "GROUP BY error_type",
        params,
    ).fetchall()
    result = EvaluationResult(
        config,
        RowLoader(path, config),
        duration=float(stored if duration is None else duration),
        totals=totals(db, config),
        error_types=dict(error_types),
        fingerprint=fingerprint,
        usage=usage_of(db, config),
        kept=kept_rows(db, config),
        **scoring,
    )
    result._limits = limits_of(db, config)
    return result


def usage_of(db: sqlite3.Connection, config: str) -> dict[str, Usage]:
    """``{model: Usage}`` spent by ``config`` (all sessions), from the ``usage`` table.

    The table holds each config's spend, added to with its rows, so no row is read. A format 1
    store has none: no usage.
    """
    if (
        version(db) < 2
        or not db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'usage'"
        ).fetchone()
    ):
        return {}
    cursor = db.execute(
        "SELECT model, calls, cached_calls, prompt_tokens, completion_tokens, total_tokens, cost "
        "FROM usage WHERE config = ? ORDER BY model",
        (config,),
    )
    return {model: Usage(*counts) for model, *counts in cursor}


def limits_of(db: sqlite3.Connection, config: str) -> dict[str, dict[str, float]]:
    """``{key: counts}`` of ``config``'s rate-limited calls, summed over its sessions.

    Counts as in :attr:`procval.EvaluationResult.limits`; ``{}`` for a store without the
    ``limits`` table (written before it existed: a reader does not add it).
    """
    if not db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'limits'"
    ).fetchone():
        return {}
    cursor = db.execute(
        f"SELECT key, {', '.join(LIMIT_COUNTS)} FROM limits WHERE config = ? ORDER BY key",
        (config,),
    )
    return {
        key: {
            name: (round(value, 3) if name == "wait_seconds" else int(value))
            for name, value in zip(LIMIT_COUNTS, counts, strict=True)
        }
        for key, *counts in cursor
    }


def totals(
    db: sqlite3.Connection, config: str, *, only_ok: bool = False, epochs: int | None = None
) -> Totals:
    """Count, score sum and errors of ``config``'s rows.

    Args:
        db: the store.
        config: the config.
        only_ok: count only the rows without an error.
        epochs: count only the rows of epochs below it (default: the config's stored epochs,
            so that rows kept from a run with more epochs are not counted).
    """
    where, params = rows_of(db, config, epochs)
    n, score_sum, errors, nan = db.execute(
        "SELECT COUNT(*), TOTAL(score), COUNT(error_type), COUNT(*) - COUNT(score) "
        f"FROM rows WHERE {where}" + (" AND error_type IS NULL" if only_ok else ""),
        params,
    ).fetchone()
    return Totals(n=n, score_sum=math.nan if nan else float(score_sum), errors=errors)


def rows_of(
    db: sqlite3.Connection, config: str, epochs: int | None = None
) -> tuple[str, tuple[Any, ...]]:
    """The ``WHERE`` condition (and its parameters) of the rows a result of ``config`` holds.

    Those of its epochs below ``epochs`` (default: the config's stored epochs). A run resumed
    with fewer epochs than its store holds keeps the later epochs' rows in the store, untouched,
    and out of its result; a run with more epochs again counts them (and does not rerun them).
    A format 1 store has no epochs: every row of the config.
    """
    if version(db) < 2:
        return "config = ?", (config,)
    if epochs is None:
        found = db.execute("SELECT epochs FROM configs WHERE name = ?", (config,)).fetchone()
        if found is None:
            return "config = ?", (config,)
        epochs = int(found[0])
    return "config = ? AND epoch < ?", (config, epochs)


def kept_rows(db: sqlite3.Connection, config: str) -> tuple[int, int]:
    """``(rows, epochs)``: the config's stored rows that its result leaves out, by epoch.

    ``rows`` of epochs at or past the config's stored epochs (see :func:`rows_of`), and the
    epochs a run would need to count them all (``(0, 0)`` when there are none).
    """
    _, params = rows_of(db, config)
    if len(params) < 2:
        return 0, 0
    n, last = db.execute(
        "SELECT COUNT(*), MAX(epoch) FROM rows WHERE config = ? AND epoch >= ?", params
    ).fetchone()
    return int(n), 0 if last is None else int(last) + 1


def check_names(path: str, db: sqlite3.Connection, wanted: Iterable[str] | None) -> list[str]:
    """``wanted`` (default: every config, in stored order), each checked to be in the store."""
    names = [name for (name,) in db.execute("SELECT name FROM configs ORDER BY rowid")]
    if wanted is None:
        return names
    unknown = [n for n in wanted if n not in names]
    if unknown:
        raise StoreError(f"the store {path} has no config {unknown[0]!r}; it has {names}")
    return list(wanted)


def error_samples(db: sqlite3.Connection, config: str) -> dict[str, tuple[int | str, str]]:
    """``{error type: (example id, message)}`` of the first failed row of each type of ``config``.

    One query grouped by error type; SQLite takes the bare columns from the row with ``MIN(idx)``.
    """
    where, params = rows_of(db, config)
    cursor = db.execute(
        "SELECT error_type, MIN(idx), example_id, error_message FROM rows "
        f"WHERE {where} AND error_type IS NOT NULL GROUP BY error_type ORDER BY MIN(idx)",
        params,
    )
    return {kind: (json.loads(eid), message or "") for kind, _, eid, message in cursor}


def iter_errors(
    path: str | os.PathLike[str], configs: Sequence[str] | None = None
) -> Iterator[tuple[str, int | str, str, str]]:
    """Stream the failed rows as ``(config, example_id, error_type, error_message)``.

    Config by config in dataset order; only the error columns are read (not examples, nor
    predictions, nor tracebacks), so a store of a million rows streams in constant memory.

    Raises:
        StoreError: no store at ``path``, not a store, or a config name it does not hold.
    """
    path = os.fspath(path)
    with contextlib.closing(connect(path, create=False)) as db:
        for name in check_names(path, db, configs):
            where, params = rows_of(db, name)
            cursor = db.execute(
                "SELECT example_id, error_type, error_message FROM rows "
                f"WHERE {where} AND error_type IS NOT NULL ORDER BY idx",
                params,
            )
            for eid, kind, message in cursor:
                yield name, json.loads(eid), kind, message or ""


def run_details(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the HTML report's run section shows, without reading the rows' content.

    Returns:
        ``{"path": path, "sessions": [...], "configs": {name: {...}}}``: the sessions as
        :func:`sessions` gives them, each with its ``host`` added. Each config's dict holds
        ``identity``, ``fingerprint``, ``created`` (epoch seconds), ``description`` (the
        stored JSON: env *names* and value hashes, seed, and under ``"run"`` the workers and
        threads asked for and the procval and Python versions of its last session, in stores
        written since they are kept), ``workers`` (distinct worker processes that produced
        its rows, all sessions) and ``nodes`` (the hosts they ran on).

    Raises:
        StoreError: no store at ``path``, or not a store.
    """
    path = os.fspath(path)
    with contextlib.closing(connect(path, create=False)) as db:
        hosts = [node for (node,) in db.execute("SELECT node FROM sessions ORDER BY id")]
        configs: dict[str, Any] = {}
        stored = db.execute(
            "SELECT name, identity, fingerprint, description, created FROM configs ORDER BY rowid"
        ).fetchall()
        for name, identity, fingerprint, description, created in stored:
            workers, nodes = db.execute(
                "SELECT COUNT(DISTINCT node || ' ' || worker_pid), GROUP_CONCAT(DISTINCT node) "
                "FROM rows WHERE config = ?",
                (name,),
            ).fetchone()
            configs[name] = {
                "identity": identity,
                "fingerprint": fingerprint,
                "created": created,
                "description": json.loads(description) if description else {},
                "workers": int(workers),
                "nodes": sorted(nodes.split(",")) if nodes else [],
            }
    found = sessions(path)
    for session, host in zip(found, hosts, strict=False):
        session["host"] = host
    return {"path": path, "sessions": found, "configs": configs}
