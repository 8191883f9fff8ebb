"""Cloudpickle with errors a user can act on, and functions that keep their module's globals.

``dumps`` pickles like ``cloudpickle.dumps``; when that fails it walks the object (attributes,
closure cells, referenced globals, containers) to find the innermost piece that cannot be pickled
and raises :class:`~procval.errors.SnapshotError` naming it and where it sits.

One difference from plain cloudpickle: a lambda or nested function defined in an importable
module (a task file, a user package) is rebuilt in the worker *in that module*, with the module's
own globals, instead of with a private copy of the globals it references. So a
``Config(setup=lambda: SETTINGS.update(model="a"))`` written in ``mytask.py`` changes the same
``mytask.SETTINGS`` that ``mytask.program`` reads, as it would in one process. Functions of
``__main__`` (scripts, notebooks) are pickled by value in one call per snapshot, so they share one
globals dict in the worker and behave the same way.

Another: code pickled by value keeps its file name. cloudpickle replaces ``co_filename`` with
``"<dynamic-code>"`` (to make its bytes independent of where a function was defined), which
makes every traceback of a ``__main__``, notebook or task-file function read
``File "<dynamic-code>", line N``. Here the original name travels, so a worker's traceback names
the user's file and line, and shows the source line when the file is readable in the worker.
"""

from __future__ import annotations

import importlib
import io
import pickle
import sys
import types
from collections import ChainMap
from collections.abc import Mapping
from typing import Any, ClassVar

import cloudpickle
from cloudpickle import cloudpickle as _cp

from procval.errors import SnapshotError

PROTOCOL = 5
_MAX_DEPTH = 6


def _reduce_code(code: types.CodeType) -> tuple[Any, ...]:
    """The reduction cloudpickle makes of a code object, with the real ``co_filename`` put back."""
    rebuild, args = _cp._code_reduce(code)
    fixed = tuple(
        code.co_filename if isinstance(arg, str) and arg == _DYNAMIC else arg for arg in args
    )
    return (rebuild, fixed)


_DYNAMIC = "<dynamic-code>"  # what cloudpickle (3.x) writes in place of co_filename


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, but functions rebuilt in their own module and code keeping its file name."""

    dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
        {types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table
    )

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType):
            reduced = _reduce_in_module(obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)


_EMPTY_CELL = "__procval_empty_cell__"


def _reduce_in_module(fn: types.FunctionType) -> tuple[Any, ...] | None:
    """``(rebuild, args)`` for a by-value function of an importable module, else None."""
    module = sys.modules.get(fn.__module__ or "")
    if (
        module is None
        or fn.__module__ == "__main__"
        or getattr(module, "__file__", None) is None
        or fn.__globals__ is not vars(module)
        or _cp._should_pickle_by_reference(fn)
        or _cp._is_registered_pickle_by_value(module)
    ):
        return None
    cells = []
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:
            value = _EMPTY_CELL
        if value is fn:  # a recursive local function: let cloudpickle handle the cycle
            return None
        cells.append(value)
    state = (fn.__name__, fn.__qualname__, fn.__defaults__, fn.__kwdefaults__, fn.__dict__)
    closure = tuple(cells) if fn.__closure__ is not None else None
    return (_function_in_module, (fn.__module__, fn.__code__, closure, state))


def _function_in_module(
    module_name: str, code: types.CodeType, closure: tuple[Any, ...] | None, state: tuple[Any, ...]
) -> types.FunctionType:
    """Rebuild a function with its module's real globals (the inverse of ``_reduce_in_module``)."""
    name, qualname, defaults, kwdefaults, attributes = state
    cells = None
    if closure is not None:
        cells = tuple(
            types.CellType() if isinstance(v, str) and v == _EMPTY_CELL else types.CellType(v)
            for v in closure
        )
    module = importlib.import_module(module_name)
    fn = types.FunctionType(code, vars(module), name, defaults, cells)
    fn.__qualname__ = qualname
    fn.__kwdefaults__ = kwdefaults
    fn.__dict__.update(attributes)
    return fn


def dumps_fast(obj: Any) -> bytes:
    """Pickle like :func:`dumps`, but let a failure raise as it is (no culprit search)."""
    return _dumps(obj)


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=PROTOCOL).dump(obj)
    return buffer.getvalue()


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
        return _dumps(obj)
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
        _dumps(obj)
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
