"""Cloudpickle with errors a user can act on.

``dumps`` pickles like ``cloudpickle.dumps``; when that fails it walks the object (attributes,
closure cells, referenced globals, containers) to find the innermost piece that cannot be pickled
and raises :class:`~procval.errors.SnapshotError` naming it and where it sits.
"""

from __future__ import annotations

import pickle
import types
from collections.abc import Mapping
from typing import Any

import cloudpickle

from procval.errors import SnapshotError

PROTOCOL = 5
_MAX_DEPTH = 6


def dumps(obj: Any, *, what: str, hint: str = "") -> bytes:
    """Cloudpickle ``obj``, or raise SnapshotError naming the unpicklable part of it.

    Args:
        obj: the object to pickle.
        what: how to call the object in a message, e.g. ``"program"`` or ``"config 'gpt'"``.
        hint: advice appended to the message.

    Returns:
        The pickled bytes.

    Raises:
        SnapshotError: ``obj`` or something it references cannot be pickled.
    """
    try:
        return cloudpickle.dumps(obj, protocol=PROTOCOL)
    except Exception as exc:  # pickling raises many types: TypeError, PicklingError, ...
        raise SnapshotError(describe_failure(obj, what, exc, hint)) from exc


def loads(data: bytes) -> Any:
    """Unpickle bytes made by :func:`dumps`."""
    return pickle.loads(data)


def describe_failure(obj: Any, what: str, exc: BaseException, hint: str = "") -> str:
    """A sentence naming what in ``obj`` cannot be pickled, where it sits, and what to do."""
    found = _find_culprit(obj, what, 0, set())
    if found is None:
        message = f"{what} cannot be sent to a worker process: {type(exc).__name__}: {exc}"
    else:
        path, culprit = found
        kind = f"{type(culprit).__module__}.{type(culprit).__qualname__}".replace("builtins.", "")
        message = (
            f"{path} is a {kind}, which cannot be sent to a worker process "
            f"({type(exc).__name__}: {exc})"
        )
    advice = hint or (
        "create it inside the program, or in Config.setup, so that each worker makes its own"
    )
    return f"{message}; {advice}"


def _picklable(obj: Any) -> bool:
    try:
        cloudpickle.dumps(obj, protocol=PROTOCOL)
    except Exception:
        return False
    return True


def _children(obj: Any, path: str) -> list[tuple[str, Any]]:
    """Named references of ``obj`` that pickling would follow."""
    kids: list[tuple[str, Any]] = []
    if isinstance(obj, types.FunctionType):
        code = obj.__code__
        for name, cell in zip(code.co_freevars, obj.__closure__ or (), strict=False):
            try:
                kids.append((f"{path} closes over `{name}`, which", cell.cell_contents))
            except ValueError:  # an empty cell
                continue
        for name in _global_names(code):
            if name in obj.__globals__:
                kids.append((f"{path} uses global `{name}`, which", obj.__globals__[name]))
        for i, default in enumerate(obj.__defaults__ or ()):
            kids.append((f"{path}'s default argument #{i}, which", default))
    elif isinstance(obj, types.MethodType):
        kids.append((f"{path} is bound to an object that", obj.__self__))
        kids.append((f"{path}'s function", obj.__func__))
    elif isinstance(obj, Mapping):
        kids.extend((f"{path}[{k!r}]", v) for k, v in list(obj.items())[:200])
    elif isinstance(obj, list | tuple | set | frozenset):
        kids.extend((f"{path}[{i}]", v) for i, v in enumerate(list(obj)[:200]))
    else:
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            kids.extend((f"{path}.{k}", v) for k, v in state.items())
        if callable(obj) and not isinstance(obj, type):
            call = getattr(type(obj), "__call__", None)
            if isinstance(call, types.FunctionType):
                kids.append((f"{path}'s __call__", call))
    return kids


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return names


def _find_culprit(obj: Any, path: str, depth: int, seen: set[int]) -> tuple[str, Any] | None:
    """Depth-first search for the innermost unpicklable object under ``obj``."""
    if id(obj) in seen or depth > _MAX_DEPTH:
        return None
    seen.add(id(obj))
    if _picklable(obj):
        return None
    for child_path, child in _children(obj, path):
        found = _find_culprit(child, child_path, depth + 1, seen)
        if found is not None:
            return found
    return (path, obj)
