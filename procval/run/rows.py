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
from collections.abc import Sequence

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

    __slots__ = ("_keys", "config", "epochs", "failure_score", "fingerprint", "names", "primary")

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
        names, keys, chosen = self.names, self._keys, self.primary is not None
        made = []
        for seq, prediction, score, error, attempts, duration, scores, extra, usage, *_ in results:
            _, example_id, example, epoch = outstanding.pop(seq)
            if scores is not None or names:  # named scores, or a row that lacks them
                if error is not None:
                    scores = None
                elif chosen or scores is None or names is None or scores.keys() != keys:
                    if names is None:
                        names = self.names = tuple(scores or ())
                        keys = self._keys = set(names)
                    score, scores, error = self._named(score, scores)
                # else: the first row's names, and the worker's primary (no primary= given)
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
        self, score: float, scores: dict[str, float] | None
    ) -> tuple[float, dict[str, float] | None, ErrorInfo | None]:
        """``(score, scores, error)`` of a row whose metric gave named scores (or should have)."""
        expected = self.names
        if expected is not None and (
            scores.keys() != self._keys if scores is not None else expected
        ):
            got = () if scores is None else tuple(scores)
            message = (
                f"the metric returned the scores {list(got) or 'one unnamed score'} for this "
                f"example, but {list(expected) or 'one unnamed score'} for the first one; a "
                "metric must return the same score names for every example"
            )
            return score, None, ErrorInfo("ScoreNamesChanged", message, "")
        if scores is not None and self.primary is not None:
            if self.primary not in scores:
                message = (
                    f"primary={self.primary!r} is not among the metric's scores {list(scores)}; "
                    "pass one of them"
                )
                return score, None, ErrorInfo("ScoreNamesChanged", message, "")
            score = scores[self.primary]
        return score, scores, None

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
