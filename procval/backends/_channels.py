"""The parent's channels that workers on other machines reach over TCP instead of a Unix socket.

The rate limiter (:mod:`procval.run.limiter`) and the log listener (:mod:`procval.run.logs`)
serve local workers on Unix sockets, whose paths go into ``WorkerOptions``. Each *offers* here a
way to be reached over TCP too; a backend whose workers may run on other nodes (Ray) calls
:func:`reachable` when it starts a worker, and gets the options that name the TCP addresses
instead (a channel's TCP listener opens on the first such call, bound to the host the backend
gives). This module only keeps the offers: the run side imports it, it imports nothing of the
run side.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from procval.wire import WorkerOptions

__all__ = ["HOST_VARIABLE", "offer", "reachable", "withdraw"]

HOST_VARIABLE = "PROCVAL_DRIVER_HOST"  # the address workers reach the driver at, if not Ray's

_offers: dict[str, Callable[[str], str]] = {}
_lock = threading.Lock()


def offer(path: str, open_tcp: Callable[[str], str]) -> None:
    """The channel on Unix socket ``path`` can be reached at ``open_tcp(host)`` (an address)."""
    with _lock:
        _offers[path] = open_tcp


def withdraw(path: str) -> None:
    """The channel on ``path`` is closed."""
    with _lock:
        _offers.pop(path, None)


def _reach(path: str, host: Callable[[], str]) -> str | None:
    with _lock:
        open_tcp = _offers.get(path)
    return open_tcp(os.environ.get(HOST_VARIABLE) or host()) if open_tcp is not None else None


def reachable(options: WorkerOptions, host: Callable[[], str]) -> dict[str, Any]:
    """The fields of ``options`` to replace so that a worker on another node reaches the parent.

    Args:
        options: the options the scheduler gave (Unix socket paths).
        host: returns the driver's address as the nodes reach it (called only if needed);
            ``PROCVAL_DRIVER_HOST``, when set, is used instead.

    Returns:
        ``limiter`` and ``log`` with TCP addresses, for :func:`dataclasses.replace`; a path
        that offers no TCP channel is left as it is.
    """
    changes: dict[str, Any] = {}
    if options.limiter:
        found = _reach(options.limiter, host)
        if found is not None:
            changes["limiter"] = found
    if options.log is not None:
        found = _reach(options.log[0], host)
        if found is not None:
            changes["log"] = (found, options.log[1])
    return changes
