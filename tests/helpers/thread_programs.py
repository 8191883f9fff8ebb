"""Programs that run part of their work in threads they start (tests/test_threads_follow.py)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import procval

_pool: ThreadPoolExecutor | None = None  # kept across examples, as a program's own pool is
_pool_lock = threading.Lock()
_go = threading.Event()
_done = threading.Event()


def _spend(model: str, prompt: int, completion: int) -> None:
    procval.record_usage(model, prompt_tokens=prompt, completion_tokens=completion)


def pooled(example: int) -> int:
    """3 pool tasks spend ``example`` prompt tokens each; a thread spends ``example`` completion
    tokens and logs. The pool is created by whichever example comes first and shared after."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(4)
    for future in [_pool.submit(_spend, "m", example, 0) for _ in range(3)]:
        future.result()

    def in_thread() -> None:
        _spend("m", 0, example)
        logging.getLogger("threads.test").warning("from a thread of example %s", example)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    return example


def outliving(example: int) -> bool:
    """Example 0 starts a thread that spends once example 1 lets it, after example 0 ended."""
    if example == 0:

        def later() -> None:
            _go.wait(30)
            _spend("late", 1, 1)
            logging.getLogger("threads.test").warning("after example 0 ended")
            _done.set()

        threading.Thread(target=later, daemon=True).start()
        _spend("early", 1, 0)
        return True
    _go.set()
    return _done.wait(30)
