"""Programs for the Ray channel tests: each fails unless its worker reaches the driver over TCP.

The session's Ray cluster is local, so its actors could reach the driver's Unix sockets too: the
programs check that they were given the TCP addresses, as an actor on another node must be.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import procval
from helpers import limit_programs
from procval.worker import _tcp, limited
from procval.worker.logs import RelayHandler

logger = logging.getLogger("helpers.ray_channel")


def log_and_wait(example: Any) -> int:
    """Log one record, then wait (30 s at most) for the driver's handler to mark it seen.

    Returns the worker's pid once the driver saw the record while this example still ran,
    else -1.
    """
    folder = procval.current_config().values["dir"]
    relays = [h for h in logging.getLogger().handlers if isinstance(h, RelayHandler)]
    if not relays or not all(_tcp.is_tcp(h.path) for h in relays):
        return -2
    logger.warning("example %s is running", example)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(folder, f"seen-{example}")):
            return os.getpid()
        time.sleep(0.02)
    return -1


def log_over_a_slow_link(example: Any) -> int:
    """Log one record that takes 0.2 s to leave (a slow link to the driver); return at once.

    Returns the worker's pid, or -2 if its log relay is not over TCP.
    """
    relays = [h for h in logging.getLogger().handlers if isinstance(h, RelayHandler)]
    if not relays or not all(_tcp.is_tcp(h.path) for h in relays):
        return -2
    for relay in relays:
        sender: Any = relay._sender
        send = sender._send

        def slow(sock: Any, batch: Any, send: Any = send) -> Any:
            time.sleep(0.2)
            return send(sock, batch)

        sender._send = slow
    logger.warning("example %s is done", example)
    return os.getpid()


def positive(example: Any, prediction: Any) -> float:
    """1.0 when the program returned a pid."""
    return float(prediction > 0)


def limited_call(example: Any) -> int:
    """:func:`helpers.limit_programs.limited_call`, whose permit comes over TCP (else -1)."""
    return limit_programs.limited_call(example) if _tcp.is_tcp(limited._path) else -1


def kill_holding_a_permit(example: Any) -> int:
    """:func:`helpers.limit_programs.kill_holding_a_permit`, over TCP (else -1)."""
    return limit_programs.kill_holding_a_permit(example) if _tcp.is_tcp(limited._path) else -1
