"""Parent side of the log relay: a listener thread re-emits the workers' log records.

See :mod:`procval.worker.logs` for the worker side. The listener binds a Unix datagram socket
in a private temporary directory, which every worker of the run is told about in
``WorkerOptions.log``; it lives as long as the run (:func:`start`, :func:`stop`), and stops within a
second of it. Records are handled in the listener's thread, by the parent's own loggers and
handlers, as they arrive, with ``procval_example_id`` and ``procval_pid`` attached. Ray actors,
which may run on other nodes, send theirs over TCP instead (:meth:`LogListener.open_tcp`,
:mod:`procval.run._tcp`), as JSON lines in batches.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import selectors
import shutil
import socket
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from procval.backends import WorkerSpec, _channels
from procval.run import _tcp
from procval.worker._datagrams import unpack

__all__ = ["LogListener", "parent_levels", "start", "stop"]

logger = logging.getLogger("procval")
_BUFFER = 4 * 1024 * 1024  # asked for; the kernel caps it (net.core.rmem_max)
_MAX_DATAGRAM = 256 * 1024
_TICK = 0.1  # seconds the thread waits for a record before it checks whether to stop


class LogListener:
    """Receives pickled records on a Unix datagram socket and hands them to ``logging``.

    Attributes:
        path: the socket's path, for ``WorkerOptions.log``.
        received: how many records arrived.
        dropped: records the workers dropped because the socket buffer was full (as last
            reported by each worker).
    """

    def __init__(self) -> None:
        self._directory = tempfile.mkdtemp(prefix="procval-log-")  # 0700: this user only
        self.path = os.path.join(self._directory, "s")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(self.path)
        with contextlib.suppress(OSError):
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _BUFFER)
        # non-blocking for life: the thread waits in its selector, flush() reads at once. A
        # timeout changed while the thread was in recv() (flush() did: 0, then 0.1 again) left
        # CPython's recv() retrying EAGAIN without waiting: the thread spun until a record came
        self._socket.setblocking(False)
        self._stopping = threading.Event()
        self._flushing = threading.Lock()
        self._reported = 0
        self.owner = os.getpid()
        self._dropped: dict[int, int] = {}
        self.received = 0
        self._thread = threading.Thread(target=self._serve, name="procval-logs", daemon=True)
        self._thread.start()
        self._tcp: _tcp.LineServer | None = None
        _channels.offer(self.path, self.open_tcp)

    def open_tcp(self, host: str) -> str:
        """Take records over TCP on ``host`` too (opened once), for workers on other nodes."""
        with self._flushing:
            if self._tcp is None:
                self._tcp = _tcp.LineServer(
                    host, name="procval-logs-tcp", on_line=lambda _, state: self._emit(state)
                )
            return self._tcp.address

    @property
    def dropped(self) -> int:
        """Records dropped by the workers, in total."""
        return sum(self._dropped.values())

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if selector.select(_TICK):
                    self._drain()

    def _drain(self) -> None:
        with self._flushing:  # one reader at a time, so that records are handled in order
            try:
                data = self._socket.recv(_MAX_DATAGRAM)
            except BlockingIOError:  # flush() took it first
                return
            except OSError:  # closed
                self._stopping.set()
                return
            if data:  # b"": stop() woke us
                self._handle(data)

    def _handle(self, data: bytes) -> None:
        for message in unpack(data):  # one record, or a batch of them
            try:
                state = pickle.loads(message)  # from our own workers, through a 0700 directory
            except Exception:
                continue
            self._emit(state)

    def _emit(self, state: dict[str, Any]) -> None:
        try:
            record = logging.makeLogRecord(state)
        except Exception:
            return
        self.received += 1
        pid, dropped = state.get("procval_pid"), state.get("procval_dropped")
        if isinstance(pid, int) and isinstance(dropped, int):
            self._dropped[pid] = max(self._dropped.get(pid, 0), dropped)
        target = logging.getLogger(record.name)
        if target.isEnabledFor(record.levelno):
            with contextlib.suppress(Exception):  # a failing handler must not end the relay
                target.handle(record)

    def flush(self) -> None:
        """Handle the records already queued, now; say how many the workers dropped."""
        if self._tcp is not None:
            self._tcp.settle()  # records on their way from other nodes
        with self._flushing:
            for _ in range(100_000):  # what arrived before the run ended, bounded
                try:
                    data = self._socket.recv(_MAX_DATAGRAM)
                except OSError:
                    break
                if data:
                    self._handle(data)
        dropped = self.dropped
        if dropped > self._reported:
            logger.warning(
                "%d log records of the workers were dropped: they logged faster than this "
                "process could receive them",
                dropped - self._reported,
            )
            self._reported = dropped

    def stop(self) -> None:
        """Handle what is already queued, then stop the thread and remove the socket."""
        _channels.withdraw(self.path)
        if self._tcp is not None:
            self._tcp.stop()
        self._stopping.set()
        # wake the thread from its recv now, rather than at its timeout (every call paid 0.1 s)
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"", self.path)
        self._thread.join(5)
        for _ in range(100_000):  # what arrived before the run ended, bounded
            try:
                data = self._socket.recv(_MAX_DATAGRAM)
            except OSError:
                break
            self._handle(data)
        self._socket.close()
        shutil.rmtree(self._directory, ignore_errors=True)
        if self.dropped > self._reported:
            logger.warning(
                "%d log records of the workers were dropped: they logged faster than this "
                "process could receive them",
                self.dropped - self._reported,
            )


def parent_levels() -> dict[str, int]:
    """The levels set on this process's loggers (``""``: the root's), for the workers."""
    levels = {"": logging.getLogger().getEffectiveLevel()}
    for name, item in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(item, logging.Logger) and item.level != logging.NOTSET:
            levels[name] = item.level
    return levels


_shared: LogListener | None = None
_shared_lock = threading.Lock()


def start(specs: Sequence[WorkerSpec]) -> LogListener | None:
    """Listen for the log records of the workers of ``specs``; sets their ``WorkerOptions.log``.

    One listener serves every run of this process (started at the first), so that its socket
    path, and so the workers' options, are the same from one call to the next: a warm worker
    (``procval.Workers``) serves a later call and still reaches it. Call :func:`stop` at the
    end of the run. None where Unix sockets do not exist (the records then stay in the workers).
    """
    global _shared
    if not hasattr(socket, "AF_UNIX"):
        return None
    with _shared_lock:
        if _shared is None or _shared.owner != os.getpid():  # (a forked child starts its own)
            _shared = LogListener()
            atexit.register(_shared.stop)
        listener = _shared
    target = (listener.path, tuple(sorted(parent_levels().items())))
    for spec in specs:
        spec.options.log = target
    return listener


def stop(listener: LogListener | None, specs: Sequence[WorkerSpec]) -> None:
    """The end of a run: handle the records already queued; the specs no longer name the socket.

    The listener goes on for the next run (it stops when the process exits).
    """
    for spec in specs:
        spec.options.log = None
    if listener is not None:
        listener.flush()
