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
from collections.abc import Callable, Sequence
from typing import Any

from procval._convert import to_jsonable
from procval._scores import NamedScores, scores_json
from procval.results import Row, RowError, Usage


def encode(row: Row, config: str, session: int) -> tuple[Any, ...]:
    """The record of ``row``: ``schema.COLUMNS`` in order, without the trailing defaults.

    A plain row (epoch 0, one score, no extra, usage or group, a plain JSON prediction) has
    format 1's 16 columns, a plain row of a later epoch 17: the common cases, whose fewer bound
    values per row keep the store as fast as format 1 (``schema.insert(width)``).
    """
    example = to_json(row.example)
    error = row.error
    eid = row.example_id
    prediction = row.prediction
    kind = type(prediction)
    record = (
        config,
        id_text(eid),
        row.index,
        text_hash(example),
        example,
        to_json(prediction),
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
    scores, extra, usage, group = row.scores, row.extra, row.usage, row.group
    if extra is None and usage is None and group is None and kind in _PLAIN:
        if scores is None:
            return (*record, row.epoch) if row.epoch else record
        # named scores: the common width; a worker's are their text already
        text = scores.text if type(scores) is NamedScores else scores_json(scores)
        return (*record, row.epoch, text)
    tail = (
        row.epoch,
        None if scores is None else scores_json(scores),
        None if extra is None else to_json(extra),
        None if usage is None else to_json({m: u.to_dict() for m, u in usage.items()}),
        group,
        None if kind in _PLAIN else f"{kind.__module__}.{kind.__qualname__}",
    )
    width = 6
    while tail[width - 1] is None:  # trailing defaults left out (tail[0], the epoch, is an int)
        width -= 1
    return (*record, *tail[:width])


DEFAULTS = (0, None, None, None, None, None)
"""The defaults of the format 2 columns (see :func:`encode`), to pad a shorter record."""

_PLAIN = frozenset({str, int, float, bool, type(None), list, dict})
"""Types whose JSON is the value itself: no ``prediction_type`` is recorded for them. A tuple
is not one: its JSON is a list, so ``builtins.tuple`` is recorded, and a rescore rebuilds it."""


def decode(record: Sequence[Any]) -> Row:
    """The row of a record read with ``schema.select(db)`` (format 2, or format 1 as 2).

    A record of format 1's 16 columns is read too: its row has epoch 0 and no scores, extra,
    usage or group.
    """
    (config, eid, index, _, example, prediction, score, error_type, message, traceback,
     attempts, duration, pid, node, fingerprint, _, *new) = record  # fmt: skip
    epoch, scores, extra, usage, group = new[:5] if new else (0, None, None, None, None)
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
        epoch=epoch,
        scores=None if scores is None else json.loads(scores),
        extra=None if extra is None else json.loads(extra),
        usage=None if usage is None else decode_usage(usage),
        group=group,
    )


def decode_usage(text: str) -> dict[str, Usage]:
    """``{model: Usage}`` of a stored usage column."""
    return {model: Usage.from_dict(counts) for model, counts in json.loads(text).items()}


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode


def _c_encoder() -> Callable[[Any], str] | None:
    """:data:`_CANONICAL` without its per-call setup: the C encoder made once (None: no C).

    The same output as ``_CANONICAL`` (keys sorted, no spaces, ASCII, NaN refused); a cycle
    raises ``RecursionError`` instead of ``ValueError`` (no markers), which :func:`to_json`
    catches alike.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)
    chunks = make(
        None,
        encoder.default,
        json.encoder.encode_basestring_ascii,
        None,
        ":",
        ",",
        True,
        False,
        False,
    )
    join = "".join

    def encode(value: Any) -> str:
        return join(chunks(value, 0))

    return encode


_ENCODE = _c_encoder() or _CANONICAL
_ASCII = json.encoder.encode_basestring_ascii
_SCALARS: dict[type, Callable[[Any], str]] = {
    int: int.__repr__,  # an int's JSON is its repr; a bool's is not (true), nor a subclass's
    str: _ASCII,
}


class RawJSON(str):
    """Text that is canonical JSON already (a stored example, rescored): stored as it is."""

    __slots__ = ()


def to_json(value: Any) -> str:
    """Canonical JSON (keys sorted, no spaces) of ``value``, through ``to_jsonable`` if needed.

    A :class:`RawJSON` is that JSON already, and is returned as it is.
    """
    scalar = _SCALARS.get(type(value))
    if scalar is not None:
        return scalar(value)
    if type(value) is RawJSON:
        return str(value)
    try:
        return _ENCODE(value)  # the fast path for plain JSON data
    except (TypeError, ValueError, RecursionError):
        return _CANONICAL(to_jsonable(value))


def id_text(example_id: int | str) -> str:
    """The stored form of an id: its JSON (``3`` and ``"3"`` differ)."""
    return str(example_id) if isinstance(example_id, int) else json.dumps(example_id)


def text_hash(text: str) -> int:
    """A signed 64-bit hash of an example's canonical JSON (fits a SQLite INTEGER)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)
