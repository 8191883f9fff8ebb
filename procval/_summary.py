"""Views of a result that need more than a format string: summary lines, a pandas frame."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from procval.results import EvaluationResult, Row


def example_of(sample: tuple[int | str, str] | None, width: int = 160) -> str:
    """``", e.g. ID: first line of the message"`` (clipped to ``width``), or "" for None."""
    if sample is None:
        return ""
    example_id, message = sample
    lines = message.strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > width:
        first = first[: width - 1] + "…"
    return f", e.g. {example_id}: {first}" if first else f", e.g. {example_id}"


def all_failed(result: EvaluationResult) -> str:
    """A loud line when every example failed (its score is then failure_score), else ""."""
    totals = result.totals
    if not totals.n or totals.errors < totals.n:
        return ""
    kinds = result.error_types
    error = result._first_error()
    if error is None:
        what = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    else:
        message = error.message.strip().splitlines()[0].rstrip(".") if error.message.strip() else ""
        message = message if len(message) <= 200 else message[:197] + "..."
        what = f"{error.type}: {message}" if message else error.type
        if len(kinds) > 1:
            what += " (first of: " + ", ".join(f"{n} x {k}" for k, n in kinds.items()) + ")"
    return (
        f"ALL {totals.n} EXAMPLES FAILED: {what}; the score {result.score} is "
        "failure_score, not a measurement"
    )


def named_scores(result: EvaluationResult) -> str:
    """``"em 0.5000, f1 0.7500"`` when the config has named scores, else ""."""
    scores = result.scores
    if list(scores) == ["score"]:
        return ""
    return ", ".join(f"{name} {value:.4f}" for name, value in scores.items())


def data_frame(rows: Sequence[Row], names: list[str]) -> Any:
    """``rows`` as a ``pandas.DataFrame`` of the Row fields ``names``, ``error`` split in three.

    Raises:
        ImportError: pandas is not installed (``pip install 'procval[pandas]'``).
    """
    try:
        import pandas
    except ImportError:
        raise ImportError("to_pandas() needs pandas: pip install 'procval[pandas]'") from None
    columns: list[str] = []
    for name in names:
        columns += ["error_type", "error_message", "error_traceback"] if name == "error" else [name]
    records = []
    for row in rows:
        record = {name: getattr(row, name, None) for name in columns}
        if row.error is not None:
            record["error_type"] = row.error.type
            record["error_message"] = row.error.message
            record["error_traceback"] = row.error.traceback
        records.append(record)
    return pandas.DataFrame.from_records(records, columns=columns)
