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
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers import processes
from procval.run.logs import LogListener
from procval.worker import _tcp

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


# ---------------------------------------------------------------- out of file descriptors

_FULL = """
import os, resource, socket, sys
from procval.ratelimit import RateLimit
from procval.run._tcp import LineServer
from procval.run.limiter import Limiter

if sys.argv[1] == "limiter":
    server = Limiter({"k": RateLimit("k", max_in_flight=1)})
    where = server.path
else:
    server = LineServer("127.0.0.1", name="procval-test-tcp", on_line=lambda sock, message: None)
    where = server.address
accepts = 0  # calls of accept(), counted
accept = socket.socket.accept
def counted(self):
    global accepts
    accepts += 1
    return accept(self)
socket.socket.accept = counted
# the fd table full: a soft limit just above what is open, then /dev/null until refused
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
fillers = []
try:
    while True:
        fillers.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
print(where, flush=True)
sys.stdin.readline()  # the parent has watched this process's CPU while its connection waited
print(accepts, flush=True)
for fd in fillers:
    os.close(fd)
sys.stdin.readline()  # the parent's connection was served
server.stop()
"""


def _line(stream, what: str, timeout: float = 30.0) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"not within {timeout:g}s: {what}"
    return stream.readline()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd")
@pytest.mark.parametrize("kind", ["limiter", "tcp"])
def test_a_listener_out_of_file_descriptors_waits_then_takes_the_connection(kind):
    """accept() failing with EMFILE leaves the connection queued and the listener readable.

    The rate limiter's thread and the TCP channel's retried at once, spinning as long as the
    process had no descriptor to spare; now the listener rests a second at a time, and the
    connection is taken once descriptors are free again.
    """
    child = processes.start([sys.executable, "-c", _FULL, kind], stdin=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    conn: socket.socket | None = None
    try:
        where = _line(child.stdout, "the server's address").strip()
        assert where, child.communicate(timeout=10)
        if kind == "limiter":
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(10)
            conn.connect(where)  # queued: the server cannot accept it
            request = b'{"op": "hello", "config": "c"}\n{"op": "acquire", "key": "k"}\n'
        else:
            host, port, token = _tcp.parse(where)
            conn = socket.create_connection((host, port), timeout=10)
            request = token.encode() + b"\n"
        server = psutil.Process(child.pid)
        before = sum(server.cpu_times()[:2])
        time.sleep(2 * QUIET)
        used = sum(server.cpu_times()[:2]) - before
        child.stdin.write("\n")  # descriptors free again
        child.stdin.flush()
        accepts = int(_line(child.stdout, "the count of accept() calls"))
        # a paused listener tries once a second; a spinning one thousands of times (hundreds
        # on a loaded machine, where its CPU time alone could pass)
        assert accepts < 20 and used < 2 * BOUND, (
            f"the {kind} server called accept() {accepts} times and used {used:.2f} s of CPU "
            f"in {2 * QUIET:g} s while it could not accept a connection: it spins"
        )
        conn.sendall(request)
        reply = conn.recv(4096)  # (timeout 10 s)
        assert reply.startswith(b'{"id"' if kind == "limiter" else b'{"auth": "ok"}'), reply
        child.stdin.write("\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=30)
    finally:
        if conn is not None:
            conn.close()
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert err.count("ulimit -n") == 1, err  # said once
