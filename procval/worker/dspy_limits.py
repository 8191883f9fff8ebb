"""DSPy LM calls limited automatically, in a worker whose config has rate limits.

Each request DSPy sends is one attempt of ``dspy.clients.execution._attempt`` (``_aattempt``
for ``acall``); both are wrapped once per worker: an attempt to a model that the config limits
(:meth:`procval.RateLimit.matches`) takes a permit from the parent, reserves an estimate of its
tokens (a quarter of the prompt's characters, plus the mean completion seen so far), reports
its usage, and on a 429 is retried *alone*, after the ``Retry-After`` the provider gave (see
:func:`procval.worker.limited.call`). DSPy's own ``num_retries`` still applies to other errors,
and to a call whose 429s outlast procval's retries. Cache hits never reach ``_attempt``, so they
take no permit.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from procval.worker import limited

__all__ = ["install"]

logger = logging.getLogger("procval")
_COMPLETION_GUESS = 100.0  # tokens a completion is guessed at before any was seen
_lock = threading.Lock()
_completion: dict[str, tuple[float, int]] = {}  # key -> (completion tokens seen, calls)
_warned: set[str] = set()


def install() -> bool:
    """Wrap DSPy's request path if DSPy is loaded and has one; whether it is wrapped."""
    if "dspy" not in sys.modules:
        return False
    try:
        from dspy.clients import execution
    except ImportError:
        return False
    attempt, aattempt = getattr(execution, "_attempt", None), getattr(execution, "_aattempt", None)
    if attempt is None or aattempt is None:
        logger.warning(
            "this DSPy version has no dspy.clients.execution._attempt: its LM calls are not "
            "rate limited by procval (wrap them in procval.limited())"
        )
        return False
    if getattr(attempt, "procval_limited", False):
        return True

    def _attempt(lm: Any, call: Any, *args: Any) -> Any:
        key = _key(lm)
        if key is None:
            return attempt(lm, call, *args)
        state = args[3]
        return limited.call(
            key,
            lambda: attempt(lm, call, *args),
            tokens=_estimate(key, call),
            usage=lambda: _used(key, call, state),
        )

    async def _aattempt(lm: Any, call: Any, *args: Any) -> Any:
        key = _key(lm)
        if key is None:
            return await aattempt(lm, call, *args)
        state = args[3]
        return await limited.acall(
            key,
            lambda: aattempt(lm, call, *args),
            tokens=_estimate(key, call),
            usage=lambda: _used(key, call, state),
        )

    _attempt.procval_limited = True  # type: ignore[attr-defined]
    execution._attempt = _attempt
    execution._aattempt = _aattempt
    return True


def _key(lm: Any) -> str | None:
    model = str(getattr(lm, "model", ""))
    key = limited.key_for(model)
    if key is None and model not in _warned:
        _warned.add(model)
        logger.warning(
            "LM %r matches no RateLimit of this config (keys and models: %s): its calls are "
            "not limited; name it in RateLimit(key) or RateLimit(..., models=[...])",
            model,
            [limit.models or limit.key for limit in limited._limits],
        )
    return key if key is not None and limited.active(key) else None


def _prompt_tokens(call: Any) -> float:
    messages = getattr(call, "messages", None) or []
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
    prompt = getattr(call, "prompt", None)
    if isinstance(prompt, str):
        chars += len(prompt)
    return chars / 4


def _estimate(key: str, call: Any) -> float:
    with _lock:
        seen, calls = _completion.get(key, (0.0, 0))
    return _prompt_tokens(call) + (seen / calls if calls else _COMPLETION_GUESS)


def _used(key: str, call: Any, state: Any) -> float | None:
    usage = getattr(getattr(state, "result", None), "usage", None)
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(completion, int | float):
        with _lock:
            seen, calls = _completion.get(key, (0.0, 0))
            _completion[key] = (seen + completion, calls + 1)
    return float(total) if isinstance(total, int | float) else None
