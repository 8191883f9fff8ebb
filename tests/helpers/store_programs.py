"""Programs for the run store tests: importable, so worker processes can load them."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

LOG_VARIABLE = "STORE_TEST_LOG"


@dataclasses.dataclass
class Answer:
    """A prediction that is not JSON by itself: stored through ``to_jsonable``."""

    value: int
    note: str = "dataclass"


def logged(example: dict[str, Any]) -> Answer:
    """Append the example's id to the file named by $STORE_TEST_LOG, then answer."""
    path = os.environ.get(LOG_VARIABLE)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{example['id']}\n".encode())
        finally:
            os.close(fd)
    if example["x"] == 13:
        raise KeyError("thirteen")
    return Answer(example["x"] * 2)


def metric(example: dict[str, Any], prediction: Answer) -> float:
    return float(prediction.value == example["x"] * 2)


def has_secret(example: Any) -> bool:
    """Whether the config's environment reached the worker (without returning its value)."""
    return bool(os.environ.get("STORE_TEST_SECRET"))


def calls(path: str) -> list[str]:
    """The ids logged so far, one per program call."""
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []
