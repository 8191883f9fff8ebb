"""What drains the worker's feed: ``threads`` threads, or one asyncio event loop.

Each runner takes the next example from the :class:`~procval.worker.feed.Feed` as soon as it is
free, runs it with the :class:`~procval.worker.execute.Runner` in its own slot of the slot table,
and hands the result back to the feed. Threads block on the feed; the event loop is woken by the
shard call (:meth:`EventLoop.wake`) and starts one task per free slot.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from procval.wire import WorkItem

if TYPE_CHECKING:
    import asyncio  # imported in the worker only for an async program

    from procval.worker.execute import Runner
    from procval.worker.feed import Feed


def start_threads(runner: Runner, feed: Feed, threads: int) -> None:
    """Start ``threads`` daemon threads, slots ``0..threads-1``, each draining ``feed`` forever."""
    for slot in range(threads):
        threading.Thread(
            target=_thread_main, args=(runner, feed, slot), name=f"procval-{slot}", daemon=True
        ).start()


def _thread_main(runner: Runner, feed: Feed, slot: int) -> None:
    while True:
        item = feed.take()
        feed.finish(runner.run(item, slot))


class EventLoop:
    """An event loop in a daemon thread that runs up to ``slots`` examples of the feed at once."""

    def __init__(self, runner: Runner, feed: Feed, slots: int) -> None:
        """Start the loop's thread.

        Args:
            runner: runs each example (its program is a coroutine function).
            feed: where the examples wait and the results go.
            slots: how many examples run at once (``Config``'s ``threads``), one slot each.
        """
        import asyncio

        self._runner = runner
        self._feed = feed
        self._loop = asyncio.new_event_loop()
        self._free_slots = list(range(slots))  # slots of no running task (touched on the loop)
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only a weak reference
        threading.Thread(target=self._loop.run_forever, name="procval-loop", daemon=True).start()

    def wake(self) -> None:
        """Tell the loop that examples joined the feed (any thread may call this)."""
        self._loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        """Start a task for each waiting example while a slot is free (on the loop)."""
        import asyncio

        while self._free_slots:
            item = self._feed.take_nowait()
            if item is None:
                return
            slot = self._free_slots.pop()
            task = asyncio.ensure_future(self._run(item, slot), loop=self._loop)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, item: WorkItem, slot: int) -> None:
        result = await self._runner.run_async(item, slot)
        self._free_slots.append(slot)
        self._feed.finish(result)
        self._dispatch()
