"""What an example leaves behind besides its result: events recorded while it runs.

Each example runs inside a :class:`Recording` (a ``ContextVar``, so each thread and each asyncio
task has its own). Code running in the worker adds to it (the DSPy integration records callback
events and LM history entries; logs carry its example id) and whatever was added travels with the
example's result as ``ExampleResult.events``: a list of ``(kind, payload)`` pairs, opaque to the
scheduler and handed to :mod:`procval.run.replay` in the parent. The list is pickled when the
example ends (``pickle``, one blob per example; kept as a list when ``pickle`` cannot take it,
for the shard's cloudpickle): the objects recorded are then freed in the worker at once, and
the parent holds one ``bytes`` per example until it replays it, instead of the many small
objects a DSPy example records (~20 callback events), which made its garbage collector run
during the shard's unpickling and again during the run. The tokens and cost spent
(:func:`procval.record_usage`, DSPy's LM calls) are summed per model and travel as
``ExampleResult.usage``. An example that recorded nothing costs one ``ContextVar.set`` and
``reset``.

A thread that the program starts inside the example does not inherit the ``ContextVar``: the
worker's ``Thread.start`` and ``ThreadPoolExecutor.submit`` carry it there
(:mod:`procval.worker.threads`, :func:`within`), DSPy's own pools among them (``dspy.Parallel``,
``module.batch``), so that the LM calls made there count in the example's usage and their
events and logs are the example's.
"""

from __future__ import annotations

import contextvars
import pickle
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from procval.wire import ExampleResult

_T = TypeVar("_T")

__all__ = [
    "Recording",
    "add",
    "add_usage",
    "begin",
    "current",
    "decoded",
    "end",
    "within",
]


class Recording:
    """The events of the example running in this thread or task.

    Attributes:
        example_id: the example's id.
        events: ``(kind, payload)`` pairs, in the order they were added.
        usage: per model, ``[calls, cached_calls, prompt_tokens, completion_tokens,
            total_tokens, cost]`` (cost None until one is known), or None when nothing was spent.
        memo: what the code recording events keeps between two events of the example (the DSPy
            integration: the copies it made of the objects it recorded), or None.
        permits: the rate-limit permits the example asked for so far (its calls' stage:
            :mod:`procval.worker.limited`).
        closed: the example has ended: a thread it started that still runs
            (:mod:`procval.worker.threads`) records nothing more into it.
    """

    __slots__ = ("closed", "events", "example_id", "memo", "permits", "usage")

    def __init__(self, example_id: Any) -> None:
        self.example_id = example_id
        self.events: list[tuple[str, Any]] = []
        self.usage: dict[str, list[Any]] | None = None
        self.memo: dict[Any, Any] | None = None
        self.permits = 0
        self.closed = False


_current: contextvars.ContextVar[Recording | None] = contextvars.ContextVar(
    "procval_recording", default=None
)


_usage_lock = threading.Lock()  # threads of one example (dspy.Parallel) add to one usage


def begin(example_id: Any) -> contextvars.Token[Recording | None]:
    """Start recording for one example; pass the token to :func:`end`."""
    return _current.set(Recording(example_id))


def current() -> Recording | None:
    """The recording of the example running here (None outside an example)."""
    recording = _current.get()
    if recording is not None and recording.closed:  # a thread outliving its example
        return None
    return recording


def within(recording: Recording, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)`` recording into ``recording`` (in another thread of its example)."""
    token = _current.set(recording)
    try:
        return fn(*args, **kwargs)
    finally:
        _current.reset(token)


def add(kind: str, payload: Any) -> None:
    """Add an event to the current example's recording (dropped outside an example)."""
    recording = current()
    if recording is not None:
        recording.events.append((kind, payload))


def add_usage(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    total_tokens: int,
    cost: float | None,
    cached: bool,
) -> bool:
    """Add one call's spend to the current example's usage; False outside an example."""
    recording = current()
    if recording is None:
        return False
    with _usage_lock:
        usage = recording.usage
        if usage is None:
            usage = recording.usage = {}
        counts = usage.get(model)
        if counts is None:
            counts = usage[model] = [0, 0, 0, 0, 0, None]
        counts[0] += 1
        counts[1] += cached
        counts[2] += prompt_tokens
        counts[3] += completion_tokens
        counts[4] += total_tokens
        if cost is not None:
            counts[5] = cost if counts[5] is None else counts[5] + cost
    return True


def end(token: contextvars.Token[Recording | None], result: ExampleResult) -> ExampleResult:
    """Stop recording; ``result`` with the events and the usage recorded, if any."""
    recording = _current.get()
    _current.reset(token)
    if recording is None:
        return result
    recording.closed = True
    usage = recording.usage
    if usage is not None:
        counts = {model: dict(zip(_FIELDS, c, strict=True)) for model, c in usage.items()}
        if recording.events:
            return result._replace(events=_encoded(recording.events), usage=counts)
        return result._replace(usage=counts)
    if not recording.events:
        return result
    return result._replace(events=_encoded(recording.events))


def _encoded(events: list[tuple[str, Any]]) -> bytes | list[tuple[str, Any]]:
    """``events`` pickled, or themselves when ``pickle`` cannot take them (cloudpickle may)."""
    try:
        return pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return events


def decoded(events: bytes | list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """In the parent: the ``(kind, payload)`` pairs of ``ExampleResult.events``."""
    return pickle.loads(events) if isinstance(events, bytes) else events


_FIELDS = ("calls", "cached_calls", "prompt_tokens", "completion_tokens", "total_tokens", "cost")
