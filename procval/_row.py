"""A row of an evaluation (one example, one epoch, under one config), its error, and totals.

Re-exported by :mod:`procval.results`, where users find them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from procval.usage import Usage

__all__ = ["Row", "RowError", "Totals"]


@dataclass(frozen=True, slots=True)
class RowError:
    """Why an example has no score.

    Attributes:
        type: the exception's class name, or ``"Timeout"``, ``"WorkerCrashed"``.
        message: the exception's message (for a crash: the exit code or signal).
        traceback: the traceback as formatted in the worker ("" where there is none).
    """

    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(frozen=True, slots=True)
class Row:
    """One example's outcome, with its provenance.

    Attributes:
        index: position in the dataset.
        example_id: the example's ``id`` key or attribute, else its position.
        example: the example as given (as stored, for a run loaded from a store).
        prediction: what the program returned (None when it raised).
        score: the metric's value as a float; ``failure_score`` when ``error`` is set.
        error: None, or what went wrong.
        attempts: how many times the program was called for this example.
        duration: seconds spent on the example in the worker, all attempts included.
        worker_pid: the process that produced the row.
        config: the config's name.
        fingerprint: the snapshot installed in that process.
        node: the host that ran the process.
        epoch: which repetition of the example this row is (``evaluate(..., epochs=)``), from 0.
        scores: every named score of the row, or None when the only score is ``score``;
            when set, ``score`` is the primary one. A read-only mapping (a run's rows hold
            their scores' JSON text, decoded on first access; ``dict(row.scores)`` for a dict).
        extra: what the metric returned besides its scores (JSON values), or None.
        usage: tokens and cost per model name spent by this example, or None.
        group: the example's group key, or None.
    """

    index: int
    example_id: int | str
    example: Any
    prediction: Any
    score: float
    error: RowError | None
    attempts: int
    duration: float
    worker_pid: int
    config: str
    fingerprint: str
    node: str = ""
    epoch: int = 0
    scores: Mapping[str, float] | None = None
    extra: Mapping[str, Any] | None = None
    usage: Mapping[str, Usage] | None = None
    group: str | None = None


@dataclass(frozen=True)
class Totals:
    """Running totals of one config's rows: enough for a score without the rows."""

    n: int = 0
    score_sum: float = 0.0
    errors: int = 0
