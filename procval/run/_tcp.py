"""Parent side of the TCP channels: the limiter and the log listener, reachable from other nodes.

::

    worker (procval.worker._tcp)                 parent: a LineServer thread (this module)
    ────────────────────────────                 ─────────────────────────────────────────
    connect ────────────────────────────────────▶ accept; keepalive on (a lost node's
                                                  connection ends within DEAD_AFTER s)
    token, newline ─────────────────────────────▶ hmac.compare_digest with the run's token;
    ◀── {"auth": "ok"}                            wrong, or none within 10 s: refused, closed
    JSON lines ─────────────────────────────────▶ on_line(sock, message), in this thread
    EOF, reset, keepalive timeout ──────────────▶ on_close(sock)

A :class:`LineServer` is opened only when a backend whose workers run elsewhere (Ray) asks for
the channel (:mod:`procval.backends._channels`), bound to the address that backend gives (the
driver's node address as Ray reports it), on a free port, with a random token of its own. The
token travels to the workers inside their options, with the snapshot; a peer that does not know
it gets nothing but a refusal.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procval.worker._tcp import address, tune

__all__ = ["Acceptor", "LineServer"]

logger = logging.getLogger("procval")

_HANDSHAKE = 10.0  # seconds a new connection has to send its token
_MAX_LINE = 4 * 1024 * 1024  # bytes a line may take (a peer sending more is cut off)
_TICK = 0.5
_ACCEPT_PAUSE = 1.0  # seconds a listener rests after accept() failed (out of file descriptors)

OnLine = Callable[[socket.socket, dict[str, Any]], None]
OnClose = Callable[[socket.socket], None]


@dataclass(eq=False)
class _Peer:
    sock: socket.socket
    since: float
    trusted: bool = False
    buffer: bytes = b""


class Acceptor:
    """Takes the connections queued on a non-blocking listener that a selector watches.

    A connection that ``accept()`` cannot take (the process is out of file descriptors:
    ``EMFILE``; the system: ``ENFILE``; out of memory) stays queued, so the listener stays
    readable: retried at once, the serving thread would spin until a descriptor is freed.
    Instead the listener leaves the selector for a second (as asyncio does), and the queued
    connections are taken when it is back. The serving thread passes its select timeout
    through :meth:`timeout`, which puts the listener back when its pause is over.

    Args:
        listener: a listening socket, non-blocking.
        selector: where the serving thread waits; the listener is registered in it here.
        what: the service, for the warning (said once).
    """

    def __init__(
        self, listener: socket.socket, selector: selectors.BaseSelector, what: str
    ) -> None:
        self.listener, self._selector, self._what = listener, selector, what
        self._resume: float | None = None  # when a paused listener is watched again
        self._warned = False
        selector.register(listener, selectors.EVENT_READ)

    def accept(self) -> list[socket.socket]:
        """The connections queued now (at most 256); none while paused."""
        taken: list[socket.socket] = []
        while self._resume is None and len(taken) < 256:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):  # none left
                break
            except ConnectionAbortedError:  # gone before it was taken: the next one
                continue
            except OSError as exc:
                self._pause(exc)
                break
            taken.append(sock)
        return taken

    def _pause(self, exc: OSError) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.listener)
        self._resume = time.monotonic() + _ACCEPT_PAUSE
        if not self._warned:
            self._warned = True
            logger.warning(
                "procval's %s cannot take a worker's connection (%s); it tries again every "
                "%g s: raise this process's limit on open files (ulimit -n)",
                self._what,
                exc,
                _ACCEPT_PAUSE,
            )

    def timeout(self, wanted: float) -> float:
        """The select timeout to use instead of ``wanted`` (shorter while paused)."""
        if self._resume is None:
            return wanted
        left = self._resume - time.monotonic()
        if left > 0:
            return min(wanted, left)
        self._resume = None
        with contextlib.suppress(KeyError, ValueError, OSError):  # (closed meanwhile: stop())
            self._selector.register(self.listener, selectors.EVENT_READ)
        return 0.0  # take what queued meanwhile now


class LineServer:
    """A TCP listener whose authenticated peers send JSON lines, handled in its own thread.

    Args:
        host: the address to bind (the driver's node address).
        name: the thread's name.
        on_line: called with the peer's socket and each message (a dict) it sends.
        on_close: called with the peer's socket when an authenticated connection ends.

    Attributes:
        address: ``tcp://host:port/token``, for the workers' options.
        refused: connections refused (a wrong or missing token).
    """

    def __init__(
        self, host: str, *, name: str, on_line: OnLine, on_close: OnClose | None = None
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family, backlog=1024)
        self._listener.setblocking(False)
        self._token = secrets.token_urlsafe(24)
        self.address = address(host, self._listener.getsockname()[1], self._token)
        self.refused = 0
        self._on_line, self._on_close = on_line, on_close
        self._peers: dict[socket.socket, _Peer] = {}
        self._last = time.monotonic()  # when the last line arrived
        self._selector = selectors.DefaultSelector()
        self._acceptor = Acceptor(self._listener, self._selector, f"TCP channel ({name})")
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception:  # a bug here must not end the channel for every worker
                logger.exception("procval's TCP channel failed; it goes on")
                time.sleep(0.05)

    def _step(self) -> None:
        for key, _ in self._selector.select(self._acceptor.timeout(_TICK)):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            else:
                self._read(self._peers[key.fileobj])  # type: ignore[index]
        now = time.monotonic()
        for peer in [p for p in self._peers.values() if not p.trusted]:
            if now - peer.since > _HANDSHAKE:
                self._refuse(peer)

    def _accept(self) -> None:
        for sock in self._acceptor.accept():
            tune(sock)
            sock.setblocking(False)
            self._peers[sock] = _Peer(sock, time.monotonic())
            self._selector.register(sock, selectors.EVENT_READ)

    def _read(self, peer: _Peer) -> None:
        try:
            data = peer.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:  # reset, or keepalive gave up on a lost node
            data = b""
        if not data:
            self._drop(peer)
            return
        peer.buffer += data
        *lines, peer.buffer = peer.buffer.split(b"\n")
        if len(peer.buffer) > (_MAX_LINE if peer.trusted else 4096):
            if peer.trusted:
                self._drop(peer)
            else:
                self._refuse(peer)
            return
        self._last = time.monotonic()
        for line in lines:
            if not peer.trusted:
                if not hmac.compare_digest(line.strip(), self._token.encode()):
                    self._refuse(peer)
                    return
                peer.trusted = True
                with contextlib.suppress(OSError):
                    peer.sock.sendall(b'{"auth": "ok"}\n')
                continue
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict):
                self._on_line(peer.sock, message)

    def _refuse(self, peer: _Peer) -> None:
        self.refused += 1
        with contextlib.suppress(OSError):
            peer.sock.sendall(b'{"auth": "refused"}\n')
        self._drop(peer)

    def _drop(self, peer: _Peer) -> None:
        self._peers.pop(peer.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(peer.sock)
        if peer.trusted and self._on_close is not None:
            self._on_close(peer.sock)
        peer.sock.close()

    def peers(self) -> int:
        """Authenticated connections open now."""
        return sum(1 for p in list(self._peers.values()) if p.trusted)

    def settle(self, quiet: float = 0.05, bound: float = 1.0) -> None:
        """Return once no line arrived for ``quiet`` seconds (at most ``bound`` seconds)."""
        deadline = time.monotonic() + bound
        while self.peers() and time.monotonic() < deadline:
            idle = time.monotonic() - self._last
            if idle >= quiet:
                return
            time.sleep(quiet - idle)

    def stop(self) -> None:
        """Stop the thread (within a second), close every connection and the listener."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5)
        for peer in list(self._peers.values()):
            self._drop(peer)
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
