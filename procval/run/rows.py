"""Turning a worker's results into rows: the parent's per-example step, kept off the scheduler.

A worker reports each example as an :class:`~procval.wire.ExampleResult`; :class:`RowMaker`
(one per config) names it again as a :class:`~procval.results.Row`: the example and its epoch
come from the item the scheduler kept, the provenance from the shard's reply. Named scores are
checked here, in the one process that sees every worker's rows: each example must return the
same score names as the first one did (else its row is an error naming both), and ``primary=``
picks which of them is the row's ``score``.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence

from procval._scores import NamedScores
from procval.results import Row, RowError, Usage
from procval.run.dataset import Item
from procval.wire import ErrorInfo, ExampleResult

_NODE = socket.gethostname()


class RowMaker:
    """Builds one config's rows from its workers' results.

    Args:
        config: the config's name.
        fingerprint: the config's snapshot fingerprint (for rows made in the parent).
        failure_score: the score of a failed example.
        epochs: how many times each example runs; an item's ``seq`` is ``index * epochs +
            epoch`` (see :func:`procval.run.epochs.repeat`).
        primary: the score name that is the row's ``score`` when the metric gives several, or
            None for the default (the key ``score``, else the first one).
    """

    __slots__ = (
        "_keys",
        "_last",
        "config",
        "epochs",
        "failure_score",
        "fingerprint",
        "names",
        "primary",
    )

    def __init__(
        self,
        config: str,
        fingerprint: str,
        *,
        failure_score: float = 0.0,
        epochs: int = 1,
        primary: str | None = None,
    ) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.failure_score = failure_score
        self.epochs = epochs
        self.primary = primary
        self.names: tuple[str, ...] | None = None  # the first scored row's names; () unnamed
        self._keys: set[str] = set()
        self._last: tuple[str, ...] | None = None  # names already checked: the same tuple

    def rows(
        self,
        results: Sequence[ExampleResult],
        outstanding: dict[int, Item],
        pid: int,
        node: str,
        fingerprint: str,
    ) -> list[Row]:
        """The rows of ``results``, taking each answered item out of ``outstanding``."""
        failure_score, name, epochs = self.failure_score, self.config, self.epochs
        names, last, chosen = self.names, self._last, self.primary is not None
        made = []
        for seq, prediction, score, error, attempts, duration, sent, extra, usage, *_ in results:
            _, example_id, example, epoch = outstanding.pop(seq)
            scores: Mapping[str, float] | None = None
            if sent is not None or names:  # named scores, or a row that lacks them
                if error is not None:
                    pass
                elif type(sent) is tuple and sent[0] is last and not chosen:
                    # the names of an earlier row (the same tuple), the worker's primary: kept
                    # as their JSON text, which the store writes as is
                    scores = NamedScores(*sent)
                else:
                    score, scores, error = self._named(score, sent)
                    names, last = self.names, self._last
            elif names is None and error is None:
                names = self.names = ()
            # positional, in Row's field order: a third faster than keywords, per example
            made.append(
                Row(
                    seq if epochs == 1 else seq // epochs,
                    example_id,
                    example,
                    prediction,
                    failure_score if error else score,
                    RowError(*error) if error else None,
                    attempts,
                    duration,
                    pid,
                    name,
                    fingerprint,
                    node,
                    epoch,
                    scores,
                    extra,
                    None if usage is None else _usage(usage),
                )
            )
        return made

    def _named(
        self, score: float, scores: tuple[tuple[str, ...], str] | Mapping[str, float] | None
    ) -> tuple[float, Mapping[str, float] | None, ErrorInfo | None]:
        """``(score, scores, error)`` of a row whose metric gave named scores (or should have).

        ``scores`` is what the worker sent, ``(names, JSON text)``, or a mapping.
        """
        got: tuple[str, ...] | None = None
        named: Mapping[str, float] | None = None
        if isinstance(scores, tuple):
            got, named = scores[0], NamedScores(*scores)
        elif scores is not None:
            got, named = tuple(scores), scores
        if self.names is None:
            self.names = got or ()
            self._keys = set(self.names)
        expected = self.names
        if set(got) != self._keys if got is not None else expected:
            message = (
                f"the metric returned the scores {list(got or ()) or 'one unnamed score'} for "
                f"this example, but {list(expected) or 'one unnamed score'} for the first one; "
                "a metric must return the same score names for every example"
            )
            return score, None, ErrorInfo("ScoreNamesChanged", message, "")
        if isinstance(scores, tuple):
            self._last = scores[0]  # the next rows of this shard: the same tuple, not compared
        if named is not None and self.primary is not None:
            if self.primary not in named:
                message = (
                    f"primary={self.primary!r} is not among the metric's scores {list(named)}; "
                    "pass one of them"
                )
                return score, None, ErrorInfo("ScoreNamesChanged", message, "")
            score = named[self.primary]
        return score, named, None

    def error_row(
        self, item: Item, error: RowError, *, failure_score: float, pid: int = 0, node: str = ""
    ) -> Row:
        """The row of an example that failed outside its worker (a crash, a timeout)."""
        seq, example_id, example, epoch = item
        return Row(
            index=seq if self.epochs == 1 else seq // self.epochs,
            example_id=example_id,
            example=example,
            prediction=None,
            score=failure_score,
            error=error,
            attempts=1,
            duration=0.0,
            worker_pid=pid,
            config=self.config,
            fingerprint=self.fingerprint,
            node=node or _NODE,
            epoch=epoch,
        )


def _usage(counts: dict[str, dict[str, float]]) -> dict[str, Usage]:
    return {model: Usage.from_dict(c) for model, c in counts.items()}
