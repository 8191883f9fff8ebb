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


def forks(example: int) -> str:
    """Log a burst (the sender's thread then runs), fork a child that logs, wait 30 s for it."""
    import os
    import time

    log = logging.getLogger("relay.burst")
    for i in range(200):
        log.warning("before the fork %s", i)
    pid = os.fork()
    if pid == 0:
        log.warning("from the forked child of example %s", example)
        logging.getLogger().handlers[0].flush()  # (the relay's: its queue, 1 s at most)
        os._exit(0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return f"child exited {os.waitstatus_to_exitcode(status)}"
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "the child hung"
