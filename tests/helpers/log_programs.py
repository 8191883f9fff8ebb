"""A program that logs a burst from several threads (tests/test_log_relay.py)."""

from __future__ import annotations

import logging
import threading

BURST = 500  # records per thread
THREADS = 4


def burst(example: int) -> int:
    """Log BURST records from each of THREADS threads at once, as fast as they can."""
    log = logging.getLogger("relay.burst")

    def logs(thread: int) -> None:
        for i in range(BURST):
            log.warning("example %s thread %s record %s", example, thread, i)

    threads = [threading.Thread(target=logs, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return example
