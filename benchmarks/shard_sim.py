"""A discrete-event model of the scheduler's loop, for tuning ``procval/run/shards.py`` in seconds.

Usage::

    python benchmarks/shard_sim.py                       # the sizer in procval/run/shards.py
    python benchmarks/shard_sim.py old_shards.py         # another version of the module
    python benchmarks/shard_sim.py --barrier             # workers as they were before: the
                                                         # next shard waits for the slowest
                                                         # example of the current one

The model follows ``procval/run/scheduler.py`` and ``procval/worker/runtime.py``: each worker
keeps ``PIPELINE`` shards
queued; its threads take the next example as soon as they are free, and a shard's call returns
once its last example has started (with ``--barrier``: once its slowest example is done, and the
threads of the next shard start together). After each returned shard the sizer observes
``(size, busy seconds)`` and the scheduler refills every worker. Example latencies are uniform,
uniform with noise, or lognormal (like LLM calls). Each case prints the makespan against a
*streaming* lower bound: the same kind of latencies list-scheduled on every thread with no shards
at all.

It leaves out what real runs add on top (process start-up, the parent's per-row work), which
``run.py`` measures; it is deterministic, so it isolates what the sizing policy itself costs.
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import math
import os
import random
import statistics
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE = 2  # shards queued per worker, as in procval/run/scheduler.py
SHARD_COST = 0.002  # seconds of fixed cost per shard (IPC, pickling, bookkeeping)
EXAMPLE_COST = 20e-6  # seconds of procval's own work per example

CASES: list[tuple[str, dict[str, Any]]] = [
    ("CPU 120 x 20 ms", {"n": 120, "latency": 0.02}),
    ("CPU 120 x 20 ms, 2nd worker +0.3 s", {"n": 120, "latency": 0.02, "delays": (0, 0.3)}),
    ("CPU 120 x 20 ms +-50%", {"n": 120, "latency": 0.02, "noise": 0.5}),
    ("CPU 1,000 x 1 ms", {"n": 1000, "latency": 0.001}),
    ("CPU 40 x 2 s +-50%", {"n": 40, "latency": 2.0, "noise": 0.5}),
    ("trivial 20,000", {"n": 20_000, "latency": 5e-6}),
    ("trivial 300,000", {"n": 300_000, "latency": 5e-6}),
    ("I/O 1,200 x 50 ms, 32 threads", {"n": 1200, "latency": 0.05, "threads": 32}),
    (
        "I/O 1,200 x 50 ms lognormal, 32 thr",
        {"n": 1200, "latency": 0.05, "threads": 32, "noise": -1},
    ),
    ("LLM 500 x 1 s, 8 threads", {"n": 500, "latency": 1.0, "threads": 8}),
    ("LLM 2,000 x 1 s lognormal, 16 thr", {"n": 2000, "latency": 1.0, "threads": 16, "noise": -1}),
    ("LLM 300 x 3 s lognormal, 8 threads", {"n": 300, "latency": 3.0, "threads": 8, "noise": -1}),
]


def draw(rnd: random.Random, latency: float, noise: float) -> float:
    """One example's latency: ``noise`` -1 means lognormal (sigma 0.8, mean ``latency``)."""
    if noise < 0:
        return latency * rnd.lognormvariate(0, 0.8) / math.exp(0.32)
    return latency * (1 + noise * (2 * rnd.random() - 1))


def simulate(
    sizer_class: Callable[[int], Any],
    *,
    n: int,
    latency: float,
    threads: int = 1,
    workers: int = 2,
    noise: float = 0.0,
    delays: tuple[float, ...] = (0.0, 0.0),
    barrier: bool = True,
    seed: int = 0,
) -> tuple[float, int]:
    """The makespan of one run, and how many shards it used."""
    rnd = random.Random(seed)
    sizer = sizer_class(threads)
    # when each thread of each worker is next free; shards run in the order they were queued,
    # so a shard's end is known when it is queued
    free = [[delays[w]] * threads for w in range(workers)]
    in_flight = [0] * workers
    ends: list[list[float]] = [[] for _ in range(workers)]  # a heap per worker: unfinished ends
    events: list[tuple[float, int, int, float]] = []  # (return, worker, size, busy seconds)
    unsent, finished, shards = n, 0, 0

    def submit(w: int, now: float) -> bool:
        nonlocal unsent, shards
        if unsent <= 0:
            return False
        while ends[w] and ends[w][0] <= now:  # the examples done by now
            heapq.heappop(ends[w])
        running = len(ends[w])
        size = min(
            unsent, sizer.next_size(remaining=n - finished, workers=workers, running=running)
        )
        unsent -= size
        shards += 1
        if barrier:  # every thread starts the shard together, once the previous one is done
            start = max([now, *free[w]])
            heap = [start] * threads
        else:  # each thread picks up the shard's examples as soon as it is free
            heap = [max(now, t) for t in free[w]]
            start = min(heap)
        heapq.heapify(heap)
        busy = last_start = 0.0
        for _ in range(size):
            last_start = heapq.heappop(heap)
            took = draw(rnd, latency, noise) + EXAMPLE_COST
            busy += took
            heapq.heappush(heap, last_start + took)
            heapq.heappush(ends[w], last_start + took)
        end = max(heap) + SHARD_COST
        free[w] = [end] * threads if barrier else [t + SHARD_COST for t in heap]
        in_flight[w] += 1
        answered = end if barrier else max(start, last_start) + SHARD_COST
        heapq.heappush(events, (answered, w, size, busy))
        return True

    for w in range(workers):
        while in_flight[w] < PIPELINE and submit(w, 0.0):
            pass
    now = 0.0
    while events:
        now, w, size, busy = heapq.heappop(events)
        in_flight[w] -= 1
        finished += size
        sizer.observe(size, busy)
        for v in range(workers):
            while in_flight[v] < PIPELINE and submit(v, now):
                pass
    # the last results arrive when every thread is done (a drain shard fetches stragglers)
    return max([now, *(t for threads_free in free for t in threads_free)]), shards


def streaming_bound(
    *,
    n: int,
    latency: float,
    threads: int = 1,
    workers: int = 2,
    noise: float = 0.0,
    delays: tuple[float, ...] = (0.0, 0.0),
    seed: int = 0,
    **_: Any,
) -> float:
    """The same kind of latencies, list-scheduled on all threads with no shards."""
    rnd = random.Random(seed + 1)
    heap = [delays[w] for w in range(workers) for _ in range(threads)]
    heapq.heapify(heap)
    for _ in range(n):
        heapq.heappush(heap, heapq.heappop(heap) + draw(rnd, latency, noise) + EXAMPLE_COST)
    return max(heap)


def load_sizer(path: str | None) -> ModuleType:
    """``procval.run.shards``, or the module at ``path``."""
    if path is None:
        sys.path.insert(0, os.path.dirname(HERE))
        import procval.run.shards

        return procval.run.shards
    spec = importlib.util.spec_from_file_location("shards_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", nargs="?", help="a shards.py to test (default: procval's)")
    parser.add_argument("--barrier", action="store_true", help="model a barrier per shard")
    parser.add_argument("--seeds", type=int, default=3, help="runs per case (median shown)")
    args = parser.parse_args(argv)
    module = load_sizer(args.module)
    print(f"sizer: {module.__file__}; {'barrier' if args.barrier else 'no barrier'} per shard")
    print(f"  {'case':<38} {'makespan s':>10} {'bound s':>8} {'over':>7} {'shards':>7}")
    overs = []
    for name, case in CASES:
        runs = [
            simulate(module.ShardSizer, barrier=args.barrier, seed=s, **case)
            for s in range(args.seeds)
        ]
        makespan = statistics.median(r[0] for r in runs)
        shards = statistics.median(r[1] for r in runs)
        bound = statistics.median(streaming_bound(seed=s, **case) for s in range(args.seeds))
        overs.append(makespan / bound - 1)
        print(
            f"  {name:<38} {makespan:>10.2f} {bound:>8.2f} {makespan / bound - 1:>+7.1%} "
            f"{shards:>7.0f}"
        )
    print(f"  mean over the bound: {statistics.mean(overs):+.1%}, worst: {max(overs):+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
