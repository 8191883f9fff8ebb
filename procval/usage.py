"""Tokens and cost: what an example, or a config, spent with each model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and cost spent with one model: by one example, or by a whole config.

    Attributes:
        calls: calls made to the model.
        cached_calls: of those, calls answered from a cache.
        prompt_tokens: tokens sent.
        completion_tokens: tokens received.
        total_tokens: prompt and completion tokens together.
        cost: the cost in the provider's currency, or None where it is not known.
    """

    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cost: float | None = None

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        cost = (
            None
            if self.cost is None and other.cost is None
            else ((self.cost or 0.0) + (other.cost or 0.0))
        )
        return Usage(
            self.calls + other.calls,
            self.cached_calls + other.cached_calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.total_tokens + other.total_tokens,
            cost,
        )

    @classmethod
    def from_dict(cls, counts: Mapping[str, Any]) -> Usage:
        """A ``Usage`` from a mapping of its field names (missing ones are 0, cost None)."""
        cost = counts.get("cost")
        return cls(
            int(counts.get("calls", 0) or 0),
            int(counts.get("cached_calls", 0) or 0),
            int(counts.get("prompt_tokens", 0) or 0),
            int(counts.get("completion_tokens", 0) or 0),
            int(counts.get("total_tokens", 0) or 0),
            None if cost is None else float(cost),
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (as stored)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
