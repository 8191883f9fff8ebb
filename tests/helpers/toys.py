"""Programs and metrics for the tests: importable, so worker processes can load them."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from typing import Any

import procval
from helpers import toyframework

POISON: dict[str, Any] = {"value": None}
_attempts: dict[Any, int] = {}
_lock = threading.Lock()
_in_flight = 0
_max_in_flight = 0


def program(example: dict[str, Any]) -> int:
    """Ask the toy framework's model."""
    return toyframework.answer(example["q"])


def metric(example: dict[str, Any], prediction: Any, trace: Any = None) -> bool:
    return prediction == example["q"] * 2


def dataset(n: int) -> list[dict[str, Any]]:
    return [{"id": f"ex{i}", "q": i} for i in range(n)]


def configure_model(model: str):
    return lambda: toyframework.configure(model=model)


def poisoning_program(example: dict[str, Any]) -> dict[str, Any]:
    """Config 'evil' poisons its own process's globals; everyone reports what they see."""
    seen = {"model": toyframework.settings()["model"], "poison": POISON["value"]}
    if procval.current_config().name == "evil":
        POISON["value"] = "evil was here"
        toyframework.configure(model="evil")
        os.environ["TOY_POISON"] = "1"
    seen["env"] = os.environ.get("TOY_POISON")
    return seen


def env_program(example: Any) -> dict[str, Any]:
    return {"key": os.environ.get("TOY_API_KEY"), "pid": os.getpid()}


def random_program(example: Any) -> tuple[float, float]:
    return (random.random(), procval.rng().random())


def rng_program_threads(example: Any) -> float:
    time.sleep(0.001)
    return procval.rng().random()


def flaky_program(example: Any) -> str:
    """Fails the first two attempts at each example, then succeeds."""
    key = example["id"]
    with _lock:
        _attempts[key] = _attempts.get(key, 0) + 1
        attempt = _attempts[key]
    if attempt <= 2:
        raise ConnectionError(f"transient failure #{attempt}")
    return "ok"


def fatal_program(example: Any) -> str:
    raise procval.NoRetry("bad input: retrying cannot help")


def failing_program(example: Any) -> str:
    raise ValueError(f"cannot handle {example['id']}")


def sometimes_failing(example: dict[str, Any]) -> int:
    if example["q"] % 3 == 0:
        raise RuntimeError(f"boom on {example['q']}")
    return example["q"] * 2


def crashy_program(example: dict[str, Any]) -> int:
    """Segfaults on q == 5, exits the process on q == 11, else doubles."""
    if example["q"] == 5:
        import ctypes

        ctypes.string_at(1)  # SIGSEGV
    if example["q"] == 11:
        os._exit(7)
    return example["q"] * 2


def hanging_program(example: dict[str, Any]) -> int:
    if example["q"] == 3:
        time.sleep(3600)
    time.sleep(0.05)
    return example["q"] * 2


def bad_metric(example: Any, prediction: Any) -> str:
    return "yes"


def raising_metric(example: Any, prediction: Any) -> bool:
    raise KeyError("missing field")


def whoami(example: Any) -> dict[str, Any]:
    config = procval.current_config()
    return {"name": config.name, "values": dict(config.values), "pid": os.getpid()}


async def async_program(example: dict[str, Any]) -> int:
    global _in_flight, _max_in_flight
    _in_flight += 1
    _max_in_flight = max(_max_in_flight, _in_flight)
    await asyncio.sleep(0.05)
    _in_flight -= 1
    return _max_in_flight


def thread_concurrency(example: Any) -> int:
    global _in_flight, _max_in_flight
    with _lock:
        _in_flight += 1
        _max_in_flight = max(_max_in_flight, _in_flight)
    time.sleep(0.05)
    with _lock:
        _in_flight -= 1
    return _max_in_flight


def any_score(example: Any, prediction: Any) -> float:
    return 1.0


def failing_setup() -> None:
    raise RuntimeError("cannot reach the model server")


def exiting_setup() -> None:
    os._exit(4)


def numpy_program(example: Any) -> float:
    import numpy

    return float(numpy.random.random())


def fixable_program(example: dict[str, Any]) -> int:
    """Fails on odd q while the file named by TOY_BROKEN exists (the "bug" is then fixed)."""
    flag = os.environ.get("TOY_BROKEN", "")
    if example["q"] % 2 and flag and os.path.exists(flag):
        raise RuntimeError(f"bug on {example['q']}")
    return example["q"] * 2


def counting_program(example: dict[str, Any]) -> int:
    """Appends each call to the file named by TOY_CALLS, so tests can count recomputations."""
    with open(os.environ["TOY_CALLS"], "a") as f:
        f.write(f"{example['id']}\n")
    return example["q"] * 2


async def async_rng_program(example: Any) -> float:
    first = procval.rng().random()
    await asyncio.sleep(0.01)  # other examples' coroutines run here
    return first + procval.rng().random()


_finished = 0
STRAGGLER_PATIENCE = 20.0  # seconds the straggler waits for the others at most


def straggler_program(example: int) -> int:
    """Example 0 waits until every other example of the (one-worker) run has finished.

    It returns how many it saw finish. With a barrier between shards it could only see the
    examples of its own shard, and would give up after ``STRAGGLER_PATIENCE`` seconds.
    """
    global _finished
    if example == 0:
        deadline = time.monotonic() + STRAGGLER_PATIENCE
        while _finished < STRAGGLER_OTHERS and time.monotonic() < deadline:
            time.sleep(0.01)
        return _finished
    time.sleep(0.01)
    with _lock:
        _finished += 1
    return 0


async def async_straggler_program(example: int) -> int:
    """:func:`straggler_program` as a coroutine."""
    global _finished
    if example == 0:
        deadline = time.monotonic() + STRAGGLER_PATIENCE
        while _finished < STRAGGLER_OTHERS and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return _finished
    await asyncio.sleep(0.01)
    _finished += 1
    return 0


STRAGGLER_OTHERS = 59  # examples 1..59


def interrupting_program(example: int) -> int:
    """Raises KeyboardInterrupt (a BaseException) on example 3."""
    if example == 3:
        raise KeyboardInterrupt("the program's own")
    return example


def crash_behind_a_straggler(example: int) -> int:
    """Example 0 runs for 3 s; example 40 ends its process; the others take 10 ms."""
    if example == 0:
        time.sleep(3)
    elif example == 40:
        os._exit(9)
    else:
        time.sleep(0.01)
    return example


STATE: list[int] = []  # module state that a process changes as it runs


def through(module: Any) -> Any:
    """A program closing over ``module`` (as a factory that imports one does)."""

    def closed(example: Any) -> Any:
        return module.program(example)

    return closed
