"""The driver's channels over TCP (rate limiter, log relay) for workers on other nodes: Ray actors.

The channel's rules (the token, a killed peer's permits, a full log queue) are tested first with
plain processes on 127.0.0.1; then runs on the session's local Ray cluster (the fixture of
tests/test_backend_ray.py), whose actors are given the channels' TCP addresses on the driver's
node address, as on a multi-node cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import procval
from helpers import limit_programs, ray_channel
from helpers.llm_server import LLMServer
from helpers.log_capture import captured_logs
from procval.ratelimit import RateLimit
from procval.run.limiter import Limiter
from procval.run.logs import LogListener
from procval.worker import _tcp
from procval.worker.logs import RelayHandler

TESTS = os.path.dirname(os.path.abspath(__file__))


def when(condition, what: str, timeout: float = 30.0) -> None:
    """Wait for ``condition()``, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s: {what}"
        time.sleep(0.05)


@pytest.fixture
def limiter():
    served = Limiter({"k": RateLimit("k", max_in_flight=1)})
    yield served
    served.stop()


# ---------------------------------------------------------------- the channel, without Ray


def test_a_wrong_token_is_refused_and_gets_no_permit(limiter):
    good = limiter.open_tcp("127.0.0.1")
    host, port, _ = _tcp.parse(good)
    wrong = _tcp.address(host, port, "not-the-token")
    with pytest.raises(RuntimeError, match="refused this worker's token"):
        _tcp.connect(wrong, timeout=5, what="rate limiter")
    # a peer that skips the token and asks at once is cut off, and granted nothing
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b'{"op": "acquire", "key": "k", "tokens": 1}\n')
        assert sock.recv(4096) == b'{"auth": "refused"}\n'
        assert sock.recv(4096) == b""  # closed
    assert limiter.in_flight().get("k", 0) == 0 and limiter.counts() == {}
    assert "not-the-token" not in str(wrong.partition("/")[0])


def test_the_token_is_what_a_worker_connects_with_and_a_permit_is_granted(limiter):
    target = limiter.open_tcp("127.0.0.1")
    assert limiter.open_tcp("127.0.0.1") == target  # one listener per limiter
    sock = _tcp.connect(target, timeout=5, what="rate limiter")
    with sock:
        sock.sendall(b'{"op": "hello", "config": "c"}\n{"op": "acquire", "key": "k"}\n')
        assert b'"id": 1' in sock.recv(4096)
        when(lambda: limiter.in_flight()["k"] == 1, "the permit is held")
        sock.sendall(b'{"op": "release", "id": 1, "status": "ok"}\n')
        when(lambda: limiter.in_flight()["k"] == 0, "the permit is given back")
    assert limiter.counts() == {
        "c": {"k": {"calls": 1, "rate_limited": 0, "waits": 0, "wait_seconds": 0, "tokens": 0}}
    }


HOLD = """
import sys, time
from procval.ratelimit import RateLimit
from procval.worker import limited
limited.install("c", (RateLimit("k", max_in_flight=1),), sys.argv[1])
with limited.limited("k"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_worker_killed_holding_a_tcp_permit_gives_it_back(limiter):
    target = limiter.open_tcp("127.0.0.1")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), TESTS])}
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD), target],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        assert limiter.in_flight()["k"] == 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        when(lambda: limiter.in_flight()["k"] == 0, "the killed worker's permit is released")
    finally:
        child.kill()
        child.wait(10)
        child.stdout.close()  # type: ignore[union-attr]


def test_both_ends_probe_a_silent_peer_so_a_lost_node_frees_its_permits(limiter):
    # a lost node sends no FIN: keepalive and the user timeout end its connection within
    # DEAD_AFTER seconds, and the limiter then releases its permits as for a closed one
    sock = _tcp.connect(limiter.open_tcp("127.0.0.1"), timeout=5, what="rate limiter")
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # no 40 ms stalls
        if hasattr(socket, "TCP_KEEPIDLE"):
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            count = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert idle + interval * count <= _tcp.DEAD_AFTER
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert timeout == _tcp.DEAD_AFTER * 1000
        server = limiter._tcp
        assert server is not None
        when(lambda: server.peers() == 1, "the parent accepted the connection")
        (peer,) = server._peers
        assert peer.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


@pytest.fixture
def collected():
    with captured_logs("tests.ray_channel") as handler:
        yield handler


def test_log_records_over_tcp_reach_the_parent_handlers_with_their_fields(collected):
    listener = LogListener()
    relay = RelayHandler(listener.open_tcp("127.0.0.1"))
    try:
        record = logging.LogRecord(
            "tests.ray_channel", logging.ERROR, __file__, 1, "n=%d", (7,), None
        )
        relay.emit(record)
        relay.flush()
        when(lambda: collected.records, "the record reaches the parent's handler")
    finally:
        relay.close()
        listener.stop()
    (got,) = collected.records
    assert (got.levelno, got.name, got.getMessage()) == (logging.ERROR, "tests.ray_channel", "n=7")
    assert got.created == record.created and got.procval_pid == os.getpid()  # type: ignore[attr-defined]
    assert got.procval_example_id is None  # type: ignore[attr-defined]  # (outside an example)


def test_a_process_forked_by_the_program_sends_its_records_over_tcp_too(collected):
    listener = LogListener()
    relay = RelayHandler(listener.open_tcp("127.0.0.1"))
    try:

        def record(message: str) -> logging.LogRecord:
            return logging.LogRecord(
                "tests.ray_channel", logging.WARNING, __file__, 1, message, (), None
            )

        relay.emit(record("from the parent"))
        pid = os.fork()
        if pid == 0:  # the child: its own lock, queue and thread, none of the parent's
            code = 1
            try:
                relay.emit(record("from the child"))
                code = 0 if relay.drain(10) and not relay.dropped else 2 + relay.dropped
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the child hung"
        relay.flush()
        when(lambda: len(collected.records) == 2, "both records reach the parent's handler")
    finally:
        relay.close()
        listener.stop()
    messages = sorted(r.getMessage() for r in collected.records)
    assert messages == ["from the child", "from the parent"]


def test_a_full_log_queue_drops_and_counts_instead_of_blocking(monkeypatch):
    monkeypatch.setattr(_tcp, "_QUEUE", 5)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts nothing, answers nothing
        target = _tcp.address("127.0.0.1", silent.getsockname()[1], "t")
        relay = RelayHandler(target)
        record = logging.LogRecord("tests.ray_channel", logging.INFO, __file__, 1, "x", (), None)
        for _ in range(50):
            relay.emit(record)  # returns at once: the sender thread waits, not the caller
        assert relay.dropped >= 50 - 5 - 1  # (one may be taken by the thread already)
    relay.close()  # the listener gone, the sender's connection fails at once: bounded
    assert relay._sender is not None and not relay._sender._thread.is_alive()


# ---------------------------------------------------------------- on Ray

ray = pytest.importorskip("ray")
from test_backend_ray import ray_cluster  # noqa: E402, F401  (the session's local cluster)

on_ray = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.ray
@on_ray
def test_worker_logs_under_ray_reach_the_driver_while_the_run_goes(tmp_path):
    seen: list[logging.LogRecord] = []

    class MarkSeen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)
            (tmp_path / f"seen-{record.procval_example_id}").touch()  # type: ignore[attr-defined]

    handler = MarkSeen()
    ray_channel.logger.addHandler(handler)
    try:
        result = procval.evaluate(
            ray_channel.log_and_wait,
            range(4),
            ray_channel.positive,
            config=procval.Config("c", values={"dir": str(tmp_path)}),
            backend="ray",
            workers=2,
            threads=2,
        )
    finally:
        ray_channel.logger.removeHandler(handler)
    # each example saw its own record reach the driver while it still ran
    assert result.errors == [] and result.score == 1.0
    pids = {row.example_id: row.worker_pid for row in result.rows}
    assert sorted((r.procval_example_id, r.procval_pid) for r in seen) == sorted(pids.items())  # type: ignore[attr-defined]
    assert all(pid != os.getpid() for pid in pids.values())
    assert {(r.levelno, r.name) for r in seen} == {(logging.WARNING, "helpers.ray_channel")}
    assert {r.getMessage() for r in seen} == {f"example {i} is running" for i in range(4)}


@pytest.mark.ray
@on_ray
def test_a_record_logged_by_the_last_example_reaches_the_driver_before_evaluate_returns():
    """The sender's thread is a daemon: each shard's end waits for its records to leave."""
    with captured_logs(ray_channel.logger.name) as handler:
        result = procval.evaluate(
            ray_channel.log_over_a_slow_link,
            range(1),
            ray_channel.positive,
            backend="ray",
            workers=1,
            progress=False,
        )
        got = handler.messages  # what reached the handler by the time evaluate returned
    assert result.errors == [] and result.score == 1.0
    assert got == ["example 0 is done"]


@pytest.mark.ray
@on_ray
def test_two_configs_under_ray_sharing_a_key_never_exceed_the_limit_together():
    with LLMServer(rate=20, burst=3) as server:
        limit = RateLimit("k", requests_per_minute=20 * 60)
        configs = [
            procval.Config(n, rate_limit=limit, values={"base": server.api_base}) for n in "ab"
        ]
        results = procval.evaluate(
            ray_channel.limited_call,
            range(30),
            limit_programs.ok,
            configs=configs,
            backend="ray",
            workers=2,
            threads=6,
        )
        counts = server.counts()
    assert counts["rate_limited"] == 0 and counts["answered"] == 60
    for name in "ab":
        assert results[name].score == 1.0
        assert results[name].limits["k"]["calls"] == 30
    assert len({row.worker_pid for name in "ab" for row in results[name].rows}) == 2


@pytest.mark.ray
@on_ray
def test_an_actor_killed_holding_a_permit_does_not_leak_it():
    # one call in flight at most: a leaked permit would hold every other call until the timeout
    with LLMServer() as server:
        limit = RateLimit("k", max_in_flight=1)
        result = procval.evaluate(
            ray_channel.kill_holding_a_permit,
            range(12),
            limit_programs.ok,
            config=procval.Config("c", rate_limit=limit, values={"base": server.api_base}),
            backend="ray",
            workers=2,
            threads=2,
            timeout=60,
        )
        counts = server.counts()
    assert [(r.example, r.error.type) for r in result.errors] == [(3, "WorkerCrashed")]
    assert counts["answered"] >= 11 and result.totals.n == 12
