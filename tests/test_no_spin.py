"""The parent's serving threads wait when they have nothing to do: none of them spins.

A thread that spins costs the caller a core for as long as it lives; the log listener lives as
long as the process, so one spin made every later ``evaluate`` call of that process pay seconds
of CPU (issue 14). Each test measures a serving thread's own CPU time (psutil's per-thread
times) over a quiet spell, after what used to make it spin: the bound (a fifth of that spell) is
far above a waiting thread's (a few polls: nothing measurable) and far below a spinning one's.
"""

from __future__ import annotations

import logging
import pickle
import socket
import threading
import time

import pytest

from procval.run.logs import LogListener

psutil = pytest.importorskip("psutil")

QUIET = 1.0  # seconds a suspect thread is watched with nothing to read
BOUND = 0.2  # CPU seconds it may use meanwhile: a waiting thread uses ~0, a spinning one ~QUIET


def thread_cpu(thread: threading.Thread) -> float:
    """``thread``'s user + system CPU seconds so far (it must be alive)."""
    for found in psutil.Process().threads():
        if found.id == thread.native_id:
            return float(found.user_time + found.system_time)
    raise AssertionError(f"thread {thread.name} has exited")


def cpu_over(thread: threading.Thread, seconds: float) -> float:
    """The CPU seconds ``thread`` uses over the next ``seconds``."""
    before = thread_cpu(thread)
    time.sleep(seconds)
    return thread_cpu(thread) - before


class Hold(logging.Handler):
    """Holds up whichever thread handles a record: ``hold`` seconds, read from the record."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.started.set()
        time.sleep(float(record.msg))


@pytest.fixture
def hold():
    handler = Hold()
    target = logging.getLogger("tests.no_spin.hold")
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    yield handler
    target.removeHandler(handler)
    target.setLevel(logging.NOTSET)


def test_log_listener_waits_after_a_flush_that_raced_its_thread(hold):
    """A flush() at the end of a run, while the thread reads records, leaves it waiting.

    flush() used to set the socket's timeout to 0 and back to 0.1 around its own reads: the
    thread, reading meanwhile, entered recv() with timeout 0, and when that recv() failed
    (EAGAIN) after the timeout was back, CPython retried it in C without waiting: the thread
    spun until the next record arrived (in a run whose workers log nothing, for the rest of
    the process). It failed at the first flush, every time.
    Here the thread is made to read during a flush(): it handles a slow record while flush()
    takes the next one (slower still), so it is back in recv() before flush() is done.
    """
    listener = LogListener()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(hold_for: float) -> None:
        state = {"name": "tests.no_spin.hold", "levelno": logging.INFO, "msg": hold_for}
        sender.sendto(pickle.dumps(state), listener.path)

    try:
        for attempt in range(3):
            hold.started.clear()
            send(0.2)  # the thread reads it and is held 0.2 s
            assert hold.started.wait(10), "the listener's thread did not read the record"
            send(0.4)  # read by flush(), held 0.4 s: meanwhile the thread reads again
            listener.flush()
            used = cpu_over(listener._thread, QUIET)  # nothing comes now
            assert used < BOUND, (
                f"the log listener's thread used {used:.2f} s of CPU in {QUIET:g} s with "
                f"nothing to read, after flush number {attempt + 1}: it spins"
            )
        assert listener.received == 6
    finally:
        sender.close()
        listener.stop()
    assert not listener._thread.is_alive()


def test_log_listener_still_hands_records_to_the_thread_and_to_flush(caplog):
    """Records reach the handlers whether the thread or flush() reads them, each once."""
    listener = LogListener()
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with caplog.at_level("INFO", logger="tests.no_spin"):
            for i in range(50):
                state = {"name": "tests.no_spin", "levelno": 20, "levelname": "INFO", "msg": i}
                sender.sendto(pickle.dumps(state), listener.path)
                if i % 7 == 0:
                    listener.flush()
            deadline = time.monotonic() + 10
            while listener.received < 50 and time.monotonic() < deadline:
                time.sleep(0.01)
            listener.flush()
            got = sorted(r.msg for r in caplog.records if r.name == "tests.no_spin")
    finally:
        sender.close()
        listener.stop()
    assert got == list(range(50))
