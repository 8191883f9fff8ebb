"""Rows from a worker's answer, and the rows the parent writes itself (timeouts, crashes).

A ``ShardDone`` carries results keyed by ``seq``; the worker's own outstanding examples give
each its index, id and example. Rows are built positionally, in ``Row``'s field order: a third
faster than keywords, and this runs once per example.
"""

from __future__ import annotations

import socket

from procval.results import Row, RowError
from procval.wire import ExampleResult, WorkItem

__all__ = ["error_row", "rows_of"]

_NODE = socket.gethostname()


def rows_of(
    results: list[ExampleResult],
    outstanding: dict[int, WorkItem],
    *,
    config: str,
    fingerprint: str,
    pid: int,
    node: str,
    failure_score: float,
) -> list[Row]:
    """The rows of ``results``, each example taken out of ``outstanding`` (it is answered)."""
    rows = []
    for seq, prediction, score, error, attempts, duration, *_ in results:
        index, example_id, example = outstanding.pop(seq)
        rows.append(
            Row(
                index,
                example_id,
                example,
                prediction,
                failure_score if error else score,
                RowError(*error) if error else None,
                attempts,
                duration,
                pid,
                config,
                fingerprint,
                node,
            )
        )
    return rows


def error_row(
    item: WorkItem,
    error: RowError,
    *,
    config: str,
    fingerprint: str,
    failure_score: float,
    pid: int = 0,
    node: str = "",
) -> Row:
    """A row the parent writes for an example that has no answer (Timeout, WorkerCrashed...)."""
    index, example_id, example = item
    return Row(
        index=index,
        example_id=example_id,
        example=example,
        prediction=None,
        score=failure_score,
        error=error,
        attempts=1,
        duration=0.0,
        worker_pid=pid,
        config=config,
        fingerprint=fingerprint,
        node=node or _NODE,
    )
