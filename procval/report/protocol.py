"""What the report reads from a result: the attributes it relies on, as Protocols.

The report side sits above :mod:`procval.results` and never imports it (imports go one way:
``results`` may call into ``report``, never the reverse). What it needs from a result and its
rows is written down here instead; :class:`procval.EvaluationResult` and :class:`procval.Row`
satisfy these Protocols structurally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeGuard

from procval.report.stats import Interval

__all__ = ["ErrorLike", "ResultLike", "RowLike", "TotalsLike", "is_result"]


class ErrorLike(Protocol):
    """Why an example has no score (:class:`procval.RowError`)."""

    @property
    def type(self) -> str:
        """The exception's class name."""

    @property
    def message(self) -> str:
        """The exception's message."""

    @property
    def traceback(self) -> str:
        """The worker's traceback, or ""."""


class RowLike(Protocol):
    """One example's outcome (:class:`procval.Row`), the fields the report shows."""

    @property
    def index(self) -> int:
        """Position in the dataset."""

    @property
    def example_id(self) -> int | str:
        """The example's id."""

    @property
    def example(self) -> Any:
        """The example as given."""

    @property
    def prediction(self) -> Any:
        """What the program returned."""

    @property
    def score(self) -> float:
        """The example's score."""

    @property
    def error(self) -> ErrorLike | None:
        """None, or what went wrong."""

    @property
    def config(self) -> str:
        """The config's name."""

    @property
    def worker_pid(self) -> int:
        """The process that produced the row."""

    @property
    def node(self) -> str:
        """The host that ran the process."""

    @property
    def fingerprint(self) -> str:
        """The snapshot installed in that process."""


class TotalsLike(Protocol):
    """Running totals of one config's rows (:class:`procval.results.Totals`)."""

    @property
    def n(self) -> int:
        """How many rows."""

    @property
    def errors(self) -> int:
        """How many rows failed."""


class ResultLike(Protocol):
    """One config's outcome (:class:`procval.EvaluationResult`)."""

    @property
    def config(self) -> str:
        """The config's name."""

    @property
    def rows(self) -> Sequence[RowLike]:
        """Every row, in dataset order."""

    @property
    def errors(self) -> Sequence[RowLike]:
        """The failed rows."""

    @property
    def totals(self) -> TotalsLike:
        """Counts and the score sum."""

    @property
    def score(self) -> float:
        """Mean score over all examples."""

    @property
    def error_types(self) -> Mapping[str, int]:
        """Failed rows by error type."""

    @property
    def duration(self) -> float:
        """Wall-clock seconds."""

    def __len__(self) -> int:
        """How many examples."""

    def ci(self, confidence: float = ..., resamples: int = ..., seed: int = ...) -> Interval:
        """A bootstrap interval of :attr:`score`."""


_RESULT_ATTRIBUTES = ("config", "rows", "errors", "totals", "score", "duration", "ci")


def is_result(value: object) -> TypeGuard[ResultLike]:
    """Whether ``value`` is a result the report can read (has a :class:`ResultLike`'s members).

    The members are looked up on the type, so a result whose rows live in a store is not read.

    Args:
        value: anything.

    Returns:
        True for an :class:`procval.EvaluationResult` (or any type with the same members).
    """
    return all(hasattr(type(value), name) for name in _RESULT_ATTRIBUTES)


def per_example(result: ResultLike) -> Sequence[RowLike]:
    """One row per example: with epochs, each example's epochs reduced (``examples()``)."""
    if getattr(result, "epochs", 1) > 1:
        examples: Sequence[RowLike] = result.examples()  # type: ignore[attr-defined]
        return examples
    return result.rows
