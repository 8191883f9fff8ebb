"""Tasks that fail in the user's code, for the CLI tests (``procval run THIS_FILE:NAME``).

- ``mixed``: a healthy config and one whose ``Config.setup`` raises in every worker;
- ``missing_data``: a dataset function that reads a JSONL file that does not exist (the line
  that names it is :data:`MISSING_LINE`).
"""

from __future__ import annotations

from typing import Any

import procval


def program(example: dict[str, Any]) -> int:
    return example["x"]


def metric(example: dict[str, Any], prediction: int) -> bool:
    return prediction == example["x"]


def broken_setup() -> None:
    raise RuntimeError("no GPU on this machine")


mixed = procval.Task(
    program,
    [{"id": i, "x": i} for i in range(500)],
    metric,
    {"broken": procval.Config(setup=broken_setup), "healthy": procval.Config()},
    workers=2,
)

missing_data = procval.Task(program, lambda: procval.read_jsonl("no_such_file.jsonl"), metric)
MISSING_LINE = missing_data.dataset.__code__.co_firstlineno  # type: ignore[union-attr]
