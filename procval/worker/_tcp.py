"""Worker side of the parent's TCP channels, for workers on other machines (Ray actors).

::

    worker (this module)                               parent (procval.run._tcp.LineServer)
    ────────────────────                               ────────────────────────────────────
    connect("tcp://host:port/token") ─────────────────▶ accept; keepalive on
    token, newline ───────────────────────────────────▶ compared in constant time
    ◀── {"auth": "ok"}  (or {"auth": "refused"}, closed)
    JSON lines, as over the parent's Unix sockets ────▶ the limiter's or log listener's handlers

A Ray actor cannot reach the driver's Unix sockets (:mod:`procval.run.limiter`,
:mod:`procval.run.logs`), so on Ray they are also served over TCP on the driver's node address,
and the worker is given a ``tcp://`` address instead of a path. The token is the run's secret:
a connection that does not send it first is closed. Keepalive is on at both ends, so a
connection whose other end vanished (a lost node) ends within :data:`DEAD_AFTER` seconds.

:class:`Sender` sends log records from a thread of its own, in batches, from a bounded queue:
the thread that logs never waits on the network, and a record that finds the queue full is
dropped and counted. A process the program forks gets a queue, a lock, a thread and a
connection of its own at its first record.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import weakref
from collections import deque
from typing import Any

__all__ = ["DEAD_AFTER", "Sender", "address", "connect", "is_tcp", "tune", "parse"]

SCHEME = "tcp://"
DEAD_AFTER = 20  # seconds after which a silent peer's connection ends (keepalive, user timeout)
_IDLE, _INTERVAL, _COUNT = 5, 2, 3  # keepalive: first probe after 5 s idle, then 3 every 2 s
_HANDSHAKE = 10.0  # seconds to connect and be answered
_QUEUE = 10_000  # log records waiting to be sent; more are dropped
_BATCH = 500  # records per send


def is_tcp(target: str) -> bool:
    """Whether ``target`` (``WorkerOptions.limiter``, or the log path) is a TCP address."""
    return target.startswith(SCHEME)


def address(host: str, port: int, token: str) -> str:
    """``tcp://host:port/token`` (an IPv6 host in brackets)."""
    shown = f"[{host}]" if ":" in host else host
    return f"{SCHEME}{shown}:{port}/{token}"


def parse(target: str) -> tuple[str, int, str]:
    """``(host, port, token)`` of a :func:`address`.

    Raises:
        ValueError: ``target`` is not such an address.
    """
    rest = target[len(SCHEME) :] if is_tcp(target) else ""
    where, _, token = rest.partition("/")
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit() or not token:
        raise ValueError(f"not a procval TCP address (tcp://host:port/token): {where or target!r}")
    return host.strip("[]"), int(port), token


def tune(sock: socket.socket) -> None:
    """Send each message at once (no Nagle delay); end a connection whose peer went silent.

    Keepalive and the user timeout end it within :data:`DEAD_AFTER` seconds.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", _IDLE),
            ("TCP_KEEPALIVE", _IDLE),  # macOS's name for the idle time
            ("TCP_KEEPINTVL", _INTERVAL),
            ("TCP_KEEPCNT", _COUNT),
            ("TCP_USER_TIMEOUT", DEAD_AFTER * 1000),  # unacknowledged data (Linux, ms)
        ):
            option = getattr(socket, name, None)
            if option is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)


def connect(target: str, *, timeout: float | None, what: str) -> socket.socket:
    """A connection to the parent's TCP channel ``target``, its token accepted.

    Args:
        target: the channel's :func:`address`.
        timeout: the socket's timeout once connected (None: blocking).
        what: the channel, for messages ("rate limiter").

    Raises:
        RuntimeError: the parent cannot be reached or refused the token.
    """
    host, port, token = parse(target)
    try:
        sock = socket.create_connection((host, port), timeout=_HANDSHAKE)
    except OSError as exc:
        raise RuntimeError(
            f"cannot reach the parent's {what} at {host}:{port} ({exc}); the run is over, the "
            "parent died, or this node cannot reach the driver's address (set "
            "PROCVAL_DRIVER_HOST on the driver to one it can)"
        ) from None
    try:
        tune(sock)
        sock.sendall(token.encode() + b"\n")
        reply = b""
        while b"\n" not in reply and len(reply) < 4096:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
        answer = json.loads(reply.split(b"\n", 1)[0] or b"{}")
    except (OSError, ValueError) as exc:
        sock.close()
        raise RuntimeError(f"the parent's {what} at {host}:{port} did not answer ({exc})") from None
    if not isinstance(answer, dict) or answer.get("auth") != "ok":
        sock.close()
        raise RuntimeError(
            f"the parent's {what} at {host}:{port} refused this worker's token (a worker of "
            "another run, or an address given by hand)"
        )
    sock.settimeout(timeout)
    return sock


class Sender:
    """Sends JSON-able dicts to a TCP channel from a daemon thread, in batches, never blocking.

    Args:
        target: the channel's :func:`address`.

    Attributes:
        lost: records dropped: refused by a full queue, or dropped after they were queued
            (the channel could not be reached, or the connection broke while they were sent).
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.lost = 0
        self._queue: deque[dict[str, Any]] = deque()
        self._pending = 0  # queued or being sent
        self._closing = False
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = self._start()
        # a process the program forks logs through this sender too: it gets a lock of its own,
        # none of the parent's queue (the parent sends that) and a thread (and connection)
        after_fork = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (method := after_fork()) and method())

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._serve, name="procval-log-sender", daemon=True)
        thread.start()
        return thread

    def _after_fork_in_child(self) -> None:
        self._ready = threading.Condition()
        self._queue = deque()
        self._pending = 0
        self._thread = None  # started at the child's first put()

    def put(self, message: dict[str, Any]) -> bool:
        """Queue ``message``; False (dropped) when :data:`_QUEUE` records wait already."""
        with self._ready:
            if self._pending >= _QUEUE or self._closing:
                self.lost += 1
                return False
            if self._thread is None:  # in a forked child
                self._thread = self._start()
            self._queue.append(message)
            self._pending += 1
            if len(self._queue) == 1:  # the thread waits only for an empty queue
                self._ready.notify_all()
        return True

    def _serve(self) -> None:
        sock: socket.socket | None = None
        while True:
            with self._ready:
                while not self._queue and not self._closing:
                    self._ready.wait()
                batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
                closing = self._closing and not self._queue
            if batch:
                sock = self._send(sock, batch)
            with self._ready:
                self._pending -= len(batch)
                self._ready.notify_all()
            if closing:
                if sock is not None:
                    sock.close()
                return

    def _send(
        self, sock: socket.socket | None, batch: list[dict[str, Any]]
    ) -> socket.socket | None:
        data = b"".join(json.dumps(m).encode() + b"\n" for m in batch)
        for _ in range(2):  # a broken connection is opened again once
            try:
                if sock is None:
                    sock = connect(self.target, timeout=_HANDSHAKE, what="log listener")
                sock.sendall(data)
                return sock
            except (OSError, RuntimeError):
                if sock is not None:
                    sock.close()
                sock = None
        self.lost += len(batch)
        return None

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait up to ``timeout`` seconds for the queued records to be sent; whether they were."""
        with self._ready:
            return self._ready.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (bounded by ``timeout``), then end the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
