"""Tasks for the CLI tests, run as ``procval run tests/helpers/cli_task.py:NAME``.

Environment variables shape them, so one file serves every test (worker processes import this
module too, and read the same variables):

- ``CLI_TASK_N``: how many examples (default 30);
- ``CLI_TASK_SLEEP``: seconds each example sleeps (default 0);
- ``CLI_TASK_LOG``: a file to which every program call appends the example's id.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import procval

N = int(os.environ.get("CLI_TASK_N", "30"))
SLEEP = float(os.environ.get("CLI_TASK_SLEEP", "0"))
LOG = os.environ.get("CLI_TASK_LOG", "")


def examples() -> Iterator[dict[str, Any]]:
    """A generator, so the CLI's ``--limit`` and the scheduler must stay lazy."""
    return ({"id": i, "x": i} for i in range(N))


def program(example: dict[str, Any]) -> dict[str, int]:
    if LOG:  # one write(2) with O_APPEND: lines from several processes do not interleave
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{example['id']}\n".encode())
        finally:
            os.close(fd)
    if SLEEP:
        time.sleep(SLEEP)
    if example["x"] % 10 == 7:
        raise ValueError(f"seven: {example['x']}")
    return {"double": example["x"] * 2 + procval.current_config().values.get("offset", 0)}


def metric(example: dict[str, Any], prediction: dict[str, int]) -> bool:
    return prediction["double"] == example["x"] * 2


task = procval.Task(
    program,
    examples,
    metric,
    {"base": procval.Config(), "offset": procval.Config(values={"offset": 1})},
    workers=2,
)
single = procval.Task(program, examples, metric, workers=2)
not_a_task = 42
