"""One way to make rows and results in a test, without running anything."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from procval.results import EvaluationResult, Row, RowError


def make_row(
    index: int,
    example_id: int | str | None = None,
    *,
    config: str = "a",
    example: Any = None,
    prediction: Any = None,
    score: float = 1.0,
    error: RowError | None = None,
    **more: Any,
) -> Row:
    """A row of ``config`` for example ``index`` (its id defaults to the index).

    ``example`` defaults to ``{"id": example_id, "x": index}``; the provenance fields are fixed
    (one attempt, 0.01 s, pid 4242, fingerprint ``"f" * 16``, node ``"here"``); ``more`` sets
    the other fields (``epoch``, ``scores``, ``extra``, ``usage``, ``group``).
    """
    example_id = index if example_id is None else example_id
    return Row(
        index=index,
        example_id=example_id,
        example={"id": example_id, "x": index} if example is None else example,
        prediction=prediction,
        score=score,
        error=error,
        attempts=1,
        duration=0.01,
        worker_pid=4242,
        config=config,
        fingerprint="f" * 16,
        node="here",
        **more,
    )


def make_result(config: str, rows: Sequence[Row], *, duration: float = 1.0) -> EvaluationResult:
    """An in-memory result of ``config`` holding ``rows``."""
    return EvaluationResult(config, rows, duration=duration)
