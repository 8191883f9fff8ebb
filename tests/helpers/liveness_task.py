"""Tasks for ``tests/test_liveness.py``, run as ``procval run tests/helpers/liveness_task.py:NAME``.

- ``freeze``: example 0's prediction is a 100 MB string whose pickling, in the worker, after the
  metric ran, first stops the worker with SIGSTOP (once: a marker file in ``LIVENESS_DIR`` says
  it happened), as a worker stopped or stuck in the OS between two examples;
- ``spawner``: each example starts ``sleep 300`` with the worker's stdout and stderr, and
  appends its pid to ``LIVENESS_DIR/pids``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import procval

DIR = os.environ.get("LIVENESS_DIR", "")
BIG = 100 * 1024 * 1024


class StopsWhenSent:
    """A prediction that stops its process the first time it is pickled to be sent back."""

    def __reduce__(self) -> tuple[Any, ...]:
        try:
            os.close(os.open(os.path.join(DIR, "stopped"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGSTOP)
        return (str, ("x" * BIG,))


def freezing_program(example: dict[str, Any]) -> Any:
    return StopsWhenSent() if example["id"] == 0 else example["id"]


def spawning_program(example: dict[str, Any]) -> int:
    child = subprocess.Popen(["sleep", "300"])  # stdout and stderr: the worker's
    fd = os.open(os.path.join(DIR, "pids"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{child.pid}\n".encode())
    finally:
        os.close(fd)
    return example["id"]


def metric(example: dict[str, Any], prediction: Any) -> float:
    return 1.0


freeze = procval.Task(freezing_program, [{"id": i} for i in range(4)], metric)
spawner = procval.Task(spawning_program, [{"id": i} for i in range(2)], metric)
