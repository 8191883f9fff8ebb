"""Programs for the Ray-only tests (importable by the actors through the cluster's PYTHONPATH)."""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Any

import ray


def assigned_resources(example: Any) -> dict[str, float]:
    """The resources Ray reserved for the actor running this example."""
    return dict(ray.get_runtime_context().get_assigned_resources())


def where(example: Any) -> dict[str, Any]:
    """The process and node that ran this example, and the run marker the actor carries."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "run": os.environ.get("PROCVAL_RAY_RUN"),
    }


def gil_hang(example: dict[str, Any]) -> int:
    """On q == 3, a regex whose backtracking runs for ages in C, holding the GIL throughout."""
    if example["q"] == 3:
        re.match(r"(a+)+$", "a" * 64 + "b")
    return example["q"] * 2


def sleepy(example: Any) -> int:
    """Sleeps a minute: the run is interrupted long before it ends."""
    time.sleep(60)
    return 0


def procval_file(example: Any) -> str:
    """Where the actor imported procval from (it must be the checkout under test)."""
    import procval

    return procval.__file__


def slow_double(example: dict[str, Any]) -> int:
    """A third of a second per example (long enough to act on a node mid-run), then q * 2."""
    time.sleep(0.3)
    return example["q"] * 2


def slow_setup() -> None:
    """A Config.setup that takes 4 seconds (loading a model, say)."""
    time.sleep(4)


def timed_setup() -> None:
    """A Config.setup that records when it began (in os.environ)."""
    os.environ["PROCVAL_TEST_SETUP_BEGAN"] = repr(time.time())


def setup_time(example: Any) -> tuple[int, float]:
    """``(pid, when its setup began)`` of the actor running this example."""
    return os.getpid(), float(os.environ["PROCVAL_TEST_SETUP_BEGAN"])


def where_too(example: Any) -> dict[str, Any]:
    """As :func:`where`: another program, so another snapshot."""
    return where(example)
