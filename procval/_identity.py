"""Stable hashes of configs and code: equal for the same thing in another process or session.

:meth:`procval.Config.identity` (compared when a store is resumed) and the program hash kept in
a store's config description both come from here. Memory addresses (``at 0x...``) are removed
before hashing, so that a ``repr`` does not change an identity from one process to the next.
"""

from __future__ import annotations

import hashlib
import json
import re
import types
from typing import Any

from procval._convert import to_jsonable


def code_identity(*functions: Any) -> str:
    """A stable hash of callables' code, closures and state: changes when the code changes."""
    return text_identity([describe_callable(fn) for fn in functions])


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
    """Module, name, code and closure of a callable: stable across processes."""
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    if code is None:
        inner = getattr(fn, "__func__", None) or getattr(type(fn), "__call__", None)
        head = f"{type(fn).__module__}.{type(fn).__qualname__}"
        state = getattr(fn, "__dict__", None)
        described = to_jsonable(state) if isinstance(state, dict) else repr(fn)
        return [head, described, describe_callable(inner, depth + 1) if depth < 3 else None]
    cells = []
    for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or (), strict=False):
        try:
            cells.append([name, to_jsonable(cell.cell_contents)])
        except ValueError:
            cells.append([name, None])
    return [
        getattr(fn, "__module__", None),
        getattr(fn, "__qualname__", None),
        _codedigest(code),
        cells,
    ]
