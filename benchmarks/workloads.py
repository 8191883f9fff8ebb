"""Programs, metrics and datasets for the benchmarks.

They live in an importable module (not in ``run.py``'s ``__main__``) so that every engine under
test -- procval's workers, joblib's loky workers, a spawn ``ProcessPoolExecutor`` -- imports them
by reference instead of pickling code, and all of them run exactly the same functions.
An example carries its own amount of work (``spins`` for CPU-bound, ``sleep`` for I/O-bound),
calibrated once in the parent, so the workers need no calibration of their own.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from typing import Any


def spin(n: int) -> int:
    """Pure-Python CPU work that holds the GIL: ``n`` rounds of integer arithmetic."""
    acc = 0
    for i in range(n):
        acc = (acc * 31 + i) % 1_000_003
    return acc


def calibrate(seconds: float, *, probe: int = 200_000) -> int:
    """How many ``spin`` rounds take ``seconds`` of CPU on this machine (best of 5 probes).

    CPU time, not wall time: other processes on a shared machine slow the wall clock but not
    the work, and an example should hold the same work whatever the load at calibration.
    """
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        spin(probe)
        best = min(best, time.process_time() - start)
    return max(1, int(probe * seconds / max(best, 1e-9)))


# ---------------------------------------------------------------- programs and metrics


def cpu_program(example: dict[str, Any]) -> int:
    """A CPU-bound program: ``example["spins"]`` rounds of pure Python."""
    return spin(example["spins"])


def io_program(example: dict[str, Any]) -> int:
    """An I/O-bound program (an LLM call, say): sleeps ``example["sleep"]`` seconds."""
    time.sleep(example["sleep"])
    return example["id"]


def llm_program(example: dict[str, Any]) -> int:
    """An LLM-like call: sleeps a lognormal latency (sigma 0.8) of mean ``example["sleep"]``.

    The latency is drawn from the example's id, so every engine sees the same latencies.
    """
    draw = random.Random(example["id"]).lognormvariate(0.0, 0.8)
    time.sleep(example["sleep"] * draw / math.exp(0.32))
    return example["id"]


def trivial_program(example: dict[str, Any]) -> int:
    """Next to no work: the benchmark measures the engine's overhead alone."""
    return example["id"] * 2


def metric(example: dict[str, Any], prediction: Any) -> bool:
    """A cheap metric, run after the program by every engine."""
    return prediction is not None


def named_metric(example: dict[str, Any], prediction: Any) -> dict[str, float]:
    """As cheap, with two named scores (the cost of named scores per row)."""
    return {"em": float(prediction is not None), "f1": 0.5}


def both(program: Any, example: dict[str, Any]) -> float:
    """Program then metric, as one task, for the engines that run plain functions."""
    return float(metric(example, program(example)))


def cpu_task(example: dict[str, Any]) -> float:
    """``both(cpu_program, example)`` as a module-level function (picklable by reference)."""
    return both(cpu_program, example)


def io_task(example: dict[str, Any]) -> float:
    """``both(io_program, example)``."""
    return both(io_program, example)


def llm_task(example: dict[str, Any]) -> float:
    """``both(llm_program, example)``."""
    return both(llm_program, example)


def trivial_task(example: dict[str, Any]) -> float:
    """``both(trivial_program, example)``."""
    return both(trivial_program, example)


# ---------------------------------------------------------------- datasets


def cpu_examples(n: int, spins: int) -> list[dict[str, Any]]:
    """``n`` CPU-bound examples of ``spins`` rounds each."""
    return [{"id": i, "spins": spins} for i in range(n)]


def io_examples(n: int, sleep: float) -> list[dict[str, Any]]:
    """``n`` I/O-bound examples that sleep ``sleep`` seconds each."""
    return [{"id": i, "sleep": sleep} for i in range(n)]


def trivial_examples(n: int) -> list[dict[str, Any]]:
    """``n`` trivial examples."""
    return [{"id": i} for i in range(n)]


def streamed_examples(n: int) -> Iterator[dict[str, Any]]:
    """``n`` trivial examples from a generator: never all in memory at once."""
    for i in range(n):
        yield {"id": i, "text": f"question number {i}"}
