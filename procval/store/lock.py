"""One writer at a time: an exclusive ``flock`` on ``STORE.lock``, held by the writing process.

One writer at a time: a run holds an exclusive ``flock`` on ``PATH.lock`` (next to the store)
from the moment its sink opens until it closes, and a second run on the same store fails at
once, before any worker starts, with :class:`procval.StoreLockedError` naming the holder's pid
and host. The kernel drops the lock when the holder exits, however it exits (``kill -9``
included), so a lock is never stale; the file itself is removed on a clean close and may be left
behind by a killed run (harmless: the pid in it is only read for the message). The lock covers
the whole store, not a config: a run's session, its configs and ``fresh`` are one unit, SQLite
has one writer at a time anyway, and runs of different configs in parallel belong in one call
(``configs=``, which shares the workers) or in separate stores. Readers (``load``, ``report``,
``export``, ``compare``) never take it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
import time
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from procval.errors import StoreError, StoreLockedError

try:
    import fcntl
except ImportError:  # not POSIX (Windows is not a target): runs go without the writer lock
    fcntl = None  # type: ignore[assignment]


class WriterLock:
    """An exclusive ``flock`` on ``STORE.lock``: held by the one process writing the store.

    The kernel releases an ``flock`` when the last descriptor of its open file is closed, which
    happens however the process ends, ``kill -9`` included: a lock is never stale, and the pid
    written in the file serves only the message of a run that finds the store busy. The
    descriptor is not inherited by worker processes: Python opens files non-inheritable
    (``O_CLOEXEC``, PEP 446); loky's fork+exec workers and the fork server (a ``subprocess``
    with ``close_fds``) never get it, and the server's forked workers get only the descriptors
    sent to them. So a worker that outlives a killed parent for a moment does not keep the store
    locked. (A child between its fork and its exec shares it for those few milliseconds.)

    Args:
        store: the run store's path; the lock file is ``store + ".lock"``, symbolic links
            resolved (so that two paths to one store share the lock).

    Raises:
        StoreLockedError: another open file description holds the lock (another process, or
            another sink of this process).
        StoreError: the lock file cannot be created.
    """

    def __init__(self, store: str) -> None:
        self.path = os.path.realpath(store) + ".lock"
        fd = _lock(store, self.path)
        # released at the latest when the sink is garbage collected or the interpreter exits
        self._release = (
            weakref.finalize(self, _unlock, fd, self.path, os.getpid()) if fd is not None else None
        )

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (False where locks are unavailable)."""
        return self._release is not None and self._release.alive

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._release is not None:
            self._release()


def _lock(store: str, path: str) -> int | None:
    """Lock ``path`` for this process and write who holds it; None where locks are unavailable.

    Raises:
        StoreLockedError: another live process (or another sink of this one) holds it.
        StoreError: the lock file cannot be created.
    """
    if fcntl is None:
        return None
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # O_CLOEXEC: never inherited
        except OSError as exc:
            raise StoreError(
                f"cannot create the lock file {path} of the run store {store}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            holder = _holder(fd) if busy else {}
            os.close(fd)
            if busy:
                raise _locked(store, path, holder) from None
            warnings.warn(  # e.g. ENOLCK: a network file system without locks
                f"the run store {store} cannot be locked ({exc.strerror}); nothing stops a "
                "second run from writing it at the same time",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        # A run that finished removed the file between our open and our flock: what we locked
        # is no longer the lock file, so lock the one at the path now.
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            current = False
        if current:
            _write_holder(fd)
            return fd
        os.close(fd)
    raise StoreError(f"cannot lock the run store {store}: its lock file {path} keeps changing")


def _unlock(fd: int, path: str, owner: int) -> None:
    """Remove the lock file (if it is still the one locked), then release the lock."""
    try:
        # a child forked without exec (never a procval worker) shares the lock: it must not
        # remove the file its parent still holds
        if os.getpid() == owner and os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_holder(fd: int) -> None:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("procval", "__main__.py")):
        argv[0] = "procval"  # python -m procval
    elif argv:
        argv[0] = os.path.basename(argv[0])
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "command": shlex.join(argv)[:200],
    }
    with contextlib.suppress(OSError):  # only for messages: a full disk must not stop the run
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)


def _holder(fd: int) -> dict[str, Any]:
    """Who holds the lock, from the file (its holder may not have written it yet: wait a bit)."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            found = json.loads(os.pread(fd, 4096, 0))
            if isinstance(found, dict):
                return found
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return {}
        time.sleep(0.02)


def _locked(store: str, path: str, holder: Mapping[str, Any]) -> StoreLockedError:
    pid = holder.get("pid") if isinstance(holder.get("pid"), int) else None
    host = str(holder["host"]) if holder.get("host") else None
    here = socket.gethostname()
    if pid == os.getpid() and host == here:
        return StoreLockedError(
            f"the run store {store} is already being written by this process (pid {pid}): an "
            "earlier evaluate() on it has not returned (in another thread?) or was not closed. "
            "Let it finish, or use another store path",
            path=store,
            pid=pid,
            host=host,
        )
    if pid is None:
        who = f"another process (its pid is not in {path} yet)"
        stop = "stop it"
    else:
        who = f"pid {pid}" + (f" on host {host}" if host else "")
        details = [str(holder["command"])] if holder.get("command") else []
        if isinstance(holder.get("started"), int | float):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
            details.append(f"since {when}")
        if details:
            who += f" ({', '.join(details)})"
        stop = f"stop it (kill {pid}" + (f" on {host}" if host and host != here else "") + ")"
    return StoreLockedError(
        f"the run store {store} is being written by another run: {who}; two runs on one store "
        f"would do the same work twice. Wait for it to finish, or {stop}, then run again to "
        "resume; or use another store path",
        path=store,
        pid=pid,
        host=host,
    )


def writer_is_gone(store: str, pid: int, node: str) -> bool:
    """Whether the writer of a session stored as ``running`` is certainly dead, without locking.

    Readers never take the lock (that could make a starting run fail as if the store were busy),
    so this looks instead: a live writer keeps ``STORE.lock`` from before its session is stored
    until after it is closed, so a missing lock file means no writer; and a session of this host
    whose pid no longer exists is dead. (A reused pid keeps a dead session ``running``: the safe
    way to be wrong.)

    Args:
        store: the run store.
        pid: the session's process.
        node: the host the session ran on.
    """
    if fcntl is not None and not os.path.exists(os.path.realpath(store) + ".lock"):
        return True
    if node != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, as another user
        return False
    return False
