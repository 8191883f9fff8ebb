"""A DSPy callback's inputs and outputs as picklable plain data, for the relay of _dspy_observe.

What is not plain data becomes plain data: a ``dspy.Signature`` class its signature string,
other objects ``procval._convert.to_jsonable``'s conversion; ``dspy.Prediction`` and
``dspy.Example`` of plain values stay themselves, a Prediction's ``completions.signature`` being
the signature string (in a copy); a code interpreter's ``FinalOutput`` stays one, its ``output``
plain data. See :mod:`procval.integrations._dspy_observe`.
"""

from __future__ import annotations

import copy
import importlib
import pickle
import weakref
from typing import Any

import dspy
from dspy.primitives.prediction import Completions

from procval._convert import to_jsonable
from procval.worker import record

__all__ = ["picklable_exception", "plain"]

_PLAIN = (str, int, float, bool, type(None))
# what an interpreter's execute returns when the code submits (DSPy >= 3.4.1)
_FINAL_OUTPUT = getattr(importlib.import_module("dspy.primitives"), "FinalOutput", None)


def plain(value: Any, depth: int = 0, recording: record.Recording | None = None) -> Any:
    """``value`` as picklable plain data (see the module docstring).

    Within one example (``recording``), a ``dspy.Prediction`` recorded again unchanged (a module
    returning its submodule's) is recorded as the same object, as DSPy passes the same object.
    """
    cls = type(value)
    if cls in _ATOMS:
        return value
    if (cls is dict or cls is list or cls is tuple) and depth <= 20:
        depth += 1  # the common case first, without a call per plain item
        if cls is dict:
            return {
                k: v if type(v) in _ATOMS else plain(v, depth, recording) for k, v in value.items()
            }
        return [v if type(v) in _ATOMS else plain(v, depth, recording) for v in value]
    if isinstance(value, _PLAIN):
        return value
    if depth > 20:
        return repr(value)
    if isinstance(value, dict):
        return {k: plain(v, depth + 1, recording) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, depth + 1, recording) for v in value]
    if isinstance(value, dspy.Example):  # Prediction too
        if all(type(v) in _ATOMS or isinstance(v, _PLAIN) for v in value._store.values()):
            return _light(value, recording)
        return to_jsonable(value)
    if _is_signature(value):
        return _signature_text(value)
    if cls is _FINAL_OUTPUT:  # what an interpreter's execute returns when the code submits
        return _FINAL_OUTPUT(plain(value.output, depth + 1, recording))
    return to_jsonable(value)


_ATOMS = frozenset(_PLAIN)


def _light(example: Any, recording: record.Recording | None = None) -> Any:
    """``example``, or a copy whose completions name their signature by its string.

    A Predict's ``Prediction`` holds its ``Completions``, which hold the signature class: a class
    built at run time, that cloudpickle sends by value and the parent rebuilds, the most costly
    part of a replayed event by far. The copy is kept in ``recording`` (with the example, so that
    its id stays its own) and recorded again while the example's attributes are the same ones.
    """
    state = vars(example)
    completions = state.get("_completions")
    signature = vars(completions).get("signature") if hasattr(completions, "__dict__") else None
    if not _is_signature(signature):
        return example
    memo = None
    if recording is not None:
        memo = recording.memo
        if memo is None:
            memo = recording.memo = {}
        kept = memo.get(id(example))
        if kept is not None and kept[0] is example and _same(kept[1], state):
            return kept[2]
    light = _copy(completions)
    light.signature = _signature_text(signature)
    copied = _copy(example)
    copied._completions = light
    if memo is not None:
        memo[id(example)] = (example, dict(state), copied)
    return copied


def _same(before: dict[str, Any], now: dict[str, Any]) -> bool:
    return len(before) == len(now) and all(now.get(k, _MISSING) is v for k, v in before.items())


_MISSING = object()


def _copy(obj: Any) -> Any:
    """``copy.copy(obj)``; for DSPy's own classes, the same done directly (their ``__dict__``)."""
    cls: Any = type(obj)
    if cls not in _COPIED_DIRECTLY:
        return copy.copy(obj)
    copied = cls.__new__(cls)
    copied.__dict__.update(obj.__dict__)
    return copied


_COPIED_DIRECTLY = frozenset({dspy.Example, dspy.Prediction, Completions})


def _is_signature(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, dspy.Signature)


def _signature_text(signature: Any) -> str:
    text = _SIGNATURES.get(signature)
    if text is None:  # DSPy builds the string from the fields at each call: once per class
        text = _SIGNATURES[signature] = str(getattr(signature, "signature", signature.__name__))
    return text


# A signature class is not changed in place (DSPy's with_instructions, append... make new ones).
_SIGNATURES: weakref.WeakKeyDictionary[type, str] = weakref.WeakKeyDictionary()


def picklable_exception(exc: BaseException) -> BaseException:
    """``exc`` if it can be pickled, else a ``RuntimeError`` naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__qualname__}: {exc}")
    return exc
