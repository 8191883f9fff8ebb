"""Rows seen as they arrive: the hook ``procval.dspy.Evaluate`` logs failed examples with.

Within :func:`on_rows`, ``evaluate`` wraps its sink so that a callback sees each batch of rows
once the sink (the store) has kept it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from procval.results import Row
from procval.store.sink import Sink, SinkWrapper

__all__ = ["RowsCallback", "observed", "on_rows"]

RowsCallback = Callable[[str, list[Row]], None]
_ON_ROWS: ContextVar[RowsCallback | None] = ContextVar("procval_on_rows", default=None)


def observed(sink: Sink) -> Sink:
    """``sink``, wrapped so that the callback of the :func:`on_rows` block sees its rows."""
    callback = _ON_ROWS.get()
    return sink if callback is None else _ObservedSink(sink, callback)


@contextlib.contextmanager
def on_rows(callback: RowsCallback) -> Iterator[None]:
    """Within the block, ``evaluate`` calls ``callback(config, rows)`` as rows arrive.

    Internal (``procval.dspy.Evaluate`` logs failed examples with it as they happen): the
    callback runs in the caller's thread, after the rows reached the sink (the store), once per
    batch of rows of one config; rows of earlier sessions of a resumed store are not passed.
    """
    token = _ON_ROWS.set(callback)
    try:
        yield
    finally:
        _ON_ROWS.reset(token)


class _ObservedSink(SinkWrapper):
    """A sink that passes the rows it was given to a callback, once they are kept."""

    def __init__(self, sink: Sink, callback: RowsCallback) -> None:
        super().__init__(sink)
        self._callback = callback

    def add(self, config: str, rows: list[Row]) -> None:
        """Add the rows to the wrapped sink (durable first), then pass them to the callback."""
        self._sink.add(config, rows)
        self._callback(config, rows)
