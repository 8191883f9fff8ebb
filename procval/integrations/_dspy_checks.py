"""``procval.dspy.Evaluate``'s helpers: its error log lines, its threads plan, its input checks."""

from __future__ import annotations

import logging
from typing import Any

import dspy
import loky

from procval.results import Row

_executor_logger = logging.getLogger("dspy.utils.parallelizer")  # DSPy's own, for its lines
#: ``Evaluate(workers=None)``: one process per 16 examples in flight, up to the CPU count. An
#: example of an LM program keeps its thread waiting on the network nearly all the time (11 ms
#: of CPU per example of 2 LM calls at 0.2 s each, measured: 16 threads use under half a core),
#: while each process holds ~18 MB of its own (``docs/performance.md``).
_THREADS_PER_PROCESS = 16


class _ErrorLog:
    """Logs each failed example as its row arrives in the parent, in DSPy's words."""

    def __init__(self, devset: list[Any], traceback: bool) -> None:
        self.devset = devset
        self.traceback = traceback

    def __call__(self, config: str, rows: list[Row]) -> None:
        for row in rows:
            if row.error is None:
                continue
            example = self.devset[row.index]
            if self.traceback:
                _executor_logger.error(f"Error for {example}: {row.error}\n{row.error.traceback}")
            else:
                _executor_logger.error(
                    f"Error for {example}: {row.error}. Set `provide_traceback=True` for traceback."
                )


def _plan(num_threads: int | None, workers: int | None) -> tuple[int, int]:
    """``(processes, threads per process)`` for at most ``num_threads`` examples in flight."""
    wanted = num_threads or dspy.settings.num_threads  # as DSPy's ParallelExecutor reads it
    if isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1:
        raise ValueError(f"num_threads must be a positive int, got {wanted!r}")
    if workers is None:
        workers = min(loky.cpu_count(), -(-wanted // _THREADS_PER_PROCESS))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    workers = min(workers, wanted)
    return workers, wanted // workers


def _check_inputs(devset: list[Any]) -> None:
    for index, example in enumerate(devset):
        inputs = getattr(example, "inputs", None)
        if not callable(inputs):
            raise TypeError(
                f"devset[{index}] is a {type(example).__name__}; Evaluate needs dspy.Example "
                "objects, e.g. dspy.Example(question=..., answer=...).with_inputs('question')"
            )
        try:
            inputs()
        except ValueError:
            raise ValueError(
                f"devset[{index}] has no inputs set; mark them with "
                "example.with_inputs('question', ...)"
            ) from None
