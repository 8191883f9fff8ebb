"""The example's recording in the threads its program starts, in a worker process.

A ``ContextVar`` does not follow a new thread, nor a task given to a thread pool: the LM calls,
``procval.record_usage`` calls, callback events and logs of a program that runs part of its
work in its own threads would count in no example (its row's usage and the config's totals
would miss them). :func:`follow`, called once as the worker starts, makes both carry the
example that started them:

- ``threading.Thread.start`` inside an example: the thread records into that example;
- ``concurrent.futures.ThreadPoolExecutor.submit`` inside an example: the task records into
  the example that submitted it, whichever thread of the pool runs it and whoever created the
  pool (a pool kept across examples attributes each task to its own example);
  ``loop.run_in_executor`` goes through it too (asyncio's tasks and ``asyncio.to_thread``
  already copy the context).

A thread that outlives its example records nothing more once the example has ended
(:attr:`procval.worker.record.Recording.closed`): what it does later belongs to no example, and
its logs carry no example id. Only worker processes are patched; the caller's process never is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from procval.worker import record

__all__ = ["follow"]

_T = TypeVar("_T")
_MARK = "_procval_follows"


def follow() -> None:
    """Patch ``Thread.start`` and ``ThreadPoolExecutor.submit`` (idempotent; workers only)."""
    start = threading.Thread.start
    if getattr(start, _MARK, False):
        return
    submit = ThreadPoolExecutor.submit

    def start_in_example(self: threading.Thread) -> None:
        recording = record.current()
        if recording is not None:
            self.run = partial(_run, self, recording, self.run)  # type: ignore[method-assign]
        start(self)

    def submit_in_example(
        self: ThreadPoolExecutor, fn: Callable[..., _T], /, *args: Any, **kwargs: Any
    ) -> Future[_T]:
        recording = record.current()
        if recording is None:
            return submit(self, fn, *args, **kwargs)
        return submit(self, record.within, recording, fn, *args, **kwargs)

    for patched, original in ((start_in_example, start), (submit_in_example, submit)):
        patched.__doc__ = original.__doc__
        setattr(patched, _MARK, True)
    threading.Thread.start = start_in_example  # type: ignore[method-assign]
    ThreadPoolExecutor.submit = submit_in_example  # type: ignore[method-assign, assignment]


def _run(thread: threading.Thread, recording: record.Recording, run: Callable[[], None]) -> None:
    try:
        record.within(recording, run)
    finally:
        thread.__dict__.pop("run", None)  # the thread no longer refers to itself
