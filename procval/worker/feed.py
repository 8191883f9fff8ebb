"""The worker's feed: examples waiting for a runner, and results waiting for a shard call.

The shard call (:func:`procval.worker.runtime.run_shard`) puts a shard's examples in and collects
whatever has finished; the runners (:mod:`procval.worker.runners`: threads, or tasks on an event
loop) take examples out one at a time and hand their results back.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from procval.wire import ExampleResult, WorkItem


class Feed:
    """Examples waiting for a thread (or an async task), and results waiting for a shard call.

    It outlives shards, so that threads never wait for the slowest example of a shard: each
    thread takes the next example as soon as it is free, whichever shard it came in.
    """

    def __init__(self) -> None:
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # runners wait here for examples
        self._progress = threading.Condition(lock)  # the shard call waits here for results
        self._pending: deque[WorkItem] = deque()
        self._running = 0
        self._done: list[ExampleResult] = []

    def put(self, items: list[WorkItem]) -> None:
        """Hand examples to the runners."""
        with self._work:
            self._pending.extend(items)
            self._work.notify(len(items))

    def take(self) -> WorkItem:
        """The next example, once there is one (a runner thread calls this)."""
        with self._work:
            while not self._pending:
                self._work.wait()
            return self._started()

    def take_nowait(self) -> WorkItem | None:
        """The next example, or ``None`` (the async dispatcher calls this)."""
        with self._work:
            return self._started() if self._pending else None

    def _started(self) -> WorkItem:
        item = self._pending.popleft()
        self._running += 1
        if not self._pending:
            self._progress.notify()
        return item

    def finish(self, result: ExampleResult) -> None:
        """Record a finished example's result."""
        with self._progress:
            self._done.append(result)
            self._running -= 1
            self._progress.notify()

    def collect(self, *, drain: bool, late: Callable[[], int] | None = None) -> list[ExampleResult]:
        """The results so far, once no example waits (and, with ``drain``, none runs).

        Args:
            drain: wait for the running examples too.
            late: how many of the running examples are past the run's timeout; a drain does
                not wait for those (the parent gives them their ``Timeout`` rows), so that the
                others' results come back. Checked every 50 ms.
        """
        with self._progress:
            while self._pending or (drain and self._running > (late() if late else 0)):
                self._progress.wait(None if late is None else 0.05)
            done, self._done = self._done, []
            return done
