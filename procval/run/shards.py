"""How many examples to put in the next shard.

A worker's threads take examples from its feed as soon as they are free, whichever shard the
examples came in (``_worker.py``); a shard's call returns once its last example has started, and
the scheduler keeps a second shard queued behind it. So a shard should be:

- long enough that the per-shard cost (pickling, IPC, the scheduler's bookkeeping: about a
  millisecond) is invisible next to the work. Like joblib's auto-batching, aim for ``TARGET``
  seconds of work per shard (up to ``MAX_SIZE`` examples for trivial programs);
- with threads, at least ``MIN_ROUNDS`` rounds of ``threads`` examples, in whole rounds, so that
  the queued shard arrives well before the running one runs dry (a shard sized by seconds alone
  would hold a few slow LLM calls, fewer than the threads);
- before any timing is known, with threads, just enough to fill the worker's free threads (then
  one example at a time), so that the first results come back as soon as the first examples
  finish: a shard's call returns once its last example has started, so a first shard of two
  rounds would hold every result back until a whole round had finished;
- small near the end of a dataset of known length, so that no worker idles while another one
  finishes a long last shard: at most a ``1 / (SHARE * workers)`` part of what is left (guided
  self-scheduling; what is left includes the shards in flight, about two per worker). With
  threads, in whole rounds while that part is a round or more; below, no more than the
  receiving worker's free threads start at once (at least one): an example queued behind busy
  threads would start late while another worker's threads idle. Under a rate limit, where an
  example's time is mostly its wait for permits, two such examples queued in one worker held
  the end of a 300-example run back by a whole LM call.

The timing comes from the workers: each answer carries its examples' durations, from which the
sizer keeps a moving average of an example's *latency*: how long it keeps one thread busy.
``docs/performance.md`` has the measurements behind these constants, and
``benchmarks/shard_sim.py`` replays the policy in a model of the scheduler.
"""

from __future__ import annotations

TARGET = 0.5  # seconds of work per shard
MIN_ROUNDS = 2  # with threads: at least this many rounds of `threads` examples per shard
SHARE = 4  # near the end: at most remaining / (SHARE * workers) examples per shard
MAX_SIZE = 4096
_SMOOTHING = 0.3  # weight of the newest observation in the moving average


class ShardSizer:
    """Adaptive shard sizes for one config, from the timings its workers report.

    Args:
        threads: examples a worker of this config runs at once.
    """

    def __init__(self, threads: int) -> None:
        self._threads = max(1, threads)
        self._latency: float | None = None  # seconds one example keeps one thread busy

    def observe(self, examples: int, busy: float) -> None:
        """A worker returned ``examples`` results that kept its threads busy ``busy`` seconds.

        ``busy`` is the sum of the examples' own durations (program, metric and retries).
        """
        if examples <= 0:
            return
        sample = max(busy, 1e-7) / examples
        if self._latency is None:
            self._latency = sample
        else:  # exponential moving average: follow drifts, damp noise
            self._latency += _SMOOTHING * (sample - self._latency)

    def next_size(self, *, remaining: int | None, workers: int, running: int = 0) -> int:
        """Examples for the next shard.

        Args:
            remaining: the config's examples without a result yet, those in running shards
                included; ``None`` when unknown (a generator).
            workers: how many workers the config has.
            running: examples the receiving worker has without a result yet.

        Returns:
            A size of at least 1.
        """
        threads = self._threads
        if self._latency is None:
            # fill the free threads, so that the first results come back soon (one thread: the
            # worker runs its shard inline and answers when all is done, so two examples)
            size = max(1, threads - running) if threads > 1 else 2
        else:
            size = int(TARGET * threads / self._latency)
            if threads > 1:
                size = _round_up(max(size, MIN_ROUNDS * threads), threads)
        if remaining is not None:
            share = max(1, remaining // (SHARE * max(1, workers)))
            if share >= threads:
                size = min(size, _round_up(share, threads))
            else:  # the end: only what the worker's free threads start at once
                size = min(size, share, max(1, threads - running))
        return max(1, min(size, MAX_SIZE))


def _round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple
