"""Each config's running totals in the store: what a resume counts without scanning its rows.

A resumed run needs, before its first new example, how many rows each config has (and their
score sum and errors, for the progress bar and the result's counts). Counting them is a scan of
the config's rows (~0.2 s per 900,000). The writer keeps them instead, in the ``totals`` table
(:data:`procval.store.schema.TOTALS`), one record per config, epoch and outcome (failed or not)::

    totals   config, epoch, failed (0 | 1), rows, score (the sum of the non-NULL scores),
             nulls (rows whose score is NULL: NaN); keyed by (config, epoch, failed)

added to in the transaction that writes the rows (:func:`add`), so a ``kill -9`` at any moment
leaves them equal to the rows. ``meta`` key ``totals`` holds the id of the last session that
kept them. A writer's first transaction (:func:`start`) trusts the table only if that session
is the last one before its own; otherwise (a store written before the table existed, a store
made by ``procval repair``, a session of a procval that did not keep them, a session whose
rows were written while its tally could not be) it recounts every config from the rows, once,
in that transaction. Readers never use the table, nor write it.
"""

from __future__ import annotations

import math
import sqlite3

from procval.results import Row, Totals
from procval.store.codec import id_text

ADD = (
    "INSERT INTO totals (config, epoch, failed, rows, score, nulls) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (config, epoch, failed) DO UPDATE SET rows = rows + excluded.rows, "
    "score = score + excluded.score, nulls = nulls + excluded.nulls"
)
_COUNT = (
    "SELECT config, epoch, error_type IS NOT NULL, COUNT(*), TOTAL(score), "
    "COUNT(*) - COUNT(score) FROM rows"
)
_GROUPS = " GROUP BY config, epoch, error_type IS NOT NULL"
_MARK = (
    "INSERT INTO meta (key, value) VALUES ('totals', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


def start(db: sqlite3.Connection, session: int) -> bool:
    """Make the tally whole for session ``session``, in the writer's first transaction.

    Called once the session's record is inserted (and the store migrated, which creates the
    table). The tally is recounted from the rows unless ``meta.totals`` names the session
    before this one; then ``meta.totals`` names this one.

    Returns:
        Whether the tally was recounted.
    """
    kept = db.execute("SELECT value FROM meta WHERE key = 'totals'").fetchone()
    (last,) = db.execute("SELECT MAX(id) FROM sessions WHERE id < ?", (session,)).fetchone()
    stale = kept is None or last is None or kept[0] != str(last)
    if stale:
        db.execute("DELETE FROM totals")
        db.execute(f"INSERT INTO totals {_COUNT}{_GROUPS}")
    db.execute(_MARK, (str(session),))
    return stale


def forget(db: sqlite3.Connection) -> None:
    """Mark the tally as not to be trusted: the next writer recounts it (:func:`start`)."""
    db.execute("DELETE FROM meta WHERE key = 'totals'")


def add(db: sqlite3.Connection, config: str, rows: list[Row]) -> None:
    """Add newly inserted ``rows`` of ``config`` to its tally (in the rows' transaction)."""
    sums: dict[tuple[int, bool], list[float]] = {}
    for row in rows:
        key = (row.epoch, row.error is not None)
        entry = sums.get(key)
        if entry is None:
            entry = sums[key] = [0, 0.0, 0]
        entry[0] += 1
        score = row.score
        if math.isnan(score):
            entry[2] += 1
        else:
            entry[1] += score
    db.executemany(
        ADD,
        [(config, epoch, failed, n, s, nulls) for (epoch, failed), (n, s, nulls) in sums.items()],
    )


def replacing(db: sqlite3.Connection, config: str, rows: list[Row]) -> list[Row]:
    """Before ``rows`` are upserted with ``replace_failed``: the ones that will count.

    A new row replaces a stored failed one (whose share of the tally is taken out here) and
    leaves a stored successful one as it is (it is not counted); a row with none is new. Pass
    what this returns to :func:`add` once the upsert succeeded.
    """
    new = []
    for row in rows:
        found = db.execute(
            "SELECT error_type IS NOT NULL, score FROM rows WHERE config = ? AND example_id = ? "
            "AND epoch = ?",
            (config, id_text(row.example_id), row.epoch),
        ).fetchone()
        if found is not None and not found[0]:
            continue  # a successful row stays: the upsert changes nothing
        if found is not None:
            score = found[1]
            minus = (config, row.epoch, 1, -1, -(score or 0.0), -int(score is None))
            db.execute(ADD, minus)
        new.append(row)
    return new


def of(db: sqlite3.Connection, config: str, *, only_ok: bool, epochs: int) -> Totals:
    """``config``'s totals, as :func:`procval.store.readers.totals` counts them, from the tally.

    Args:
        db: the writer's connection, after :func:`start`.
        config: the config.
        only_ok: count only the rows without an error.
        epochs: count only the rows of epochs below it.
    """
    n = errors = nulls = 0
    score = 0.0
    cursor = db.execute(
        "SELECT failed, SUM(rows), SUM(score), SUM(nulls) FROM totals WHERE config = ? "
        "AND epoch < ? GROUP BY failed",
        (config, epochs),
    )
    for failed, count, total, nan in cursor:
        if failed and only_ok:
            continue
        n, score, nulls = n + count, score + total, nulls + nan
        errors += count if failed else 0
    return Totals(n=n, score_sum=math.nan if nulls else score, errors=errors)
