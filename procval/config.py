"""What a worker process must become: :class:`Config`.

A config is taken as a snapshot in the parent (cloudpickled once, before any worker starts; see
``procval.run.snapshot``).
Every worker of that config installs exactly those bytes at start, in this order: ``env`` into
``os.environ``, ``seed`` into the global RNGs, then ``setup()``. A worker never installs a second
snapshot, so nothing one config does to its process can reach another config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from procval._convert import to_jsonable
from procval._identity import describe_callable, describe_callable_v1, digest, text_identity
from procval.ratelimit import RateLimit, rate_limits

__all__ = [
    "Config",
    "FrozenDict",
    "SecretEnv",
]


class FrozenDict(Mapping[str, Any]):
    """A read-only, picklable mapping (``types.MappingProxyType`` cannot be pickled)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"{self._data!r}"

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items(), key=lambda kv: kv[0])))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._data,))


class SecretEnv(FrozenDict):
    """``Config.env``: a read-only mapping whose repr shows names, never values."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{k!r}: '***'" for k in self._data) + "}"

    def __hash__(self) -> int:
        return super().__hash__()


@dataclass(frozen=True)
class Config:
    """One configuration to evaluate, installed in its own worker processes.

    Args:
        name: how results, rows and the run store refer to this config.
        setup: called once in each worker process after ``env`` and ``seed`` are installed,
            e.g. ``lambda: dspy.configure(lm=dspy.LM("openai/gpt-4o-mini"))``.
        env: environment variables set in each worker (API keys, library switches). The
            parent's ``os.environ`` is not touched, and values are never written to the store.
        seed: seeds ``random`` (and numpy's global RNG when numpy is installed) at worker start,
            and again before each example from ``(seed, example_id)``.
        values: free user data, read in the worker through ``procval.current_config().values``.
        rate_limit: a :class:`procval.RateLimit` or a list of them: limits on the calls made
            under each key, shared with every config of the run that names the same key
            (docs/rate-limits.md). Kept as a tuple; part of :meth:`describe` only when set.
        max_tokens: stop sending this config's examples once its rows have spent this many
            tokens (overrides ``evaluate(max_tokens=)``; docs/rate-limits.md). Not part of
            the config's identity: a run resumed with a larger budget continues its rows.
        max_cost: the same for the cost its rows report (overrides ``evaluate(max_cost=)``).

    Raises:
        ValueError: an empty name, ``rate_limit`` naming a key twice, or a budget that is
            not a positive number.
        TypeError: a non-callable ``setup``, non-string ``env`` entries, a non-int ``seed``,
            or a ``rate_limit`` that is not made of ``RateLimit`` objects.
    """

    name: str = "default"
    setup: Callable[[], Any] | None = None
    env: Mapping[str, str] = field(default_factory=SecretEnv)
    seed: int | None = None
    values: Mapping[str, Any] = field(default_factory=FrozenDict)
    rate_limit: RateLimit | tuple[RateLimit, ...] | None = None
    max_tokens: int | None = None
    max_cost: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"Config name must be a non-empty string, got {self.name!r}")
        if self.setup is not None and not callable(self.setup):
            raise TypeError(
                "Config.setup must be a callable taking no arguments, "
                f"got {type(self.setup).__name__}"
            )
        env = self.env or {}
        if not isinstance(env, Mapping):
            raise TypeError(f"Config.env must be a mapping of str to str, got {type(env).__name__}")
        for key, value in env.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(
                    f"Config.env entries must be str to str; {key!r} maps to a "
                    f"{type(value).__name__} (convert it with str())"
                )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise TypeError(f"Config.seed must be an int or None, got {type(self.seed).__name__}")
        values = self.values if self.values is not None else {}
        if not isinstance(values, Mapping):
            raise TypeError(f"Config.values must be a mapping, got {type(values).__name__}")
        object.__setattr__(self, "env", SecretEnv(env))
        object.__setattr__(self, "values", FrozenDict(values))
        object.__setattr__(self, "rate_limit", rate_limits(self.rate_limit) or None)
        _check_budget("Config.max_tokens", self.max_tokens)
        _check_budget("Config.max_cost", self.max_cost)

    @property
    def rate_limits(self) -> tuple[RateLimit, ...]:
        """``rate_limit`` as a tuple (empty when unset)."""
        limit = self.rate_limit
        return limit if isinstance(limit, tuple) else () if limit is None else (limit,)

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description with no secret in it: env names only, values hashed.

        ``setup`` is described by its module, name and code; the values its closure captured
        (or, for a callable object, its attributes) appear as names and hashes only. This is
        what the run store keeps, and what resuming compares (see :meth:`identity`).
        """
        return self._describe(describe_callable)

    def identity(self) -> str:
        """A stable hash of :meth:`describe`: equal for the same config in another process.

        ``rate_limit`` is left out: limits change how fast a config runs, not its results, so a
        run resumed with other limits continues the same rows.
        """
        return text_identity(self._describe(describe_callable, limits=False))

    def _identity_v1(self) -> str:
        """The identity procval 0.1.0 gave this config, or ``""`` when it equals :meth:`identity`.

        0.1.0 described a ``setup``'s captured values as they were; a store it wrote keeps
        that identity, which resuming accepts (and then replaces by :meth:`identity`).
        """
        old = text_identity(self._describe(describe_callable_v1, limits=False))
        return "" if old == self.identity() else old

    def _describe(
        self, describe_setup: Callable[[Any], Any], *, limits: bool = True
    ) -> dict[str, Any]:
        described = {
            "name": self.name,
            "env": {k: digest(v.encode())[:12] for k, v in sorted(self.env.items())},
            "seed": self.seed,
            "values": to_jsonable(dict(self.values)),
            "setup": describe_setup(self.setup),
        }
        if limits and self.rate_limits:  # only when set: other configs' identity stays
            described["rate_limit"] = [limit.describe() for limit in self.rate_limits]
        return described


def _check_budget(what: str, value: Any) -> None:
    """Refuse a budget (``max_tokens``, ``max_cost``) that is not None or a positive number.

    Raises:
        ValueError: ``value`` is a bool, not a number, zero, negative, NaN or infinite.
    """
    if value is None:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a positive number (or None for no budget), got {value!r}")
