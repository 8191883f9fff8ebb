"""Which DSPy callbacks run in the workers (and only there) rather than in the caller's process.

See :mod:`procval.integrations._dspy_observe`: the others are replayed in the caller's process.
"""

from __future__ import annotations

from typing import Any

__all__ = ["InWorker", "in_worker", "runs_in_worker"]


class InWorker:
    """A DSPy callback that runs in the worker processes only (pickled with the snapshot).

    For callbacks that write to a file or a tracing server from where the program runs. Build
    it with :func:`in_worker`; it forwards every handler to the wrapped callback.
    """

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def __getattr__(self, name: str) -> Any:
        if name == "callback":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.callback, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (InWorker, (self.callback,))

    def __repr__(self) -> str:
        return f"in_worker({self.callback!r})"


def in_worker(callback: Any) -> InWorker:
    """Mark a DSPy callback to run in the workers, where the program runs, and not here.

    Without it (or a true ``procval_in_worker`` attribute on the callback), a callback in
    ``dspy.settings.callbacks`` runs in the calling process, on the events replayed from the
    workers. A callback run in the workers must be picklable.

    Args:
        callback: a ``dspy.utils.callback.BaseCallback`` (or any object with its handlers).

    Returns:
        The wrapped callback, for ``dspy.configure(callbacks=[...])``.
    """
    return callback if isinstance(callback, InWorker) else InWorker(callback)


def runs_in_worker(callback: Any) -> bool:
    """Whether ``callback`` is meant to run in the workers (wrapped, or ``procval_in_worker``)."""
    return isinstance(callback, InWorker) or getattr(callback, "procval_in_worker", False) is True
