"""Exceptions raised by procval.

Every exception procval raises derives from :class:`ProcvalError`; where a built-in exception
describes the same kind of failure, the subclass inherits it too, so ``except ValueError`` keeps
working for callers who do not know procval::

    ProcvalError (Exception)
    ├── SnapshotError (ProcvalError, TypeError)      something cannot be sent to a worker
    ├── NotInWorkerError (ProcvalError, RuntimeError) current_config() outside a worker
    ├── SetupError (ProcvalError, RuntimeError)       Config.setup failed, or workers die at start
    ├── IsolationError (ProcvalError, RuntimeError)   a process served two snapshots (a bug)
    ├── TooManyErrors (ProcvalError, RuntimeError)    max_errors exceeded; carries partial results
    ├── TaskError (ProcvalError, ValueError)          a task reference or Task that is unusable
    ├── UnalignedResultsError (ProcvalError, ValueError) compared results cover other ids
    └── StoreError (ProcvalError)                     the run store cannot be used
        ├── StoreMismatchError (StoreError, ValueError) resume against other configs or data
        ├── StoreLockedError (StoreError)             another live run is writing the store
        ├── StoreFullError (StoreError)               the disk is full; free space and resume
        └── StoreCorruptError (StoreError)            the store's file is damaged

:class:`ProgramChangedWarning` (a ``UserWarning``) is issued when a run store is resumed with a
program or metric whose code changed: the results would mix both versions.

A failing *example* is never an exception: it becomes a row whose ``error`` says what happened.
:class:`NoRetry` is the one class here meant for user code: raise it (or an exception carrying
``procval_retry = False``) from a program to stop procval from retrying that example.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "IsolationError",
    "NoRetry",
    "NotInWorkerError",
    "ProcvalError",
    "ProgramChangedWarning",
    "SetupError",
    "SnapshotError",
    "StoreCorruptError",
    "StoreError",
    "StoreFullError",
    "StoreLockedError",
    "StoreMismatchError",
    "TaskError",
    "TooManyErrors",
    "UnalignedResultsError",
]


if TYPE_CHECKING:
    from collections.abc import Mapping


class ProcvalError(Exception):
    """Base class of every error procval raises."""


class SnapshotError(ProcvalError, TypeError):
    """A program, metric, config or example cannot be pickled and sent to a worker process."""


class NotInWorkerError(ProcvalError, RuntimeError):
    """A worker-only function was called outside a procval worker process."""


class SetupError(ProcvalError, RuntimeError):
    """A config could not be installed in a worker: ``setup`` raised, or workers die at start.

    The other configs of the call run to completion first (and are stored, with ``store=``);
    then this is raised.

    Attributes:
        results: the configs that ran, as a :class:`procval.Results` mapping (the failed
            configs left out; empty when none ran).
        tracebacks: each failed config's worker traceback (only the frames of the user's
            code; "" when the workers died without one), by config name.
    """

    TRACEBACK_FOLLOWS = " (the worker's traceback follows)"  # ends the message's first line

    def __init__(
        self,
        message: str,
        *,
        results: Mapping[str, Any] | None = None,
        tracebacks: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.results: Mapping[str, Any] = results if results is not None else {}
        self.tracebacks: dict[str, str] = dict(tracebacks or {})


class IsolationError(ProcvalError, RuntimeError):
    """A worker process produced rows for two different snapshots.

    procval checks this on every row; seeing it means procval itself is broken.
    """


class TooManyErrors(ProcvalError, RuntimeError):
    """More examples failed than ``max_errors`` allows; the run stopped early.

    Attributes:
        failed: how many examples had failed when the run stopped.
        results: what finished before the stop, as ``evaluate`` would have returned it.
        limit: the ``max_errors`` that was exceeded.
    """

    def __init__(
        self,
        message: str,
        *,
        failed: int,
        results: Mapping[str, Any] | Any,
        limit: int | None = None,
    ) -> None:
        super().__init__(message)
        self.failed = failed
        self.results = results
        self.limit = limit


class TaskError(ProcvalError, ValueError):
    """A task reference that does not lead to a :class:`procval.Task`, or a malformed task."""


class UnalignedResultsError(ProcvalError, ValueError):
    """Two results do not cover the same example ids, so they cannot be paired.

    Attributes:
        missing_in_a: how many ids of ``b`` are not in ``a``.
        missing_in_b: how many ids of ``a`` are not in ``b``.
    """

    def __init__(self, message: str, *, missing_in_a: int, missing_in_b: int) -> None:
        super().__init__(message)
        self.missing_in_a = missing_in_a
        self.missing_in_b = missing_in_b


class StoreError(ProcvalError):
    """The run store is missing, unreadable or of another format."""


class StoreMismatchError(StoreError, ValueError):
    """Resuming would mix results of different configs or of changed examples."""


class StoreLockedError(StoreError):
    """Another live process is writing the run store; two writers would duplicate the work.

    Attributes:
        path: the run store.
        pid: the process that holds it (None if it could not be read).
        host: the machine that process runs on (None if it could not be read).
    """

    def __init__(self, message: str, *, path: str, pid: int | None, host: str | None) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid
        self.host = host


class StoreFullError(StoreError):
    """The disk holding the run store is full: the rows stored so far are safe.

    Free some space and run again with the same store: the run resumes.

    Attributes:
        path: the run store.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class StoreCorruptError(StoreError):
    """The run store's file is damaged (SQLite: "database disk image is malformed").

    Its readable rows can be copied into a new store with ``procval repair`` (or
    :func:`procval.store.repair.repair`); a run on that store resumes.

    Attributes:
        path: the run store.
    """

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class ProgramChangedWarning(UserWarning):
    """A resumed run's program or metric differs from the one that produced the stored rows."""


class NoRetry(Exception):
    """Raise from a program to record the error at once, without retries.

    Any exception whose class or instance has ``procval_retry = False`` is treated the same way,
    so an existing exception type can opt out with one attribute.
    """

    procval_retry = False
