"""The worker's feed (``procval.worker.feed.Feed``): threads take examples across shards.

In-process tests of the hand-over between a shard call and the runner threads; the behaviour
with real worker processes is in ``backend_suite.py``.
"""

from __future__ import annotations

import threading
import time

from procval.worker.feed import Feed


def result(seq: int) -> tuple[int, None, float, None, int, float]:
    return (seq, None, 1.0, None, 1, 0.0)


def start(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def test_a_shard_call_returns_once_its_examples_have_started_not_finished():
    feed, release = Feed(), threading.Event()

    def runner() -> None:
        item = feed.take()
        release.wait(10)
        feed.finish(result(item[0]))

    runners = [start(runner) for _ in range(2)]
    feed.put([(0, "a", None), (1, "b", None)])
    assert feed.collect(drain=False) == []  # both started, neither finished: nothing to wait for
    release.set()
    assert sorted(r[0] for r in feed.collect(drain=True)) == [0, 1]
    for thread in runners:
        thread.join(10)


def test_a_straggler_comes_back_with_a_later_shard():
    feed, slow = Feed(), threading.Event()

    def runner(first_is_slow: bool) -> None:
        item = feed.take()
        if first_is_slow:
            slow.wait(10)
        feed.finish(result(item[0]))
        while True:
            item = feed.take()
            feed.finish(result(item[0]))

    start(runner, True)
    feed.put([(0, "slow", None)])
    assert feed.collect(drain=False) == []
    start(runner, False)  # a second thread: it runs the next shard while example 0 still runs
    feed.put([(1, "b", None), (2, "c", None)])
    deadline = time.monotonic() + 10
    done: list[int] = []
    while len(done) < 2 and time.monotonic() < deadline:
        done += [r[0] for r in feed.collect(drain=False)]
        time.sleep(0.01)
    assert sorted(done) == [1, 2]  # the later shard finished first
    slow.set()
    assert [r[0] for r in feed.collect(drain=True)] == [0]


def test_take_nowait_is_none_when_nothing_waits():
    feed = Feed()
    assert feed.take_nowait() is None
    feed.put([(5, "x", None)])
    assert feed.take_nowait() == (5, "x", None)
    assert feed.take_nowait() is None
    feed.finish(result(5))
    assert feed.collect(drain=True) == [result(5)]
