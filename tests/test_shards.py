"""ShardSizer: the sizes it picks from given timings (no clocks, no processes)."""

from __future__ import annotations

import pytest

from procval.run.shards import MAX_SIZE, MIN_ROUNDS, TARGET, ShardSizer


def test_first_shards_fill_the_free_threads_until_a_timing_comes_back():
    assert ShardSizer(1).next_size(remaining=None, workers=2) == 2
    assert ShardSizer(8).next_size(remaining=None, workers=2) == 8
    # the shard queued behind a full first one: one example, so its call returns (with the
    # first results) as soon as a thread frees, not after a whole round
    assert ShardSizer(8).next_size(remaining=None, workers=2, running=8) == 1
    assert ShardSizer(8).next_size(remaining=None, workers=2, running=3) == 5


def test_trivial_examples_travel_in_large_shards():
    sizer = ShardSizer(1)
    sizer.observe(100, 100 * 5e-6)
    assert sizer.next_size(remaining=None, workers=2) == MAX_SIZE


def test_slow_examples_travel_alone():
    sizer = ShardSizer(1)
    sizer.observe(2, 10.0)
    assert sizer.next_size(remaining=None, workers=2) == 1


def test_cpu_bound_shards_hold_about_target_seconds():
    sizer = ShardSizer(1)
    sizer.observe(10, 10 * 0.02)
    assert sizer.next_size(remaining=None, workers=2) == pytest.approx(TARGET / 0.02, abs=1)


def test_with_threads_a_shard_is_whole_rounds_of_several_rounds():
    # LLM-like calls of 1 s on 8 threads: by seconds alone a shard would hold 4 examples, fewer
    # than the threads; it must hold MIN_ROUNDS full rounds instead
    sizer = ShardSizer(8)
    sizer.observe(16, 16 * 1.0)
    size = sizer.next_size(remaining=None, workers=2)
    assert size == MIN_ROUNDS * 8


def test_latency_is_busy_seconds_per_example_whatever_the_threads():
    # 3 examples that kept a thread busy 10 ms each: a latency of 10 ms on 1 thread or on 8,
    # so 8 threads get shards 8 times larger
    one, eight = ShardSizer(1), ShardSizer(8)
    one.observe(3, 0.03)
    eight.observe(3, 0.03)
    assert one.next_size(remaining=None, workers=1) == pytest.approx(TARGET / 0.01, abs=1)
    assert eight.next_size(remaining=None, workers=1) == 8 * one.next_size(
        remaining=None, workers=1
    )


def test_shards_shrink_near_the_end():
    sizer = ShardSizer(1)
    sizer.observe(100, 100 * 1e-4)
    sizes = [sizer.next_size(remaining=r, workers=2) for r in (10_000, 400, 40, 8, 1)]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[-2:] == [1, 1]
    assert sizes[1] <= 400 / 8


def test_near_the_end_threads_get_whole_rounds_then_only_their_free_threads():
    sizer = ShardSizer(32)
    sizer.observe(64, 64 * 0.05)
    assert sizer.next_size(remaining=1000, workers=2) == 128  # a part of 125: whole rounds
    # the end: a part of what is left, and never more than the worker's free threads start
    assert sizer.next_size(remaining=100, workers=2) == 12
    assert sizer.next_size(remaining=100, workers=2, running=28) == 4
    assert sizer.next_size(remaining=100, workers=2, running=32) == 1
    assert sizer.next_size(remaining=3, workers=2) == 1


def test_observations_are_smoothed():
    sizer = ShardSizer(1)
    sizer.observe(10, 10 * 0.01)
    sizer.observe(10, 10 * 0.1)  # one shard 10x slower moves the size, without jumping to 5
    assert TARGET / 0.1 < sizer.next_size(remaining=None, workers=2) < TARGET / 0.01


def test_empty_and_zero_time_observations_are_harmless():
    sizer = ShardSizer(1)
    sizer.observe(0, 1.0)
    sizer.observe(5, 0.0)
    assert 1 <= sizer.next_size(remaining=3, workers=4) <= MAX_SIZE
