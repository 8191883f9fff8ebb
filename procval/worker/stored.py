"""Rescoring in the worker: a stored prediction rebuilt, and handed to a new metric.

``procval.rescore`` runs a config's stored rows through the usual scheduler and workers, with a
"program" that calls nothing: :class:`Replay` returns the prediction each row stored, rebuilt
by :func:`rebuild` from its JSON and its recorded type, and :class:`OnStored` calls the new
metric with the row's example and that prediction. A worker installs the config's snapshot
first, as for ``evaluate``, so a metric that calls an LLM judge runs under the config's env,
seed and setup, in processes of its own.

Rebuilding (the rule, also in the README):

- no recorded type (a plain JSON value: str, number, bool, None, list, dict; or any row of a
  store of format 1): the JSON value as it is (a dict stays a dict);
- a recorded type that can be imported here: a ``tuple`` or ``NamedTuple`` from its items, a
  pydantic model by ``model_validate``, a ``dspy.Prediction``, a dataclass or another class
  called with the stored fields as keywords, a subclass of ``str``/``int``/``float`` from its
  value;
- otherwise (a type defined in a script's ``__main__``, a class whose constructor does not take
  its fields, a prediction stored by its ``repr()``): a :class:`Fields` (a ``dict`` that also
  answers ``pred.answer``) for a JSON object, else the JSON value.

This module runs in the workers: it imports nothing heavy.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any

__all__ = ["Fields", "OnStored", "Replay", "Stored", "StoredFailure", "rebuild"]


class Fields(dict[str, Any]):
    """A stored JSON object whose type could not be rebuilt: a dict with attribute access too.

    ``pred["answer"]``, ``pred.get("answer")`` and ``pred.answer`` all work, as they do on a
    ``dspy.Prediction``.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Stored:
    """One stored row, as sent to a worker: its example, its prediction and how to rebuild it.

    The JSON is decoded in the worker (:attr:`example`, :meth:`Replay.__call__`), which spares
    the parent a decode per row.

    Attributes:
        text: the stored example's JSON text; :attr:`example` is its value (a JSON object as a
            :class:`Fields`).
        prediction: the stored prediction's JSON text.
        kind: the prediction's recorded type (``module.qualname``), or None.
        error: ``(type, message, traceback)`` of a row whose program failed: there is no
            prediction to score, and the rescored row keeps that error.
        group: the row's group key, kept on the rescored row.
    """

    __slots__ = ("_example", "error", "group", "kind", "prediction", "text")

    def __init__(
        self,
        text: str,
        prediction: str,
        kind: str | None,
        error: tuple[str, str, str] | None = None,
        group: str | None = None,
    ) -> None:
        self.text = text
        self.prediction = prediction
        self.kind = kind
        self.error = error
        self.group = group
        self._example: Any = _UNREAD

    @property
    def example(self) -> Any:
        """The example, decoded once: a JSON object as a :class:`Fields`."""
        if self._example is _UNREAD:
            value = json.loads(self.text)
            self._example = Fields(value) if type(value) is dict else value
        return self._example

    def __getstate__(self) -> tuple[Any, ...]:
        return self.text, self.prediction, self.kind, self.error, self.group

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.text, self.prediction, self.kind, self.error, self.group = state
        self._example = _UNREAD

    def __repr__(self) -> str:
        return f"Stored({self.text!r}, {self.prediction!r}, kind={self.kind!r})"


_UNREAD = object()


class StoredFailure(Exception):
    """Raised for a row whose program had failed; the parent gives the row its stored error."""

    procval_retry = False


class Replay:
    """The "program" of a rescore: the stored prediction, rebuilt; nothing is called."""

    def __call__(self, stored: Stored) -> Any:
        """The prediction of ``stored``; raises :class:`StoredFailure` if its program failed."""
        if stored.error is not None:
            raise StoredFailure(stored.error[1])
        return rebuild(json.loads(stored.prediction), stored.kind)


class OnStored:
    """A metric called with a stored row's example (not the :class:`Stored` wrapping it)."""

    __slots__ = ("metric",)

    def __init__(self, metric: Callable[..., Any]) -> None:
        self.metric = metric

    def __call__(self, stored: Stored, prediction: Any) -> Any:
        """``metric(example, prediction)``."""
        return self.metric(stored.example, prediction)

    def __getstate__(self) -> Callable[..., Any]:
        return self.metric

    def __setstate__(self, metric: Callable[..., Any]) -> None:
        self.metric = metric


def rebuild(value: Any, kind: str | None) -> Any:
    """The prediction of stored JSON ``value`` whose type was ``kind`` (see the module doc)."""
    if kind is None:
        return value
    cls = _import(kind)
    if cls is not None:
        try:
            return _construct(cls, value)
        except Exception:  # a constructor that does not take its fields: a Fields below
            pass
    return Fields(value) if isinstance(value, dict) else value


def _import(kind: str) -> type | None:
    module, _, qualname = kind.rpartition(".")
    if not module or module == "__main__" or "<locals>" in qualname:
        return None
    while module:  # "pkg.mod.Outer.Inner": the module is the longest importable prefix
        try:
            found: Any = importlib.import_module(module)
        except ImportError:
            module, _, head = module.rpartition(".")
            qualname = f"{head}.{qualname}"
            continue
        for part in qualname.split("."):
            found = getattr(found, part, None)
        return found if isinstance(found, type) else None
    return None


def _construct(cls: type, value: Any) -> Any:
    if isinstance(value, list) and issubclass(cls, tuple):
        return cls(*value) if hasattr(cls, "_fields") else cls(value)
    if isinstance(value, dict):
        validate = getattr(cls, "model_validate", None)
        if callable(validate):
            return validate(value)
        return cls(**value)
    if isinstance(value, str) and issubclass(cls, str):
        return cls(value)
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if numeric and issubclass(cls, int | float) and not issubclass(cls, bool):
        return cls(value)
    raise TypeError(f"cannot rebuild a {cls.__name__} from {type(value).__name__}")
