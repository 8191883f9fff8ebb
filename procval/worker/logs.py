"""Worker side of the log relay: records logged in a worker go to the parent as they happen.

::

    worker process                                   parent (procval.run.logs.LogListener)
    ──────────────                                   ─────────────────────────────────────
    logging.getLogger(...).info(...)                 a thread reads the datagrams and
      └▶ root handler (install()): the record,        re-emits each record with
         its message formatted, traceback as text,    logging.getLogger(name).handle(record)
         + procval_example_id, procval_pid     ──▶   on the parent's handlers
         pickled, one Unix datagram, never blocking

The worker's loggers take the parent's levels (``WorkerOptions.log``), so what the parent would
not show is not even formatted. A full socket never stalls the worker: the record waits in a
bounded queue that a thread sends in order as the parent reads
(:mod:`procval.worker._datagrams`); past the bound it is dropped and counted, and the next
record that gets through carries the count (``procval_dropped``), which the parent reports at
the end of the run.

On Ray the target is a ``tcp://`` address (the driver's node, :mod:`procval.worker._tcp`): the
record goes to a bounded queue that a thread sends in batches, so logging never waits on the
network either; a full queue drops the record and counts it the same way. The thread is a
daemon, so the end of each shard waits for the queue to be sent (:func:`sent`, half a second at
most) before its results go back: a record logged just before an actor exits is not lost.
"""

from __future__ import annotations

import logging
import os
import pickle
from typing import Any

from procval.worker import _tcp, record
from procval.worker._datagrams import DatagramSender

__all__ = ["RelayHandler", "install", "sent"]

_MAX_MESSAGE = 32_000  # characters of a message or traceback kept; a datagram stays small
_LOCAL = frozenset({"args", "exc_info", "msg", "message"})


class RelayHandler(logging.Handler):
    """Sends each record, with its example id and pid, to the parent (datagrams; TCP on Ray)."""

    def __init__(self, path: str) -> None:
        super().__init__(logging.NOTSET)
        self.path = path
        self.pid = os.getpid()
        self._tcp = _tcp.is_tcp(path)  # JSON over TCP (Ray), else pickles in datagrams
        self._sender: _tcp.Sender | DatagramSender = (
            _tcp.Sender(path) if self._tcp else DatagramSender(path)
        )

    def emit(self, record_: logging.LogRecord) -> None:
        """Send the record, never blocking (queued while the socket is full, dropped past that)."""
        try:
            state = self._prepare(record_)
            message: Any = state if self._tcp else pickle.dumps(state, pickle.HIGHEST_PROTOCOL)
        except Exception:
            self.handleError(record_)
            return
        self._sender.put(message)  # a record it drops, it counts (``dropped``)

    @property
    def dropped(self) -> int:
        """Records dropped so far: the sender's queue was full, or the parent was gone."""
        return self._sender.lost

    def _prepare(self, record_: logging.LogRecord) -> dict[str, Any]:
        recording = record.current()
        message = record_.getMessage()
        state = {k: v for k, v in vars(record_).items() if k not in _LOCAL}
        if record_.exc_info and not record_.exc_text:
            state["exc_text"] = logging.Formatter().formatException(record_.exc_info)
        if state.get("exc_text"):
            state["exc_text"] = state["exc_text"][-_MAX_MESSAGE:]
        state["msg"] = message[:_MAX_MESSAGE]
        state["args"] = None
        state["procval_example_id"] = recording.example_id if recording is not None else None
        state["procval_pid"] = self.pid
        state["procval_dropped"] = self.dropped
        for key, value in state.items():  # extra=... values the parent may not unpickle
            if not isinstance(value, str | int | float | bool | type(None)):
                state[key] = repr(value)
        return state

    def flush(self) -> None:
        """Wait (a second at most) for the queued records to be sent."""
        self.drain(1.0)

    def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the queued records to be sent; whether they were.

        A datagram is sent as it is logged, unless the parent's socket is full: then it waits
        in the sender's queue (:mod:`procval.worker._datagrams`).
        """
        return self._sender.flush(timeout)

    def close(self) -> None:
        """Send what is queued (within two seconds), then close the socket."""
        self._sender.close()
        super().close()


_installed: RelayHandler | None = None
SENT_WITHIN = 0.5  # seconds the end of a shard waits for its log records to leave (over TCP)


def sent(timeout: float = SENT_WITHIN) -> bool:
    """Wait (``timeout`` s at most) for the log records queued so far to be sent to the parent.

    Called at the end of each shard, before its results are returned: the sender's thread is a
    daemon, so a record logged in the last moments before an actor exits would otherwise be
    lost, and one that is sent arrives before the results that follow it.
    """
    return _installed.drain(timeout) if _installed is not None else True


def install(target: tuple[str, tuple[tuple[str, int], ...]] | None) -> RelayHandler | None:
    """Send this worker's log records to the parent's socket, at the parent's levels.

    Args:
        target: ``WorkerOptions.log``: the socket path and the parent's logger levels as
            ``(name, level)`` pairs (``""`` for the root logger); None leaves logging as it is.

    Returns:
        The handler installed on the root logger, or None.
    """
    if target is None:
        return None
    path, levels = target
    global _installed
    handler = _installed = RelayHandler(path)
    root = logging.getLogger()
    root.addHandler(handler)
    for name, level in levels:
        logging.getLogger(name or None).setLevel(level)
    return handler
