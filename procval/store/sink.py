"""Where finished rows go: memory, or the run store (``procval.store``), behind one interface."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from procval._scores import NamedScores
from procval.results import EvaluationResult, Row, Totals
from procval.wire import Snapshot
from procval.wire import WorkItem as Item


class Sink(Protocol):
    """Receives rows as shards finish; the scheduler reports a row only after ``add`` returns."""

    def begin(self, snapshot: Snapshot) -> Totals:
        """Register a config; return the totals of rows already finished (a resumed run)."""
        ...

    def is_done(
        self, config: str, index: int, example_id: int | str, example: Any, epoch: int = 0
    ) -> bool:
        """Whether this example (this epoch of it) already has a row (then it is not run again)."""
        ...

    def pending(self, config: str, items: Iterable[Item]) -> Iterator[Item]:
        """The items that are not done, in order: ``is_done`` of each, as one lazy stream."""
        ...

    def add(self, config: str, rows: list[Row]) -> None:
        """Keep finished rows (durably, for a store) before they are reported anywhere."""
        ...

    def result(self, config: str, duration: float) -> EvaluationResult:
        """The config's result: earlier sessions' rows included."""
        ...

    def close(self, *, completed: bool) -> None:
        """Flush and release; ``completed`` says whether every example has a row."""
        ...


class MemorySink:
    """Rows kept in the parent's memory (no store).

    Args:
        epochs: how many times each example runs (the results reduce over them).
        reducer: the run's ``reducer=``.
        primary: the run's ``primary=``.
    """

    def __init__(
        self,
        *,
        epochs: int = 1,
        reducer: str | Mapping[str, str] = "mean",
        primary: str | None = None,
    ) -> None:
        self._scoring: dict[str, Any] = {"epochs": epochs, "reducer": reducer, "primary": primary}
        self._rows: dict[str, list[Row]] = {}
        self._fingerprints: dict[str, str] = {}

    def begin(self, snapshot: Snapshot) -> Totals:
        """Start an empty list of rows for the config."""
        self._rows[snapshot.name] = []
        self._fingerprints[snapshot.name] = snapshot.fingerprint
        return Totals()

    def is_done(
        self, config: str, index: int, example_id: int | str, example: Any, epoch: int = 0
    ) -> bool:
        """Nothing is done before a run in memory."""
        return False

    def pending(self, config: str, items: Iterable[Item]) -> Iterator[Item]:
        """Every item: nothing is done before a run in memory."""
        return iter(items)

    def add(self, config: str, rows: list[Row]) -> None:
        """Append rows; their named scores become plain dicts, as a stored row's are.

        Rows travel with their named scores as JSON text (:class:`procval._scores.NamedScores`,
        decoded when read): the rows a caller keeps in memory get them decoded once, so that
        ``row.scores`` is a ``dict`` (``json.dumps`` takes it) whether or not a store was used.
        """
        for row in rows:
            if type(row.scores) is NamedScores:
                object.__setattr__(row, "scores", dict(row.scores))  # frozen: set once, here
        self._rows[config].extend(rows)

    def result(self, config: str, duration: float) -> EvaluationResult:
        """The rows collected, in dataset order."""
        return EvaluationResult(
            config,
            self._rows[config],
            duration=duration,
            fingerprint=self._fingerprints[config],
            **self._scoring,
        )

    def close(self, *, completed: bool) -> None:
        """Nothing to release."""


class SinkWrapper:
    """A sink that hands everything to another one; subclasses change what ``add`` does."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    def begin(self, snapshot: Snapshot) -> Totals:
        """As the wrapped sink."""
        return self._sink.begin(snapshot)

    def is_done(
        self, config: str, index: int, example_id: int | str, example: Any, epoch: int = 0
    ) -> bool:
        """As the wrapped sink."""
        return self._sink.is_done(config, index, example_id, example, epoch)

    def pending(self, config: str, items: Iterable[Item]) -> Iterator[Item]:
        """As the wrapped sink."""
        return self._sink.pending(config, items)

    def add(self, config: str, rows: list[Row]) -> None:
        """As the wrapped sink."""
        self._sink.add(config, rows)

    def result(self, config: str, duration: float) -> EvaluationResult:
        """As the wrapped sink."""
        return self._sink.result(config, duration)

    def close(self, *, completed: bool) -> None:
        """As the wrapped sink."""
        self._sink.close(completed=completed)
