"""A row to the values of its SQLite record and back; canonical JSON for examples and predictions.

Examples and predictions are stored as JSON through :func:`procval._convert.to_jsonable`:
plain JSON values as they are; mappings, lists, tuples and sets item by item; dataclasses
field by field; pydantic models by ``model_dump(mode="json")``; objects with ``toDict()`` or
``to_dict()`` (DSPy) through it; other objects by their public ``__dict__``; anything else as its
``repr()``. A row read back from the store holds these JSON values, not the original objects.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

from procval._convert import to_jsonable
from procval.results import Row, RowError


def encode(row: Row, config: str, session: int) -> tuple[Any, ...]:
    """The record of ``row`` (columns in ``schema.COLUMNS`` order)."""
    example = to_json(row.example)
    error = row.error
    eid = row.example_id
    return (
        config,
        str(eid) if isinstance(eid, int) else json.dumps(eid),
        row.index,
        text_hash(example),
        example,
        to_json(row.prediction),
        None if math.isnan(row.score) else row.score,
        error.type if error else None,
        error.message if error else None,
        error.traceback if error else None,
        row.attempts,
        row.duration,
        row.worker_pid,
        row.node,
        row.fingerprint,
        session,
    )


def decode(record: Sequence[Any]) -> Row:
    """The row of a record read with ``schema.SELECT``."""
    (config, eid, index, _, example, prediction, score, error_type, message, traceback,
     attempts, duration, pid, node, fingerprint, _) = record  # fmt: skip
    return Row(
        index=index,
        example_id=json.loads(eid),
        example=json.loads(example),
        prediction=json.loads(prediction),
        score=math.nan if score is None else score,
        error=None if error_type is None else RowError(error_type, message or "", traceback or ""),
        attempts=attempts,
        duration=duration,
        worker_pid=pid,
        config=config,
        fingerprint=fingerprint,
        node=node,
    )


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def to_json(value: Any) -> str:
    """Canonical JSON (keys sorted, no spaces) of ``value``, through ``to_jsonable`` if needed."""
    try:
        return _CANONICAL(value)  # the fast path for plain JSON data
    except (TypeError, ValueError, RecursionError):
        return _CANONICAL(to_jsonable(value))


def text_hash(text: str) -> int:
    """A signed 64-bit hash of an example's canonical JSON (fits a SQLite INTEGER)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)
