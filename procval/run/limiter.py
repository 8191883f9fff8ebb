"""Parent side of the rate limits: one thread hands out permits for every key of the run.

::

    worker thread (procval.worker.limited)            parent: Limiter thread (this module)
    ──────────────────────────────────────            ────────────────────────────────────
    connects once per thread (Unix stream socket) ──▶ accept; {"op": "hello", config}
    {"op": "acquire", key, tokens, stage} ──────────▶ queued per key (by _Waiter.rank);
                                                      granted when the key's KeyState
    ◀── {"id", "waited"}  (blocks until granted) ──── admits it (pacing, token bucket,
                                                      in-flight window)
    ... the call ...
    {"op": "release", id, tokens, status, retry_after} ▶ in flight - 1; usage corrects the
                                                      bucket; a 429 pauses the key and cuts
                                                      its window (procval.run.pacing)
    the worker dies (kill -9) ── EOF ───────────────▶ every permit that connection held is
                                                      released, its queued requests dropped

The permits live in the parent, so no crash of a worker can leak one: the kernel closes a dead
process's sockets and the parent sees the end of the stream. Every config of the run that names
a key shares that key's state; the counts (calls, 429s, waits) are kept per config and put on
each :class:`~procval.results.EvaluationResult` (``.limits``) at the end of the run.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import selectors
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from procval.backends import _channels
from procval.config import Config
from procval.ratelimit import RateLimit
from procval.run import _tcp
from procval.run.pacing import KeyState
from procval.wire import WorkerSpec

__all__ = ["LimitCounts", "Limiter", "check_limits", "start", "stop"]

logger = logging.getLogger("procval")

_WAIT = 0.01  # a call that waited this long for its permit counts as a wait
_IDLE = 0.5  # seconds the thread sleeps with nothing to grant (it is woken on any message)


@dataclass
class LimitCounts:
    """What one config's calls met under one key.

    Attributes:
        calls: permits granted (each attempt of a call is one).
        rate_limited: calls answered 429 (or another rate-limit error).
        waits: calls that waited for their permit (the limit held them back).
        wait_seconds: the time those calls waited, in total.
        tokens: the tokens the calls reported using (their estimate when they did not say).
    """

    calls: int = 0
    rate_limited: int = 0
    waits: int = 0
    wait_seconds: float = 0.0
    tokens: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """The counts as a JSON-friendly dict."""
        return {
            "calls": self.calls,
            "rate_limited": self.rate_limited,
            "waits": self.waits,
            "wait_seconds": round(self.wait_seconds, 3),
            "tokens": round(self.tokens),
        }


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    config: str = ""
    buffer: bytes = b""
    held: set[int] = field(default_factory=set)


@dataclass(order=True)
class _Waiter:
    """A call waiting for its permit; a key's waiters are granted lowest :attr:`rank` first.

    First the retries of calls answered 429 (they already waited), in the order they came; then
    the others in the order they came, an example's later calls (``stage`` > 0: its example was
    granted a permit before) each counted :data:`STAGE_DELAY` seconds later than it came. A
    later call thus yields to the first calls that came up to that much after it: near the end
    of a run, the last examples' first calls pass the queued later calls of the others, so their
    own next calls are queued before the provider's slots run dry (the run's end was held back by
    a whole call otherwise). The delay does not grow with the stage: no call waits more than
    :data:`STAGE_DELAY` longer than in order of arrival, however many calls its example makes
    (an agent's twentieth call is not pushed back by ten seconds), so none is starved, and a
    call made outside an example (``stage`` 0) keeps its place.
    """

    rank: tuple[int, float, int]
    conn: _Conn = field(compare=False)
    key: str = field(compare=False)
    tokens: float = field(compare=False)
    since: float = field(compare=False)


STAGE_DELAY = 0.5  # seconds an example's later call counts later than it came


def check_limits(configs: Sequence[Config]) -> dict[str, RateLimit]:
    """Every key named by ``configs``, with its limits.

    Raises:
        ValueError: two configs give the same key different limits (before any worker starts).
    """
    keys: dict[str, tuple[str, RateLimit]] = {}
    for config in configs:
        for limit in config.rate_limits:
            seen = keys.get(limit.key)
            if seen is None:
                keys[limit.key] = (config.name, limit)
            elif seen[1].limits() != limit.limits():
                raise ValueError(
                    f"configs {seen[0]!r} and {config.name!r} give rate limit key "
                    f"{limit.key!r} different limits ({seen[1].describe()} and "
                    f"{limit.describe()}); a key is one provider budget, shared by every "
                    "config that names it: give it the same limits (or another key)"
                )
    return {key: limit for key, (_, limit) in keys.items()}


class Limiter:
    """The permits of every key of one run, served to the workers over a Unix socket.

    Args:
        limits: the run's keys and their limits (:func:`check_limits`).

    Attributes:
        path: the socket's path, for ``WorkerOptions.limiter``.
    """

    def __init__(self, limits: Mapping[str, RateLimit]) -> None:
        self._limits = dict(limits)
        self._directory = tempfile.mkdtemp(prefix="procval-limits-")  # 0700: this user only
        self.path = os.path.join(self._directory, "s")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1024)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._acceptor = _tcp.Acceptor(self._listener, self._selector, "rate limiter")
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._keys: dict[str, KeyState] = {}
        self._queues: dict[str, list[_Waiter]] = {}  # a heap per key, by _Waiter.rank
        self._held: dict[int, tuple[_Conn, str, float]] = {}
        self._next_id = 1
        self._arrivals = 0  # acquire messages so far: the last tie-break of a waiter's rank
        self._counts: dict[tuple[str, str], LimitCounts] = {}
        self._lock = threading.Lock()  # around the counts, read by the caller's thread
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="procval-limits", daemon=True)
        self._thread.start()
        self._tcp: _tcp.LineServer | None = None  # for workers on other nodes (open_tcp)
        self._remote: dict[socket.socket, _Conn] = {}
        _channels.offer(self.path, self.open_tcp)

    # ---------------------------------------------------------------- results

    def counts(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{config: {key: counts}}`` so far (:meth:`LimitCounts.as_dict`)."""
        with self._lock:
            out: dict[str, dict[str, dict[str, float]]] = {}
            for (config, key), counts in sorted(self._counts.items()):
                out.setdefault(config, {})[key] = counts.as_dict()
            return out

    def in_flight(self) -> dict[str, int]:
        """Permits held now, by key (0 once every call has ended or its worker died)."""
        with self._lock:
            return {key: state.in_flight for key, state in self._keys.items()}

    def _count(self, config: str, key: str) -> LimitCounts:
        found = self._counts.get((config, key))
        if found is None:
            found = self._counts[config, key] = LimitCounts()
        return found

    # ---------------------------------------------------------------- serving

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                self._step()
            except Exception:  # a bug here must not leave every worker waiting for a permit
                logger.exception("procval's rate limiter failed; it goes on")
                time.sleep(0.05)

    def _step(self) -> None:
        with self._lock:
            delay = self._grant(time.monotonic())
        timeout = _IDLE if delay is None else min(_IDLE, max(0.0, delay))
        for key, _ in self._selector.select(self._acceptor.timeout(timeout)):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            else:
                self._read(key.data)

    def _accept(self) -> None:
        for sock in self._acceptor.accept():
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, _Conn(sock))

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buffer += data
        *lines, conn.buffer = conn.buffer.split(b"\n")
        with self._lock:
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                self._handle(conn, message, time.monotonic())

    def _handle(self, conn: _Conn, message: dict[str, Any], now: float) -> None:
        op = message.get("op")
        if op == "hello":
            conn.config = str(message.get("config", ""))
        elif op == "acquire":
            key = str(message.get("key", ""))
            tokens = float(message.get("tokens") or 0.0)
            self._state(key, now)
            stage = message.get("stage")
            stage = stage if isinstance(stage, int) and stage > 0 else 0
            self._arrivals += 1
            if message.get("retry"):  # a call answered 429 goes first: it already waited
                rank = (0, now, self._arrivals)
            else:
                rank = (1, now + (STAGE_DELAY if stage else 0.0), self._arrivals)
            heapq.heappush(self._queues.setdefault(key, []), _Waiter(rank, conn, key, tokens, now))
        elif op == "release":
            self._release(message, now)

    def _state(self, key: str, now: float) -> KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = KeyState(self._limits.get(key), now)
        return state

    def _release(self, message: dict[str, Any], now: float) -> None:
        held = self._held.pop(int(message.get("id", 0)), None)
        if held is None:
            return
        conn, key, reserved = held
        conn.held.discard(int(message["id"]))
        state = self._keys[key]
        in_flight = state.in_flight
        actual = message.get("tokens")
        actual = float(actual) if isinstance(actual, int | float) else None
        state.release(reserved, actual, now)
        counts = self._count(conn.config, key)
        counts.tokens += actual if actual is not None else reserved
        status = message.get("status")
        if status == "ok":
            state.answered()
        elif status == "limited":
            counts.rate_limited += 1
            retry = message.get("retry_after")
            state.rate_limited(retry if isinstance(retry, int | float) else None, now, in_flight)

    def _grant(self, now: float) -> float | None:
        """Grant what can start now; the seconds until the next grant could (None: unknown)."""
        soonest: float | None = None
        for key, queue in self._queues.items():
            state = self._keys[key]
            while queue:
                waiter = queue[0]
                at = state.ready_at(waiter.tokens, now)
                if at is None:
                    break
                if at > now:
                    soonest = at - now if soonest is None else min(soonest, at - now)
                    break
                heapq.heappop(queue)
                self._give(waiter, state, now)
        return soonest

    def _give(self, waiter: _Waiter, state: KeyState, now: float) -> None:
        permit = self._next_id
        self._next_id += 1
        waited = now - waiter.since
        reply = json.dumps({"id": permit, "waited": waited}).encode() + b"\n"
        try:
            waiter.conn.sock.sendall(reply)
        except OSError:  # the worker is gone: its EOF is read next, nothing was granted
            return
        state.grant(waiter.tokens, now)
        self._held[permit] = (waiter.conn, waiter.key, waiter.tokens)
        waiter.conn.held.add(permit)
        counts = self._count(waiter.conn.config, waiter.key)
        counts.calls += 1
        if waited >= _WAIT:
            counts.waits += 1
            counts.wait_seconds += waited

    def _close(self, conn: _Conn) -> None:
        """A worker's connection ended (it exited or was killed): give back what it held."""
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        with self._lock:
            now = time.monotonic()
            for permit in list(conn.held):
                _, key, reserved = self._held.pop(permit)
                self._keys[key].release(reserved, None, now)  # its tokens stay spent
            conn.held.clear()
            for queue in self._queues.values():
                if any(w.conn is conn for w in queue):
                    queue[:] = [w for w in queue if w.conn is not conn]
                    heapq.heapify(queue)

    def stop(self) -> None:
        """Stop the thread (within a second) and remove the socket."""
        _channels.withdraw(self.path)
        if self._tcp is not None:
            self._tcp.stop()
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5)
        for key in list(self._selector.get_map().values()):
            with contextlib.suppress(OSError):
                key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._listener.close()  # (out of the selector while its accepting pauses)
        self._wake_w.close()
        shutil.rmtree(self._directory, ignore_errors=True)

    # ---------------------------------------------------------------- over TCP (procval.run._tcp)

    def open_tcp(self, host: str) -> str:
        """Serve workers on other nodes too, over TCP on ``host`` (opened once); its address.

        Their messages are handled as a local worker's; a connection that ends (its actor
        killed, or its node lost: keepalive) gives back its permits as a Unix one does.
        """
        with self._lock:
            if self._tcp is None:
                self._tcp = _tcp.LineServer(
                    host, name="procval-limits-tcp", on_line=self._tcp_line, on_close=self._tcp_end
                )
            return self._tcp.address

    def _tcp_line(self, sock: socket.socket, message: dict[str, Any]) -> None:
        conn = self._remote.get(sock)
        if conn is None:
            conn = self._remote[sock] = _Conn(sock)
        with self._lock:
            self._handle(conn, message, time.monotonic())
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")  # the serving thread grants what it can now

    def _tcp_end(self, sock: socket.socket) -> None:
        conn = self._remote.pop(sock, None)
        if conn is not None:
            self._close(conn)


def start(configs: Sequence[Config], specs: Iterable[WorkerSpec]) -> Limiter | None:
    """Serve the run's rate limits when a config names any; sets ``WorkerOptions.limiter``.

    Call it before any worker starts (the options are shared by the specs), and :func:`stop`
    at the end of the run. None when no config has a rate limit.
    """
    limits = check_limits(configs)
    if not limits:
        return None
    limiter = Limiter(limits)
    for spec in specs:
        spec.options.limiter = limiter.path
    return limiter


def stop(limiter: Limiter | None, results: Any) -> None:
    """Stop ``limiter``; put each config's counts on its result in ``results`` (if any).

    A result read from a run store keeps the store's counts (every session, this one included).
    """
    if limiter is None:
        return
    limiter.stop()
    counts = limiter.counts()
    items = results.values() if isinstance(results, Mapping) else [results]
    for result in items:
        found = counts.get(getattr(result, "config", None) or "")
        if found is not None and hasattr(result, "_limits") and not result._limits:
            result._limits = found
