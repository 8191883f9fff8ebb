"""What an example leaves behind besides its result: events recorded while it runs.

Each example runs inside a :class:`Recording` (a ``ContextVar``, so each thread and each asyncio
task has its own). Code running in the worker adds to it (the DSPy integration records callback
events and LM history entries; logs carry its example id) and whatever was added travels with the
example's result as ``ExampleResult.events``: a list of ``(kind, payload)`` pairs, opaque to the
scheduler and handed to :mod:`procval.run.replay` in the parent. An example that recorded
nothing costs one ``ContextVar.set`` and ``reset``.
"""

from __future__ import annotations

import contextvars
from typing import Any

from procval.wire import ExampleResult

__all__ = ["Recording", "add", "begin", "current", "end"]


class Recording:
    """The events of the example running in this thread or task.

    Attributes:
        example_id: the example's id.
        events: ``(kind, payload)`` pairs, in the order they were added.
    """

    __slots__ = ("events", "example_id")

    def __init__(self, example_id: Any) -> None:
        self.example_id = example_id
        self.events: list[tuple[str, Any]] = []


_current: contextvars.ContextVar[Recording | None] = contextvars.ContextVar(
    "procval_recording", default=None
)


def begin(example_id: Any) -> contextvars.Token[Recording | None]:
    """Start recording for one example; pass the token to :func:`end`."""
    return _current.set(Recording(example_id))


def current() -> Recording | None:
    """The recording of the example running here (None outside an example)."""
    return _current.get()


def add(kind: str, payload: Any) -> None:
    """Add an event to the current example's recording (dropped outside an example)."""
    recording = _current.get()
    if recording is not None:
        recording.events.append((kind, payload))


def end(token: contextvars.Token[Recording | None], result: ExampleResult) -> ExampleResult:
    """Stop recording; ``result`` with the events recorded, if any."""
    recording = _current.get()
    _current.reset(token)
    if recording is None or not recording.events:
        return result
    return result._replace(events=recording.events)
