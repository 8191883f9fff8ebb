"""Turning predictions and examples into JSON-friendly values, for the store and exports.

The conversion, in order of preference:

1. ``None``, ``bool``, ``int``, ``float``, ``str`` as they are; a module as its name
   (``"<module dspy.clients.base_lm>"``: a closure that captured a module is described by
   which module it is, not by what the module holds now, nor by walking into its objects);
2. mappings (keys as strings), lists, tuples and sets, converted item by item;
3. dataclass instances, field by field;
4. pydantic models through ``model_dump(mode="json")``;
5. objects with ``toDict()`` (DSPy's ``Example`` and ``Prediction``) or ``to_dict()``;
6. other objects with a ``__dict__``, through their public attributes;
7. anything else as its ``repr()``.

Nesting deeper than 20 levels is cut off with its ``repr()``.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 20


def to_jsonable(obj: Any, _depth: int = 0) -> Any:
    """Convert ``obj`` to values ``json.dumps`` accepts, as the module docstring describes."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)
    if isinstance(obj, types.ModuleType):
        return f"<module {obj.__name__}>"
    if _depth >= _MAX_DEPTH:
        return repr(obj)
    nxt = _depth + 1
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, nxt) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=repr) if isinstance(obj, set | frozenset) else obj
        return [to_jsonable(v, nxt) for v in items]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), nxt) for f in dataclasses.fields(obj)}
    for method, kwargs in (("model_dump", {"mode": "json"}), ("toDict", {}), ("to_dict", {})):
        fn = getattr(obj, method, None)
        if callable(fn) and not isinstance(obj, type):
            try:
                return to_jsonable(fn(**kwargs), nxt)
            except Exception:  # a user's converter failed: fall through to the next way
                continue
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "shape", None) == ():
        return to_jsonable(obj.item(), nxt)  # numpy scalars
    state = getattr(obj, "__dict__", None)
    if isinstance(state, dict) and not isinstance(obj, type):
        return {k: to_jsonable(v, nxt) for k, v in state.items() if not k.startswith("_")}
    return repr(obj)
