"""Capturing the log records that reach this process's loggers (the workers' among them)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class Records(logging.Handler):
    """Keeps every record it handles."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    @property
    def messages(self) -> list[str]:
        """The records' messages, in the order they came."""
        return [record.getMessage() for record in self.records]

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def captured_logs(name: str) -> Iterator[Records]:
    """A :class:`Records` on logger ``name`` for the ``with`` block (taken off after)."""
    handler = Records()
    target = logging.getLogger(name)
    target.addHandler(handler)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
