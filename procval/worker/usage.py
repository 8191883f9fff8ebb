"""Tokens and cost spent by an example: :func:`record_usage` for any program, DSPy LMs tapped.

Both add to the running example's recording (:mod:`procval.worker.record`), summed per model;
the parent makes ``Row.usage`` of it, the run store sums each config's spend.

DSPy: :func:`tap_dspy` (called once in each worker, when DSPy is imported there) wraps
``BaseLM.update_history``, through which every DSPy LM reports each call it makes, whatever
``track_usage`` says. From each history entry it takes the model, the tokens of ``usage`` and
the ``cost`` (else LiteLLM's price table, where it knows the model, else None). A call DSPy
answered from its cache has its ``usage`` emptied: it is counted in ``cached_calls``, with no
tokens and no cost. Not seen: calls made with ``dspy.settings.disable_history=True`` (DSPy
writes no history entry then), and LMs whose class replaces ``update_history`` without calling
``BaseLM.update_history``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from procval.worker import record

__all__ = ["record_usage", "tap_dspy"]


def record_usage(
    model: str,
    *,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cost: float | None = None,
    cached: bool = False,
) -> None:
    """Add one model call's tokens and cost to the usage of the example running here.

    Call it inside your program, once per call to a model (DSPy LMs are counted without it).
    The row's ``usage`` then maps ``model`` to the sums of its calls, and the config's
    :attr:`~procval.EvaluationResult.usage` to those of all its rows.

    Outside an example run by procval (your program called directly, in the calling process)
    it does nothing, so that the same program runs unchanged in an ordinary script.

    Args:
        model: the model's name, as you want it reported (``"openai/gpt-4o-mini"``).
        prompt_tokens: tokens sent.
        completion_tokens: tokens received.
        cost: what the call cost, or None where it is not known.
        cached: the call was answered from a cache (counted in ``cached_calls``).

    Raises:
        TypeError: ``model`` is not a non-empty string, or a count is not an int.
        ValueError: a count or the cost is negative (or the cost is not finite).
    """
    if not isinstance(model, str) or not model:
        raise TypeError(f"record_usage() needs the model's name as a string, got {model!r}")
    for name, value in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"record_usage({name}=...) must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"record_usage({name}=...) must be 0 or more, got {value}")
    if cost is not None:
        if not isinstance(cost, int | float) or isinstance(cost, bool):
            raise TypeError(f"record_usage(cost=...) must be a number or None, got {cost!r}")
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"record_usage(cost=...) must be finite and 0 or more, got {cost}")
        cost = float(cost)
    record.add_usage(
        model, prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, cost, cached
    )


# ------------------------------------------------------------------ DSPy


def tap_dspy() -> None:
    """Count every DSPy LM call of this process in the running example's usage (idempotent).

    The calls made in DSPy's own thread pools inside the example (``dspy.Parallel``,
    ``module.batch``) count too: the example's recording travels there with each task
    (:mod:`procval.worker.threads`). Does nothing unless DSPy is imported already.
    """
    if "dspy" not in sys.modules:
        return
    from dspy.clients.base_lm import BaseLM

    original = BaseLM.update_history
    if getattr(original, "_procval_usage", False):
        return

    def update_history(self: Any, entry: dict[str, Any]) -> Any:
        with contextlib.suppress(Exception):  # a strange entry must not fail the LM call
            _count(entry)
        return original(self, entry)

    update_history._procval_usage = True  # type: ignore[attr-defined]
    update_history.__doc__ = original.__doc__
    BaseLM.update_history = update_history


def _count(entry: Mapping[str, Any]) -> None:
    """Add one DSPy history entry's call to the running example's usage."""
    if record.current() is None:
        return
    model = str(entry.get("model") or "unknown")
    usage = entry.get("usage") or {}
    if not usage:
        response = entry.get("response")
        cached = bool(getattr(response, "cache_hit", False)) or bool(
            getattr(response, "usage", None)  # DSPy's cache empties the entry's usage only
        )
        record.add_usage(model, 0, 0, 0, None, cached)
        return
    prompt = _tokens(usage, "prompt_tokens", "input_tokens")
    completion = _tokens(usage, "completion_tokens", "output_tokens")
    total = _tokens(usage, "total_tokens") or prompt + completion
    cost = entry.get("cost")
    if not isinstance(cost, int | float) or isinstance(cost, bool):
        cost = price(model, prompt, completion)
    record.add_usage(
        model, prompt, completion, total, float(cost) if cost is not None else None, False
    )


def _tokens(usage: Mapping[str, Any], *names: str) -> int:
    for name in names:
        value = usage.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
    return 0


_Rates = tuple[float, float]  # cost per prompt token, per completion token
_table: dict[str, _Rates] | None = None


def price(model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
    """The cost of the tokens from LiteLLM's price table, or None where it does not know ``model``.

    The table is LiteLLM's own when LiteLLM is imported, else the copy shipped in its package,
    read once per process without importing LiteLLM (which takes seconds) and kept as two rates
    per model (0.3 MB instead of the 5 MB its JSON makes; a DSPy-preloading fork server reads
    it once for all its workers, ``procval.integrations._dspy_warm``).
    """
    for name in (model, model.split("/", 1)[-1]):
        rates = _rates(name)
        if rates is not None:
            return rates[0] * prompt_tokens + rates[1] * completion_tokens
    return None


def _rates(model: str) -> _Rates | None:
    litellm = sys.modules.get("litellm")
    cost = getattr(litellm, "model_cost", None)
    if isinstance(cost, dict):
        return _entry_rates(cost.get(model))
    global _table
    if _table is None:
        _table = _read_table()
    return _table.get(model)


def _entry_rates(entry: Any) -> _Rates | None:
    if not isinstance(entry, dict):
        return None
    prompt = entry.get("input_cost_per_token")
    completion = entry.get("output_cost_per_token")
    if isinstance(prompt, int | float) and isinstance(completion, int | float):
        return float(prompt), float(completion)
    return None


def _read_table() -> dict[str, _Rates]:
    """LiteLLM's bundled price table, as rates by model name ({} without LiteLLM)."""
    try:
        spec = importlib.util.find_spec("litellm")
        if spec is None or not spec.origin:
            return {}
        path = os.path.join(
            os.path.dirname(spec.origin), "model_prices_and_context_window_backup.json"
        )
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except (OSError, ValueError, ImportError):
        return {}
    if not isinstance(entries, dict):
        return {}
    table = {}
    for name, entry in entries.items():
        rates = _entry_rates(entry)
        if rates is not None:
            table[str(name)] = rates
    return table
