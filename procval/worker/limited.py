"""Worker side of the rate limits: ask the parent for a permit around each call.

::

    with procval.limited("openai/gpt-4o-mini", tokens=800) as permit:   # blocks until granted
        reply = client.chat(...)                                        # the call
        permit.record(tokens=reply.usage.total_tokens)                  # corrects the estimate

Each thread holds one connection to the parent's limiter (:mod:`procval.run.limiter`), opened
on first use; a permit is an ``acquire`` answered by the parent and a ``release`` sent back.
An exception that is a rate-limit answer (HTTP 429: a ``status``/``status_code`` of 429, or a
``RateLimitError``) is reported with its ``Retry-After`` (or ``retry-after-ms``,
``x-ratelimit-reset-requests``/``-tokens``), which pauses the key for every worker and cuts its
in-flight window. :func:`call` retries such a call itself, as a unit: only that call is
repeated, never the example. Outside a procval worker, or for a key the config does not limit,
:func:`limited` lets the call run at once.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from procval.ratelimit import RateLimit
from procval.worker import _tcp, record

__all__ = ["Permit", "acall", "call", "install", "is_rate_limited", "limited", "retry_after"]

T = TypeVar("T")

RATE_LIMIT_RETRIES = 8  # 429s in a row after which a call gives up (its error is the 429)
_GRANT_TIMEOUT = 900.0  # seconds a call may wait for its permit before it fails
_BACKOFF = 0.25  # the first retry's wait when the 429 did not say how long, doubled each time
_BACKOFF_CAP = 30.0

_path = ""
_config = ""
_limits: tuple[RateLimit, ...] = ()
_local = threading.local()
_jitter = random.Random()


def install(config: str, limits: tuple[RateLimit, ...], path: str) -> None:
    """Limit this worker's calls through the parent's socket ``path`` ("" limits nothing)."""
    global _path, _config, _limits
    _path, _config, _limits = path, config, limits


def key_for(model: str) -> str | None:
    """The key a call to ``model`` is limited under in this worker, or None."""
    for limit in _limits:
        if limit.matches(model):
            return limit.key
    return None


def active(key: str) -> bool:
    """Whether calls under ``key`` go through the parent's limiter here."""
    return bool(_path) and any(limit.key == key for limit in _limits)


class Permit:
    """A granted call under one key; :meth:`record` its usage to correct the estimate.

    Attributes:
        key: the key it was granted under.
        tokens: the tokens it reserved (the estimate).
        waited: the seconds it waited for the permit.
    """

    __slots__ = ("_id", "key", "tokens", "used", "waited")

    def __init__(self, permit: int, key: str, tokens: float, waited: float) -> None:
        self._id = permit
        self.key = key
        self.tokens = tokens
        self.waited = waited
        self.used: float | None = None

    def record(self, *, tokens: float) -> None:
        """The tokens the call used, as it reported them (the limiter corrects its bucket)."""
        self.used = float(tokens)


def _connection() -> socket.socket:
    conn: socket.socket | None = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "path", "") != _path:
        if _tcp.is_tcp(_path):  # a Ray actor: the driver's TCP channel (procval.worker._tcp)
            conn = _tcp.connect(_path, timeout=_GRANT_TIMEOUT, what="rate limiter")
        else:
            conn = _unix(_path)
        conn.sendall(json.dumps({"op": "hello", "config": _config}).encode() + b"\n")
        _local.conn, _local.path, _local.buffer = conn, _path, b""
    return conn


def _unix(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(_GRANT_TIMEOUT)
    try:
        conn.connect(path)
    except OSError as exc:
        conn.close()
        raise RuntimeError(
            f"cannot reach the parent's rate limiter at {path} ({exc}); the run is over "
            "or the parent died"
        ) from None
    return conn


def _stage() -> int:
    """How many permits the running example asked for before this call (0: its first).

    0 too outside an example. The parent ranks a later call of an example a little behind the
    first calls of others (``procval.run.limiter._Waiter``). Kept on the example's recording,
    which its threads and asyncio tasks share.
    """
    recording = record.current()
    if recording is None:  # outside an example (a setup, a thread the program started): none
        return 0
    stage = recording.permits
    recording.permits = stage + 1
    return stage


def _acquire(key: str, tokens: float, *, retry: bool = False, stage: int | None = None) -> Permit:
    """A permit for one call; a ``retry`` (of a call answered 429) is queued ahead of the others.

    ``stage``: the call's :func:`_stage`, taken here when None (and never for a retry, which
    is the same call again).
    """
    conn = _connection()
    if retry:
        message: dict[str, Any] = {"op": "acquire", "key": key, "tokens": tokens, "retry": True}
    else:
        stage = _stage() if stage is None else stage
        message = {"op": "acquire", "key": key, "tokens": tokens, "stage": stage}
    conn.sendall(json.dumps(message).encode() + b"\n")
    buffer: bytes = _local.buffer
    while b"\n" not in buffer:
        try:
            data = conn.recv(4096)
        except TimeoutError:
            _local.conn = None
            conn.close()
            raise TimeoutError(
                f"no permit for rate limit key {key!r} within {_GRANT_TIMEOUT:g}s; the limits "
                "are too tight for the run's concurrency"
            ) from None
        if not data:
            _local.conn = None
            conn.close()
            raise RuntimeError("the parent's rate limiter closed the connection (run over)")
        buffer += data
    line, _local.buffer = buffer.split(b"\n", 1)
    reply = json.loads(line)
    return Permit(int(reply["id"]), key, tokens, float(reply.get("waited", 0.0)))


def _release(permit: Permit, status: str, retry: float | None = None) -> None:
    message = {"op": "release", "id": permit._id, "tokens": permit.used, "status": status}
    if retry is not None:
        message["retry_after"] = retry
    with contextlib.suppress(OSError, AttributeError):
        _connection().sendall(json.dumps(message).encode() + b"\n")


@contextlib.contextmanager
def limited(key: str, *, tokens: float | None = None) -> Iterator[Permit | None]:
    """Run the block as one call under ``key``'s limits, shared by every worker of the run.

    Blocks until the parent grants a permit (pacing ``requests_per_minute``, reserving
    ``tokens`` of ``tokens_per_minute``, within ``max_in_flight``). An exception that is a
    rate-limit answer (429) is reported, which pauses the key for all workers; it is raised
    again (wrap the block in a loop, or use DSPy, whose LM calls are retried for you).

    Args:
        key: a key of the config's ``rate_limit``; another key (or no procval worker) runs
            the block at once, unlimited.
        tokens: the tokens the call is expected to use (prompt and completion); correct it
            with ``permit.record(tokens=...)`` once the call reports its usage.

    Yields:
        The :class:`Permit`, or None when the block runs unlimited.
    """
    if not active(key):
        yield None
        return
    permit = _acquire(key, float(tokens or 0.0))
    try:
        yield permit
    except BaseException as exc:
        if isinstance(exc, Exception) and is_rate_limited(exc):
            _release(permit, "limited", retry_after(exc))
        else:
            _release(permit, "failed")
        raise
    _release(permit, "ok")


def call(key: str, fn: Callable[[], T], *, tokens: float, usage: Callable[[], Any]) -> T:
    """Call ``fn()`` under ``key``'s limits, retrying it alone on 429s (honouring Retry-After).

    A 429's wait is kept by the parent, which pauses the key for every worker: the retry asks
    for its permit at once and is queued ahead of the calls not sent yet, which would otherwise
    take the provider's first free slots (the retry sleeping meanwhile) and could starve it
    into :data:`RATE_LIMIT_RETRIES` 429s in a row. A 429 without a wait backs off here first.

    Args:
        key: the key.
        fn: the call (one request to the provider).
        tokens: its estimate.
        usage: returns the tokens the call used once it returned (None: unknown).
    """
    for attempt in range(RATE_LIMIT_RETRIES + 1):
        permit = _acquire(key, tokens, retry=attempt > 0)
        try:
            result = fn()
        except Exception as exc:
            if not is_rate_limited(exc):
                _release(permit, "failed")
                raise
            wait = retry_after(exc)
            _release(permit, "limited", wait)
            if attempt == RATE_LIMIT_RETRIES:
                raise
            if wait is None:  # else the parent holds the key (this call first) for ``wait``
                time.sleep(backoff(wait, attempt))
            continue
        except BaseException:
            _release(permit, "failed")
            raise
        used = _safe(usage)
        if used is not None:
            permit.record(tokens=used)
        _release(permit, "ok")
        return result
    raise AssertionError("unreachable")  # pragma: no cover


def backoff(wait: float | None, attempt: int) -> float:
    """Seconds before retrying a 429: what it asked for, else doubling; with jitter."""
    base = wait if wait is not None else min(_BACKOFF_CAP, _BACKOFF * 2**attempt)
    return base * _jitter.uniform(1.0, 1.25)


def _safe(usage: Callable[[], Any]) -> float | None:
    try:
        value = usage()
    except Exception:
        return None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# ------------------------------------------------------------------ reading a 429


def is_rate_limited(exc: BaseException) -> bool:
    """Whether ``exc`` is a provider's rate-limit answer (HTTP 429, or a ``RateLimitError``)."""
    for candidate in _chain(exc):
        for name in ("status", "status_code", "http_status"):
            if getattr(candidate, name, None) == 429:
                return True
        response = getattr(candidate, "response", None)
        if getattr(response, "status_code", None) == 429:
            return True
        if "RateLimit" in type(candidate).__name__:
            return True
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def retry_after(exc: BaseException) -> float | None:
    """The seconds a rate-limit answer asks to wait, from its headers or attributes (or None).

    Reads ``retry-after-ms``, ``Retry-After`` (seconds), ``x-ratelimit-reset-requests`` and
    ``x-ratelimit-reset-tokens`` (``"1s"``, ``"6m0s"``, ``"20ms"``), then a ``retry_after``
    attribute; the longest reset is taken.
    """
    for candidate in _chain(exc):
        headers = _headers(candidate)
        found = header_wait(headers) if headers else None
        if found is not None:
            return found
        value = getattr(candidate, "retry_after", None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return float(value)
    return None


def _headers(exc: BaseException) -> Mapping[str, str] | None:
    for name in ("rate_limit_headers", "headers", "response_headers", "litellm_response_headers"):
        value = getattr(exc, name, None)
        if value is not None and hasattr(value, "items"):
            return {str(k).lower(): str(v) for k, v in value.items()}
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is not None and hasattr(headers, "items"):
        return {str(k).lower(): str(v) for k, v in headers.items()}
    return None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def header_wait(headers: Mapping[str, str]) -> float | None:
    """The wait the headers (lower-case names) ask for, in seconds, or None."""
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    seconds = _number(headers.get("retry-after"))
    resets = [
        _duration(headers.get(name, ""))
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
    ]
    known = [value for value in (seconds, *resets) if value is not None]
    return max(known) if known else None


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


def _duration(text: str) -> float | None:
    """``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1.5"`` as seconds (None if unreadable)."""
    text = text.strip()
    if not text:
        return None
    plain = _number(text)
    if plain is not None:
        return plain
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * units[u] for n, u in parts)


async def acall(
    key: str, fn: Callable[[], Awaitable[T]], *, tokens: float, usage: Callable[[], Any]
) -> T:
    """:func:`call` for a coroutine: the permit is awaited in a thread, the loop never blocks."""
    import asyncio

    stage = _stage()  # in this task's context: the thread that waits for the permit has its own
    for attempt in range(RATE_LIMIT_RETRIES + 1):
        permit = await asyncio.to_thread(_acquire, key, tokens, retry=attempt > 0, stage=stage)
        try:
            result = await fn()
        except Exception as exc:
            if not is_rate_limited(exc):
                _release(permit, "failed")
                raise
            wait = retry_after(exc)
            _release(permit, "limited", wait)
            if attempt == RATE_LIMIT_RETRIES:
                raise
            if wait is None:  # else the parent holds the key (this call first) for ``wait``
                await asyncio.sleep(backoff(wait, attempt))
            continue
        except BaseException:
            _release(permit, "failed")
            raise
        used = _safe(usage)
        if used is not None:
            permit.record(tokens=used)
        _release(permit, "ok")
        return result
    raise AssertionError("unreachable")  # pragma: no cover
