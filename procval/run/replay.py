"""What the examples recorded in the workers, handed to whoever replays it in the parent.

A worker's result may carry ``events`` (:mod:`procval.worker.record`): ``(kind, payload)``
pairs. As each batch of rows reaches the sink, the scheduler calls :func:`deliver`, which hands
every example's events to the handler registered for their kind (the DSPy integration registers
``"dspy"`` when it is imported), in the caller's thread, in the order the rows arrived. Events of
a kind no handler knows are dropped. A failing handler is logged, never fatal to the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from procval.results import Row
from procval.wire import ExampleResult
from procval.worker import record

__all__ = ["Handler", "deliver", "register"]

Handler = Callable[[str, Row, list[Any]], None]
"""``handler(config, row, payloads)``: one example's payloads of one kind, in recorded order."""

logger = logging.getLogger("procval")
_handlers: dict[str, Handler] = {}


def register(kind: str, handler: Handler) -> None:
    """Replay the events of ``kind`` with ``handler`` (replacing an earlier one)."""
    _handlers[kind] = handler


def deliver(config: str, rows: Sequence[Row], results: Sequence[ExampleResult]) -> None:
    """Hand the events of ``results`` (paired with ``rows``, in order) to their handlers."""
    for row, result in zip(rows, results, strict=True):
        if not result.events:
            continue
        try:
            events = record.decoded(result.events)
        except Exception:
            logger.exception("the events recorded by example %r cannot be read", row.example_id)
            continue
        by_kind: dict[str, list[Any]] = {}
        for kind, payload in events:
            by_kind.setdefault(kind, []).append(payload)
        for kind, payloads in by_kind.items():
            handler = _handlers.get(kind)
            if handler is None:
                continue
            try:
                handler(config, row, payloads)
            except Exception:
                logger.exception(
                    "replaying the %r events of example %r failed", kind, row.example_id
                )
