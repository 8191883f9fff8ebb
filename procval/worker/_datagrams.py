"""Datagrams to the parent's log socket that never block the sender and are not lost in bursts.

A Unix datagram socket queues only ``net.unix.max_dgram_qlen`` datagrams (10 by default) for
its reader: a worker whose threads log a burst faster than the parent's listener thread reads
them would see ``EAGAIN`` at the eleventh. A record is therefore sent at once while the socket
takes it, and queued when it does not; a thread, started at the first refusal, sends the queue
as the reader frees room (the socket is connected, so the kernel reports when it is writable),
in order: while anything is queued, new records queue behind it, and the thread sends what
waits in batches (one datagram of up to :data:`BATCH_BYTES`, read by :func:`unpack`), so that
it catches up with a burst. The queue is bounded (:data:`QUEUE` records, :data:`QUEUE_BYTES`
bytes); past that a record is dropped and counted.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import weakref
from collections import deque
from collections.abc import Iterator

__all__ = ["BATCH_BYTES", "QUEUE", "QUEUE_BYTES", "DatagramSender", "unpack"]

QUEUE = 10_000  # datagrams waiting for room; more are dropped
QUEUE_BYTES = 16 * 1024 * 1024
BATCH_BYTES = 64 * 1024  # a batch datagram, at most (one larger record goes alone)
_WAIT = 1.0  # seconds the thread waits for room before it looks again
_BATCH = b"B"  # a batch's first byte (a pickle's is b"\x80")
_LENGTH = struct.Struct(">I")


def unpack(data: bytes) -> Iterator[bytes]:
    """The messages of one datagram: itself, or those of a batch."""
    if data[:1] != _BATCH:
        yield data
        return
    at = 1
    while at + _LENGTH.size <= len(data):
        (size,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        yield data[at : at + size]
        at += size


def _batch(queue: deque[bytes]) -> tuple[bytes, int]:
    """The first messages of ``queue`` as one datagram, and how many it holds."""
    first = queue[0]
    if len(queue) == 1 or len(first) + 2 * _LENGTH.size + 1 > BATCH_BYTES:
        return first, 1
    parts, size = [_BATCH], 1
    for data in queue:
        if size + _LENGTH.size + len(data) > BATCH_BYTES:
            break
        parts += (_LENGTH.pack(len(data)), data)
        size += _LENGTH.size + len(data)
    return b"".join(parts), (len(parts) - 1) // 2


class DatagramSender:
    """Sends datagrams to the socket at ``path``: at once, or queued in order when it is full.

    Attributes:
        lost: datagrams dropped (the queue was full, or the reader is gone).
    """

    def __init__(self, path: str) -> None:
        self.lost = 0
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        try:
            self._socket.connect(path)
        except OSError:
            self._socket.close()  # the reader is gone already: everything is lost
            self._closed = True
        else:
            self._closed = False
        self._queue: deque[bytes] = deque()
        self._bytes = 0
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        # a process the program forks (a fork-started multiprocessing pool) logs through this
        # sender too: its lock may have been held by the thread, which the child does not have
        after_fork = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (method := after_fork()) and method())

    def _after_fork_in_child(self) -> None:
        self._ready = threading.Condition()
        self._thread = None  # started again at the child's first refusal
        self._queue = deque()  # the parent's, which the parent sends
        self._bytes = 0

    def put(self, data: bytes) -> bool:
        """Send ``data`` now, or queue it behind those waiting; False if it was dropped."""
        with self._ready:
            if self._closed:
                self.lost += 1
                return False
            if not self._queue:
                try:
                    self._socket.send(data)
                    return True
                except BlockingIOError:
                    pass
                except OSError:  # the reader is gone (ECONNREFUSED), or it is too large
                    self.lost += 1
                    return False
            if len(self._queue) >= QUEUE or self._bytes + len(data) > QUEUE_BYTES:
                self.lost += 1
                return False
            self._queue.append(data)
            self._bytes += len(data)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="procval-log-sender", daemon=True
                )
                self._thread.start()
            self._ready.notify_all()
        return True

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                self._send_queued()
            try:  # room for the next one, outside the lock: put() queues meanwhile
                select.select([], [self._socket], [], _WAIT)
            except (OSError, ValueError):  # closed meanwhile
                return

    def _send_queued(self) -> None:
        """Send what the socket takes now, in order (holding the lock)."""
        while self._queue:
            data, count = _batch(self._queue)
            try:
                self._socket.send(data)
            except BlockingIOError:
                return
            except OSError:  # the reader is gone: what waits is lost
                self.lost += len(self._queue)
                self._queue.clear()
                self._bytes = 0
                self._ready.notify_all()
                return
            for _ in range(count):
                self._bytes -= len(self._queue.popleft())
        self._ready.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queue to be sent; whether it was."""
        with self._ready:
            return self._ready.wait_for(lambda: not self._queue, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (bounded by ``timeout``), then close the socket."""
        self.flush(timeout)
        with self._ready:
            self.lost += len(self._queue)
            self._queue.clear()
            self._closed = True
            self._ready.notify_all()
            self._socket.close()
