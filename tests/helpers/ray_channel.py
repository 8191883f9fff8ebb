"""Programs for the Ray channel tests: log a record, then wait until the driver has seen it."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import procval

logger = logging.getLogger("helpers.ray_channel")


def log_and_wait(example: Any) -> int:
    """Log one record, then wait (30 s at most) for the driver's handler to mark it seen.

    Returns the worker's pid once the driver saw the record while this example still ran,
    else -1.
    """
    folder = procval.current_config().values["dir"]
    logger.warning("example %s is running", example)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(folder, f"seen-{example}")):
            return os.getpid()
        time.sleep(0.02)
    return -1


def positive(example: Any, prediction: Any) -> float:
    """1.0 when the program returned a pid."""
    return float(prediction > 0)
