"""``RateLimit``: a provider key's limits, shared by every worker of every config that names it.

A config names its limits (``Config(rate_limit=...)``); the parent enforces them for the whole
run (:mod:`procval.run.limiter`), the workers ask it for a permit before each call
(:mod:`procval.worker.limited`). This module only describes and checks them: it is imported by
both sides and imports nothing of procval's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["RateLimit", "parse_rate_limit", "rate_limits"]


def _positive(name: str, value: Any, *, integer: bool) -> None:
    if value is None:
        return
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "a positive int" if integer else "a positive number"
        raise ValueError(f"RateLimit {name} must be {kind} or None, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"RateLimit {name} must be finite, got {value!r}")


@dataclass(frozen=True)
class RateLimit:
    """Limits on the calls made under one provider key, enforced across the whole run.

    Every worker process and thread of every config that names the same ``key`` shares them:
    the parent process hands out the permits, so a killed worker's permits come back with it.

    Args:
        key: the name the limits are shared under. A DSPy LM call is limited by the config's
            ``RateLimit`` whose key (or one of ``models``) is the LM's model name, e.g.
            ``"openai/gpt-4o-mini"``; other programs name the key in
            ``with procval.limited(key):``.
        requests_per_minute: calls started per minute, paced evenly (None: no limit).
        tokens_per_minute: tokens per minute; each call reserves an estimate, corrected by
            the usage the call reports (None: no limit).
        max_in_flight: calls running at once (None: no limit). After a 429 the limit is cut in
            half and grows back by one call per window of calls answered (AIMD).
        models: the LM model names limited under this key (default: the key itself), for a
            provider key shared by several models.

    Raises:
        ValueError: an empty key, or a limit that is not a positive number.
    """

    key: str
    requests_per_minute: float | None = None
    tokens_per_minute: int | None = None
    max_in_flight: int | None = None
    models: tuple[str, ...] = ()

    def __init__(
        self,
        key: str,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: int | None = None,
        max_in_flight: int | None = None,
        models: Sequence[str] = (),
    ) -> None:
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"RateLimit key must be a non-empty string, got {key!r}")
        _positive("requests_per_minute", requests_per_minute, integer=False)
        _positive("tokens_per_minute", tokens_per_minute, integer=True)
        _positive("max_in_flight", max_in_flight, integer=True)
        if isinstance(models, str) or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"RateLimit models must be a list of model names, got {models!r}")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "requests_per_minute", requests_per_minute)
        object.__setattr__(self, "tokens_per_minute", tokens_per_minute)
        object.__setattr__(self, "max_in_flight", max_in_flight)
        object.__setattr__(self, "models", tuple(models))

    def matches(self, model: str) -> bool:
        """Whether a call to ``model`` is limited under this key."""
        return model in (self.models or (self.key,))

    def limits(self) -> tuple[float | None, int | None, int | None]:
        """``(requests_per_minute, tokens_per_minute, max_in_flight)``, compared across configs."""
        return (self.requests_per_minute, self.tokens_per_minute, self.max_in_flight)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (kept in the store with the config)."""
        described: dict[str, Any] = {"key": self.key}
        for name in ("requests_per_minute", "tokens_per_minute", "max_in_flight"):
            if getattr(self, name) is not None:
                described[name] = getattr(self, name)
        if self.models:
            described["models"] = list(self.models)
        return described


def rate_limits(value: RateLimit | Iterable[RateLimit] | None) -> tuple[RateLimit, ...]:
    """``Config.rate_limit`` as a tuple: one ``RateLimit``, a list of them, or None.

    Raises:
        TypeError: something else than RateLimit objects.
        ValueError: two limits with the same key.
    """
    if value is None:
        return ()
    items = (value,) if isinstance(value, RateLimit) else tuple(value)
    for item in items:
        if not isinstance(item, RateLimit):
            raise TypeError(
                "rate_limit must be a procval.RateLimit or a list of them, "
                f"got {type(item).__name__}"
            )
    keys = [item.key for item in items]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"rate_limit names the key(s) {twice} twice; give each key once")
    return items


_FIELDS = {
    "rpm": "requests_per_minute",
    "requests_per_minute": "requests_per_minute",
    "rps": "rps",
    "tpm": "tokens_per_minute",
    "tokens_per_minute": "tokens_per_minute",
    "inflight": "max_in_flight",
    "max_in_flight": "max_in_flight",
}


def parse_rate_limit(text: str) -> RateLimit:
    """A ``RateLimit`` from the CLI's ``KEY:rpm=N,tpm=N,inflight=N`` (also ``rps=N``).

    The key is everything before the last ``:`` (model names hold ``/`` but no ``:``).

    Raises:
        ValueError: the text does not have that shape, naming what is wrong.
    """
    key, sep, spec = text.rpartition(":")
    if not sep or not key or not spec:
        raise ValueError(
            f"--rate-limit {text!r}: expected KEY:rpm=N,tpm=N,inflight=N "
            "(e.g. openai/gpt-4o-mini:rpm=500,inflight=32)"
        )
    options: dict[str, Any] = {}
    for part in spec.split(","):
        name, eq, raw = part.partition("=")
        field = _FIELDS.get(name.strip())
        if not eq or field is None:
            raise ValueError(
                f"--rate-limit {text!r}: unknown setting {part!r}; use rpm=, rps=, tpm=, inflight="
            )
        try:
            number = float(raw)
        except ValueError:
            raise ValueError(f"--rate-limit {text!r}: {name}={raw!r} is not a number") from None
        if field == "rps":
            options["requests_per_minute"] = number * 60
        elif field == "requests_per_minute":
            options[field] = number
        else:
            if number != int(number):
                raise ValueError(f"--rate-limit {text!r}: {name} must be a whole number")
            options[field] = int(number)
    return RateLimit(key, **options)
