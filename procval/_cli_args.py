"""The command line's argument types: counts, seconds, amounts and rate limits, named by flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from procval.ratelimit import RateLimit, parse_rate_limit

__all__ = ["COUNT", "COUNT0", "SECONDS", "amount", "at_least", "rate_limit"]


def at_least(low: int | float, kind: type[int] | type[float] = int) -> Callable[[str], Any]:
    """An argparse ``type=``: a number of ``kind`` not below ``low`` (above it, for floats).

    The CLI checks its flags itself, so that a bad value is named by its flag, not by the
    keyword argument of :func:`procval.evaluate` it becomes.
    """
    what = f"an integer of at least {low}" if kind is int else f"a number above {low:g}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < low or (kind is float and value <= low):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


COUNT, COUNT0, SECONDS = at_least(1), at_least(0), at_least(0, float)


def amount(text: str) -> float:
    """``--max-cost X``: a finite number above 0."""
    value = SECONDS(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return float(value)


def rate_limit(text: str) -> RateLimit:
    """``--rate-limit KEY:rpm=N,tpm=N,inflight=N`` (also ``rps=N``) as a RateLimit."""
    try:
        return parse_rate_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
