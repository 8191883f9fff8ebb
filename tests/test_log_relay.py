"""Worker log records reach the parent's handlers, all of them, in bursts too."""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time

import pytest

import procval
from helpers import log_programs
from helpers.log_capture import captured_logs
from procval.worker import _datagrams
from procval.worker._datagrams import DatagramSender


@pytest.fixture
def reader():
    """A Unix datagram socket nobody reads until the test does."""
    directory = tempfile.mkdtemp(prefix="procval-test-")
    path = os.path.join(directory, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def _read_all(sock: socket.socket, n: int, bound: float = 30.0) -> list[bytes]:
    """``n`` messages, from as many datagrams as they came in (single, or batches)."""
    sock.settimeout(bound)
    got: list[bytes] = []
    while len(got) < n:
        got += _datagrams.unpack(sock.recv(_datagrams.BATCH_BYTES + 1024))
    return got


def test_a_burst_beyond_the_sockets_queue_waits_and_arrives_in_order(reader):
    path, sock = reader
    sender = DatagramSender(path)
    started = time.monotonic()
    for i in range(200):  # the kernel queues 10 (net.unix.max_dgram_qlen)
        assert sender.put(b"%d" % i)
    assert time.monotonic() - started < 1.0  # put() never waits for the reader
    assert not sender.flush(0.2)  # nobody reads yet: still queued
    got = _read_all(sock, 200)
    assert got == [b"%d" % i for i in range(200)]
    assert sender.flush(5) and sender.lost == 0
    sender.close()


def test_past_its_bound_the_queue_drops_and_counts(reader, monkeypatch):
    path, sock = reader
    monkeypatch.setattr(_datagrams, "QUEUE", 20)
    sender = DatagramSender(path)
    results = [sender.put(b"x") for _ in range(100)]
    assert results.count(False) == sender.lost > 0
    assert len(_read_all(sock, results.count(True))) == results.count(True)
    sender.close()


def test_a_reader_that_is_gone_loses_the_records_without_blocking(reader):
    path, sock = reader
    sender = DatagramSender(path)
    for _ in range(30):
        sender.put(b"x")
    sock.close()  # the parent's listener ends while records wait
    started = time.monotonic()
    sender.close(timeout=2.0)
    assert time.monotonic() - started < 5.0
    assert sender.lost > 0
    assert not sender.put(b"late") and sender.lost > 0


def test_a_workers_burst_of_records_reaches_the_parent_whole_and_in_order(no_leaked_workers):
    with captured_logs("relay.burst") as handler:
        result = procval.evaluate(log_programs.burst, range(3), lambda e, p: 1.0, workers=1)
    assert result.errors == []
    per = log_programs.BURST
    assert len(handler.messages) == 3 * log_programs.THREADS * per  # none dropped
    pattern = re.compile(r"example (\d+) thread (\d+) record (\d+)")
    order: dict[tuple[int, int], list[int]] = {}
    for message in handler.messages:
        example, thread, i = map(int, pattern.fullmatch(message).groups())
        order.setdefault((example, thread), []).append(i)
    for key, seen in order.items():  # each thread's, in order
        assert seen == list(range(per)), (key, [i for j, i in enumerate(seen) if i != j][:5])


def test_a_process_the_program_forks_logs_to_the_parent_too(no_leaked_workers):
    with captured_logs("relay.burst") as handler:
        result = procval.evaluate(log_programs.forks, [0, 1], lambda e, p: 1.0, workers=1)
    assert [row.prediction for row in result.rows] == ["child exited 0"] * 2
    children = [m for m in handler.messages if m.startswith("from the forked child")]
    assert sorted(children) == [f"from the forked child of example {n}" for n in (0, 1)]
    assert len(handler.messages) == 2 * 201
