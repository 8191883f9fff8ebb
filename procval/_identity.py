"""Stable hashes of configs and code: equal for the same thing in another process or session.

:meth:`procval.Config.identity` (compared when a store is resumed) and the program hash kept in
a store's config description both come from here. Memory addresses (``at 0x...``) are removed
before hashing, so that a ``repr`` does not change an identity from one process to the next.

A description holds no captured value: a closure's cells appear as their names and a hash of
each value, a callable object's attributes as their names and hashes (a ``Config.setup`` that
captured an API key must not write it into the store). procval 0.1.0 described cells and
attributes by value; :func:`describe_callable_v1` keeps that algorithm, only so that a store
written then can still be resumed (``Config._identity_v1``, compared when resuming).
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from collections.abc import Callable
from typing import Any

from procval._convert import to_jsonable


def code_identity(*functions: Any) -> str:
    """A stable hash of callables' code, closures and state: changes when the code changes.

    Only the hash is kept, never the description, so it hashes captured values with 0.1.0's
    algorithm: the program hashes of stores written then stay equal (no false "the program
    changed" warning on resume).
    """
    return text_identity([describe_callable_v1(fn) for fn in functions])


def text_identity(described: Any) -> str:
    """A 16-hex-digit hash of a JSON-friendly description, addresses removed."""
    text = json.dumps(described, sort_keys=True, default=repr)
    return digest(_ADDRESS.sub("", text).encode())[:16]


def digest(data: bytes) -> str:
    """The SHA-256 of ``data``, in hex."""
    return hashlib.sha256(data).hexdigest()


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _codedigest(code: types.CodeType) -> str:
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        parts.append(
            _codedigest(const).encode()
            if isinstance(const, types.CodeType)
            else repr(const).encode()
        )
    return digest(b"\0".join(parts))[:16]


def describe_callable(fn: Any, depth: int = 0) -> Any:
    """Module, name, code, and the names and value hashes of a callable's closure or state."""
    return _describe(fn, depth, _hashed)


def describe_callable_v1(fn: Any, depth: int = 0) -> Any:
    """The description procval 0.1.0 gave, captured values as they are: for old stores only."""
    return _describe(fn, depth, to_jsonable)


def _hashed(value: Any) -> str:
    return text_identity(to_jsonable(value))


def _describe(fn: Any, depth: int, value_of: Callable[[Any], Any]) -> Any:
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    if code is None:
        inner = getattr(fn, "__func__", None) or getattr(type(fn), "__call__", None)
        head = f"{type(fn).__module__}.{type(fn).__qualname__}"
        state = getattr(fn, "__dict__", None)
        if not isinstance(state, dict):
            described: Any = repr(fn)
        elif value_of is to_jsonable:
            described = to_jsonable(state)
        else:
            described = {str(k): value_of(v) for k, v in state.items()}
        return [head, described, _describe(inner, depth + 1, value_of) if depth < 3 else None]
    cells = []
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            cells.append([name, value_of(cell.cell_contents)])
        except ValueError:
            cells.append([name, None])
    return [
        getattr(fn, "__module__", None),
        getattr(fn, "__qualname__", None),
        _codedigest(code),
        cells,
    ]
