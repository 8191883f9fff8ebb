"""Rate limits shared by every worker of a run (issue 15), against the stand-in server.

The pure rules (pacing, the token bucket, the AIMD window) are tested without processes; the
rest runs real workers against tests/helpers/llm_server.py on 127.0.0.1, whose counters say
how many requests came and how many were answered 429.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import socket
import time

import pytest

import procval
from helpers import limit_programs as programs
from helpers.llm_server import LLMServer
from procval.ratelimit import RateLimit, parse_rate_limit
from procval.run.limiter import check_limits
from procval.run.pacing import SAFETY, KeyState
from procval.worker.limited import header_wait, is_rate_limited, retry_after

# ---------------------------------------------------------------- the pure rules


def test_requests_are_paced_evenly_at_the_rate():
    state = KeyState(RateLimit("k", requests_per_minute=600), now=0.0)  # one per 0.1 s
    starts = []
    now = 0.0
    for _ in range(5):
        at = state.ready_at(1, now)
        assert at is not None
        now = at
        state.grant(1, now)
        starts.append(round(now, 6))
    assert starts == pytest.approx([i * 0.1 * (1 + SAFETY) for i in range(5)])


def test_grants_a_little_late_keep_the_schedule_and_an_idle_spell_gives_no_burst():
    state = KeyState(RateLimit("k", requests_per_minute=3000), now=0.0)  # one per 20 ms
    now = 0.0
    for _ in range(600):  # each grant 1 ms late, as the limiter's thread wakes
        at = state.ready_at(1, now)
        assert at is not None
        now = at + 0.001
        state.grant(1, now)
        state.release(1, None, now)
    # the lateness does not add up: 600 calls take 600 intervals, not 600 x 21 ms
    assert now == pytest.approx(599 * 0.02 * (1 + SAFETY) + 0.001)
    idle = now + 5.0  # nobody asked for 5 s: the next call starts at once, the one after paced
    state.grant(1, idle)
    assert state.ready_at(1, idle) == pytest.approx(idle + 0.02 * (1 + SAFETY))


def test_tokens_are_reserved_then_corrected_by_the_usage_reported():
    state = KeyState(RateLimit("k", tokens_per_minute=600), now=0.0)  # 10 tokens/s, bucket 10
    state.grant(10, 0.0)
    assert state.ready_at(10, 0.0) == pytest.approx(1.0)  # the bucket is empty
    state.release(10, 2, 0.0)  # it used 2: 8 come back
    assert state.ready_at(10, 0.0) == pytest.approx(0.2)


def test_a_429_pauses_the_key_and_halves_the_window_which_grows_back_slowly():
    state = KeyState(RateLimit("k", max_in_flight=8), now=0.0)
    for _ in range(8):
        state.grant(0, 0.0)
    assert state.ready_at(0, 0.0) is None  # the window is full
    assert state.rate_limited(2.0, 0.0, in_flight=8)
    assert not state.rate_limited(2.0, 0.5, in_flight=7)  # one cut per pause
    assert state.window == 4
    for _ in range(8):
        state.release(0, None, 1.0)
    assert state.ready_at(0, 1.0) == 2.5  # after the later 429's pause
    for _ in range(4):
        state.answered()
    assert 4.9 < state.window < 5.1  # one call more per window of answered calls


class _Client:
    """A worker thread's connection to the limiter, driven by hand."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def send(self, **message: object) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def reply(self) -> dict:
        return json.loads(self.file.readline())


@contextlib.contextmanager
def _limiter(clients: int, limit: RateLimit):
    """A limiter of one key ``limit`` and ``clients`` connections to it; all closed after."""
    from procval.run.limiter import Limiter

    limiter = Limiter({limit.key: limit})
    made: list[_Client] = []
    try:
        made.extend(_Client(limiter.path) for _ in range(clients))
        yield limiter, made
    finally:
        for client in made:
            client.file.close()
            client.sock.close()
        limiter.stop()


def test_a_call_answered_429_is_granted_before_the_calls_waiting_behind_it():
    """Else fresh calls take the provider's free slots first and starve the retry into 429s."""
    with _limiter(2, RateLimit("k", max_in_flight=1)) as (_, (retried, fresh)):
        retried.send(op="acquire", key="k", tokens=0)
        first = retried.reply()
        fresh.send(op="acquire", key="k", tokens=0)  # waits: the window is full
        time.sleep(0.2)  # queued in the limiter before the retry
        retried.send(op="release", id=first["id"], tokens=0, status="limited", retry_after=0.3)
        retried.send(op="acquire", key="k", tokens=0, retry=True)
        again = retried.reply()  # the retry is granted first...
        retried.send(op="release", id=again["id"], tokens=0, status="ok")
        assert "id" in fresh.reply()  # ...then the fresh call


def test_an_examples_later_call_yields_to_first_calls_that_came_a_little_after_it():
    """Near the end of a run the last examples' first calls go first, never starving the others."""
    from procval.run.limiter import STAGE_DELAY

    with _limiter(3, RateLimit("k", max_in_flight=1)) as (limiter, (holder, later, first)):

        def queued(n):
            deadline = time.monotonic() + 10
            while len(limiter._queues.get("k", ())) != n:
                assert time.monotonic() < deadline, "the limiter never queued the request"
                time.sleep(0.005)

        holder.send(op="acquire", key="k", tokens=0, stage=0)
        held = holder.reply()
        later.send(op="acquire", key="k", tokens=0, stage=1)  # an example's second call
        queued(1)
        first.send(op="acquire", key="k", tokens=0, stage=0)  # another example's first call
        queued(2)
        holder.send(op="release", id=held["id"], tokens=0, status="ok")
        granted = first.reply()  # came after, goes first
        first.send(op="release", id=granted["id"], tokens=0, status="ok")
        granted = later.reply()
        # a later call that came more than STAGE_DELAY earlier is not passed
        first.send(op="acquire", key="k", tokens=0, stage=1)
        queued(1)
        time.sleep(STAGE_DELAY + 0.2)
        holder.send(op="acquire", key="k", tokens=0, stage=0)
        queued(2)
        later.send(op="release", id=granted["id"], tokens=0, status="ok")
        granted = first.reply()
        first.send(op="release", id=granted["id"], tokens=0, status="ok")
        assert "id" in holder.reply()


def test_a_calls_stage_counts_its_examples_earlier_permits_and_nothing_outside_an_example():
    """The stage the limiter ranks by: 0, 1, 2 within an example, 0 again for the next; 0 always
    outside one (a setup, a thread the program started), which would otherwise keep growing."""
    import contextvars

    from procval.worker import record
    from procval.worker.limited import _stage

    def run() -> list[int]:
        stages = [_stage() for _ in range(3)]  # outside an example
        for example in range(200):  # a freed recording's address is soon another's
            token = record.begin(example)
            stages += [_stage() for _ in range(3)]
            record._current.reset(token)
        return stages

    assert contextvars.copy_context().run(run) == [0, 0, 0] + [0, 1, 2] * 200


def test_an_unlimited_key_gets_a_window_at_its_first_429():
    state = KeyState(None, now=0.0)
    assert math.isinf(state.window)
    state.rate_limited(None, 0.0, in_flight=20)
    assert state.window == 10


def test_429s_are_read_from_statuses_headers_and_attributes():
    class Limited(Exception):
        status_code = 429

        def __init__(self) -> None:
            self.headers = {"Retry-After": "2", "x-ratelimit-reset-requests": "6m0s"}

    assert is_rate_limited(Limited()) and retry_after(Limited()) == 360.0
    assert header_wait({"retry-after-ms": "250"}) == 0.25
    assert header_wait({"x-ratelimit-reset-tokens": "20ms"}) == 0.02
    assert not is_rate_limited(ValueError("no"))


def test_cli_syntax_and_bad_limits_are_named():
    limit = parse_rate_limit("openai/gpt-4o-mini:rpm=500,tpm=90000,inflight=16")
    assert limit == RateLimit(
        "openai/gpt-4o-mini", requests_per_minute=500, tokens_per_minute=90000, max_in_flight=16
    )
    assert parse_rate_limit("k:rps=50").requests_per_minute == 3000
    with pytest.raises(ValueError, match="unknown setting"):
        parse_rate_limit("k:rpx=5")
    with pytest.raises(ValueError, match="max_in_flight must be a positive int"):
        RateLimit("k", max_in_flight=0)


def test_a_rate_limit_does_not_change_any_config_identity():
    plain = procval.Config("c", seed=1)
    limited = dataclasses.replace(plain, rate_limit=RateLimit("k", requests_per_minute=60))
    assert "rate_limit" not in plain.describe()  # stores written before are resumed as they are
    assert limited.describe()["rate_limit"] == [{"key": "k", "requests_per_minute": 60}]
    assert limited.identity() == plain.identity()  # a run resumed with other limits goes on


def test_two_configs_giving_one_key_different_limits_are_refused():
    a = procval.Config("a", rate_limit=RateLimit("k", requests_per_minute=60))
    b = procval.Config("b", rate_limit=RateLimit("k", requests_per_minute=120))
    with pytest.raises(ValueError, match="different limits"):
        check_limits([a, b])
    with pytest.raises(ValueError, match="different limits"):
        procval.evaluate(programs.limited_call, range(3), programs.ok, configs=[a, b])


# ---------------------------------------------------------------- real workers, real server


def configs(server: LLMServer, limit: RateLimit, names: str) -> list[procval.Config]:
    return [procval.Config(n, rate_limit=limit, values={"base": server.api_base}) for n in names]


def test_two_configs_sharing_a_key_never_exceed_the_limit_together():
    with LLMServer(rate=20, burst=5) as server:
        limit = RateLimit("k", requests_per_minute=20 * 60)
        results = procval.evaluate(
            programs.limited_call,
            range(40),
            programs.ok,
            configs=configs(server, limit, "ab"),
            workers=2,
            threads=8,
        )
        counts = server.counts()
    assert counts["rate_limited"] == 0 and counts["answered"] == 80
    for name in "ab":
        assert results[name].score == 1.0
        assert results[name].limits["k"]["calls"] == 40
        assert results[name].limits["k"]["rate_limited"] == 0
    assert results["a"].limits["k"]["waits"] + results["b"].limits["k"]["waits"] > 0
    assert "rate limit 'k': 40 calls, 0 answered 429" in results.summary()


def test_a_key_limit_holds_across_4_workers_of_16_threads():
    with LLMServer(rate=30, burst=5) as server:
        limit = RateLimit("k", requests_per_minute=30 * 60)
        result = procval.evaluate(
            programs.limited_call,
            range(120),
            programs.ok,
            config=configs(server, limit, "c")[0],
            workers=4,
            threads=16,
        )
        counts = server.counts()
    assert counts["rate_limited"] == 0 and counts["answered"] == 120
    assert result.score == 1.0


def test_a_worker_killed_holding_a_permit_does_not_leak_it():
    # one call in flight at most: a leaked permit would hold every other call for ever
    with LLMServer() as server:
        limit = RateLimit("k", max_in_flight=1)
        result = procval.evaluate(
            programs.kill_holding_a_permit,
            range(30),
            programs.ok,
            config=configs(server, limit, "c")[0],
            workers=2,
            threads=4,
        )
        counts = server.counts()
    assert [(r.example, r.error.type) for r in result.errors] == [(3, "WorkerCrashed")]
    assert counts["answered"] >= 29 and result.totals.n == 30


def test_a_hung_call_times_out_without_rerunning_its_neighbours():
    hangs = lambda request: request["messages"][0]["content"] == "question 5"  # noqa: E731
    with LLMServer(latency=0.2, hang=hangs) as server:
        result = procval.evaluate(
            programs.plain_call,
            range(24),
            programs.ok,
            config=procval.Config("c", values={"base": server.api_base}),
            workers=1,
            threads=4,
            timeout=3,
        )
        counts = server.counts()
    assert [(r.example, r.error.type) for r in result.errors] == [(5, "Timeout")]
    assert counts["requests"] == 24  # each example asked once: no neighbour was rerun


def test_dspy_lm_calls_are_limited_and_a_429_retries_the_call_not_the_example():
    dspy = pytest.importorskip("dspy")
    # no requests_per_minute: the server's 429s drive the window; each is retried alone
    with LLMServer(rate=15, burst=2) as server:
        lm = dspy.LM(server.model, api_base=server.api_base, api_key="sk-test", cache=False,
                     num_retries=0)  # fmt: skip
        with dspy.context(lm=lm):
            config = procval.dspy.snapshot(rate_limit=RateLimit(server.model, max_in_flight=8))
        result = procval.evaluate(
            programs.make_two_calls(),
            [dspy.Example(question=f"q{i}").with_inputs("question") for i in range(20)],
            programs.answered,
            config=config,
            workers=1,
            threads=8,
        )
        counts = server.counts()
    assert result.errors == [] and result.score == 1.0
    assert counts["answered"] == 40  # two calls per example, none repeated
    assert counts["rate_limited"] > 0  # the server did push back...
    assert result.limits[server.model]["rate_limited"] == counts["rate_limited"]  # ...counted
    assert result.limits[server.model]["calls"] == counts["requests"]


def test_a_task_and_the_command_line_add_limits_to_every_config():
    from procval.task import Task, _with_limits

    own = procval.Config("a", rate_limit=RateLimit("k", requests_per_minute=60))
    task = Task(programs.limited_call, range(2), programs.ok, configs=[own, procval.Config("b")],
                rate_limit=RateLimit("other", max_in_flight=2))  # fmt: skip
    cli = parse_rate_limit("k:rpm=120")
    merged = _with_limits(own, (RateLimit("other", max_in_flight=2), cli))
    assert {limit.key: limit for limit in merged.rate_limits}["k"].requests_per_minute == 120
    assert task.rate_limit is not None
