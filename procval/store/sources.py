"""What a rescore reads from a store: each config as stored, and its rows' predictions.

Like every reader, it opens the file read-only and takes no lock.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from procval.store.faults import store_errors
from procval.store.schema import connect, version

__all__ = ["StoredConfig", "StoredRow", "stored_configs", "stored_rows"]


@dataclass(frozen=True)
class StoredConfig:
    """A config as the store keeps it.

    Attributes:
        name: the config's name.
        identity: :meth:`procval.Config.identity` of the config that ran.
        description: :meth:`procval.Config.describe` (env names and value hashes, never values).
        kind: ``"run"``, or ``"rescore"`` for a config made by ``procval.rescore``.
        source: for a rescore, the config whose predictions it scored.
        metric: the stored ``configs.metric`` (primary, reducer, score names), or ``{}``.
        epochs: how many epochs the config ran.
        rows: how many rows it has.
        predictions: how many of them have a prediction to score (not a failed program).
    """

    name: str
    identity: str
    description: dict[str, Any]
    kind: str
    source: str | None
    metric: dict[str, Any]
    epochs: int
    rows: int
    predictions: int


class StoredRow(NamedTuple):
    """One stored row, as a rescore sends it: its example and prediction as JSON text.

    The text is decoded in the worker that scores the row, not in the parent.

    Attributes:
        position: the example's position in the dataset (its index).
        example_id: the example's id.
        epoch: the row's epoch.
        example: the stored example's JSON text (canonical: as stored, and hashed).
        prediction: the stored prediction's JSON text.
        prediction_type: the prediction's type as ``module.qualname``, or None (plain JSON).
        error: ``(type, message, traceback)`` when the program failed (no prediction), or None.
        group: the row's group key.
    """

    position: int
    example_id: int | str
    epoch: int
    example: str
    prediction: str
    prediction_type: str | None
    error: tuple[str, str, str] | None
    group: str | None


_FAILED_PROGRAM = "error_type IS NOT NULL AND prediction = 'null'"
"""A row with an error and no prediction: its program failed, there is nothing to score."""


def stored_configs(path: str | os.PathLike[str], *, counts: bool = True) -> dict[str, StoredConfig]:
    """Every config of the store, in the order they were first stored.

    Args:
        path: the run store.
        counts: count each config's rows and predictions (one pass over the rows); without,
            ``rows`` and ``predictions`` are 0 and no row is read.

    Raises:
        StoreError: no store at ``path``, or not a store.
    """
    path = os.fspath(path)
    with store_errors(path), contextlib.closing(connect(path, create=False)) as db:
        v2 = version(db) >= 2
        columns = "kind, source, metric, epochs" if v2 else "'run', NULL, NULL, 1"
        found = db.execute(
            f"SELECT name, identity, description, {columns} FROM configs ORDER BY rowid"
        ).fetchall()
        counted = {
            name: (n, n - failed)
            for name, n, failed in (
                db.execute(
                    f"SELECT config, COUNT(*), COUNT(CASE WHEN {_FAILED_PROGRAM} THEN 1 END) "
                    "FROM rows GROUP BY config"
                )
                if counts
                else ()
            )
        }
    return {
        name: StoredConfig(
            name=name,
            identity=identity,
            description=json.loads(description) if description else {},
            kind=kind,
            source=source,
            metric=json.loads(metric) if metric else {},
            epochs=int(epochs),
            rows=counted.get(name, (0, 0))[0],
            predictions=counted.get(name, (0, 0))[1],
        )
        for name, identity, description, kind, source, metric, epochs in found
    }


def stored_rows(path: str | os.PathLike[str], config: str) -> Iterator[StoredRow]:
    """Stream ``config``'s rows in dataset order (by index, then epoch), in constant memory.

    A store of format 1 has no epochs, prediction types or groups: epoch 0, None, None.

    Raises:
        StoreError: no store at ``path``, or not a store.
    """
    path = os.fspath(path)
    with store_errors(path), contextlib.closing(connect(path, create=False)) as db:
        v2 = version(db) >= 2
        extra = "epoch, prediction_type, group_key" if v2 else "0, NULL, NULL"
        cursor = db.execute(
            f"SELECT idx, example_id, {extra}, example, prediction, error_type, error_message, "
            f"error_traceback, {_FAILED_PROGRAM} FROM rows WHERE config = ? "
            f"ORDER BY {'idx, epoch' if v2 else 'idx'}",
            (config,),
        )
        loads = json.loads
        for (
            index,
            eid,
            epoch,
            kind,
            group,
            example,
            prediction,
            etype,
            message,
            tb,
            failed,
        ) in cursor:
            yield StoredRow(
                index,
                loads(eid),
                epoch,
                example,
                prediction,
                kind,
                (etype, message or "", tb or "") if failed else None,
                group,
            )
