"""A tiny "framework" that keeps its settings like dspy.settings: process-global configuration
plus per-thread state, and the stale-thread bug the original DSPy report hit.

Each thread caches the global settings the first time it reads them; `configure` changes the
global copy but a thread that already cached keeps its stale copy. Reused pool threads therefore
keep answering with the model they first saw.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any

_global: dict[str, Any] = {"model": None}
_local = threading.local()


def configure(**kwargs: Any) -> None:
    _global.update(kwargs)


def settings() -> dict[str, Any]:
    if getattr(_local, "cache", None) is None:
        _local.cache = dict(_global)  # the bug: cached forever in this thread
    overrides = getattr(_local, "overrides", {})
    return {**_local.cache, **overrides}


@contextmanager
def context(**kwargs: Any):
    old = getattr(_local, "overrides", {})
    _local.overrides = {**old, **kwargs}
    try:
        yield
    finally:
        _local.overrides = old


def answer(question: int) -> int:
    """The "LM": model 'right' doubles, model 'wrong' adds one, anything else returns -1."""
    model = settings()["model"]
    if model == "right":
        return question * 2
    if model == "wrong":
        return question + 1
    return -1
